"""launch/bench_diloco.py on CPU (8 fake devices): 1 and 2 islands through the outer-loop driver."""
import json
import os
import subprocess
import sys

from tests.data.small_corpus import make_small_corpus
from tests.train.helpers import REPO, SMALL, TINY


def test_bench_diloco_smoke(tmp_path):
  source = make_small_corpus(tmp_path / "src")
  out = tmp_path / "diloco.json"
  overrides = {**SMALL, "model.num_layers": 1, "data.batch_size": 2,
               "data.sources": f"('{source}',)", "data.cache_dir": str(tmp_path / "cache")}
  cmd = [sys.executable, os.path.join(REPO, "launch", "bench_diloco.py"), f"--config={TINY}",
         "--workers=1,2", "--inner_steps=2", "--outer_steps=2", "--warmup_outer=2",
         f"--out={out}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  d = json.loads(out.read_text())
  assert d["num_devices"] == 8 and d["inner_steps"] == 2 and d["outer_steps"] == 2
  for m in (1, 2):
    r = d["results"][str(m)]
    assert r["num_workers"] == m and len(set(r["devices"])) == m   # one island per device
    assert r["timed_tokens"] == 2 * m * 2 * 2 * SMALL["data.seq_len"]
    assert len(r["outer_step_s"]) == 2 and all(t > 0 for t in r["outer_step_s"])
    assert r["tokens_per_s"] == r["timed_tokens"] / r["window_s"] > 0
    assert sorted(r["phase_s"]) == [str(w) for w in range(m)]
    assert r["final_val_loss"] > 0 and r["final_train_loss"] > 0
  assert d["ratio_two_over_2x_one"] == (
      d["results"]["2"]["tokens_per_s"] / (2 * d["results"]["1"]["tokens_per_s"]))
