"""What every outer loop shares: the run context (`Run`: data, logging, state) and compile memo.

A Run holds one run's islands and runtime (outer/topology.py: one island per
worker plus `server`, the clock and links), its data iterators, the compiled
inner pieces (outer/inner.py) and the metrics writer; loops call it to place
values on islands, read batches, log, evaluate and commit their state.

State (`Run.state_dict`) is two parts, as `pathways_lite.checkpoint` saves it:
arrays (a pytree of arrays: global params, outer optimizer state, per-worker
TrainStates, algorithm extras such as DN buffers or delayed deltas, RNG) and
meta (JSON: step counters, data iterator positions, clock and link counters,
rejected pseudo-gradients, bookkeeping). Taking it to a checkpoint and back,
Futures included, is outer/snapshot.py.
"""
from __future__ import annotations

import json
import logging
import math
import time

import jax
import numpy as np

from models import utils as model_utils
from pathways_lite import configuration
from pathways_lite import data as data_lib
from pathways_lite.futures import Future
from pathways_lite import metrics as metrics_lib
from pathways_lite.metrics import MetricsWriter
from pathways_lite.outer import rules
from pathways_lite.outer.config import OuterConfig, check_island_mesh
from pathways_lite.outer.inner import make_inner
from pathways_lite.outer.snapshot import ckpt_state, place_restored, resolve
from pathways_lite.outer.topology import SERVER, make_runtime, worker_name
from pathways_lite.ray_backends import from_local

log = logging.getLogger(__name__)


_MEMO: dict = {}


def memo(key, make):
  """One compiled function per key for the whole process (runs and tests share compiles)."""
  if key not in _MEMO:
    _MEMO[key] = make()
  return _MEMO[key]


def outer_optimizer(name: str, lr: float, ocfg: OuterConfig):
  spec = (name, lr, ocfg.momentum, ocfg.b1, ocfg.b2, ocfg.eps)
  return memo(("opt",) + spec, lambda: rules.make_outer_optimizer(
      name, lr, momentum=ocfg.momentum, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps))


_identity = jax.jit(lambda x: x)
zeros_f32 = jax.jit(lambda p: jax.tree.map(lambda x: jax.numpy.zeros(x.shape, "float32"), p))


def wire(ocfg: OuterConfig):
  return None if ocfg.wire_dtype == "float32" else ocfg.wire_dtype


