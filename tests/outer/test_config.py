"""The `outer` config section: schema, validation before compiling, and the train.py entry."""
import json
import os

import pytest

from pathways_lite import train as train_lib
from pathways_lite.outer import OuterConfig
from pathways_lite.outer.driver import check


def test_base_config_has_every_outer_field():
  from configs import base
  c = base.get_config()
  assert c.outer.to_dict() == OuterConfig().to_dict()
  assert c.outer.algorithm == "single"


@pytest.mark.parametrize("field,value,match", [
    ("algorithm", "fedprox", "outer.algorithm"),
    ("lr", 0.0, "outer.lr"),
    ("optimizer", "lion", "outer.optimizer"),
    ("wire_dtype", "fp4", "outer.wire_dtype"),
    ("num_workers", 0, "outer.num_workers"),
    ("step_time_s", (1.0,), "outer.step_time_s"),
    ("dn_c", 0.9, "outer.dn_c"),
    ("merge_alpha", 1.5, "outer.merge_alpha"),
    ("worker_schedule", (1, 3), "outer.worker_schedule"),
    ("shard_sampling", "fastest", "outer.shard_sampling"),
    ("bogus", 1, "outer.bogus"),
])
def test_bad_values_name_the_field(make_config, field, value, match):
  c = make_config("diloco")
  c.outer[field] = value
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    check(c)


@pytest.mark.parametrize("kw,match", [
    (dict(algorithm="streaming", num_fragments=3), "num_fragments"),
    (dict(algorithm="streaming", inner_steps=4, num_fragments=1, overlap_tau=3), "overlap_tau"),
    (dict(algorithm="async_local_sgd", drop_prob=0.5), "drop_prob"),
    (dict(algorithm="eager", worker_schedule=(1, 2)), "worker_schedule"),
    (dict(algorithm="single", num_workers=1), "single"),
])
def test_cross_field_checks(make_config, kw, match):
  c = make_config(kw.pop("algorithm"))
  for k, v in kw.items():
    c.outer[k] = v
  with pytest.raises(ValueError, match=match):
    check(c)


def test_train_entry_rejects_bad_outer_before_compiling(make_config, tmp_path):
  c = make_config("diloco")
  c.checkpoint.enabled = False
  c.outer.wire_dtype = "fp4"
  with pytest.raises(ValueError, match="outer.wire_dtype"):
    train_lib.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_train_entry_runs_diloco_and_writes_outputs(make_config, tmp_path):
  c = make_config("diloco", steps=4, inner_steps=2, link_latency_s=0.5)
  c.checkpoint.enabled = False
  c.train.eval_every = 2
  s = train_lib.train_and_evaluate(c, str(tmp_path))
  for f in ("metrics.jsonl", "outer.png", "trace.json", "trace.png", "summary.json",
            "loss_vs_step.png", "config.json"):
    assert (tmp_path / f).exists(), f
  assert s["workdir"] == str(tmp_path)
  # 2 outer steps of H=2 at 1 s/step, each with 2 transfers of 0.5 s latency (down, up).
  assert s["sim_time_s"] == pytest.approx(2 * (2 + 2 * 0.5))
  vals = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  steps = [r["step"] for r in vals if "val/loss" in r["values"]]
  assert steps == [0, 2, 4]
  workers = {r["worker"] for r in vals if "train/loss" in r["values"]}
  assert workers == {0, 1}
