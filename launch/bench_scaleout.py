"""Scale-out bench (issue 10): DiLoCo and streaming DiLoCo across islands of several devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python launch/bench_scaleout.py --config=configs/scaleout.py:cpu --workdir=runs/scaleout_cpu
  (GPU shapes and expected results: configs/scaleout.py's docstring.)

From the config (outer.num_workers = M islands of outer.island_data x outer.island_tensor = k
devices, outer.link_bandwidth_gbps between islands, the real clock) it runs, through the outer
driver (`pathways_lite.outer.run_with_state`):
  one_island  DiLoCo with one island of the same shape: the same per-island work, no peers;
  diloco      DiLoCo over the M islands;
  streaming   streaming DiLoCo (outer.num_fragments) over the M islands;
  ddp         synchronous data parallel over all M*k devices as one island (data x M), batch
              M*B, the same steps: the same token budget, no simulated link (one host).
Per run, from the runtime's trace (wall-clock spans): each worker island's compute intervals
(diloco: a phase; streaming: the steps between fragment syncs; ddp: a gradient step) with the
inner steps each covers; the first --warmup_outer*H steps (compiles, dispatch-mode changes) are
excluded: a worker's window runs from the end of its last warm-up interval to the end of its
last interval. tokens/s = sum over workers of (timed steps x B x L) / window; per device: over
M*k devices. ratio_per_device = that / the one-island run's (1.0: perfect scale-out).
utilization: each island's busy share of [min window start, max window end]. outer overhead:
per worker, window - time computing inside it (waiting for syncs: transfers over the link,
the outer update, dispatch gaps), as a share of the window and in seconds per sync.
loss_vs_ddp = final val loss / ddp's (same tokens). Prints one JSON (emit_json); with
--workdir each run writes its outputs there (trace.json, trace.png, metrics, plots).
"""
import copy
import itertools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


RUNS = ("one_island", "diloco", "streaming", "ddp")
# compute span names -> the inner step they end at (intervals())
_PHASE = re.compile(r"phase (\d+)")
_STEPS = re.compile(r"steps ->(\d+)")


def variant(config, name: str):
  c = copy.deepcopy(config)
  o = c.outer
  M = o.num_workers
  if name == "one_island":
    c.outer.update(algorithm="diloco", num_workers=1, outer_island=0)
  elif name in ("diloco", "streaming"):
    c.outer.algorithm = name
  elif name == "ddp":   # one island of every device, the global batch, no link
    c.outer.update(algorithm="ddp", num_workers=1, island_data=M * o.island_data,
                   link_bandwidth_gbps=0.0, link_latency_s=0.0, outer_island=0)
    c.data.batch_size = M * c.data.batch_size
  else:
    raise ValueError(f"unknown run {name!r}; allowed: {list(RUNS)}")
  c.name = f"{config.name}_{name}"
  return c


def intervals(trace, island: str, algorithm: str, H: int):
  """[(end inner step, t_start, t_end)] of `island`'s compute, in order."""
  if algorithm == "ddp":   # the n-th gradient step ends inner step n
    n = itertools.count(1)

    def key(s):
      return next(n) if s.name == "grads" else None
  else:
    def key(s):
      m = (_PHASE if algorithm == "diloco" else _STEPS).match(s.name)
      if not m:
        return None
      return (int(m.group(1)) + 1) * H if algorithm == "diloco" else int(m.group(1))
  return [(k, a, b) for k, (a, b) in trace.intervals(island, key).items()]


