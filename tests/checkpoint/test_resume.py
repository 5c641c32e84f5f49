"""Kill -9 and SIGTERM a real training process; the resumed run must equal an uninterrupted one.

Compares bitwise: the final checkpoint's arrays, every logged train loss and
every validation loss.
"""
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pathways_lite.checkpoint import Checkpointer
from pathways_lite.metrics import read_metrics
from tests.data.small_corpus import make_small_corpus
from tests.train.helpers import REPO, SMALL

STEPS = 40
OVERRIDES = {**SMALL, "train.steps": STEPS, "train.eval_every": 20, "train.log_every": 1,
             "checkpoint.every_steps": 4, "checkpoint.keep": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return make_small_corpus(root), str(tmp_path_factory.mktemp("cache"))


def _cmd(workdir, corpus, **extra):
  source, cache_dir = corpus
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"),
         f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}",
         f"--config.data.sources=('{source}',)", f"--config.data.cache_dir={cache_dir}"]
  return cmd + [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]


def _start(workdir, corpus):
  return subprocess.Popen(_cmd(workdir, corpus), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _steps(workdir):
  d = workdir / "checkpoints"
  return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _kill_when(proc, workdir, predicate, timeout=120):
  """SIGKILLs proc as soon as predicate(names in checkpoints/) holds; False if it ended first."""
  t0 = time.time()
  while proc.poll() is None and time.time() - t0 < timeout:
    if predicate(_steps(workdir)):
      proc.kill()
      proc.wait()
      return True
    time.sleep(0.001)
  proc.wait()
  return False


def _final(workdir):
  ck = Checkpointer(workdir / "checkpoints")
  step, arrays, _ = ck.restore(None)
  ck.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(arrays)]


def _curves(workdir):
  records = read_metrics(str(workdir))
  train = [(r["step"], r["values"]["train/loss"]) for r in records if "train/loss" in r["values"]]
  val = [(r["step"], r["values"]["val/loss"]) for r in records if "val/loss" in r["values"]]
  return train, val


def _assert_same_run(a, b):
  step_a, leaves_a = _final(a)
  step_b, leaves_b = _final(b)
  assert step_a == step_b == STEPS
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)
  train_a, val_a = _curves(a)
  train_b, val_b = _curves(b)
  assert [s for s, _ in train_a] == list(range(1, STEPS + 1))
  assert train_a == train_b  # steps and values, bitwise
  assert val_a == val_b and [s for s, _ in val_a] == [0, 20, STEPS]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = subprocess.run(_cmd(workdir, corpus), cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return workdir


def test_kill9_mid_save_and_at_random_points_resumes_bitwise(corpus, reference, tmp_path):
  rng = random.Random(0)
  workdir = tmp_path / "killed"
  # 1: killed while a save is being written (Orbax's temporary directory exists).
  proc = _start(workdir, corpus)
  killed_mid_save = _kill_when(proc, workdir, lambda names: any("tmp" in n for n in names))
  # 2, 3: killed once some checkpoint exists, after a random extra delay.
  kills = 0
  for _ in range(2):
    proc = _start(workdir, corpus)
    before = _steps(workdir)
    if _kill_when(proc, workdir, lambda names: names and names != before):
      time.sleep(rng.uniform(0.0, 0.5))
      kills += 1
  # Then run to completion (resuming each time from the last complete step).
  for _ in range(3):
    proc = subprocess.run(_cmd(workdir, corpus), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 0:
      break
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert kills >= 1, "no kill landed after a checkpoint: the test did not test resumption"
  print(f"killed mid-save: {killed_mid_save}, later kills: {kills}")
  assert "resuming from step" in proc.stdout or "resuming from step" in proc.stderr
  _assert_same_run(reference, workdir)


def test_sigterm_saves_then_resume_matches(corpus, reference, tmp_path):
  workdir = tmp_path / "preempted"
  proc = _start(workdir, corpus)
  t0 = time.time()
  while proc.poll() is None and not _steps(workdir) and time.time() - t0 < 120:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted: saved step" in out
  saved = int(out.split("preempted: saved step ")[1].split()[0])
  assert 0 < saved < STEPS and str(saved) in _steps(workdir)
  proc = subprocess.run(_cmd(workdir, corpus), cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert f"resuming from step {saved}" in proc.stdout
  _assert_same_run(reference, workdir)


def test_resume_with_other_config_names_fields(corpus, reference, tmp_path):
  proc = subprocess.run(_cmd(reference, corpus, **{"model.d_model": 64}), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "model.d_model: saved 32 vs now 64" in proc.stderr
  assert "allow_config_change" in proc.stderr
