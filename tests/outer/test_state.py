"""The run state (arrays + JSON meta), non-finite rejection, and real-clock runs on device islands."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from pathways_lite.outer import rules, run_with_state
from pathways_lite.outer.diloco import make_outer_update
from pathways_lite.outer.eager import make_exchange


def test_state_dict_is_arrays_plus_json_meta(make_config):
  c = make_config("async_local_sgd", steps=4, inner_steps=2, step_time_s=(1.0, 2.0))
  _, r = run_with_state(c, None)
  st = r.state_dict()
  json.dumps(st["meta"])                      # JSON-able as is
  assert st["meta"]["algorithm"] == "async_local_sgd"
  assert len(st["meta"]["data"]) == 2 and st["meta"]["runtime"]["clock"]["kind"] == "virtual"
  leaves = jax.tree.leaves(st["arrays"])
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)
  dn = st["arrays"]["global"]["opt_state"]
  assert set(dn) == {"momentum", "buffer"}    # DN buffers are part of the state


def test_nonfinite_pseudo_gradient_is_never_applied():
  opt = rules.make_outer_optimizer("sgd", 1.0)
  update = make_outer_update(opt)
  p = {"w": jnp.array([1.0, 1.0])}
  good = {"w": jnp.array([0.5, 0.5])}
  bad = {"w": jnp.array([jnp.nan, 0.0])}
  weights = np.array([0.5, 0.5], np.float32)
  new, _, info = update(p, opt.init(p), [good, bad], weights, np.array([True, True]))
  assert list(np.asarray(info["finite"])) == [True, False]
  np.testing.assert_array_equal(new["w"], [0.5, 0.5])      # only the finite one, reweighted to 1
  new, s, info = update(p, opt.init(p), [bad, bad], weights, np.array([True, True]))
  assert not bool(info["applied"])
  np.testing.assert_array_equal(new["w"], p["w"])          # nothing finite: nothing moves
  # The eager exchange zeroes it for the others too.
  outs, finite = make_exchange(2, True)([good, bad], weights)
  np.testing.assert_array_equal(outs[0]["w"], [0.0, 0.0])
  np.testing.assert_array_equal(outs[1]["w"], [0.25, 0.25])


def test_real_clock_on_device_islands(make_config):
  c = make_config("diloco", steps=4, inner_steps=2, clock="real", islands="devices")
  s, r = run_with_state(c, None)
  devs = {i.name: i.devices for i in r.rt.islands}
  assert devs["worker0"] != devs["worker1"] and devs["server"] == devs["worker0"]
  assert np.isfinite(s["final_val_loss"]) and s["sim_time_s"] > 0
