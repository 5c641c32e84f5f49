"""launch/gpu_figures.sh: names checked before any work, one measurement's JSON and trace
written where it says, a failing measurement counted in the exit status and the next run."""
import json
import os
import subprocess
import sys

from tests.launchers import REPO

SCRIPT = os.path.join(REPO, "launch", "gpu_figures.sh")


def _run(*args, **env):
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHON": sys.executable, **env})


def test_unknown_name_fails_before_any_measurement(tmp_path):
  out = tmp_path / "out"
  proc = _run(str(out), "runtime", "no_such_figure")
  assert proc.returncode == 2
  assert "unknown measurement 'no_such_figure'" in proc.stderr and "diloco_steps" in proc.stderr
  assert not out.exists()          # nothing ran, not even the valid name before it


def test_runtime_smoke_writes_json_and_trace_and_counts_failures(tmp_path):
  out = tmp_path / "out"
  # --quick for the runtime bench; checkpoint does not know --quick: it fails, runtime still runs
  proc = _run(str(out), "checkpoint", "runtime", FIGURE_ARGS="--quick",
              XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "== checkpoint: exit" in proc.stdout and "== runtime: exit 0" in proc.stdout
  result = json.loads((out / "runtime.json").read_text())
  assert result["summary"]["call_chained_us"] > 0 and result["n_devices"] == 8
  assert (out / "runtime_trace" / "trace.png").stat().st_size > 0
  assert "quick" in (out / "checkpoint.log").read_text()
