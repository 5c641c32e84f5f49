"""Train one config several ways and compare the loss curves step by step.

`compare(config, variants, workdir)` runs the single-island loop
(`pathways_lite.train.train_and_evaluate`, the product path) once per variant,
each a dict of `section.field -> value` overrides of the same config: same
seed, same initial params, same data order. It then reads every run's
`train/loss` per step and reports, for each variant against the first one (the
reference), the largest and mean absolute difference, and the difference of
the last 20 steps' mean. A PNG shows the curves and the differences.

"Within noise" needs a yardstick: pass a third variant that is known-correct
but numerically different (e.g. attention "xla" next to "cudnn" and "pallas");
`within_noise` then says whether each variant stays within `noise_factor` times
that variant's differences from the reference.
"""
from __future__ import annotations

import os

import numpy as np

from pathways_lite import metrics as metrics_lib

TAIL = 20  # steps in the "final loss" mean


def loss_curve(workdir: str) -> np.ndarray:
  """train/loss per step 1..N from a run's metrics.jsonl (NaN where a step was not logged)."""
  recs = [r for r in metrics_lib.read_metrics(workdir)
          if "train/loss" in r["values"] and "worker" not in r]
  if not recs:
    raise ValueError(f"{workdir}: metrics.jsonl has no train/loss records")
  out = np.full(max(int(r["step"]) for r in recs), np.nan)
  for r in recs:
    out[int(r["step"]) - 1] = float(r["values"]["train/loss"])
  return out


def differences(ref: np.ndarray, other: np.ndarray) -> dict:
  n = min(len(ref), len(other))
  d = np.abs(ref[:n] - other[:n])
  return {"steps": n, "max_abs_diff": float(np.nanmax(d)), "mean_abs_diff": float(np.nanmean(d)),
          "final_mean_diff": float(abs(np.nanmean(ref[n - TAIL:n]) - np.nanmean(other[n - TAIL:n]))),
          "final_loss": float(np.nanmean(other[n - TAIL:n]))}


def judge(diffs: dict, noise: str, noise_factor: float) -> dict:
  """Adds `within_noise` to every entry of diffs but `noise`, the yardstick.

  Within noise: the mean per-step difference is at most noise_factor times the
  yardstick's, and so is the difference of the final losses (with a floor of
  1e-3, below which two curves count as equal).
  """
  yard = diffs[noise]
  for name, d in diffs.items():
    if name != noise:
      d["within_noise"] = bool(
          d["mean_abs_diff"] <= noise_factor * yard["mean_abs_diff"]
          and d["final_mean_diff"] <= noise_factor * max(yard["final_mean_diff"], 1e-3))
  return diffs


def compare(config, variants: dict[str, dict], workdir: str, *, noise: str | None = None,
            noise_factor: float = 2.0) -> dict:
  """Runs every variant (the first is the reference); returns the comparison dict."""
  from pathways_lite import train as train_lib  # pylint: disable=import-outside-toplevel
  if len(variants) < 2:
    raise ValueError(f"compare needs at least two variants, got {list(variants)}")
  if noise is not None and noise not in variants:
    raise ValueError(f"noise variant {noise!r} is not one of the variants {list(variants)}")
  from pathways_lite import configuration  # pylint: disable=import-outside-toplevel
  configs = {name: configuration.with_overrides(config, ov, f"variant {name!r}")
             for name, ov in variants.items()}
  for name, c in configs.items():  # every variant's config errors come before any work
    try:
      configuration.validate(c)
    except ValueError as e:
      raise ValueError(f"variant {name!r}: {e}") from e
  curves, summaries = {}, {}
  for name, c in configs.items():
    wd = os.path.join(workdir, name)
    summaries[name] = train_lib.train_and_evaluate(c, wd)
    curves[name] = loss_curve(wd)
  ref = next(iter(variants))
  result = {"reference": ref, "variants": variants, "noise_variant": noise,
            "noise_factor": noise_factor, "compare": {}, "summaries": summaries}
  for name in list(variants)[1:]:
    result["compare"][name] = differences(curves[ref], curves[name])
  if noise is not None:
    judge(result["compare"], noise, noise_factor)
  result["curves"] = {k: [None if np.isnan(x) else float(x) for x in v] for k, v in curves.items()}
  result["png"] = plot(curves, ref, os.path.join(workdir, "loss_compare.png"), config.name)
  return result


def plot(curves: dict, ref: str, path: str, title: str = "") -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                             gridspec_kw={"height_ratios": [2, 1]})
  for name, c in curves.items():
    a.plot(np.arange(1, len(c) + 1), c, label=name, lw=1)
    if name != ref:
      n = min(len(c), len(curves[ref]))
      b.plot(np.arange(1, n + 1), c[:n] - curves[ref][:n], label=f"{name} - {ref}", lw=1)
  a.set_ylabel("train loss")
  a.set_title(title)
  a.legend()
  b.axhline(0, color="k", lw=0.5)
  b.set_xlabel("step")
  b.set_ylabel("loss difference")
  b.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