def measure(run, summary, algorithm: str, warmup_steps: int) -> dict:
  c, trace = run.config, run.rt.trace
  spans = list(trace.spans)
  bad = [(s.name, s.island, s.status) for s in spans if s.status != "ok"][:5]
  if bad:
    raise RuntimeError(f"{c.name}: failed spans {bad}")
  M, k = run.M, run.ocfg.island_devices
  tokens_per_step = c.data.batch_size * c.data.seq_len
  per_worker, starts, ends, overhead, syncs = {}, [], [], [], summary.get("syncs") or 0
  tps = 0.0
  for w, isl in enumerate(run.workers):
    iv = intervals(trace, isl, algorithm, run.H)
    done = [e for e in iv if e[0] <= warmup_steps]
    timed = [e for e in iv if e[0] > warmup_steps]
    if not done or not timed:
      raise RuntimeError(f"{c.name}: worker {w} has no timed compute after {warmup_steps} "
                         "warm-up steps (raise train.steps or lower --warmup_outer)")
    t0, t1 = done[-1][2], timed[-1][2]
    steps = timed[-1][0] - done[-1][0]
    busy = trace.busy(isl, t0, t1)
    rate = steps * tokens_per_step / (t1 - t0)
    tps += rate
    starts.append(t0)
    ends.append(t1)
    overhead.append((t1 - t0 - busy, t1 - t0))
    per_worker[str(w)] = {"tokens_per_s": rate, "window_s": t1 - t0, "timed_steps": steps,
                          "busy_s": busy}
  w0, w1 = min(starts), max(ends)
  n_sync = syncs * (run.total_steps - warmup_steps) / run.total_steps if syncs else None
  idle = sum(o for o, _ in overhead) / M
  return {"num_workers": M, "devices_per_island": k, "devices": M * k,
          "tokens_per_s": tps, "tokens_per_s_per_device": tps / (M * k),
          "per_worker": per_worker,
          "utilization": {isl: trace.utilization(isl, w0, w1) for isl in run.workers + ["server"]},
          "outer_overhead_share": sum(o / t for o, t in overhead) / M,
          "outer_overhead_s_per_sync": idle / n_sync if n_sync else None,
          "final_val_loss": summary["final_val_loss"], "tokens": summary["tokens"],
          "bytes": summary["bytes"], "syncs": syncs, "wall_time_s": summary["wall_time_s"]}


def bench(config, runs, warmup_outer: int, workdir, devices, out_path=None) -> dict:
  """Every run of `runs` (RUNS) from `config`; the result dict that main prints.

  With `out_path`, the result so far is written there after each run (`"partial": true`),
  so a run killed at a device call's time limit keeps the runs it finished."""
  import jax
  from pathways_lite import configuration
  from pathways_lite.metrics import write_partial
  from pathways_lite.outer import run_with_state

  o = config.outer
  warmup_steps = warmup_outer * o.inner_steps
  out = {"device_kind": devices[0].device_kind, "platform": devices[0].platform,
         "num_devices": len(devices), "jax_version": jax.__version__, "config": config.name,
         "islands": o.num_workers, "island_mesh": {"data": o.island_data, "tensor": o.island_tensor},
         "tp_collectives": config.model.tp_collectives, "link_gbps": o.link_bandwidth_gbps,
         "inner_steps": o.inner_steps, "steps": config.train.steps,
         "batch_per_island": config.data.batch_size, "seq_len": config.data.seq_len,
         "warmup_steps": warmup_steps, "results": {}}
  res = out["results"]
  for name in runs:
    c = variant(config, name)
    configuration.validate(c)
    wd = os.path.join(workdir, name) if workdir else None
    summary, run = run_with_state(c, wd, devices=devices)
    res[name] = r = measure(run, summary, c.outer.algorithm, warmup_steps)
    if wd:
      r["trace_png"] = os.path.join(wd, "trace.png")
    print(f"{name}: {r['tokens_per_s_per_device']:,.0f} tokens/s/device, overhead "
          f"{r['outer_overhead_share']:.3f}, val loss {r['final_val_loss']:.4f}", flush=True)
    write_partial(out, out_path)
  one = res.get("one_island")
  for name in ("diloco", "streaming", "ddp"):
    if name in res and one:
      res[name]["ratio_per_device"] = (res[name]["tokens_per_s_per_device"]
                                       / one["tokens_per_s_per_device"])
    if name in res and "ddp" in res:
      res[name]["loss_vs_ddp"] = res[name]["final_val_loss"] / res["ddp"]["final_val_loss"]
  return out


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/scaleout.py:<cpu|x4|x8>.", lock_config=True)
_RUNS = flags.DEFINE_list("runs", list(RUNS), "Runs to do, of " + ", ".join(RUNS) + ".")
_WARMUP = flags.DEFINE_integer("warmup_outer", 1,
                               "Leading outer steps (x H inner steps) not timed.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Each run's outputs (trace.png ...) in a subfolder.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax
  from pathways_lite import configuration
  from pathways_lite.metrics import emit_json

  config = _CONFIG.value
  configuration.validate(config)
  if _WARMUP.value < 1 or _WARMUP.value * config.outer.inner_steps >= config.train.steps:
    raise app.UsageError(f"--warmup_outer={_WARMUP.value} must be >= 1 and leave timed steps "
                         f"(train.steps={config.train.steps}, H={config.outer.inner_steps})")
  for name in _RUNS.value:
    if name not in RUNS:
      raise app.UsageError(f"--runs: unknown run {name!r}; allowed: {list(RUNS)}")
  out = bench(config, _RUNS.value, _WARMUP.value, _WORKDIR.value, jax.devices(), _OUT.value)
  emit_json(out, _OUT.value)


if __name__ == "__main__":
  app.run(main)
