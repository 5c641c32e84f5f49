"""launch/bench_train.py: the sweep's skip rules, runtime vs plain, the command line end to end."""
import json
import os
import subprocess
import sys
import time

import pytest

from pathways_lite import configuration
from tests import launchers
from tests.train.helpers import REPO, SMALL, TINY


@pytest.fixture(scope="module")
def bench():
  """The launcher as a module (its absl flags unregistered: see tests/launchers.py)."""
  return launchers.load("launch/bench_train.py")


def _tiny():
  c = configuration.load_config_file(TINY)
  for key, value in SMALL.items():
    section, field = key.split(".")
    c[section][field] = value
  return c, configuration.validate(c)


def test_sweep_skips_larger_batches_after_oom_and_failed_impls(bench):
  config, model_cfg = _tiny()
  calls = []

  def fake_trial(config, cfg, B, L, steps, warmup):
    calls.append((cfg.attention_impl, cfg.remat, B))
    if cfg.attention_impl == "pallas":
      raise NotImplementedError("no kernel here")
    if cfg.remat == "none" and B >= 4:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.")
    return {"tokens_per_s": float(B * (2 if cfg.remat == "none" else 1)
                                  * (3 if cfg.attention_impl == "xla" else 1))}

  out = bench.sweep(config, model_cfg, ["xla", "pallas"], ["none", "full"], [8, 2, 4], 1, 1, 0.0,
                    trial=fake_trial)
  # batch sizes ascending; pallas tried once; remat none stops at its first OOM (B=4)
  assert calls == [("xla", "none", 2), ("pallas", "none", 2), ("xla", "none", 4),
                   ("xla", "full", 2), ("xla", "full", 4), ("xla", "full", 8)]
  errors = {(t["impl"], t["remat"], t["batch_size"]): t for t in out["trials"] if "error" in t}
  assert errors[("xla", "none", 4)]["oom"] and not errors[("pallas", "none", 2)]["oom"]
  assert "NotImplementedError: no kernel here" == errors[("pallas", "none", 2)]["error"]
  reasons = {(s["impl"], s["remat"], s["batch_size"]): s["reason"] for s in out["skipped"]}
  assert reasons[("xla", "none", 8)] == "batch 4 ran out of memory"
  assert reasons[("pallas", "full", 8)].startswith("pallas failed: NotImplementedError")
  assert len(out["trials"]) + len(out["skipped"]) == 2 * 2 * 3
  best = out["best"]["xla"]
  assert (best["remat"], best["batch_size"], best["tokens_per_s"]) == ("full", 8, 24.0)
  assert "pallas" not in out["best"] and out["ratio_cudnn_over_xla"] is None


def test_sweep_time_budget_stops_and_lists_the_rest(bench):
  config, model_cfg = _tiny()

  def slow_trial(config, cfg, B, L, steps, warmup):
    time.sleep(0.2)
    return {"tokens_per_s": 1.0}

  out = bench.sweep(config, model_cfg, ["xla"], ["none", "dots"], [1, 2, 4], 1, 1, 0.3,
                    trial=slow_trial)
  assert 1 <= len(out["trials"]) <= 2   # the second fits only if the first took < 0.1 s more
  assert len(out["trials"]) + len(out["skipped"]) == 6
  assert all(s["reason"] == "time budget --max_seconds=0.3" for s in out["skipped"])


def test_compare_runtime_trains_the_same_steps(bench):
  config, model_cfg = _tiny()
  out = bench.compare_runtime(config, model_cfg, 2, config.data.seq_len, steps=3, warmup=1,
                              trials=2)
  assert len(out["tokens_per_s"]["plain"]) == len(out["tokens_per_s"]["runtime"]) == 2
  # same seed, batches and step count on both paths: the same loss (one trial apart in time)
  assert out["loss"]["runtime"] == pytest.approx(out["loss"]["plain"], rel=1e-5)
  assert out["ratio_runtime_over_plain"] > 0 and out["runtime_donates_state"] is True


def test_cli_sweep_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, os.path.join(REPO, "launch", "bench_train.py"), f"--config={TINY}",
         "--impls=xla,cudnn", "--batch_sizes=2,4", "--remats=none", "--steps=2", "--warmup=1",
         f"--out={out}"] + [f"--config.{k}={v}" for k, v in SMALL.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  d = json.loads(out.read_text())
  assert d["config"] == "tiny" and d["seq_len"] == SMALL["data.seq_len"]
  points = [(t["impl"], t["batch_size"]) for t in d["trials"]]
  assert points == [("xla", 2), ("cudnn", 2), ("xla", 4)]
  assert "needs an NVIDIA GPU" in d["trials"][1]["error"]      # reported, not raised
  assert d["skipped"] == [{"impl": "cudnn", "remat": "none", "batch_size": 4,
                           "reason": "cudnn failed: " + d["trials"][1]["error"]}]
  assert d["best"]["xla"]["tokens_per_s"] > 0 and d["flops_per_token"] > 0
