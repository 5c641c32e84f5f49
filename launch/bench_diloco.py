"""DiLoCo throughput through the outer-loop driver: 1 island vs 2 islands, in one run.

  # two GPUs (one island each), the 125M model at seq 2048, H=100: ~3-4 minutes on 2 H200s
  # (6 outer steps of 100 x 16 x 2048 tokens per worker count, plus compiles)
  python launch/bench_diloco.py --config=configs/lm_125m.py --config.data.seq_len=2048 \
      --config.model.max_seq_len=2048 --workers=1,2 --inner_steps=100 --outer_steps=3 \
      --out=runs/bench_diloco.json
  # the same with each phase as one lax.scan call (--inner_loop=scan) or as a chain of H
  # single-step calls (--inner_loop=steps); auto (the default): scan
  # CPU smoke test (8 fake devices, tiny model, H=2)
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python launch/bench_diloco.py --config=configs/tiny.py --inner_steps=2 --outer_steps=2

For each worker count M in --workers, runs config with outer.algorithm
"diloco", M workers on islands of one device each (outer.islands "devices":
worker w on device w, the outer optimizer on worker 0's device), the real
clock, no simulated link delays, no checkpoints, evaluation only at the start
and the end, for --warmup_outer + --outer_steps outer steps of
--inner_steps inner steps each, through `pathways_lite.outer.run_with_state`:
the product path. Throughput is read from the runtime's trace (wall-clock
spans): tokens of the timed outer steps (M * H * batch * seq_len each) over
the time from the end of the last warm-up outer update (its compiles done) to
the end of the last one. Four warm-up outer steps by default: the outer
update compiles again at outer step 1 (its inputs at step 0 come from the
initial transfers, with other shardings than the update's own outputs), and
the runtime moves a call whose dispatch blocks (on GPU, the inner phase's
scan) to its island's dispatch thread only after 3 such dispatches it timed
(pathways_lite/dispatch.py); the first call of a (fn, island) takes the
runtime's untimed general path, so with --inner_loop=scan outer steps 0-3 may
run the islands in turn, hence the default --warmup_outer=4. --inner_loop=steps
(outer.inner_loop, pathways_lite/outer/inner.py) dispatches each phase as H
single-step calls that return at once on GPU, so the islands overlap from
outer step 1 on. Also reported: the inner loop each run used, each worker's
mean inner-phase time (from its first to its last call of the phase, as the
trace's spans say; transfers excluded) and per inner step, and the share of an
outer step spent outside the phases (the sync: transfers of params and
pseudo-gradients, the outer update, dispatch gaps).

ratio = tokens/s(M=2) / (2 * tokens/s(M=1)): 1.0 = two islands scale
perfectly (goal >= 0.97 at H=100).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pathways_lite.outer.bench_setup import diloco_config, phase_intervals  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True)
_WORKERS = flags.DEFINE_string("workers", "1,2", "Comma-separated worker (island) counts.")
_INNER = flags.DEFINE_integer("inner_steps", 100, "H: inner steps per outer step.")
_OUTER = flags.DEFINE_integer("outer_steps", 3, "Timed outer steps per worker count.")
_WARMUP = flags.DEFINE_integer("warmup_outer", 4, "Untimed outer steps first (>= 1: compiles).")
_LOOP = flags.DEFINE_enum("inner_loop", "auto", ["auto", "scan", "steps"],
                          "outer.inner_loop: a phase as one lax.scan call or a chain of H step "
                          "calls; auto: scan.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
flags.mark_flags_as_required(["config"])


def bench_workers(config, M: int, H: int, outer_steps: int, warmup: int, devices,
                  inner_loop: str = "auto") -> dict:
  from pathways_lite import configuration
  from pathways_lite.outer import run_with_state
  from pathways_lite.outer.topology import SERVER, worker_name

  n_outer = warmup + outer_steps
  c = diloco_config(config, M, H, n_outer, inner_loop)
  configuration.validate(c)
  summary, run = run_with_state(c, None, devices=devices[:M])
  spans = list(run.rt.trace.spans)
  ends = {int(s.name.split()[-1]): s.t_end for s in spans
          if s.island == SERVER and s.name.startswith("outer step ")}
  missing = [t for t in range(n_outer) if t not in ends]
  if missing or any(s.status != "ok" for s in spans):
    bad = [(s.name, s.island, s.status) for s in spans if s.status != "ok"][:5]
    raise RuntimeError(f"M={M}: outer steps {missing} missing from the trace; failed spans: {bad}")
  window = ends[n_outer - 1] - ends[warmup - 1]
  tokens = outer_steps * M * H * c.data.batch_size * c.data.seq_len
  outer_s = [ends[t] - ends[t - 1] for t in range(warmup, n_outer)]
  phase_s, overlap = {}, []
  ivs = [phase_intervals(run.rt.trace, worker_name(w)) for w in range(M)]
  for w in range(M):
    phase_s[w] = statistics.mean(b - a for t, (a, b) in ivs[w].items() if t >= warmup)
  if M > 1:   # how much of the shorter phase of workers 0 and 1 ran at the same time
    for t in range(warmup, n_outer):
      (a0, b0), (a1, b1) = ivs[0][t], ivs[1][t]
      overlap.append(max(0.0, min(b0, b1) - max(a0, a1)) / max(min(b0 - a0, b1 - a1), 1e-12))
  mean_outer = statistics.mean(outer_s)
  return {"num_workers": M, "inner_loop": summary["inner_loop"],
          "tokens_per_s": tokens / window, "timed_tokens": tokens,
          "window_s": window, "outer_step_s": outer_s,
          "phase_s": {str(w): v for w, v in phase_s.items()},
          "inner_step_ms": {str(w): 1e3 * v / H for w, v in phase_s.items()},
          "phase_overlap_w0_w1": overlap,
          "sync_share": 1.0 - max(phase_s.values()) / mean_outer,
          "devices": [str(d) for d in devices[:M]],
          "final_train_loss": summary["final_train_loss"],
          "final_val_loss": summary["final_val_loss"],
          "driver_wall_s": summary["wall_time_s"],
          "driver_tokens_per_s_incl_compile": summary["tokens_per_s"]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax
  from models import utils as model_utils
  from pathways_lite import configuration
  from pathways_lite.metrics import emit_json, write_partial

  config = _CONFIG.value
  model_cfg = configuration.validate(config)
  try:
    workers = [int(s) for s in _WORKERS.value.split(",") if s.strip()]
  except ValueError:
    raise app.UsageError(f"--workers must be comma-separated ints, got {_WORKERS.value!r}")
  if not workers or min(workers) < 1:
    raise app.UsageError(f"--workers must be ints >= 1, got {_WORKERS.value!r}")
  if _INNER.value < 1 or _OUTER.value < 1 or _WARMUP.value < 1:
    raise app.UsageError("--inner_steps, --outer_steps and --warmup_outer must be >= 1")
  devices = jax.devices()
  if max(workers) > len(devices):
    raise app.UsageError(f"--workers={_WORKERS.value} needs {max(workers)} devices (one island "
                         f"each); jax sees {len(devices)}")
  out = {"device_kind": devices[0].device_kind, "platform": devices[0].platform,
         "num_devices": len(devices), "jax_version": jax.__version__, "config": config.name,
         "model": model_cfg.to_dict(),
         "param_count_matmul": model_utils.matmul_param_count(model_cfg),
         "batch_size": config.data.batch_size, "seq_len": config.data.seq_len,
         "inner_steps": _INNER.value, "outer_steps": _OUTER.value,
         "warmup_outer": _WARMUP.value, "inner_loop_flag": _LOOP.value, "results": {}}
  results = out["results"]
  for M in workers:
    results[str(M)] = r = bench_workers(config, M, _INNER.value, _OUTER.value, _WARMUP.value,
                                        devices, _LOOP.value)
    out["inner_loop"] = r["inner_loop"]   # what --inner_loop resolved to here
    r["mfu_per_device"] = model_utils.mfu(r["tokens_per_s"] / M, model_cfg,
                                          config.data.seq_len, devices[0])
    print(f"M={M} ({r['inner_loop']}): {r['tokens_per_s']:,.0f} tokens/s, outer step "
          f"{statistics.mean(r['outer_step_s']):.3f} s, sync share {r['sync_share']:.3f}", flush=True)
    write_partial(out, _OUT.value)   # a run killed from outside keeps the worker counts it did
  if "1" in results and "2" in results:
    out["ratio_two_over_2x_one"] = results["2"]["tokens_per_s"] / (2 * results["1"]["tokens_per_s"])
  emit_json(out, _OUT.value)


if __name__ == "__main__":
  app.run(main)
