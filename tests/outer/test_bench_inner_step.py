"""launch/bench_inner_step.py: the inner step timed along each path, with the peer in the run."""
import math


def test_paths_agree_and_report_ratios(make_config, tmp_path):
  from tests import launchers
  bench = launchers.load("launch/bench_inner_step.py")
  out_file = tmp_path / "inner.json"
  r = bench.measure(make_config("diloco"), 2, driver=True, out_path=str(out_file),
                    profile_dir=str(tmp_path / "prof"))
  # the runtime's chain computes exactly what plain jax computes
  assert r["runtime_equals_direct"] is True and r["runtime_vs_direct_max_rel_diff"] == 0.0
  assert set(r["ms_per_step"]) == {"direct", "runtime", "run_islands", "driver"}
  assert all(v > 0 and math.isfinite(v) for v in r["ms_per_step"].values())
  assert r["ratio"]["direct"] == 1.0
  assert math.isclose(r["ratio"]["runtime"], r["ms_per_step"]["runtime"] / r["ms_per_step"]["direct"])
  assert len(r["driver_phase_ms_per_step"]) == 3          # 3 outer steps of the driver
  assert r["ms_per_step"]["driver"] == min(r["driver_phase_ms_per_step"][1:])
  assert out_file.read_text().strip().startswith("{")
  # the driver run was traced by jax.profiler: a Perfetto trace to open
  assert list((tmp_path / "prof").glob("plugins/profile/*/perfetto_trace.json.gz"))
