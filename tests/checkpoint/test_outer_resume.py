"""Kill -9 and SIGTERM outer-loop training processes; the resumed run must equal an uninterrupted one.

Through launch/train.py with configs/diloco_tiny.py shrunk (tests/train/helpers.py SMALL,
2-3 workers, H=2, the virtual clock). Compares bitwise: the final checkpoint's global
params and outer optimizer state, and every metrics record (per-worker train losses,
validation losses, simulated time, bytes sent), in order.

(a) synchronous DiLoCo, kill -9 at a random point after a checkpoint exists;
(b) async Local-SGD with delayed Nesterov and heterogeneous worker speeds (3 workers,
    step times 1.0/1.7/2.3 simulated s): in-flight pseudo-gradients at the save are
    recorded with their virtual arrival times, so the resumed run's events are the same;
(c) SIGTERM -> "preempted: saved step N", then the resumed DiLoCo run equals (a)'s reference;
(d) ddp, streaming DiLoCo (fragment syncs in flight across the save: tau=1, bf16 on the wire)
    and eager (exchanges of the last d=2 outer steps in flight), killed mid-save (a save's
    temporary directory exists) or at a random point after a checkpoint;
(e) an outer run saved with all islands on one device resumes with its workers on two
    devices (its arrays resharded onto the new islands), in process, and equals the
    uninterrupted run.
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

STEPS = 24
BASE = {**SMALL, "train.steps": STEPS, "train.eval_every": 8, "train.log_every": 1,
        "outer.num_workers": 2, "outer.inner_steps": 2,
        "checkpoint.enabled": True, "checkpoint.every_steps": 4, "checkpoint.keep": 2}
ASYNC = {**BASE, "outer.algorithm": "async_local_sgd", "outer.async_outer": "dn",
         "outer.num_workers": 3, "outer.step_time_s": "(1.0,1.7,2.3)"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return make_small_corpus(root), str(tmp_path_factory.mktemp("cache"))


def _cmd(workdir, corpus, overrides):
  source, cache_dir = corpus
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"),
         f"--config={os.path.join(REPO, 'configs', 'diloco_tiny.py')}", f"--workdir={workdir}",
         f"--config.data.sources=('{source}',)", f"--config.data.cache_dir={cache_dir}"]
  return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


def _run(workdir, corpus, overrides):
  proc = subprocess.run(_cmd(workdir, corpus, overrides), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


def _steps(workdir):
  d = workdir / "checkpoints"
  return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _complete(names):
  return [n for n in names if n.isdigit()]


def _final(workdir):
  """The final checkpoint: every array of the run (global and per-worker state, in flight)."""
  ck = Checkpointer(workdir / "checkpoints")
  step, arrays, _ = ck.restore(None)
  ck.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(arrays)]


def _records(workdir):
  return [(r["step"], r.get("worker"), r["values"]) for r in read_metrics(str(workdir))]


def _assert_same_run(a, b):
  step_a, leaves_a = _final(a)
  step_b, leaves_b = _final(b)
  assert step_a == step_b == STEPS
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)                  # the whole state, bitwise
  ra, rb = _records(a), _records(b)
  assert any("train/loss" in v for _, _, v in ra) and any("val/loss" in v for _, _, v in ra)
  assert ra == rb                                        # every record, in order, bitwise


def _kill9_and_resume(workdir, corpus, overrides, seed, mid_save=False):
  """Starts, SIGKILLs after the first complete checkpoint, reruns to the end.

  The kill lands at a random point (seeded), or with `mid_save` as soon as a later save's
  temporary directory appears (if none is seen before half the run is saved: then)."""
  proc = subprocess.Popen(_cmd(workdir, corpus, overrides), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  t0 = time.time()
  while proc.poll() is None and not _complete(_steps(workdir)) and time.time() - t0 < 180:
    time.sleep(0.005)
  if mid_save:
    while proc.poll() is None and time.time() - t0 < 180:
      names = _steps(workdir)
      if any(not n.isdigit() for n in names) or max(map(int, _complete(names))) >= STEPS // 2:
        break
      time.sleep(0.001)
    print("killed with", _steps(workdir))
  else:
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: nothing was tested"
  saved = _complete(_steps(workdir))
  assert saved and STEPS > max(int(s) for s in saved) >= 0
  out = _run(workdir, corpus, overrides)
  assert "resuming from step" in out
  return out


@pytest.fixture(scope="module")
def diloco_reference(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("diloco_uninterrupted")
  _run(workdir, corpus, BASE)
  return workdir


def test_diloco_kill9_resumes_bitwise(corpus, diloco_reference, tmp_path):
  _kill9_and_resume(tmp_path / "killed", corpus, BASE, seed=0)
  _assert_same_run(diloco_reference, tmp_path / "killed")


def test_async_dn_virtual_clock_kill9_resumes_bitwise(corpus, tmp_path):
  reference = tmp_path / "uninterrupted"
  _run(reference, corpus, ASYNC)
  _kill9_and_resume(tmp_path / "killed", corpus, ASYNC, seed=1)
  _assert_same_run(reference, tmp_path / "killed")


def test_diloco_sigterm_saves_then_resume_matches(corpus, diloco_reference, tmp_path):
  workdir = tmp_path / "preempted"
  proc = subprocess.Popen(_cmd(workdir, corpus, BASE), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  while proc.poll() is None and not _complete(_steps(workdir)) and time.time() - t0 < 180:
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted: saved step" in out, out[-3000:]
  saved = int(out.split("preempted: saved step ")[1].split()[0])
  assert 0 < saved < STEPS and str(saved) in _steps(workdir)
  out = _run(workdir, corpus, BASE)
  assert f"resuming from step {saved}" in out
  _assert_same_run(diloco_reference, workdir)


SYNC = {
    "ddp": {**BASE, "outer.algorithm": "ddp"},
    "streaming": {**BASE, "outer.algorithm": "streaming", "outer.num_fragments": 1,
                  "outer.overlap_tau": 1, "outer.merge_alpha": 0.5, "outer.wire_dtype": "bf16"},
    "eager": {**BASE, "outer.algorithm": "eager", "outer.overlap_outer_steps": 2},
}


@pytest.mark.parametrize("algorithm,seed,mid_save", [("ddp", 2, True), ("streaming", 3, False),
                                                     ("eager", 4, True)])
def test_sync_outer_kill9_resumes_bitwise(corpus, tmp_path, algorithm, seed, mid_save):
  reference = tmp_path / "uninterrupted"    # runs beside the killed one (CI has the cores)
  ref = subprocess.Popen(_cmd(reference, corpus, SYNC[algorithm]), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _kill9_and_resume(tmp_path / "killed", corpus, SYNC[algorithm], seed=seed, mid_save=mid_save)
  out, _ = ref.communicate(timeout=300)
  assert ref.returncode == 0, out[-3000:]
  _assert_same_run(reference, tmp_path / "killed")


def _config(corpus, overrides):
  from pathways_lite import configuration
  source, cache_dir = corpus
  c = configuration.load_config_file(os.path.join(REPO, "configs", "diloco_tiny.py"))
  for key, value in {**overrides, "data.sources": (source,), "data.cache_dir": cache_dir}.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def test_outer_resume_onto_other_devices_is_bitwise(corpus, tmp_path, devices):
  """Saved with every island on device 0, resumed with the workers on devices 0 and 1."""
  import shutil
  from pathways_lite.outer import driver

  config = _config(corpus, {**SYNC["eager"], "outer.islands": "devices", "checkpoint.keep": 10})
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  _, run = driver.run_with_state(config, str(reference), devices=devices[:1])
  expected = run.state_dict()["arrays"]
  shutil.copytree(reference, resumed)
  for step in _complete(_steps(resumed)):
    if int(step) > 8:                            # as if the run had stopped after step 8
      shutil.rmtree(resumed / "checkpoints" / step)
  _, run = driver.run_with_state(config, str(resumed), devices=devices[:2])
  got = run.state_dict()["arrays"]
  assert jax.tree.leaves(got["theta"][1])[0].devices() == {devices[1]}
  assert jax.tree.leaves(expected["theta"][1])[0].devices() == {devices[0]}
  assert jax.tree.structure(expected) == jax.tree.structure(got)
  for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _records(reference) == _records(resumed)
