"""launch/bench_runtime.py runs end to end (tiny sizes) and reports what it promises."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_runtime_quick(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench_runtime.py"), "--quick",
                           f"--out={out}", f"--trace_dir={tmp_path}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["n_devices"] == 8 and not d["virtual_islands"]
    for section in ("gang", "call"):
        for key in ("ratio_chained", "ratio_opbyop"):
            assert d[section][key]["median"] > 0
    assert d["gang"]["ratio_fused"]["median"] > 0
    assert d["virtual"]["events"] >= d["virtual"]["calls"] > 0 and d["virtual"]["events_per_s"] > 0
    assert d["utilization"]["sweep"] and all(0 < u <= 1 for r in d["utilization"]["sweep"]
                                              for u in r["utilization"])
    # the trace's own busy share: a real fraction per island and row (spans inside the window)
    assert all(len(r["trace_busy"]) == 2 and all(0 < b <= 1 + 1e-9 for b in r["trace_busy"])
               for r in d["utilization"]["sweep"])
    assert os.path.getsize(d["trace"]["png"]) > 0
    assert json.loads(open(d["trace"]["json"]).read())["traceEvents"]
    assert set(d["summary"]) >= {"gang_chained_ratio", "call_chained_ratio", "virtual_events_per_s",
                                 "smallest_op_ms_at_95pct", "smallest_op_ms_trace_busy_95pct"}
