"""Exact equivalences between the outer loops, run end to end on the runtime (virtual clock)."""
import jax
import numpy as np
import pytest

from pathways_lite import configuration
from pathways_lite import data as data_lib
from pathways_lite import train as train_lib
from pathways_lite.outer import inner as inner_lib
from pathways_lite.outer import OuterConfig, run_with_state
from pathways_lite.outer.eager import consensus
from pathways_lite.outer.snapshot import resolve
from pathways_lite.outer.streaming import global_params


def _global(r):
  a = r.state["arrays"]
  if "theta" in a:
    return consensus(a["theta"])
  g = a["global"]
  if "state" in g:
    return jax.device_get(resolve(g["state"]).params)
  return jax.device_get(resolve(g["params"]))


def _assert_trees(a, b, exact=False, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_diloco_one_worker_outer_sgd_lr1_is_the_inner_optimizer(make_config):
  """M=1, outer SGD lr 1: theta <- theta - (theta - local) = local, so DiLoCo = plain AdamW."""
  c = make_config("diloco", steps=6, num_workers=1, inner_steps=3, optimizer="sgd", lr=1.0)
  _, r = run_with_state(c, None)
  inner = r.inner
  step = jax.jit(train_lib.make_train_step(r.model_cfg, inner.optimizer, inner.schedule))
  state = inner.init_state(c.seed)
  it = data_lib.load_data(c.data, seed=c.seed, num_workers=1).train_iterator(0)
  for _ in range(6):
    state, _ = step(state, next(it))
  _assert_trees(_global(r), jax.device_get(state.params))
  # ... and the pseudo-gradient sign: the worker's params are where the global params went.
  worker = resolve(r.state["arrays"]["workers"][0])
  _assert_trees(_global(r), jax.device_get(worker.params))


def test_local_sgd_h1_with_sgd_inner_is_ddp(make_config):
  kw = dict(steps=3, inner_steps=1, inner_optimizer="sgd", weighting="uniform")
  _, r_local = run_with_state(make_config("local_sgd", **kw), None)
  _, r_ddp = run_with_state(make_config("ddp", **kw), None)
  _assert_trees(_global(r_local), _global(r_ddp))


@pytest.mark.parametrize("mode", ["eager", "delayed"])
def test_overlap_zero_delay_is_diloco(make_config, mode):
  """With d=0 the 'delayed' term is the fresh one: eager and delayed both equal DiLoCo."""
  kw = dict(steps=4, inner_steps=2, weighting="uniform")
  _, r_sync = run_with_state(make_config("diloco", **kw), None)
  _, r_eager = run_with_state(
      make_config("eager", eager_mode=mode, overlap_outer_steps=0, **kw), None)
  _assert_trees(_global(r_eager), _global(r_sync), exact=True)


def test_delayed_keeps_worker_copies_identical_and_eager_differs(make_config):
  kw = dict(steps=4, inner_steps=2, overlap_outer_steps=1)
  _, r = run_with_state(make_config("eager", eager_mode="delayed", **kw), None)
  thetas = [jax.device_get(t.result()) for t in r.state["arrays"]["theta"]]
  _assert_trees(thetas[0], thetas[1], exact=True)
  _, r = run_with_state(make_config("eager", eager_mode="eager", **kw), None)
  thetas = [jax.device_get(t.result()) for t in r.state["arrays"]["theta"]]
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(thetas[0]),
                                                        jax.tree.leaves(thetas[1])))


def test_dn_n1_c0_is_naive_async_nesterov(make_config):
  kw = dict(steps=4, inner_steps=2, step_time_s=(1.0, 1.5), optimizer="nesterov", lr=0.7,
            momentum=0.9)
  s_dn, r_dn = run_with_state(
      make_config("async_local_sgd", async_outer="dn", dn_buffer=1, dn_c=0.0, **kw), None)
  s_nv, r_nv = run_with_state(make_config("async_local_sgd", async_outer="naive", **kw), None)
  assert s_dn["arrivals"] == s_nv["arrivals"] > 2
  _assert_trees(_global(r_dn), _global(r_nv), exact=True)


def test_virtual_clock_async_is_bitwise_reproducible(make_config):
  c = make_config("async_local_sgd", steps=6, num_workers=3, inner_steps=3,
                  step_time_s=(0.58, 1.51, 3.33), dylu=True, grace_period_s=0.5,
                  shard_sampling="least_progress")
  s1, r1 = run_with_state(c, None)
  s2, r2 = run_with_state(c, None)
  assert s1["steps_per_phase"] == [3, 1, 1]
  assert s1["sim_time_s"] == s2["sim_time_s"] and s1["arrivals"] == s2["arrivals"]
  assert r1.shard_progress == r2.shard_progress
  _assert_trees(_global(r1), _global(r2), exact=True)
  ev1 = [e["loss"] for e in r1.evals]
  assert ev1 == [e["loss"] for e in r2.evals]


def test_same_seed_same_start_params(make_config):
  """Every worker's start is init_state(seed): two independent builds give the same bits."""
  c = make_config("diloco")
  ocfg = OuterConfig.from_config(c.outer)
  model_cfg = configuration.model_config(c)
  builds = [inner_lib.Inner(model_cfg, *inner_lib.make_inner_optimizer(c.train, ocfg),
                            c.data.seq_len) for _ in range(2)]   # fresh, uncached
  a, b = (x.init_state(c.seed).params for x in builds)
  _assert_trees(a, b, exact=True)
  other = builds[0].init_state(c.seed + 1).params
  assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(other)[0])


def test_streaming_runs_with_overlap_merge_and_4bit_wire(make_config):
  c = make_config("streaming", steps=6, inner_steps=3, num_fragments=2, overlap_tau=1,
                  merge_alpha=0.5, wire_dtype="int4")
  s, r = run_with_state(c, None)
  assert s["num_fragments_total"] == 3 and s["syncs"] == 3 * 2
  f32 = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(r.inner.init_state(c.seed).params))
  assert sum(s["sync_bytes"]) < f32 / 6           # 4-bit payload + block scales
  assert np.isfinite(s["final_val_loss"])
  p = global_params(r.inner.init_state(c.seed).params, *_frag_state(r))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(p))


def _frag_state(r):
  from pathways_lite.outer import fragments
  ids = fragments.fragment_ids(r.inner.init_state(r.seed).params, r.ocfg.num_fragments,
                               r.ocfg.fragment_pattern)
  return ids, r.state["arrays"]["global"]["fragments"]
