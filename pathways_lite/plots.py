"""End-of-run outputs from metrics.jsonl: loss PNGs and a one-screen text summary.

`loss_vs_step.png` and `loss_vs_time.png` plot "train/loss" and "val/loss"
(one line per worker when records carry a worker). `summary.txt` lists the
run's headline numbers.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pathways_lite.metrics import read_metrics

LOSS_TAGS = ("train/loss", "val/loss")
SUMMARY_FILE = "summary.txt"


def _series(records, x_key: str) -> dict[tuple[str, int | None], tuple[list, list]]:
  out: dict = defaultdict(lambda: ([], []))
  for r in records:
    for tag in LOSS_TAGS:
      v = r["values"].get(tag)
      if v is not None and math.isfinite(v):
        xs, ys = out[(tag, r.get("worker"))]
        xs.append(r[x_key])
        ys.append(v)
  return dict(out)


def plot_losses(workdir: str, title: str = "") -> list[str]:
  """Writes loss_vs_step.png and loss_vs_time.png into workdir; returns their paths."""
  records = read_metrics(workdir)
  paths = []
  for x_key, xlabel, fname in (("step", "step", "loss_vs_step.png"),
                               ("elapsed_s", "wall-clock time (s)", "loss_vs_time.png")):
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for (tag, worker), (xs, ys) in sorted(_series(records, x_key).items(),
                                          key=lambda kv: (kv[0][0], kv[0][1] or -1)):
      label = tag if worker is None else f"{tag} (worker {worker})"
      style = dict(marker="o", linestyle="--") if tag.startswith("val") else dict(alpha=0.8)
      ax.plot(xs, ys, label=label, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or os.path.basename(os.path.normpath(workdir)))
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
    path = os.path.join(workdir, fname)
    fig.savefig(path)
    paths.append(path)
  return paths


def _fmt(key: str, v) -> str:
  if v is None:
    return "n/a"
  if key == "mfu":
    return f"{100 * v:.2f}%"
  if isinstance(v, float):
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


SUMMARY_ROWS = (
    ("config", "config_name"), ("steps", "steps"), ("tokens", "tokens"),
    ("parameters", "param_count"), ("time (s)", "time_s"),
    ("final train loss", "final_train_loss"), ("final val loss", "final_val_loss"),
    ("final val perplexity", "final_val_perplexity"), ("tokens/s", "tokens_per_s"),
    ("MFU", "mfu"), ("device", "device"),
)


def write_summary(workdir: str, summary: Mapping) -> str:
  """Writes summary.txt (one screen) and returns its text."""
  width = max(len(label) for label, _ in SUMMARY_ROWS)
  lines = [f"pathways_lite run: {workdir}"]
  lines += [f"  {label:<{width}}  {_fmt(key, summary.get(key))}" for label, key in SUMMARY_ROWS]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, SUMMARY_FILE), "w") as fh:
    fh.write(text)
  return text
