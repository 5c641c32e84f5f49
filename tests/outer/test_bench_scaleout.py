"""launch/bench_scaleout.py on 8 fake CPU devices: configs/scaleout.py:cpu shrunk to 2 islands
x (data 1, tensor 2), 8 inner steps; every run of the bench, in process (shared compiles)."""
import json
import os

import jax

from tests import launchers


def _module(rel, name):
  return launchers.load(rel, name)


def test_bench_scaleout_cpu_smoke(tmp_path):
  bench = _module("launch/bench_scaleout.py", "bench_scaleout")
  config = _module("configs/scaleout.py", "scaleout_config").get_config("cpu")
  assert (config.outer.num_workers, config.outer.island_tensor) == (4, 2)
  config.model.update(d_model=32, max_seq_len=32)
  config.data.update(seq_len=32, batch_size=2)
  config.train.update(steps=8, warmup_steps=1, eval_batches=1)
  config.outer.update(num_workers=2, inner_steps=4, num_fragments=1)
  partial = tmp_path / "partial.json"
  out = bench.bench(config, list(bench.RUNS), 1, str(tmp_path), jax.devices(), str(partial))
  res = out["results"]
  saved = json.loads(partial.read_text())   # written after each run: the last has them all
  assert saved["partial"] is True and set(saved["results"]) == set(bench.RUNS)
  assert set(res) == set(bench.RUNS)
  assert res["diloco"]["devices"] == res["ddp"]["devices"] == 4
  assert res["ddp"]["devices_per_island"] == 4 and res["one_island"]["devices"] == 2
  for name, r in res.items():
    assert r["tokens"] == (2 if name != "one_island" else 1) * 8 * 2 * 32
    assert r["tokens_per_s_per_device"] > 0 and 0 <= r["outer_overhead_share"] <= 1
    assert all(0 <= u <= 1 for u in r["utilization"].values())
    assert os.path.exists(r["trace_png"])
  for name in ("diloco", "streaming"):
    assert res[name]["ratio_per_device"] > 0 and res[name]["loss_vs_ddp"] > 0
    assert res[name]["bytes"] > 0 and res[name]["syncs"] > 0
