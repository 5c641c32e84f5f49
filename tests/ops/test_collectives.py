"""ops.collectives on CPU: the Pallas TPU ring kernels in the TPU interpreter
(remote DMAs and semaphores simulated across fake devices) against lax."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.experimental.pallas import tpu as pltpu

from ops import collectives as coll
from ops.collectives import api
from ops.collectives import pallas_gpu
from ops.collectives import reference

F32, BF16 = jnp.float32, jnp.bfloat16


def _mesh(n):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("x",))


def _run(n, fn, args, in_specs, out_specs=P("x")):
  mesh = _mesh(n)
  args = [jax.device_put(a, NamedSharding(mesh, s))
          for a, s in zip(args, in_specs)]
  f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs),
                            out_specs=out_specs, check_vma=False))
  return f(*args)


def _tol(dtype, terms):
  """Absolute tolerance relative to max|ref|: output rounding plus f32 sums."""
  eps = float(jnp.finfo(dtype).eps)
  return 2 * eps + 1e-6 * np.sqrt(terms)


def _close(got, want, dtype, terms):
  got = np.asarray(jnp.asarray(got, F32))
  want = np.asarray(jnp.asarray(want, F32))
  assert got.shape == want.shape
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want))) / scale
  assert err <= _tol(dtype, terms), (err, _tol(dtype, terms))


def _rand(key, shape, dtype):
  return jax.random.normal(jax.random.key(key), shape, F32).astype(dtype)


# -------------------------------------------------------------- ring kernels

RING_CASES = [
    # (op, n, direction, dtype, per-device shape)
    ("all_reduce", 2, "both", F32, (6, 5)),
    ("all_reduce", 4, "right", F32, (3, 7)),
    ("all_reduce", 4, "left", BF16, (4, 33)),
    ("all_reduce", 4, "both", BF16, (1030,)),
    ("reduce_scatter", 2, "left", F32, (4, 3)),
    ("reduce_scatter", 4, "both", F32, (8, 5)),
    ("reduce_scatter", 4, "right", BF16, (12, 9)),
    ("all_gather", 2, "right", BF16, (3, 5)),
    ("all_gather", 4, "both", F32, (5, 3)),
    ("all_gather", 4, "left", F32, (2, 130)),
]


def _reference_f32(op, x, axis):
  if op == "all_reduce":
    return reference.all_reduce_f32(x, axis)
  if op == "reduce_scatter":
    return reference.reduce_scatter_f32(x, axis)
  return reference.all_gather(x, axis)


@pytest.mark.parametrize("op,n,direction,dtype,shape", RING_CASES)
def test_ring_kernel_matches_lax(op, n, direction, dtype, shape):
  x = _rand(n, (n * shape[0], *shape[1:]), dtype)
  fn = getattr(coll, op)
  got = _run(n, lambda v: fn(v, "x", implementation="pallas",
                             direction=direction), [x], [P("x")])
  want = _run(n, lambda v: _reference_f32(op, v, "x"), [x], [P("x")])
  _close(got, want, dtype, n)
  if op == "all_gather":  # a copy: exact
    np.testing.assert_array_equal(np.asarray(got, F32), np.asarray(want, F32))


def test_all_reduce_eight_devices_bf16_chunked():
  n = 8
  x = _rand(8, (n * 16, 40), BF16)
  got = _run(n, lambda v: coll.all_reduce(v, "x", implementation="pallas",
                                          num_chunks=3), [x], [P("x")])
  want = _run(n, lambda v: reference.all_reduce_f32(v, "x"), [x], [P("x")])
  _close(got, want, BF16, n)


def test_all_reduce_over_one_axis_of_a_2d_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2),
                           ("data", "model"))
  spec = P("data", "model")
  x = jax.device_put(_rand(4, (8, 4 * 5), F32), NamedSharding(mesh, spec))
  for axis in ("model", "data"):
    got, want = (jax.jit(jax.shard_map(
        fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))(x)
        for fn in (lambda v: coll.all_reduce(v, axis, implementation="pallas"),
                   lambda v: lax.psum(v, axis)))
    _close(got, want, F32, 2)


def test_reduce_scatter_race_free_and_split_into_pieces():
  """detect_races in the interpreter; a tiny piece budget forces 2+ kernels."""
  from ops.collectives import pallas_tpu
  n = 4
  params = pltpu.InterpretParams(detect_races=True)
  x = _rand(3, (n * 4, 1100), F32)
  got = _run(n, lambda v: pallas_tpu.reduce_scatter(
      v, "x", interpret=params, max_piece_bytes=160_000), [x], [P("x")])
  want = _run(n, lambda v: lax.psum_scatter(v, "x", tiled=True), [x], [P("x")])
  _close(got, want, F32, n)
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  races = getattr(ipc, "races", None)
  assert races is None or not races.races_found


# ---------------------------------------------------------- collective matmul

MATMUL_CASES = [
    # (n, direction, dtype, m, k, f)
    (2, "both", F32, 6, 16, 8),
    (4, "left", F32, 5, 8, 16),
    (4, "both", BF16, 8, 32, 16),
    (8, "right", F32, 2, 8, 8),
]


@pytest.mark.parametrize("n,direction,dtype,m,k,f", MATMUL_CASES)
def test_all_gather_matmul_matches_lax(n, direction, dtype, m, k, f):
  x, w = _rand(1, (n * m, k), dtype), _rand(2, (k, f), dtype)
  got = _run(n, lambda a, b: coll.all_gather_matmul(
      a, b, "x", implementation="pallas", direction=direction),
      [x, w], [P("x"), P()], P())
  want = jnp.dot(x.astype(F32), w.astype(F32))
  _close(got, want, dtype, k)


@pytest.mark.parametrize("n,direction,dtype,m,k,f", MATMUL_CASES[:3])
def test_matmul_reduce_scatter_matches_lax(n, direction, dtype, m, k, f):
  x, w = _rand(3, (n * m, n * k), dtype), _rand(4, (n * k, f), dtype)
  got = _run(n, lambda a, b: coll.matmul_reduce_scatter(
      a, b, "x", implementation="pallas", direction=direction),
      [x, w], [P(None, "x"), P("x")], P("x"))
  # Device j holds columns j of x and rows j of w: the sum over j is x @ w.
  want = jnp.dot(x.astype(F32), w.astype(F32))
  _close(got, want, dtype, n * k)


# ---------------------------------------------------------------- gradients


def _grad_of(fn, n, args, in_specs, out_spec):
  def loss(*a):
    y = jax.shard_map(fn, mesh=_mesh(n), in_specs=tuple(in_specs),
                      out_specs=out_spec, check_vma=False)(*a)
    return jnp.sum(jnp.sin(y.astype(F32)))
  mesh = _mesh(n)
  args = [jax.device_put(a, NamedSharding(mesh, s))
          for a, s in zip(args, in_specs)]
  return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather"])
def test_ring_gradients_match_xla(op):
  n = 2
  x = _rand(5, (n * 4, 3), F32)
  fn = getattr(coll, op)
  got = _grad_of(lambda v: fn(v, "x", implementation="pallas"), n, [x],
                 [P("x")], P("x"))
  want = _grad_of(lambda v: fn(v, "x", implementation="xla"), n, [x],
                  [P("x")], P("x"))
  _close(got[0], want[0], F32, n)


def test_collective_matmul_gradients_match_xla():
  n = 2
  x, w = _rand(6, (n * 4, 8), F32), _rand(7, (8, 6), F32)
  for op, specs, out in [("all_gather_matmul", [P("x"), P()], P()),
                         ("matmul_reduce_scatter", [P(), P()], P("x"))]:
    fn = getattr(coll, op)
    got = _grad_of(lambda a, b: fn(a, b, "x", implementation="pallas"), n,
                   [x, w], specs, out)
    want = _grad_of(lambda a, b: fn(a, b, "x", implementation="xla"), n,
                    [x, w], specs, out)
    for g, r in zip(got, want):
      _close(g, r, F32, 8 * n)


# ------------------------------------------------------ choice and bad input


def test_unknown_implementation_names_the_allowed_ones():
  with pytest.raises(ValueError, match="'pallas', 'xla'"):
    _run(2, lambda v: coll.all_reduce(v, "x", implementation="nccl"),
         [jnp.ones((4, 2))], [P("x")])


def test_default_on_cpu_is_xla_and_equals_psum():
  x = _rand(9, (8, 3), F32)
  fn = lambda v: coll.all_reduce(v, "x")
  jaxpr = jax.make_jaxpr(jax.shard_map(fn, mesh=_mesh(2), in_specs=P("x"),
                                       out_specs=P("x"), check_vma=False))(x)
  assert "pallas_call" not in str(jaxpr)
  np.testing.assert_array_equal(
      _run(2, fn, [x], [P("x")]),
      _run(2, lambda v: lax.psum(v, "x"), [x], [P("x")]))


def test_bad_inputs_raise_clear_errors():
  x = jnp.ones((6, 2), F32)
  with pytest.raises(ValueError, match="not an axis"):
    _run(2, lambda v: coll.all_reduce(v, "y"), [x], [P("x")])
  with pytest.raises(ValueError, match="divisible by the size 2"):
    _run(2, lambda v: coll.reduce_scatter(v[:1], "x"), [x], [P("x")])
  with pytest.raises(NotImplementedError, match="dtype int32"):
    _run(2, lambda v: coll.all_reduce(v.astype(jnp.int32), "x",
                                      implementation="pallas"), [x], [P("x")])
  with pytest.raises(NotImplementedError, match="check_vma=False"):
    jax.shard_map(lambda v: coll.all_reduce(v, "x", implementation="pallas"),
                  mesh=_mesh(2), in_specs=P("x"), out_specs=P("x"))(
                      jax.device_put(x, NamedSharding(_mesh(2), P("x"))))
  with pytest.raises(ValueError, match="direction="):
    _run(2, lambda v: coll.all_gather(v, "x", direction="up"), [x], [P("x")])
  with pytest.raises(ValueError, match="expects x"):
    _run(2, lambda v: coll.all_gather_matmul(v, v, "x"), [x], [P("x")])
  # Unsupported dtype with the default implementation: falls back to XLA.
  got = _run(2, lambda v: coll.all_reduce(v.astype(jnp.int32), "x"), [x],
             [P("x")])
  np.testing.assert_array_equal(got, 2 * np.ones((6, 2), np.int32))


def test_gpu_kernels_report_unavailable_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU fallback")
  ok, why = pallas_gpu.is_available()
  assert not ok and "cpu" in why
  plan = api._plan("all_gather_matmul", None, jnp.ones((4, 4)), jnp.ones((4, 4)),
                   "x", "both", 1, None)
  assert plan.backend == "xla"


# ---------------------------------------------------------------- bucketing


def _mlp_loss(params, batch):
  h = batch
  for name in sorted(params):
    h = jnp.tanh(h @ params[name]["w"] + params[name]["b"])
  return jnp.mean(h ** 2)


def _mlp_params():
  keys = jax.random.split(jax.random.key(0), 3)
  dims = [(6, 8), (8, 8), (8, 4)]
  return {f"layer{i}": {"w": jax.random.normal(k, d) * 0.5,
                        "b": jnp.full((d[1],), 0.1 * i)}
          for i, (k, d) in enumerate(zip(keys, dims))}


@pytest.mark.parametrize("implementation,bucket_bytes,mean",
                         [("xla", 200, False), ("pallas", 600, True)])
def test_sync_grads_equals_psum_of_grads(implementation, bucket_bytes, mean):
  n = 4
  params = _mlp_params()
  batch = _rand(11, (n * 3, 6), F32)

  def synced_loss(p, b):
    p = coll.sync_grads(p, "x", bucket_bytes=bucket_bytes,
                        implementation=implementation, mean=mean)
    return _mlp_loss(p, b)

  def bucketed(p, b):
    return jax.grad(synced_loss)(p, b)

  def plain(p, b):
    g = jax.grad(_mlp_loss)(p, b)
    g = jax.tree.map(lambda v: lax.psum(v, "x"), g)
    return jax.tree.map(lambda v: v / n, g) if mean else g

  got = _run(n, bucketed, [params, batch], [P(), P("x")], P())
  want = _run(n, plain, [params, batch], [P(), P("x")], P())
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(g, r, F32, n)


def test_plan_buckets_by_bytes_and_dtype():
  leaves = [jnp.ones(10, F32), jnp.ones(10, F32), jnp.ones(10, BF16),
            jnp.ones(100, F32), jnp.ones(5, F32)]
  # Reverse order; a new bucket at each dtype change or when 80 bytes fill.
  assert coll.plan_buckets(leaves, 80) == [[4], [3], [2], [1, 0]]
  assert coll.plan_buckets(leaves, None) == [[4, 3], [2], [1, 0]]


def test_all_reduce_tree_matches_psum():
  n = 2
  tree = {"a": _rand(1, (n * 2, 3), F32), "b": _rand(2, (n * 5,), BF16)}
  got = _run(n, lambda t: coll.all_reduce_tree(t, "x", bucket_bytes=16),
             [tree], [P("x")], P("x"))
  want = _run(n, lambda t: jax.tree.map(lambda v: lax.psum(v, "x"), t),
              [tree], [P("x")], P("x"))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(g, r, g.dtype, n)
