"""outer.inner_loop: a phase as one lax.scan call or as a chain of H single-step calls.

The two give the same DiLoCo run (params up to float reassociation, the same metrics
records, the very same simulated times); a chain may donate its state from call to call
through rt.call; and with a dispatch that blocks the controller (a CPU without async
dispatch stands in for a GPU scan), the phases of two islands still overlap in time.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pathways_lite.islands import make_islands
from pathways_lite.metrics import read_metrics
from pathways_lite.outer import run_with_state
from pathways_lite.outer.driver import check
from pathways_lite.outer.inner import resolve_inner_loop
from pathways_lite.outer.snapshot import resolve
from pathways_lite.runtime import Runtime

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("kw,match", [
    (dict(inner_loop="while"), r"outer\.inner_loop.*allowed values: \['auto', 'scan', 'steps'\]"),
    (dict(algorithm="streaming", inner_loop="steps"), r"outer\.inner_loop"),
])
def test_bad_inner_loop_names_the_field(make_config, kw, match):
  c = make_config(kw.pop("algorithm", "diloco"))
  for k, v in kw.items():
    c.outer[k] = v
  with pytest.raises(ValueError, match=match):
    check(c)


def test_auto_is_scan_and_steps_needs_the_local_runtime(devices):
  rt = Runtime(make_islands(1, devices=devices[:1]), clock="real")
  name = rt.islands[0].name
  try:
    assert resolve_inner_loop("auto", rt, name) == "scan"
    assert resolve_inner_loop("steps", rt, name) == "steps"
    assert resolve_inner_loop("scan", rt, name) == "scan"
    with pytest.raises(ValueError, match=r"outer\.inner_loop"):
      resolve_inner_loop("loop", rt, name)
    with pytest.raises(ValueError, match=r"runtime\.backend='local'"):
      resolve_inner_loop("steps", object(), name)
    assert resolve_inner_loop("auto", object(), name) == "scan"
  finally:
    rt.shutdown()


@pytest.mark.parametrize("clock", ["real", "virtual"])
def test_a_chain_of_calls_may_donate_its_state(devices, clock):
  """Each call donates the previous output's carry; its undonated tick lets the runtime finish it."""
  step = jax.jit(lambda prev, x: (prev[0] * 2.0 + x, prev[0].sum()), donate_argnums=0)
  rt = Runtime(make_islands(1, devices=devices[:1]), clock=clock)
  isl = rt.islands[0].name
  try:
    x = rt.transfer(np.ones(4, np.float32), island=isl)
    c = rt.transfer((np.zeros(4, np.float32), np.float32(0)), island=isl)
    futs = []
    for _ in range(6):
      c = rt.call(step, c, x, island=isl, cost=1)
      futs.append(c)
    carry, tick = c.result()
    np.testing.assert_array_equal(np.asarray(carry), np.full(4, 63.0))   # 2^6 - 1
    assert float(tick) == 4 * 31.0
    assert all(f.exception() is None for f in futs)
    spans = [s for s in rt.trace.spans if s.kind != "transfer"]
    assert len(spans) == 6 and all(s.status == "ok" for s in spans)
    ends = [s.t_end for s in sorted(spans, key=lambda s: s.t_start)]
    assert ends == sorted(ends)
  finally:
    rt.shutdown()


def _records(workdir):
  return [(r["step"], r.get("worker"), sorted(r["values"])) for r in read_metrics(workdir)]