class Run:
  """The context one outer-loop run needs: config, data, compiled pieces, runtime, writer."""

  def __init__(self, config, workdir: str | None, devices=None, checkpointer=None):
    self.config = config
    self.ckpt = checkpointer       # pathways_lite.checkpoint.Checkpointer or None (driver's)
    self.records = 0               # metrics records written (a checkpoint keeps this many)
    self.workdir = workdir
    self.ocfg = ocfg = OuterConfig.from_config(config.outer)
    check_island_mesh(config, ocfg, len(jax.devices() if devices is None else devices))
    self.model_cfg = configuration.model_config(config)
    self.M = M = ocfg.num_workers
    self.H = ocfg.inner_steps
    self.total_steps = config.train.steps
    self.seed = config.seed
    self.data = data_lib.load_data(config.data, seed=config.seed, num_workers=M)
    self.shard_tokens = [s.num_tokens for s in self.data.shards]
    self.weights = rules.worker_weights(self.shard_tokens, M, ocfg.weighting)
    self.iters = [self.data.train_iterator(w) for w in range(M)]
    self.shard_progress = [0] * M
    self.val_batches = self.data.validation_batches(config.train.eval_batches)
    self.inner = make_inner(config, self.model_cfg, ocfg)
    self.outer_opt = outer_optimizer(ocfg.optimizer, ocfg.lr, ocfg)
    # config.runtime.backend: "local" keeps this runtime; "ray" swaps in Ray islands (same names,
    # clock, links); see pathways_lite/ray_backends.py.
    self.rt = from_local(config.runtime, make_runtime(ocfg, devices))
    self.workers = [worker_name(w) for w in range(M)]
    self.rng = np.random.default_rng([config.seed, 0x0CE])
    resuming = checkpointer is not None and checkpointer.latest_step() is not None
    self.writer = MetricsWriter(workdir, append=resuming) if workdir else None
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    self.tokens = 0
    self.rejected: list[dict] = []
    self.dropped = 0
    self.evals: list[dict] = []
    self.last_train: dict[int, float] = {}
    self.state: dict | None = None   # {"arrays": pytree (may hold Futures), "meta": JSON dict}
    self.next_eval = config.train.eval_every or self.total_steps
    self.t_start = time.time()

  # ---- islands of several devices -------------------------------------------------------
  def inner_on(self, island: str):
    """The inner pieces for `island` (outer/inner.py, Inner.on): the run's Inner itself on
    one-device islands (the default), else its copy jitted for the island's mesh."""
    if self.ocfg.island_devices == 1:
      return self.inner
    return self.inner.on(self.rt.island(island))

  def place(self, tree, island: str, name: str):
    """A host pytree (initial state, params) onto `island`: a transfer from the host on
    one-device islands (the default); on a mesh, laid out by the sharding rules (a transfer
    has one PartitionSpec for every leaf), then made a Future of the island by a no-cost
    identity call (so later transfers from it go through the link like a transfer's)."""
    if self.ocfg.island_devices == 1:
      return self.rt.transfer(tree, island=island, name=name)
    placed = self.inner.place(tree, self.rt.island(island))
    return self.rt.call(_identity, placed, island=island, cost=0, name=name)

  # ---- data -----------------------------------------------------------------------------
  def batches(self, shard: int, n: int) -> np.ndarray:
    """n batches of one shard's iterator as a host [n, B, L+1] array."""
    it = self.iters[shard]
    self.shard_progress[shard] += n
    self.tokens += n * self.tokens_per_step
    return np.stack([next(it) for _ in range(n)])

  # ---- logging --------------------------------------------------------------------------
  def write(self, step: int, values: dict, worker: int | None = None) -> None:
    if self.writer is not None:
      self.writer.write(step, values, worker=worker)
      self.records += 1

  def log_phase(self, step: int, worker: int, summary) -> None:
    """A worker's phase metrics (host values), read one outer step after dispatch."""
    s = jax.device_get(summary)
    loss = float(s["loss"])
    self.last_train[worker] = loss
    if not math.isfinite(loss):
      log.warning("worker %d: non-finite training loss %s at inner step %d", worker, loss, step)
    self.write(step, {"train/loss": loss, "train/grad_norm": s["grad_norm"], "train/lr": s["lr"],
                      "outer/delta_norm": s.get("delta_norm")}, worker=worker)

  def reject(self, step: int, worker: int, reason: str) -> None:
    """A non-finite pseudo-gradient that was not applied: logged with its reason."""
    rec = {"step": int(step), "worker": int(worker), "reason": reason}
    self.rejected.append(rec)
    log.warning("rejected pseudo-gradient of worker %d at step %d: %s", worker, step, reason)
    self.write(step, {"outer/rejected": len(self.rejected)}, worker=worker)

  def progress(self, step: int, extra: dict | None = None) -> None:
    vals = {"sim/time_s": self.rt.now(), "comm/bytes": self.rt.links.bytes_sent(),
            "train/tokens": self.tokens}
    vals.update(extra or {})
    self.write(step, vals)

  def eval_due(self, step: int) -> bool:
    return step >= self.next_eval or step >= self.total_steps

  def evaluate(self, step: int, params) -> dict:
    """Validation loss of the global params (host wait; takes no simulated time)."""
    if isinstance(params, Future):
      params = params.result()
    if self.ocfg.island_devices > 1:    # on the server's mesh (model.tp_collectives needs one)
      params = self.inner.place(params, self.rt.island(SERVER))
    ev = self.inner_on(SERVER).evaluate(params, self.val_batches)
    ev.update(step=int(step), sim_time_s=self.rt.now(), bytes=self.rt.links.bytes_sent(),
              tokens=self.tokens)
    self.evals.append(ev)
    self.write(step, {"val/loss": ev["loss"], "val/perplexity": ev["perplexity"],
                      "sim/time_s": ev["sim_time_s"], "comm/bytes": ev["bytes"],
                      "train/tokens": self.tokens})
    every = self.config.train.eval_every
    while every and self.next_eval <= step:
      self.next_eval += every
    log.info("step %d: val loss %.4f (sim %.1f s)", step, ev["loss"], ev["sim_time_s"])
    return ev

  # ---- state ----------------------------------------------------------------------------
  def meta(self, **extra) -> dict:
    m = {"algorithm": self.ocfg.algorithm, "num_workers": self.M,
         "data": [it.get_state() for it in self.iters], "shard_progress": list(self.shard_progress),
         "tokens": self.tokens, "rejected": list(self.rejected), "dropped": self.dropped,
         "runtime": {"clock": self.rt.clock.state_dict(), "links": self.rt.links.state_dict()},
         "rng": self.rng.bit_generator.state, "next_eval": self.next_eval, "evals": self.evals,
         "last_train": {str(k): v for k, v in self.last_train.items()}, "records": self.records}
    m.update(extra)
    return m

  def commit(self, step: int, arrays: dict, **meta) -> None:
    """The loop's state after an outer step (arrays may still be Futures).

    Every loop calls this once per outer step (async: per group of arrivals)
    and at the end; it is the one place to take a checkpoint of an outer run
    (`state_dict()` waits for the values)."""
    arrays = jax.tree.map(lambda x: x, arrays, is_leaf=lambda x: isinstance(x, Future))  # own lists
    self.state = {"arrays": arrays, "meta": self.meta(step=int(step), **meta)}
    if self.ckpt is None:
      return
    preempted = self.ckpt.preempted
    if self.save_due(step) and self.ckpt.last_saved_step != int(step) and (
        preempted or self.ckpt.should_save(int(step))):
      self.save()
    if preempted:
      raise Preempted(int(step))

  def save_due(self, step: int) -> bool:
    """Whether `step` is a save point: loops flush the metrics they hold back before
    committing it (so the checkpoint's record count covers them).

    The policy's test (Checkpointer.due: a step that jumps over a multiple of
    checkpoint.every_steps counts, as async loops advance by several steps), or a
    preemption. commit() may still skip the save while the previous one is writing
    (checkpoint.if_busy="skip"); the flush does not depend on that, so the metrics
    records are the same whichever saves were skipped."""
    if self.ckpt is None:
      return False
    return self.ckpt.preempted or self.ckpt.due(int(step))

  def save(self) -> None:
    """Checkpoints the last commit (ckpt_state: values without waiting under the virtual clock)."""
    arrays, meta = ckpt_state(self.rt, self.state)
    if self.writer is not None:
      self.writer.flush()
    meta["config"] = json.loads(configuration.to_json(self.config))
    self.ckpt.save(meta["step"], arrays, meta)

  def resume(self, like: dict):
    """(arrays, meta) of the workdir's latest checkpoint, or None for a fresh run.

    Called by a loop right after it built its initial state; `like` holds that
    state (keys of the committed arrays; Futures or arrays) so restored arrays
    land on the same islands and shardings. Restores the runtime's clock and
    link counters, the data iterators, RNG, evaluation schedule and metrics
    (records written after the checkpoint are dropped), and gives every
    Future of the committed state back as a Future with its original times;
    the ones still in flight at the save are queued again on the virtual clock
    in their original order, so the resumed run's events are the same.
    """
    if self.ckpt is None or self.ckpt.latest_step() is None:
      return None
    from pathways_lite import checkpoint
    res = checkpoint.resume(self.ckpt, json.loads(configuration.to_json(self.config)), None,
                            allow_config_change=self.config.checkpoint.allow_config_change)
    _, arrays, meta = res
    self.rt._engine.drain()                  # the loop's init work: nothing may be in flight
    self.rt.clock.load_state_dict(meta["runtime"]["clock"])
    self.rt.links.load_state_dict(meta["runtime"]["links"])
    for it, st in zip(self.iters, meta["data"]):
      it.set_state(st)
    self.shard_progress = list(meta["shard_progress"])
    self.tokens = meta["tokens"]
    self.rejected = list(meta["rejected"])
    self.dropped = meta["dropped"]
    self.rng.bit_generator.state = meta["rng"]
    self.next_eval = meta["next_eval"]
    self.evals = list(meta["evals"])
    self.last_train = {int(k): v for k, v in meta["last_train"].items()}
    self.records = meta["records"]
    if self.writer is not None:
      self.writer.close()
      metrics_lib.truncate_to(self.workdir, self.records)
      self.writer = MetricsWriter(self.workdir, append=True)
    arrays = place_restored(self.rt, arrays, like, meta.get("futures", {}))
    self.state = {"arrays": arrays, "meta": meta}
    return arrays, meta

  def resume_or_evaluate(self, like: dict, init_params):
    """`resume(like)`; a fresh run (None) evaluates `init_params` as step 0 instead.

    Loops then continue after the checkpoint's step. Each loop consumes the
    metrics it holds back before a commit that saves (`save_due`), so the
    checkpoint's record count covers every record up to its step.
    """
    resumed = self.resume(like)
    if resumed is None:
      self.evaluate(0, init_params)
    return resumed

  def state_dict(self) -> dict:
    """{"arrays": pytree of arrays, "meta": JSON dict} of the last commit (host wait)."""
    return {"arrays": resolve(self.state["arrays"]), "meta": self.state["meta"]}

  def summary(self, final_params, **extra) -> dict:
    if isinstance(final_params, Future):
      final_params = final_params.result()
    last = self.evals[-1] if self.evals else self.evaluate(self.total_steps, final_params)
    train = list(self.last_train.values())
    wall = time.time() - self.t_start
    out = {"config_name": self.config.name, "workdir": self.workdir,
           "algorithm": self.ocfg.algorithm,
           "num_workers": self.M, "inner_steps": self.H, "steps": self.total_steps,
           "tokens": self.tokens, "param_count": model_utils.param_count(final_params),
           "final_train_loss": float(np.mean(train)) if train else None,
           "final_val_loss": last["loss"],
           "final_val_perplexity": last["perplexity"], "sim_time_s": self.rt.now(),
           "bytes": self.rt.links.bytes_sent(), "wall_time_s": wall,
           "tokens_per_s": self.tokens / wall,
           "rejected": len(self.rejected), "dropped": self.dropped,
           "clock": self.ocfg.clock, "device": str(jax.devices()[0].device_kind)}
    out.update(extra)
    return out

  def close(self) -> None:
    self.rt.shutdown()
    if self.writer is not None:
      self.writer.close()


class Preempted(Exception):
  """Raised by Run.commit after the preemption save (SIGTERM/SIGINT); the driver stops."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}")
    self.step = step
