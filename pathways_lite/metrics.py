"""Run metrics: one JSON object per line in `metrics.jsonl` plus TensorBoard events.

A record is {"step", "wall_time" (unix s), "elapsed_s" (since the writer opened),
"worker" (only for per-worker values), "values": {tag: float}}. Tags look like
"train/loss" or "val/perplexity". TensorBoard gets the same scalars under
`<workdir>/tensorboard/`, tagged "<tag>/worker_<w>" when a worker is given.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
  """Writes scalar metrics to metrics.jsonl and TensorBoard; use as a context manager."""

  def __init__(self, workdir: str, append: bool = False):
    from tensorboardX import SummaryWriter  # here, so importing train.py does not need it

    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = open(self.path, "a" if append else "w", buffering=1)
    self._tb = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR), flush_secs=10)
    self._t0 = time.time()

  def write(self, step: int, values: Mapping[str, float], worker: int | None = None) -> dict:
    now = time.time()
    vals = {k: _scalar(v) for k, v in values.items() if v is not None}
    record = {"step": int(step), "wall_time": now, "elapsed_s": now - self._t0}
    if worker is not None:
      record["worker"] = int(worker)
    record["values"] = vals
    self._file.write(json.dumps(record) + "\n")
    for tag, v in vals.items():
      if math.isfinite(v):
        self._tb.add_scalar(tag if worker is None else f"{tag}/worker_{worker}", v,
                            global_step=int(step), walltime=now)
    return record

  def flush(self) -> None:
    self._file.flush()
    self._tb.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _scalar(v) -> float:
  return float(v.item() if hasattr(v, "item") else v)


def read_metrics(workdir_or_file: str) -> list[dict]:
  """All records of a metrics.jsonl (a workdir or the file itself)."""
  path = workdir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def _rewrite(workdir: str, select) -> int:
  """Atomically replaces metrics.jsonl by select(lines); returns how many lines went."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path) as fh:
    lines = [ln if ln.endswith("\n") else ln + "\n" for ln in fh]
  kept = select(lines)
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.writelines(kept)
  os.replace(tmp, path)
  return len(lines) - len(kept)


def truncate_after(workdir: str, step: int) -> int:
  """Drops records past `step` (written after the checkpoint a run resumes from).

  Returns how many records were dropped; a torn last line (killed mid-write) goes too.
  """
  def select(lines):
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record["step"] <= step:
        kept.append(line)
    return kept
  return _rewrite(workdir, select)


def truncate_to(workdir: str, n: int) -> int:
  """Keeps the first n records (those written before the checkpoint a run resumes from)."""
  return _rewrite(workdir, lambda lines: lines[:n])


def emit_json(result: dict, path: str | None = None) -> str:
  """Prints a benchmark's result as JSON and, when `path` is given, writes it there too."""
  text = json.dumps(result, indent=1)
  print(text)
  if path:
    with open(path, "w") as fh:
      fh.write(text + "\n")
  return text


def write_partial(result: dict, path: str | None) -> None:
  """Writes a benchmark's result so far to `path` (if given) with "partial": true, so that a
  run killed from outside (a device call's time limit) keeps what it measured."""
  if path:
    with open(path, "w") as fh:
      json.dump(result | {"partial": True}, fh, indent=1)
