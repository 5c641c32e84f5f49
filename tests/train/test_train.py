"""The single-island loop: it learns, fails loudly on NaN, and launch/train.py writes every output."""
import glob
import json
import math
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from models.config import ModelConfig
from models.decoder import DecoderLM
from pathways_lite import train as train_lib
from pathways_lite.metrics import read_metrics
from tests.data.small_corpus import make_small_corpus
from tests.train.helpers import REPO, SMALL, small_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return make_small_corpus(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def test_tiny_run_lowers_validation_loss(source, cache_dir, tmp_path):
  c = small_config(source, cache_dir)
  summary = train_lib.train_and_evaluate(c, str(tmp_path))
  records = read_metrics(str(tmp_path))
  val = [(r["step"], r["values"]["val/loss"]) for r in records if "val/loss" in r["values"]]
  assert [s for s, _ in val] == [0, 20, 40]
  assert val[0][1] == pytest.approx(math.log(259), abs=0.5)  # untrained: near uniform
  assert val[-1][1] < 0.8 * val[0][1]  # clearly learned something
  assert summary["final_val_loss"] == val[-1][1]
  assert summary["final_val_perplexity"] == pytest.approx(math.exp(val[-1][1]))
  train_steps = [r["step"] for r in records if "train/loss" in r["values"]]
  assert train_steps == list(range(5, 41, 5))
  assert summary["tokens"] == c.train.steps * c.data.batch_size * c.data.seq_len
  assert summary["tokens_per_s"] > 0 and summary["param_count"] > 0
  lrs = [r["values"]["train/lr"] for r in records if "train/lr" in r["values"]]
  assert max(lrs) <= c.train.lr and lrs[-1] < max(lrs)  # warmup then cosine decay


def test_nan_loss_raises_with_step(source, cache_dir, tmp_path, monkeypatch):
  real = train_lib.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def step(state, batch):
      new_state, metrics = step_fn(state, batch)
      loss = jnp.where(state.step == 3, jnp.nan, metrics["loss"])
      return new_state, {**metrics, "loss": loss}
    return step

  monkeypatch.setattr(train_lib, "make_train_step", poisoned)
  c = small_config(source, cache_dir, **{"train.steps": 6, "train.eval_every": 0})
  with pytest.raises(FloatingPointError, match=r"non-finite loss=nan at step 3"):
    train_lib.train_and_evaluate(c, str(tmp_path))


def _tfevent_scalars(path):
  """Parses a TFRecord file of Event protos: {tag: [(step, value)]}."""
  from tensorboardX.proto import event_pb2
  out = {}
  with open(path, "rb") as fh:
    blob = fh.read()
  pos = 0
  while pos < len(blob):
    (n,) = struct.unpack("<Q", blob[pos:pos + 8])
    event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_launch_train_writes_all_outputs(source, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  overrides = {**SMALL, "train.steps": 6, "train.eval_every": 3, "train.log_every": 2}
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"),
         f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}",
         f"--config.data.sources=('{source}',)", f"--config.data.cache_dir={cache_dir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final val loss" in proc.stdout

  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["d_model"] == 32 and config["train"]["steps"] == 6
  assert config["data"]["sources"] == [source] and config["name"] == "tiny"

  records = read_metrics(str(workdir))
  assert [r["step"] for r in records if "train/loss" in r["values"]] == [2, 4, 6]
  assert [r["step"] for r in records if "val/loss" in r["values"]] == [0, 3, 6]
  assert all({"step", "wall_time", "elapsed_s", "values"} <= set(r) for r in records)

  events = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  assert len(events) == 1
  scalars = _tfevent_scalars(events[0])
  assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
  jsonl_val = [r["values"]["val/loss"] for r in records if "val/loss" in r["values"]]
  assert [v for _, v in scalars["val/loss"]] == pytest.approx(jsonl_val, rel=1e-6)

  for png in ("loss_vs_step.png", "loss_vs_time.png"):
    import matplotlib.image
    img = matplotlib.image.imread(str(workdir / png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0  # not a blank canvas
  summary = (workdir / "summary.txt").read_text()
  assert len(summary.splitlines()) <= 25
  for needle in ("tiny", "final val loss", "final val perplexity", "tokens/s", "parameters"):
    assert needle in summary
  assert f"{jsonl_val[-1]:.4f}" in summary


def test_init_compiles_threefry_as_the_gpu_kernel_and_restores_the_flag(monkeypatch):
  """init_train_state traces the model's init with jax_threefry_gpu_kernel_lowering on (a
  94 s -> 8-11 s init at 350M on an H100, same bits), and only inside its own call."""
  seen, real_init = [], DecoderLM.init

  def spy(self, *args, **kwargs):
    seen.append(bool(jax.config.jax_threefry_gpu_kernel_lowering))
    return real_init(self, *args, **kwargs)

  monkeypatch.setattr(DecoderLM, "init", spy)
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                    d_ff=32, max_seq_len=8)
  state = train_lib.init_train_state(cfg, optax.adam(1e-3), seed=0, seq_len=8)
  assert seen == [True]
  assert not jax.config.jax_threefry_gpu_kernel_lowering
  assert jnp.isfinite(state.params["embed"]["embedding"]).all()
