"""MetricsWriter records and per-worker tags; plots and summary from metrics.jsonl (no compile)."""
import math

import matplotlib.image
import pytest

from pathways_lite import plots
from pathways_lite.metrics import MetricsWriter, read_metrics


def test_metrics_records_and_per_worker_plots(tmp_path):
  with MetricsWriter(str(tmp_path)) as w:
    for step in range(1, 6):
      for worker in (0, 1):
        w.write(step, {"train/loss": 5.0 / step + worker}, worker=worker)
    w.write(5, {"val/loss": 1.5, "val/perplexity": math.exp(1.5), "perf/mfu": None})
  records = read_metrics(str(tmp_path))
  assert len(records) == 11
  assert {r.get("worker") for r in records} == {0, 1, None}
  assert records[-1]["values"] == {"val/loss": 1.5, "val/perplexity": pytest.approx(4.4817, 1e-4)}
  series = plots._series(records, "step")
  assert set(series) == {("train/loss", 0), ("train/loss", 1), ("val/loss", None)}
  assert series[("train/loss", 1)][1][0] == 6.0
  paths = plots.plot_losses(str(tmp_path), title="two workers")
  for p in paths:
    assert matplotlib.image.imread(p).shape[0] > 100


def test_writer_truncates_unless_appending(tmp_path):
  with MetricsWriter(str(tmp_path)) as w:
    w.write(1, {"train/loss": 2.0})
  with MetricsWriter(str(tmp_path), append=True) as w:
    w.write(2, {"train/loss": 1.0})
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
  with MetricsWriter(str(tmp_path)) as w:
    w.write(3, {"train/loss": 0.5})
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [3]


def test_summary_is_one_screen_and_formats_values(tmp_path):
  text = plots.write_summary(str(tmp_path), {
      "config_name": "x", "steps": 12000, "final_val_loss": 1.23456, "mfu": 0.4321,
      "tokens_per_s": 123456.7, "param_count": None})
  assert (tmp_path / "summary.txt").read_text() == text
  assert len(text.splitlines()) <= 25 and max(map(len, text.splitlines())) <= 100
  assert "12,000" in text and "1.2346" in text and "43.21%" in text and "123,457" in text
  assert "n/a" in text
