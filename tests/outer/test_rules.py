"""The pure outer update rules: signs, weights, optimizers, merge, eager, DN, DyLU, fragments."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pathways_lite.outer import fragments, rules


def _tree(x):
  return {"a": jnp.asarray(x, jnp.float32), "b": {"c": jnp.asarray(x, jnp.float32) * 2}}


def test_pseudo_gradient_sign_is_global_minus_local():
  g, l = _tree([1.0, 2.0]), _tree([0.5, 3.0])
  d = rules.pseudo_gradient(g, l)
  np.testing.assert_array_equal(d["a"], [0.5, -1.0])
  # An outer SGD step with lr 1 on delta lands exactly on the worker's params.
  opt = rules.make_outer_optimizer("sgd", 1.0)
  new, _ = rules.outer_step(opt, g, opt.init(g), d)
  np.testing.assert_array_equal(new["a"], l["a"])
  # A small positive lr moves theta toward the worker, not away.
  opt = rules.make_outer_optimizer("sgd", 0.5)
  new, _ = rules.outer_step(opt, g, opt.init(g), d)
  np.testing.assert_allclose(new["a"], [0.75, 2.5])


def test_shard_size_weighting():
  w = rules.worker_weights([1, 3], 2, "shard_size")
  assert w == [0.25, 0.75]
  assert rules.worker_weights([1, 3], 2, "uniform") == [0.5, 0.5]
  g = _tree([0.0])
  avg = rules.average_pseudo_gradient(g, [_tree([-4.0]), _tree([-8.0])], w)
  np.testing.assert_allclose(avg["a"], [0.25 * 4 + 0.75 * 8])
  with pytest.raises(ValueError, match="outer.weighting"):
    rules.worker_weights([1, 1], 2, "bogus")


def test_outer_optimizers_match_the_textbook_rules():
  p = {"w": jnp.array([1.0])}
  d = {"w": jnp.array([0.1])}
  # Nesterov lr 0.7 mom 0.9: m1 = d, step = d + 0.9 m1; m2 = d + 0.9 m1, step = d + 0.9 m2.
  opt = rules.make_outer_optimizer("nesterov", 0.7, momentum=0.9)
  s = opt.init(p)
  p1, s = rules.outer_step(opt, p, s, d)
  np.testing.assert_allclose(p1["w"], 1.0 - 0.7 * (0.1 + 0.9 * 0.1), rtol=1e-6)
  p2, s = rules.outer_step(opt, p1, s, d)
  m2 = 0.1 + 0.9 * 0.1
  np.testing.assert_allclose(p2["w"], p1["w"] - 0.7 * (0.1 + 0.9 * m2), rtol=1e-6)
  # Heavy-ball SGD momentum: step = m.
  opt = rules.make_outer_optimizer("sgdm", 1.0, momentum=0.5)
  s = opt.init(p)
  p1, s = rules.outer_step(opt, p, s, d)
  p2, s = rules.outer_step(opt, p1, s, d)
  np.testing.assert_allclose(p2["w"], 1.0 - 0.1 - (0.1 + 0.05), rtol=1e-6)
  # Adam's first step is lr * sign-ish: d / (|d| + eps).
  opt = rules.make_outer_optimizer("adam", 0.1, b1=0.9, b2=0.99, eps=1e-3)
  p1, _ = rules.outer_step(opt, p, opt.init(p), d)
  np.testing.assert_allclose(p1["w"], 1.0 - 0.1 * 0.1 / (0.1 + 1e-3), rtol=1e-5)


@pytest.mark.parametrize("kw,field", [
    (dict(name="lion", lr=1.0), "outer.optimizer"),
    (dict(name="sgd", lr=0.0), "outer.lr"),
    (dict(name="nesterov", lr=0.7, momentum=1.5), "outer.momentum"),
    (dict(name="adam", lr=0.1, eps=0.0), "outer.eps"),
])
def test_bad_outer_optimizer_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field):
    rules.make_outer_optimizer(**kw)


def test_nonfinite_detected_with_reason():
  t = _tree([1.0, 2.0])
  assert bool(rules.tree_is_finite(t)) and rules.nonfinite_reason(t) is None
  t["b"]["c"] = t["b"]["c"].at[0].set(jnp.nan)
  assert not bool(rules.tree_is_finite(t))
  reason = rules.nonfinite_reason(t)
  assert "'c'" in reason and "1 NaN" in reason


def test_merge():
  l, g = _tree([1.0]), _tree([3.0])
  np.testing.assert_array_equal(rules.merge(l, g, 0.0)["a"], [3.0])
  np.testing.assert_array_equal(rules.merge(l, g, 1.0)["a"], [1.0])
  np.testing.assert_allclose(rules.merge(l, g, 0.25)["a"], [0.25 * 1 + 0.75 * 3])
  with pytest.raises(ValueError, match="merge_alpha"):
    rules.merge(l, g, 1.5)


def test_quantized_sum_accumulates_in_f32():
  # 1 + 2^-10 is exact in f32 but not in bf16: each term is rounded on the wire, the sum is not.
  x = {"v": jnp.array([1.0 + 2.0 ** -10], jnp.float32)}
  q = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  s = rules.quantized_weighted_sum([x] * 4, [1.0] * 4, q)
  assert s["v"].dtype == jnp.float32
  np.testing.assert_array_equal(s["v"], [4.0])  # bf16 rounds 1+2^-10 to 1
  s = rules.quantized_weighted_sum([{"v": jnp.array([2.0 ** -9], jnp.float32)}] * 3, [1.0] * 3, q)
  np.testing.assert_array_equal(s["v"], [3 * 2.0 ** -9])


def test_eager_with_fresh_others_equals_sync_average_bitwise():
  rng = np.random.default_rng(0)
  deltas = [_tree(rng.normal(size=5)) for _ in range(3)]
  w = rules.worker_weights([2, 3, 5], 3, "shard_size")
  sync = rules.weighted_sum(deltas, w)
  for m in range(3):
    e = rules.eager_gradient(deltas[m], deltas, m, w)
    jax.tree.map(np.testing.assert_array_equal, e, sync)
  # Delayed others: own fresh term + others' old terms.
  old = [_tree(rng.normal(size=5)) for _ in range(3)]
  e = rules.eager_gradient(deltas[1], old, 1, w)
  np.testing.assert_allclose(e["a"], w[0] * old[0]["a"] + w[1] * deltas[1]["a"] + w[2] * old[2]["a"],
                             rtol=1e-6)
  # Nothing arrived yet (first outer step): the others count as zero.
  e = rules.eager_gradient(deltas[0], [None] * 3, 0, w)
  np.testing.assert_allclose(e["a"], w[0] * deltas[0]["a"], rtol=1e-6)


def test_dn_with_n1_c0_is_nesterov_bitwise():
  rng = np.random.default_rng(1)
  p = _tree(rng.normal(size=4))
  opt = rules.make_outer_optimizer("nesterov", 0.7, momentum=0.9)
  ps, s = p, opt.init(p)
  pd, dn, count = p, rules.dn_init(p), 0
  step_opt = jax.jit(lambda p, s, d: rules.outer_step(opt, p, s, d))
  step_dn = jax.jit(lambda p, dn, d: rules.dn_update(p, dn, d, 0, 0.7, 0.9, 1, 0.0)[:2])
  for _ in range(5):
    d = _tree(rng.normal(size=4))
    ps, s = step_opt(ps, s, d)
    pd, dn = step_dn(pd, dn, d)
    count += 1
  jax.tree.map(np.testing.assert_array_equal, pd, ps)


@pytest.mark.parametrize("c", [0.0, 0.125, 0.25])
def test_dn_over_n_arrivals_takes_one_nesterov_step_on_the_average(c):
  """After N arrivals DN's params equal one Nesterov step on the buffered mean, for any c."""
  N, lr, beta = 4, 0.5, 0.9
  rng = np.random.default_rng(2)
  p = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
  dn, count = rules.dn_init(p), 0
  # Warm the momentum with a first block so c matters.
  blocks = [[{"w": jnp.asarray(rng.normal(size=3), jnp.float32)} for _ in range(N)] for _ in range(2)]
  pd = p
  for d in blocks[0]:
    pd, dn, count = rules.dn_update(pd, dn, d, count, lr, beta, N, c)
  m1 = np.mean([b["w"] for b in blocks[0]], axis=0)
  np.testing.assert_allclose(dn["momentum"]["w"], m1, rtol=1e-5)
  start = np.asarray(pd["w"])
  for d in blocks[1]:
    pd, dn, count = rules.dn_update(pd, dn, d, count, lr, beta, N, c)
  g = np.mean([b["w"] for b in blocks[1]], axis=0)
  m2 = beta * m1 + g
  # c*beta*m1 applied on N-1 arrivals, (1-cN+c)*beta*m2 on the last.
  expect = start - lr * (g + (N - 1) * c * beta * m1 + (1 - c * N + c) * beta * m2)
  np.testing.assert_allclose(pd["w"], expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dn["buffer"]["w"], 0.0)
  with pytest.raises(ValueError, match="dn_c"):
    rules.dn_update(pd, dn, blocks[0][0], count, lr, beta, N, 0.5)


