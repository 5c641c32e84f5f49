"""ops.collectives Mosaic GPU kernels on 2+ Hopper GPUs (skipped elsewhere).

    export NCCL_NVLS_ENABLE=0
    JAX_PLATFORMS=cuda python3 -m pytest tests/ops/test_collectives_gpu.py -q
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ops import collectives as coll
from ops.collectives import pallas_gpu
from ops.collectives import reference

_OK, _WHY = pallas_gpu.is_available()
pytestmark = [
    pytest.mark.skipif(not _OK, reason=f"needs Hopper GPUs: {_WHY}"),
    pytest.mark.skipif(_OK and len(jax.devices()) < 2, reason="needs 2+ GPUs"),
]
os.environ["NCCL_NVLS_ENABLE"] = "0"


def _run(fn, args, in_specs, out_specs):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  args = [jax.device_put(a, NamedSharding(mesh, s))
          for a, s in zip(args, in_specs)]
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs),
                               out_specs=out_specs, check_vma=False))(*args)


def _err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


@pytest.mark.parametrize("op,dtype,shape,direction", [
    ("all_reduce", jnp.bfloat16, (1000, 37), "both"),
    ("all_reduce", jnp.float32, (4096, 3), "right"),
    ("reduce_scatter", jnp.bfloat16, (2 * 999, 5), "both"),
    ("all_gather", jnp.float32, (777, 3), "left"),
])
def test_ring_kernels_match_lax(op, dtype, shape, direction):
  x = jax.random.normal(jax.random.key(0), (2 * shape[0], *shape[1:])).astype(dtype)
  got = _run(lambda v: getattr(coll, op)(v, "x", implementation="pallas",
                                         direction=direction), [x], [P("x")], P("x"))
  ref = {"all_reduce": reference.all_reduce_f32,
         "reduce_scatter": reference.reduce_scatter_f32,
         "all_gather": reference.all_gather}[op]
  want = _run(lambda v: ref(v, "x"), [x], [P("x")], P("x"))
  assert _err(got, want) <= 2 * float(jnp.finfo(dtype).eps)


def test_all_gather_matmul_matches_lax():
  m = k = f = 512
  x = jax.random.normal(jax.random.key(1), (2 * m, k), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (k, 2 * f), jnp.bfloat16)
  got = _run(lambda a, b: coll.all_gather_matmul(a, b, "x", implementation="pallas"),
             [x, w], [P("x"), P(None, "x")], P(None, "x"))
  want = _run(lambda a, b: lax.all_gather(a, "x", tiled=True) @ b,
              [x, w], [P("x"), P(None, "x")], P(None, "x"))
  assert _err(got, want) <= 1e-2
