"""`run(config, workdir)`: the entry of every outer algorithm (train.py routes here).

Checks `config.outer` (OuterConfig) before anything is built or compiled,
builds the run (islands, runtime, data, compiled pieces), runs the chosen
algorithm's loop, and writes into workdir: metrics.jsonl (+ TensorBoard; per
worker train/loss, global val/loss, sim/time_s, comm/bytes, train/tokens),
loss_vs_step.png and loss_vs_time.png (pathways_lite.plots), outer.png (val
loss vs step, tokens, simulated time; bytes sent), trace.json (Perfetto) and
trace.png (Gantt), summary.json / summary.txt. Returns the summary dict.
"""
from __future__ import annotations

import importlib
import json
import logging
import os

from pathways_lite import checkpoint, plots
from pathways_lite.outer.common import Preempted, Run
from pathways_lite.outer.config import OuterConfig

log = logging.getLogger(__name__)

# algorithm -> module with train(run) -> summary
MODULES = {"ddp": "ddp", "local_sgd": "diloco", "diloco": "diloco", "streaming": "streaming",
           "eager": "eager", "async_local_sgd": "async_local_sgd"}
# algorithms whose loop resumes from a checkpoint (Run.resume): all of them
RESUMABLE = tuple(MODULES)
MAX_TRACE_SPANS = 4000  # the PNG of a longer trace is unreadable (and slow): JSON only


def check(config) -> OuterConfig:
  """Validates config.outer against the rest of the config; raises ValueError naming the field."""
  ocfg = OuterConfig.from_config(config.outer)
  if ocfg.algorithm == "single":
    raise ValueError("config field 'outer.algorithm'='single' is the single-island loop "
                     "(pathways_lite.train), not an outer loop; allowed here: "
                     f"{sorted(MODULES)}")
  if ocfg.drop_prob > 0 and ocfg.algorithm not in ("diloco", "local_sgd"):
    raise ValueError(f"config field 'outer.drop_prob'={ocfg.drop_prob} is supported by "
                     f"outer.algorithm in ['diloco', 'local_sgd'], not {ocfg.algorithm!r}")
  if ocfg.worker_schedule and ocfg.algorithm not in ("diloco", "local_sgd"):
    raise ValueError(f"config field 'outer.worker_schedule' is supported by outer.algorithm in "
                     f"['diloco', 'local_sgd'], not {ocfg.algorithm!r}")
  if ocfg.algorithm == "streaming":
    L = config.model.num_layers
    if ocfg.num_fragments > L:
      raise ValueError(f"config field 'outer.num_fragments'={ocfg.num_fragments} must be <= "
                       f"model.num_layers={L}")
  ev = config.train.eval_every
  if ocfg.algorithm != "ddp" and ev and ev % ocfg.inner_steps and ocfg.algorithm != "async_local_sgd":
    log.info("train.eval_every=%d is not a multiple of outer.inner_steps=%d: evaluations fall "
             "on the next outer step", ev, ocfg.inner_steps)
  return ocfg


def run(config, workdir: str | None, devices=None) -> dict:
  """Runs config.outer.algorithm; returns the summary dict (also in workdir/summary.json)."""
  return run_with_state(config, workdir, devices)[0]


def run_with_state(config, workdir: str | None, devices=None) -> tuple[dict, Run]:
  """Like `run`, also returning the finished Run (its `.state`: final arrays + meta)."""
  ocfg = check(config)
  module = importlib.import_module(f"pathways_lite.outer.{MODULES[ocfg.algorithm]}")
  ckpt = None
  if workdir and config.checkpoint.enabled:
    ckpt = checkpoint.for_run(config, workdir)
  r = Run(config, workdir, devices=devices, checkpointer=ckpt)
  try:
    try:
      summary = module.train(r)
    except Preempted as p:
      ckpt.close()
      ckpt = None
      print(f"preempted: saved step {p.step} in {r.ckpt.directory}; rerun the same command "
            "to resume", flush=True)
      if r.writer is not None:
        r.writer.close()
      return {"config_name": config.name, "workdir": workdir, "preempted": True, "step": p.step,
              "final_val_loss": float("nan"), "final_val_perplexity": float("nan")}, r
    if ckpt is not None:  # the final state, always
      if ckpt.last_saved_step != r.state["meta"]["step"]:
        r.save()
  finally:
    if ckpt is not None:
      ckpt.close()
    r.close()
  if workdir:
    write_outputs(r, summary)
  return summary, r


def write_outputs(r: Run, summary: dict) -> None:
  from pathways_lite.outer import report
  wd = r.workdir
  if r.writer is not None:
    r.writer.close()
  plots.plot_losses(wd, title=r.config.name)
  report.plot_run(wd, title=f"{r.config.name} ({r.ocfg.algorithm})")
  r.rt.trace.write(os.path.join(wd, "trace.json"))
  if len(r.rt.trace.spans) <= MAX_TRACE_SPANS:
    r.rt.trace.plot(os.path.join(wd, "trace.png"), title=f"{r.config.name}: simulated timeline"
                    if r.ocfg.clock == "virtual" else None)
  with open(os.path.join(wd, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2, default=str)
  plots.write_summary(wd, {**summary, "time_s": summary.get("wall_time_s")})
  if r.rejected:
    with open(os.path.join(wd, "rejected.json"), "w") as fh:
      json.dump(r.rejected, fh, indent=2)
