"""Checkpoint benchmark: how long a save blocks the training loop, and its cost in steps/s.

    python launch/bench_checkpoint.py --gib=2 --out=/tmp/ckpt.json       # on a GPU
    python launch/bench_checkpoint.py --gib=0.25 --steps=200             # on a CPU
    python launch/bench_checkpoint.py --config=configs/lm_125m.py        # a real LM's state and step

Measured in one run on the same state (f32 leaves totalling --gib, or with
--config the TrainState (params + AdamW moments) and train step of that model):
  sync_blocking_s          Checkpointer(async_save=False).save: the whole write
  async_blocking_s         Checkpointer(async_save=True).save: the caller's share only
  orbax_async_blocking_s   the peer: Orbax's own async CheckpointManager.save
  raw_write_gbps[_fsync]   the disk under --dir: the state's bytes written with os.write
                           (then fsync), the physical bound of any checkpoint write
  steps_per_s_plain        a donated jitted step, no checkpoints
  per policy (checkpoint.if_busy "skip" and "wait"), a save due every --every steps:
    steps_per_s, ratio (over plain), saves (written), skipped, blocking_s (total the
    loop waited in save), write_gbps (median bytes / background write time per save),
    bytes_per_s (bytes saved / loop time: what the loop asked the disk to absorb)
  heartbeat_p99_ms_{plain,ckpt}  lateness of a thread sleeping 1 ms in a loop while the
                           training loop runs, without / with saves: how long the
                           background write keeps other Python threads off the GIL/CPU
Prints one JSON object; the goals are async/sync <= 0.10 and ckpt/plain >= 0.95 (with
the default if_busy="skip"). When write_gbps is near raw_write_gbps_fsync and a save
takes longer than --every steps, "wait" is bound by the disk: state bytes per
(every * step time) above the raw bandwidth cannot be written in time.
"""
import os
import statistics
import tempfile
import threading
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pathways_lite.checkpoint import Checkpointer, SavePolicy
from pathways_lite.metrics import emit_json

flags.DEFINE_float("gib", 0.25, "state size in GiB (f32)")
flags.DEFINE_integer("leaves", 64, "number of arrays in the state")
flags.DEFINE_integer("steps", 200, "training steps timed per variant")
flags.DEFINE_integer("every", 50, "save every this many steps in the with-checkpoint run")
flags.DEFINE_integer("matmul", 2048, "size of the matmuls that give the step its compute")
flags.DEFINE_integer("matmuls_per_step", 8, "matmuls per step")
flags.DEFINE_integer("repeats", 3, "saves timed per variant (median reported)")
flags.DEFINE_string("out", "", "also write the JSON here")
flags.DEFINE_string("config", "", "a config file: bench its model's TrainState and step instead")
flags.DEFINE_string("dir", "", "write checkpoints under this directory (default: the system temp)")
flags.DEFINE_list("policies", ["skip", "wait"], "checkpoint.if_busy policies to time")
FLAGS = flags.FLAGS


def make_state(gib, leaves):
  per = int(gib * 2**30 / 4 / leaves)
  keys = jax.random.split(jax.random.key(0), leaves)
  return {f"w{i:03d}": jax.random.normal(k, (per,), jnp.float32) for i, k in enumerate(keys)}


def make_step(n, reps):
  def step(state, x):
    y = x
    for _ in range(reps):
      y = jnp.tanh(y @ x)
    scale = 1.0 + 1e-6 * jnp.mean(y)
    return jax.tree.map(lambda w: w * scale, state), y
  return jax.jit(step, donate_argnums=0)


def tmpdir():
  return tempfile.TemporaryDirectory(dir=FLAGS.dir or None)


def time_saves(make_saver, state, repeats):
  times = []
  for r in range(repeats):
    with tmpdir() as d:
      save, finish = make_saver(d)
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      save(r + 1, state)
      times.append(time.perf_counter() - t0)
      finish()
  return statistics.median(times)


def ours(async_save):
  def make(d):
    ck = Checkpointer(d, SavePolicy(every_steps=1, async_save=async_save))
    return (lambda s, st: ck.save(s, st, {"step": s})), ck.close
  return make


def orbax_async(d):
  mngr = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True))
  def save(s, st):
    mngr.save(s, args=ocp.args.StandardSave(st))
  def finish():
    mngr.wait_until_finished()
    mngr.close()
  return save, finish


