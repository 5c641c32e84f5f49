"""Islands of several devices (outer.island_data x outer.island_tensor): the outer loops run
their inner computations data + tensor parallel on each island's mesh and give the result of
the same run on one-device islands.

Tolerance: the sharded runs compute the same f32 math; only the order of the sums differs
(the loss/gradient sums over a batch split over "data", the sums over heads and the MLP width
split over "tensor", the all-reduces of XLA / the TPU-interpreted Pallas rings). AdamW divides
by sqrt(nu) + eps, which amplifies a reassociation of ~1e-7 relative in an early small gradient,
so params after a few steps agree to ~1e-5 relative; 1e-4 relative / 1e-5 absolute bounds it
with margin while catching any real difference (a wrong shard, a missing all-reduce: O(1e-2))."""
import jax
import numpy as np
import pytest

from pathways_lite.outer import run_with_state
from pathways_lite.outer.snapshot import resolve
from pathways_lite.outer.streaming import global_params

RTOL, ATOL = 1e-4, 1e-5


def _global(r):
  a = r.state["arrays"]
  g = a["global"]
  if "state" in g:
    return jax.device_get(resolve(g["state"]).params)
  if "fragments" in g:
    return jax.device_get(global_params(r.inner.init_state(r.seed).params, r._ids, g["fragments"]))
  return jax.device_get(resolve(g["params"]))


def _close(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def _run(make_config, algorithm, data=1, tensor=1, tp="gspmd", **kw):
  c = make_config(algorithm, islands="devices", island_data=data, island_tensor=tensor, **kw)
  c.model.tp_collectives = tp
  if data > 1:
    c.data.batch_size = max(c.data.batch_size, data)
  return run_with_state(c, None)


def _islands_of(r):
  return [(len(r.rt.island(w).devices), dict(r.rt.island(w).mesh.shape)) for w in r.workers]


@pytest.mark.parametrize("data,tensor,tp,loop", [
    (1, 2, "xla", "scan"),      # tensor parallel with the project's collectives over "tensor"
    (2, 1, "gspmd", "steps"),   # data parallel inside the island, the chained inner loop
])
def test_diloco_on_two_device_islands_equals_one_device(make_config, data, tensor, tp, loop):
  kw = dict(steps=4, inner_steps=2, inner_loop=loop)
  s1, r1 = _run(make_config, "diloco", tp="gspmd", **kw)
  s2, r2 = _run(make_config, "diloco", data, tensor, tp, **kw)
  assert _islands_of(r2) == [(2, {"data": data, "fsdp": 1, "tensor": tensor})] * 2
  assert r2.rt.island("server").devices == r2.rt.island("worker0").devices
  assert not set(r2.rt.island("worker0").devices) & set(r2.rt.island("worker1").devices)
  params = resolve(r2.state["arrays"]["global"]["params"])
  if tensor > 1:   # really sharded, and still sharded after the transfers and the outer update
    q = params["blocks_0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec[1] == "tensor" and len(q.sharding.device_set) == 2
  _close(_global(r2), _global(r1))
  assert abs(s2["final_val_loss"] - s1["final_val_loss"]) <= 1e-4 * abs(s1["final_val_loss"])
  assert s2["bytes"] == s1["bytes"]


@pytest.mark.parametrize("algorithm,kw", [
    ("streaming", dict(steps=4, inner_steps=2, num_fragments=1)),
    ("ddp", dict(steps=2)),
])
def test_streaming_and_ddp_on_2x2_device_islands(make_config, algorithm, kw):
  """2 workers on islands of data=2 x tensor=2 (8 devices), tp_collectives="xla"."""
  s1, r1 = _run(make_config, algorithm, **kw)
  s2, r2 = _run(make_config, algorithm, 2, 2, "xla", **kw)
  assert _islands_of(r2) == [(4, {"data": 2, "fsdp": 1, "tensor": 2})] * 2
  if algorithm == "streaming":
    from pathways_lite.outer import fragments
    init = r1.inner.init_state(r1.seed).params
    r1._ids = r2._ids = fragments.fragment_ids(init, 1, "strided")
  _close(_global(r2), _global(r1))
  assert abs(s2["final_val_loss"] - s1["final_val_loss"]) <= 1e-4 * abs(s1["final_val_loss"])


@pytest.mark.parametrize("outer,match", [
    (dict(island_data=0), r"outer\.island_data' must be an int >= 1"),
    (dict(island_tensor=-1), r"outer\.island_tensor' must be an int >= 1"),
    (dict(island_tensor=2), r"outer\.island_tensor'=2 needs outer\.islands='devices'"),
    (dict(algorithm="eager", islands="devices", island_data=2),
     r"outer\.island_data'=2 \(islands of several devices\) is supported by outer\.algorithm"),
    (dict(islands="devices", island_data=2, island_tensor=4),
     r"outer\.island_data': outer\.num_workers=2 islands x .* need 16 devices, only 8"),
    (dict(islands="devices", island_data=4), r"outer\.island_data'=4 must divide data\.batch_size=2"),
])
def test_bad_island_mesh_fields_raise_naming_the_field(make_config, outer, match):
  with pytest.raises(ValueError, match=match):
    run_with_state(make_config(outer.pop("algorithm", "diloco"), steps=2, inner_steps=2, **outer),
                   None)


def test_tp_collectives_need_tensor_to_divide_heads(make_config):
  c = make_config("diloco", steps=2, inner_steps=2, islands="devices", island_tensor=4)
  c.model.tp_collectives = "xla"
  with pytest.raises(ValueError, match=r"outer\.island_tensor'=4 must divide model\.num_heads=2"):
    run_with_state(c, None)
