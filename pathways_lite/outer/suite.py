"""Reproduction suites: run the runs of configs/suite_<name>.py, write a table and plots.

A suite config module has:
  get_config(scale) -> ConfigDict     the base of every run (configs/suite_base.py)
  get_runs(scale) -> [(label, {"outer.lr": 0.7, "train.lr": 1e-3, ...}), ...]
  EXPECTED: str                       the papers' ordering this suite checks
  ORDER_BY (optional): summary key that ranks runs ("final_val_loss" by default)
  COLUMNS (optional): extra (header, summary key) table columns
Every run goes through pathways_lite.train.train_and_evaluate (the same checks
as launch/train.py) into <workdir>/<label>/. The suite writes, into workdir:
results.json (every summary), README.md (the table, expected vs observed
ordering, device and times) and the four comparison PNGs of outer/report.py.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time

import jax

from pathways_lite import configuration
from pathways_lite import train as train_lib
from pathways_lite.outer import report

log = logging.getLogger(__name__)
BASE_COLUMNS = (("run", "label"), ("algorithm", "algorithm"), ("workers", "num_workers"),
                ("H", "inner_steps"), ("final val loss", "final_val_loss"),
                ("val ppl", "final_val_perplexity"), ("tokens", "tokens"),
                ("sim time (s)", "sim_time_s"), ("bytes sent", "bytes"),
                ("wall (s)", "wall_time_s"))


def load_suite(name: str):
  if not re.fullmatch(r"[a-z0-9_]+", name or ""):
    raise ValueError(f"--suite={name!r} must be a suite name like 'outer_opt' (configs/suite_<name>.py)")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.path.join(root, "configs", f"suite_{name}.py")
  if name == "base" or not os.path.exists(path):
    have = sorted(f[len("suite_"):-3] for f in os.listdir(os.path.join(root, "configs"))
                  if f.startswith("suite_") and f.endswith(".py") and f != "suite_base.py")
    raise ValueError(f"--suite={name!r}: no configs/suite_{name}.py; allowed values: {have}")
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"configs_suite_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_run_config(base, label: str, overrides: dict):
  """A copy of base with dotted overrides ("outer.lr": 0.5) applied; unknown fields raise."""
  return configuration.with_overrides(base, {"name": label, **overrides}, f"suite run {label!r}")


def run_suite(name: str, workdir: str, scale: str = "cpu", only: list[str] | None = None) -> str:
  """Runs the suite (or the runs named in `only`); returns the Markdown report."""
  mod = load_suite(name)
  base = mod.get_config(scale)
  runs = mod.get_runs(scale)
  labels = [l for l, _ in runs]
  if only:
    unknown = sorted(set(only) - set(labels))
    if unknown:
      raise ValueError(f"--only names unknown runs {unknown}; this suite's runs: {labels}")
    runs = [(l, o) for l, o in runs if l in only]
  configs = [(label, make_run_config(base, label, over)) for label, over in runs]  # fail early
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  rows = []
  for label, c in configs:
    log.info("suite %s: run %s", name, label)
    t = time.time()
    s = train_lib.train_and_evaluate(c, os.path.join(workdir, label))
    s = {k: v for k, v in s.items() if _jsonable(v)}
    s.update(label=label, wall_time_s=time.time() - t)
    rows.append(s)
    with open(os.path.join(workdir, "results.json"), "w") as fh:
      json.dump(rows, fh, indent=2, default=str)
  total = time.time() - t0
  report.plot_suite(workdir, {r["label"]: os.path.join(workdir, r["label"]) for r in rows},
                    title=f"suite {name} ({scale})")
  text = markdown(name, mod, rows, scale, total)
  with open(os.path.join(workdir, "README.md"), "w") as fh:
    fh.write(text)
  return text


def _jsonable(v) -> bool:
  try:
    json.dumps(v)
    return True
  except TypeError:
    return False


def markdown(name: str, mod, rows: list[dict], scale: str, total_s: float) -> str:
  order_by = getattr(mod, "ORDER_BY", "final_val_loss")
  cols = list(BASE_COLUMNS) + list(getattr(mod, "COLUMNS", ()))
  ranked = sorted(rows, key=lambda r: (r.get(order_by) is None, r.get(order_by)))
  for i, r in enumerate(ranked):
    r["rank"] = i + 1
  cols.append((f"rank ({order_by})", "rank"))
  doc = (mod.__doc__ or "").strip().splitlines()
  dev = jax.devices()[0]
  lines = [f"# Suite `{name}` ({scale})", "", doc[0] if doc else "", "",
           f"Device: {dev.platform} ({dev.device_kind}), {len(jax.devices())} device(s); "
           f"total wall time {total_s:.0f} s for {len(rows)} runs.", "",
           report.markdown_table(rows, cols), "",
           f"Expected (papers): {getattr(mod, 'EXPECTED', 'n/a')}", "",
           "Observed, best first by " + order_by + ": " +
           " < ".join(f"{r['label']} ({_num(r.get(order_by))})" for r in ranked), "",
           "Plots: loss_vs_step.png, loss_vs_tokens.png, loss_vs_time.png (simulated), "
           "bytes.png; each run's outputs in its own directory.", ""]
  return "\n".join(lines)


def _num(v) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)