def test_dylu_steps():
  assert rules.dylu_steps([1.0, 2.0, 4.0, 1.0], 100) == [100, 50, 25, 100]
  assert rules.dylu_steps([0.58, 0.75, 1.51, 3.33], 30) == [30, 23, 11, 5]
  assert rules.dylu_steps([1.0, 1000.0], 10) == [10, 1]


def test_shard_sampling_favours_less_progress():
  rng = np.random.default_rng(0)
  picks = [rules.sample_shard([10, 0, 10, 10], rng) for _ in range(400)]
  counts = np.bincount(picks, minlength=4)
  assert counts[1] > 3 * counts[0]


def _params(num_layers=4):
  p = {"embed": {"embedding": jnp.zeros((3, 2))}, "final_norm": {"scale": jnp.zeros(2)}}
  for i in range(num_layers):
    p[f"blocks_{i}"] = {"mlp": {"down": {"kernel": jnp.full((2, 2), float(i))}}}
  return p


def test_fragments_strided_and_sequential():
  assert fragments.layer_groups(4, 2, "strided") == [[0, 2], [1, 3]]
  assert fragments.layer_groups(4, 2, "sequential") == [[0, 1], [2, 3]]
  p = _params()
  ids = fragments.fragment_ids(p, 2, "strided")
  assert ids["embed"]["embedding"] == 0 and ids["final_norm"]["scale"] == 0
  assert [ids[f"blocks_{i}"]["mlp"]["down"]["kernel"] for i in range(4)] == [1, 2, 1, 2]
  part = fragments.split(p, ids, 2)
  assert len(part) == 2
  new = fragments.join(p, ids, 2, {k: v + 10 for k, v in part.items()})
  assert float(new["blocks_1"]["mlp"]["down"]["kernel"][0, 0]) == 11.0
  assert float(new["blocks_0"]["mlp"]["down"]["kernel"][0, 0]) == 0.0
  with pytest.raises(ValueError, match="fragment_pattern"):
    fragments.layer_groups(4, 2, "random")
  with pytest.raises(ValueError, match="num_fragments"):
    fragments.layer_groups(2, 3, "strided")


def test_fragment_schedule_staggers_syncs():
  offs = fragments.sync_offsets(3, 12)
  assert offs == [4, 8, 0]
  due = {t: fragments.due_fragments(t, offs, 12) for t in range(1, 25)}
  assert due[4] == [0] and due[8] == [1] and due[12] == [2] and due[24] == [2]
  assert sum(len(v) for v in due.values()) == 6  # each fragment twice in 2H steps, one at a time
  with pytest.raises(ValueError, match="inner_steps"):
    fragments.sync_offsets(5, 4)