def raw_write_gbps(state, fsync):
  """The state's bytes (host copies) written to one file under --dir with os.write (+ fsync)."""
  host = [np.ascontiguousarray(jax.device_get(x)) for x in jax.tree.leaves(state)]
  nbytes = sum(h.nbytes for h in host)
  with tmpdir() as d:
    t0 = time.perf_counter()
    fd = os.open(os.path.join(d, "raw"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      for h in host:
        view = memoryview(h).cast("B")
        while view:
          view = view[os.write(fd, view[:1 << 26]):]
      if fsync:
        os.fsync(fd)
    finally:
      os.close(fd)
    return nbytes / (time.perf_counter() - t0) / 1e9


class Heartbeat:
  """A thread sleeping 1 ms in a loop; its lateness shows how long others hold the GIL/CPU."""

  def __init__(self):
    self.late, self._stop = [], threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      t = time.perf_counter()
      time.sleep(1e-3)
      self.late.append(time.perf_counter() - t - 1e-3)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  def p99_ms(self):
    return float(np.percentile(self.late, 99) * 1e3) if self.late else None


def steps_per_s(state, x, step_fn, steps, ck=None):
  """Steps/s of the loop, saving when the policy says so; the host stays one step ahead."""
  state, y = step_fn(state, x)  # compile
  jax.block_until_ready((state, y))
  saved = 0
  with Heartbeat() as hb:
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
      prev = y
      state, y = step_fn(state, x)
      jax.block_until_ready(prev)   # as train.py: read step i-1's output after dispatching i
      if ck is not None and ck.should_save(i):
        ck.save(i, state, {"step": i})
        saved += sum(a.nbytes for a in jax.tree.leaves(state))
    jax.block_until_ready((state, y))
    elapsed = time.perf_counter() - t0
  if ck is not None:
    ck.wait_until_finished()
  return steps / elapsed, state, {"bytes_per_s": saved / elapsed, "heartbeat_p99_ms": hb.p99_ms()}


def model_state_and_step(path):
  """The TrainState and jitted train step of a config's model, with a random batch."""
  import numpy as np
  from models.config import ModelConfig
  from pathways_lite import configuration
  from pathways_lite import train as train_lib
  config = configuration.load_config_file(path)
  model_cfg = ModelConfig.from_dict(config.model)
  opt = train_lib.make_optimizer(config.train)
  state = train_lib.init_train_state(model_cfg, opt, 0, config.data.seq_len)
  step = jax.jit(train_lib.make_train_step(model_cfg, opt), donate_argnums=0)
  batch = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (config.data.batch_size, config.data.seq_len + 1), np.int32))
  return state, batch, step


def main(_):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  dev = jax.devices()[0]
  if FLAGS.config:
    state, x, step_fn = model_state_and_step(FLAGS.config)
  else:
    state = make_state(FLAGS.gib, FLAGS.leaves)
    x = jax.random.normal(jax.random.key(1), (FLAGS.matmul, FLAGS.matmul), jnp.float32) / FLAGS.matmul**0.5
    step_fn = make_step(FLAGS.matmul, FLAGS.matmuls_per_step)
  state_gib = sum(a.nbytes for a in jax.tree.leaves(state)) / 2**30
  # Warm the snapshot's jitted copy and Orbax's code paths once.
  time_saves(ours(True), state, 1)
  sync_s = time_saves(ours(False), state, FLAGS.repeats)
  async_s = time_saves(ours(True), state, FLAGS.repeats)
  orbax_s = time_saves(orbax_async, state, FLAGS.repeats)
  raw = raw_write_gbps(state, fsync=False)
  raw_fsync = raw_write_gbps(state, fsync=True)
  plain, state, plain_info = steps_per_s(state, x, step_fn, FLAGS.steps)
  policies = {}
  for policy in FLAGS.policies:
    with tmpdir() as d:
      ck = Checkpointer(d, SavePolicy(every_steps=FLAGS.every, keep=2, if_busy=policy))
      rate, state, info = steps_per_s(state, x, step_fn, FLAGS.steps, ck)
      ck.close()
    policies[policy] = {
        "steps_per_s": rate, "ratio": rate / plain, "saves": len(ck.writes),
        "skipped": len(ck.skipped), "skipped_steps": ck.skipped,
        "blocking_s": sum(ck.blocking_s),
        "write_s": [w["write_s"] for w in ck.writes],
        "write_gbps": statistics.median(w["bytes"] / w["write_s"] / 1e9 for w in ck.writes)
                      if ck.writes else None,
        **info}
  main_policy = policies.get("skip") or next(iter(policies.values()))
  result = {
      "bench": "checkpoint", "device": dev.device_kind, "platform": dev.platform,
      "jax": jax.__version__, "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "",
      "state_gib": state_gib, "leaves": len(jax.tree.leaves(state)),
      "state": FLAGS.config or "synthetic",
      "sync_blocking_s": sync_s, "async_blocking_s": async_s, "orbax_async_blocking_s": orbax_s,
      "async_over_sync": async_s / sync_s, "orbax_async_over_sync": orbax_s / sync_s,
      "raw_write_gbps": raw, "raw_write_gbps_fsync": raw_fsync,
      "state_gb_per_save_interval_s": state_gib * 2**30 / 1e9 / (FLAGS.every / plain),
      "steps": FLAGS.steps, "save_every": FLAGS.every, "steps_per_s_plain": plain,
      "heartbeat_p99_ms_plain": plain_info["heartbeat_p99_ms"], "policies": policies,
      "steps_per_s_ckpt": main_policy["steps_per_s"], "ckpt_over_plain": main_policy["ratio"],
      "goals": {"async_over_sync<=0.10": async_s / sync_s <= 0.10,
                "ckpt_over_plain>=0.95": main_policy["ratio"] >= 0.95},
  }
  emit_json(result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
