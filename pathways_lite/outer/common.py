"""What every outer loop shares: the run context (`Run`), islands + runtime, data, logging.

Islands: one per worker (`worker<w>`) plus `server`, where the outer
optimizer runs. `outer.islands="virtual"`: all share the first device
(time-sliced; M workers on one CPU or GPU). `"devices"`: worker w gets device
w mod D; the server shares the device of worker `outer.outer_island`.
Clock: `outer.clock="virtual"` gives worker w the speed `outer.step_time_s[w]`
simulated seconds per inner step (a phase of H steps costs H units) and the
server speed 0 (the outer update is instant); links carry
`outer.link_bandwidth_gbps` / `outer.link_latency_s` between every pair.

State (`Run.state_dict`) is two parts, as `pathways_lite.checkpoint` saves it:
arrays (a pytree of arrays: global params, outer optimizer state, per-worker
TrainStates, algorithm extras such as DN buffers or delayed deltas, RNG) and
meta (JSON: step counters, data iterator positions, clock and link counters,
rejected pseudo-gradients, bookkeeping).
"""
from __future__ import annotations

import logging
import math
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh

from models import utils as model_utils
from pathways_lite import configuration
from pathways_lite import data as data_lib
from pathways_lite.clock import VirtualClock
from pathways_lite.futures import Future
from pathways_lite.islands import Island, make_islands
from pathways_lite.metrics import MetricsWriter
from pathways_lite.network import Link, LinkModel
from pathways_lite.outer import rules
from pathways_lite.outer.config import OuterConfig
from pathways_lite.outer.inner import make_inner
from pathways_lite.ray_backends import from_local
from pathways_lite.runtime import Runtime

log = logging.getLogger(__name__)
SERVER = "server"


def worker_name(w: int) -> str:
  return f"worker{w}"


def make_run_islands(ocfg: OuterConfig, devices=None) -> list[Island]:
  devices = list(jax.devices() if devices is None else devices)
  M = ocfg.num_workers
  names = [worker_name(w) for w in range(M)] + [SERVER]
  if ocfg.islands == "virtual":
    return make_islands(M + 1, virtual=True, devices=devices[:1], names=names)
  islands = []
  shared = {}
  for w in range(M):
    shared.setdefault(w % len(devices), []).append(w)
  for w in range(M):
    d = devices[w % len(devices)]
    islands.append(Island(names[w], (d,), Mesh(np.array([d], dtype=object), ("data",)),
                          len(shared[w % len(devices)]) > 1))
  d = devices[ocfg.outer_island % len(devices)]
  islands.append(Island(SERVER, (d,), Mesh(np.array([d], dtype=object), ("data",)), True))
  return islands


def make_runtime(ocfg: OuterConfig, devices=None) -> Runtime:
  islands = make_run_islands(ocfg, devices)
  if ocfg.clock == "virtual":
    speeds = {worker_name(w): t for w, t in enumerate(ocfg.step_times)}
    speeds[SERVER] = 0.0
    clock = VirtualClock(speeds=speeds)
  else:
    clock = "real"
  bw = ocfg.link_bandwidth_gbps * 1e9 / 8 if ocfg.link_bandwidth_gbps > 0 else math.inf
  links = LinkModel(default=Link(bandwidth_bytes_per_s=bw, latency_s=ocfg.link_latency_s))
  return Runtime(islands, clock=clock, links=links, trace=True)


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


zeros_f32 = jax.jit(lambda p: jax.tree.map(lambda x: jax.numpy.zeros(x.shape, "float32"), p))


def wire(ocfg: OuterConfig):
  return None if ocfg.wire_dtype == "float32" else ocfg.wire_dtype


class Run:
  """The context one outer-loop run needs: config, data, compiled pieces, runtime, writer."""

  def __init__(self, config, workdir: str | None, devices=None):
    self.config = config
    self.workdir = workdir
    self.ocfg = ocfg = OuterConfig.from_config(config.outer)
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
    self.writer = MetricsWriter(workdir) if workdir else None
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    self.tokens = 0
    self.rejected: list[dict] = []
    self.dropped = 0
    self.evals: list[dict] = []
    self.last_train: dict[int, float] = {}
    self.state: dict | None = None   # {"arrays": pytree (may hold Futures), "meta": JSON dict}
    self.next_eval = config.train.eval_every or self.total_steps
    self.t_start = time.time()

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
    ev = self.inner.evaluate(params, self.val_batches)
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
         "runtime": {"clock": self.rt.clock.state_dict(), "links": self.rt.links.state_dict()}}
    m.update(extra)
    return m

  def commit(self, step: int, arrays: dict, **meta) -> None:
    """The loop's state after an outer step (arrays may still be Futures).

    Every loop calls this once per outer step (async: per group of arrivals)
    and at the end; it is the one place to take a checkpoint of an outer run
    (`state_dict()` waits for the values)."""
    arrays = jax.tree.map(lambda x: x, arrays, is_leaf=lambda x: isinstance(x, Future))  # own lists
    self.state = {"arrays": arrays, "meta": self.meta(step=int(step), **meta)}

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


def resolve(tree):
  """Futures inside a pytree -> their values (host wait)."""
  return jax.tree.map(lambda x: x.result() if isinstance(x, Future) else x, tree,
                      is_leaf=lambda x: isinstance(x, Future))
