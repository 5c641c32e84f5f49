"""Plots and tables of outer-loop runs, from their metrics.jsonl.

- `plot_run(workdir)`: outer.png, four panels: validation loss vs inner step,
  vs tokens (all workers), vs simulated wall-clock, and bytes sent vs step.
- `plot_suite(out_dir, runs)`: the same four panels with one line per run
  (loss_vs_step.png, loss_vs_tokens.png, loss_vs_time.png, bytes.png).
- `markdown_table(rows, columns)`: a Markdown table.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pathways_lite.metrics import read_metrics

PANELS = (("step", "val/loss", "inner steps (per worker)", "validation loss", "loss_vs_step.png"),
          ("train/tokens", "val/loss", "tokens (all workers)", "validation loss", "loss_vs_tokens.png"),
          ("sim/time_s", "val/loss", "simulated wall-clock (s)", "validation loss", "loss_vs_time.png"),
          ("step", "comm/bytes", "inner steps (per worker)", "bytes sent (all links)", "bytes.png"))


def curves(workdir: str) -> dict[tuple[str, str], tuple[list, list]]:
  """(x_tag, y_tag) -> (xs, ys) for every panel, from the global (non-worker) records."""
  out = {}
  for x_tag, y_tag, *_ in PANELS:
    xs, ys = [], []
    for r in read_metrics(workdir):
      if r.get("worker") is not None:
        continue
      v = r["values"]
      x = r["step"] if x_tag == "step" else v.get(x_tag)
      y = v.get(y_tag)
      if x is not None and y is not None and math.isfinite(y):
        xs.append(x)
        ys.append(y)
    out[(x_tag, y_tag)] = (xs, ys)
  return out


def _panel(ax, xlabel, ylabel, series):
  for label, (xs, ys) in series:
    ax.plot(xs, ys, marker="o", markersize=2.5, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if len(series) > 1 or (series and series[0][0]):
    ax.legend(fontsize=7)


def plot_run(workdir: str, title: str = "") -> str:
  c = curves(workdir)
  fig = Figure(figsize=(11, 7.5), dpi=100)
  FigureCanvasAgg(fig)
  for i, (x_tag, y_tag, xl, yl, _) in enumerate(PANELS):
    _panel(fig.add_subplot(2, 2, i + 1), xl, yl, [("", c[(x_tag, y_tag)])])
  fig.suptitle(title or os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  path = os.path.join(workdir, "outer.png")
  fig.savefig(path)
  return path


def plot_suite(out_dir: str, runs: Mapping[str, str], title: str = "") -> list[str]:
  """runs: label -> workdir. Writes one PNG per panel into out_dir; returns the paths."""
  data = {label: curves(wd) for label, wd in runs.items()}
  paths = []
  for x_tag, y_tag, xl, yl, fname in PANELS:
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    _panel(ax, xl, yl, [(label, c[(x_tag, y_tag)]) for label, c in data.items()])
    if y_tag == "comm/bytes" and any(c[(x_tag, y_tag)][1] and max(c[(x_tag, y_tag)][1]) > 0
                                     for c in data.values()):
      ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    path = os.path.join(out_dir, fname)
    fig.savefig(path)
    paths.append(path)
  return paths


def _fmt(v) -> str:
  if isinstance(v, bool) or v is None:
    return "" if v is None else str(v)
  if isinstance(v, float):
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
      return f"{v:.3g}"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
  if isinstance(v, int) and abs(v) >= 100000:
    return f"{v:.3g}"
  return str(v)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]]) -> str:
  """columns: (header, key). One row per mapping."""
  head = "| " + " | ".join(h for h, _ in columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  body = ["| " + " | ".join(_fmt(r.get(k)) for _, k in columns) + " |" for r in rows]
  return "\n".join([head, sep] + body)