def test_steps_equals_scan(make_config, tmp_path):
  """The same DiLoCo run in both modes: params, metrics records and simulated times."""
  runs = {}
  for loop in ("scan", "steps"):
    c = make_config("diloco", steps=6, inner_steps=3, inner_loop=loop, step_time_s=(0.3, 0.7),
                    link_latency_s=0.1)
    c.checkpoint.enabled = False
    c.train.eval_every = 3
    s, r = run_with_state(c, str(tmp_path / loop))
    assert s["inner_loop"] == loop
    runs[loop] = (s, r, read_metrics(str(tmp_path / loop)))
  (s_a, r_a, m_a), (s_b, r_b, m_b) = runs["scan"], runs["steps"]
  a, b = (jax.device_get(resolve(r.state["arrays"])) for r in (r_a, r_b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
  # The same records (step, worker, keys) in the same order; values equal up to reassociation,
  # simulated times exactly.
  assert _records(str(tmp_path / "scan")) == _records(str(tmp_path / "steps"))
  assert len(m_a) >= 9     # val at 0, 3, 6; per step: 2 workers + progress
  for ra, rb in zip(m_a, m_b):
    for k, v in ra["values"].items():
      if k == "sim/time_s":
        assert v == rb["values"][k]
      else:
        np.testing.assert_allclose(v, rb["values"][k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert s_a["sim_time_s"] == s_b["sim_time_s"] == pytest.approx(2 * (0.7 * 3 + 0.2))
  # Every future the two modes share finishes at the same simulated time (bitwise floats).
  def times(r):
    return sorted((s.island, s.name, s.t_start, s.t_end) for s in r.rt.trace.spans
                  if s.kind != "transfer" and not s.name.startswith("phase "))
  assert times(r_a) == times(r_b)
  ends = {}
  for loop, r in (("scan", r_a), ("steps", r_b)):
    ends[loop] = sorted((s.island, s.name.split()[1], s.t_end) for s in r.rt.trace.spans
                        if s.name.startswith("phase ") and s.kind != "transfer"
                        and (loop == "scan" or s.name.endswith("delta")))
  assert ends["scan"] == ends["steps"]
  steps_spans = [s for s in r_b.rt.trace.spans if " step " in s.name and s.name.startswith("phase")]
  assert len(steps_spans) == 2 * 2 * 3      # H spans per phase, readable names


_CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_enable_async_dispatch", False)   # every dispatch blocks (a GPU scan)
sys.path.insert(0, os.getcwd())
from tests.outer.conftest import tiny_config
from pathways_lite.outer import run_with_state
out = {}
for loop, n_outer in (("steps", 3), ("scan", 6)):
  c = tiny_config("diloco", steps=6 * n_outer, num_workers=2, inner_steps=6, inner_loop=loop,
                  clock="real", islands="devices")
  c.model.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, max_seq_len=64)
  c.data.update(seq_len=64, batch_size=8)
  s, r = run_with_state(c, None, devices=jax.devices()[:2])
  for sp in r.rt.trace.spans:
    if sp.island.startswith("worker") and sp.name.startswith("phase ") and sp.kind != "transfer":
      assert sp.status == "ok", sp
  iv = {}   # an island's busy interval per phase: its calls (not transfers)
  for w in r.workers:
    phases = r.rt.trace.intervals(w, lambda sp: sp.name.split()[1]
                                  if sp.name.startswith("phase ") else None)
    iv.update({f"{w} {t}": ab for t, ab in phases.items()})
  out[loop] = {"iv": iv, "inner_loop": s["inner_loop"]}
print("RESULT " + json.dumps(out))
"""


def _overlap(iv, t):
  (a0, b0), (a1, b1) = iv[f"worker0 {t}"], iv[f"worker1 {t}"]
  return max(0.0, min(b0, b1) - max(a0, a1)) / min(b0 - a0, b1 - a1)


def test_islands_overlap_when_dispatch_blocks():
  """Blocking dispatch: "steps" overlaps the islands' phases from outer step 1 on (its step
  calls move to the islands' dispatch threads within the first phase); "scan" from outer
  step 3 on (dispatch.py offloads a pair after 3 slow dispatches, counted on the fast and
  the general path alike). Before, "scan" never overlapped: its phase took a host array,
  so every call took the general path, which was not timed."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.run([sys.executable, "-c", _CHILD], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert out["steps"]["inner_loop"] == "steps" and out["scan"]["inner_loop"] == "scan"
  for loop, ts in (("steps", (1, 2)), ("scan", (3, 4, 5))):
    for t in ts:
      assert _overlap(out[loop]["iv"], t) > 0.5, (loop, t, out[loop]["iv"])


def test_bench_diloco_reports_the_inner_loop(make_config, devices):
  """launch/bench_diloco.py's measurement with --inner_loop=steps, in process (2 islands)."""
  from tests import launchers
  bench = launchers.load("launch/bench_diloco.py")
  r = bench.bench_workers(make_config("diloco"), 2, 2, 2, 1, devices, "steps")
  assert r["inner_loop"] == "steps" and len(r["phase_overlap_w0_w1"]) == 2
  assert sorted(r["inner_step_ms"]) == ["0", "1"] and all(v > 0 for v in r["phase_s"].values())
  assert r["tokens_per_s"] > 0
