"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105) and Local-SGD / FedAvg, on the runtime.

Every outer step t, each active worker w (its own island):
  1. receives the global params theta (server -> worker, f32),
  2. runs H inner steps from theta with its own inner optimizer (AdamW by
     default; its state is never synced) on its own shard,
  3. sends delta_w = theta - theta_w to the server (quantized with
     outer.wire_dtype; accumulated in f32),
and the server applies the outer optimizer to sum_w w_w delta_w, weights by
shard tokens (non-iid) or uniform, over the deltas that were kept (random
drops, outer.drop_prob) and finite (non-finite ones are rejected and logged,
never applied). local_sgd is the same loop with outer SGD, lr 1 (FedAvg:
theta <- the weighted mean of the workers' params).

Each phase is one scan call or a chain of H step calls (outer.inner_loop, see
pathways_lite/outer/inner.py). The whole step is enqueued as futures; the
host reads step t-1's metrics after step t is dispatched. Elastic compute: outer.worker_schedule gives the
number of active workers (the first n) for equal slices of training.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pathways_lite import network
from pathways_lite.outer import rules
from pathways_lite.outer.common import Run, memo, outer_optimizer, wire, zeros_f32
from pathways_lite.outer.inner import (pick0, pick1, pick2, pick_delta, pick_state, pick_summary,
                                       resolve_inner_loop)
from pathways_lite.outer.topology import SERVER
from pathways_lite.ray_elastic import Elastic


def make_outer_update(opt: optax.GradientTransformation):
  """Jitted server step: (params, opt_state, deltas[M], weights[M], keep[M]) -> (params, opt_state, info).

  Deltas that are dropped or non-finite get weight 0 (and are zeroed, so a NaN
  never reaches the sum); the kept weights are renormalised to sum to 1. If
  nothing is kept, params and optimizer state stay as they are.
  """

  def update(params, opt_state, deltas, weights, keep):
    finite = jnp.stack([rules.tree_is_finite(d) for d in deltas])
    ok = finite & keep
    w = jnp.where(ok, weights, 0.0)
    total = jnp.sum(w)
    w = w / jnp.where(total > 0, total, 1.0)
    clean = [jax.tree.map(lambda x, o=ok[i]: jnp.where(o, x, 0.0), d) for i, d in enumerate(deltas)]
    delta = rules.weighted_sum(clean, [w[i] for i in range(len(deltas))])
    new_p, new_s = rules.outer_step(opt, params, opt_state, delta)
    applied = total > 0
    new_p = jax.tree.map(lambda a, b: jnp.where(applied, a, b), new_p, params)
    new_s = jax.tree.map(lambda a, b: jnp.where(applied, a, b), new_s, opt_state)
    return new_p, new_s, {"finite": finite, "applied": applied, "delta_norm": rules.tree_norm(delta)}

  return memo(("outer_update", opt), lambda: jax.jit(update))


def active_workers(run: Run, t: int, num_outer: int) -> list[int]:
  sched = run.ocfg.worker_schedule
  if not sched:
    return list(range(run.M))
  n = sched[min(len(sched) - 1, t * len(sched) // num_outer)]
  return list(range(n))


def train(run: Run) -> dict:
  """The DiLoCo / Local-SGD outer loop; returns the run summary."""
  rt, inner, ocfg, M, H = run.rt, run.inner, run.ocfg, run.M, run.H
  loop = resolve_inner_loop(ocfg.inner_loop, rt, run.workers[0])   # before any compile
  opt = run.outer_opt if ocfg.algorithm == "diloco" else outer_optimizer("sgd", 1.0, ocfg)
  update = make_outer_update(opt)
  opt_init = memo(("opt_init", opt), lambda: jax.jit(opt.init))
  init = inner.init_state(run.seed)                         # every worker: the same seed
  gp = run.place(init.params, SERVER, "init params")   # islands of k devices: sharded
  ostate = rt.call(opt_init, gp, island=SERVER, cost=0, name="outer init")
  ws = [run.place(init, w, f"init {w}") for w in run.workers]
  zeros = rt.call(zeros_f32, gp, island=SERVER, cost=0, name="zeros")
  weights = np.asarray(run.weights, np.float32)
  num_outer = math.ceil(run.total_steps / H)
  pending = None
  step = t0 = 0
  resumed = run.resume({"global": {"params": gp, "opt_state": ostate}, "workers": ws})
  if resumed is None:
    run.evaluate(0, init.params)
  else:                                   # continue after the checkpoint's outer step
    arrays, meta = resumed
    gp, ostate, ws = arrays["global"]["params"], arrays["global"]["opt_state"], arrays["workers"]
    step, t0 = meta["step"], meta["outer_step"]
  el = Elastic(run)     # a lost island: average over the survivors, replace it (Ray backend)
  for t in range(t0, num_outer):
    h = min(H, run.total_steps - t * H)
    active = el.alive(active_workers(run, t, num_outer))
    keep = np.array([w in active for w in range(M)])
    if ocfg.drop_prob > 0:
      drop = run.rng.random(M) < ocfg.drop_prob
      run.dropped += int(np.sum(drop & keep))
      keep &= ~drop
    deltas, summaries, starts = [zeros] * M, {}, {}
    for w in active:
      isl = run.workers[w]
      start = starts[w] = rt.transfer(gp, island=isl, name=f"params->{isl}")
      out = run.inner_on(isl).dispatch_phase(rt, loop, ws[w], start, el.batches(w, h),
                                             island=isl, name=f"phase {t}")
      ws[w] = rt.call(pick_state, out, island=isl, cost=0, name="state")
      d = rt.call(pick_delta, out, island=isl, cost=0, name="delta")
      deltas[w] = rt.transfer(d, island=SERVER, wire_dtype=wire(ocfg), name=f"delta {w}")
      summaries[w] = rt.call(pick_summary, out, island=isl, cost=0, name="summary")
    _, lost = el.settle({w: deltas[w] for w in active})   # Ray: waits for this step's deltas
    for w in lost:                                        # average over the survivors
      keep[w], deltas[w] = False, zeros
      summaries.pop(w)
    for w in el.pending_join & set(starts):
      el.joined(t, w, starts[w], gp)
    prev = (gp, ostate) if lost else None
    upd = rt.call(update, gp, ostate, deltas, weights, keep, island=SERVER, cost=0,
                  name=f"outer step {t}")
    gp = rt.call(pick0, upd, island=SERVER, cost=0, name="global params")
    ostate = rt.call(pick1, upd, island=SERVER, cost=0, name="outer state")
    info = rt.call(pick2, upd, island=SERVER, cost=0, name="info")
    step += h
    if lost:
      _audit(el, t, step, prev, (gp, ostate), deltas, weights, keep, lost)
      for w in lost:                          # the lost state is gone; a replacement starts fresh
        ws[w] = fresh_state(init, step)
      for w in el.lost(step, lost):           # rejoins at step t+1 from the global params
        ws[w] = rt.transfer(ws[w], island=run.workers[w], name=f"join {run.workers[w]}")
    if pending is not None:                 # step t-1's metrics, after step t is enqueued
      _consume(run, *pending)
    pending = (step, summaries, info, keep)
    if run.eval_due(step) or run.save_due(step):   # records up to `step` precede its checkpoint
      _consume(run, *pending)
      pending = None
      if run.eval_due(step):
        run.evaluate(step, gp)
    run.commit(step, {"global": {"params": gp, "opt_state": ostate}, "workers": ws},
               outer_step=t + 1, elastic=el.meta())
  if pending is not None:
    _consume(run, *pending)
  upload = sum(network.payload_nbytes(np.shape(x), np.float32, wire(ocfg))
               for x in jax.tree.leaves(init.params))
  return run.summary(gp, peak_sync_bytes=M * upload, syncs=num_outer, inner_loop=loop)


def _consume(run: Run, step: int, summaries: dict, info, keep) -> None:
  for w, s in summaries.items():
    run.log_phase(step, w, s.result())
  inf = jax.device_get(info.result())
  for w in summaries:
    if not inf["finite"][w]:
      run.reject(step, w, "non-finite pseudo-gradient (NaN/Inf); not applied")
  run.progress(step, {"outer/applied": float(inf["applied"]),
                      "outer/workers": float(np.sum(keep)),
                      "outer/workers_alive": float(len(summaries)),
                      "outer/delta_norm": float(inf["delta_norm"])})


def fresh_state(init, step: int):
  """A joining worker's TrainState (host): fresh inner optimizer state, the run's inner step count."""
  return init.replace(step=np.asarray(step, np.asarray(init.step).dtype))


def _audit(el, t, step, prev, new, deltas, weights, keep, lost) -> None:
  """Host record of a step that lost workers: what the survivors' average must reproduce."""
  get = lambda x: jax.device_get(x.result() if hasattr(x, "result") else x)   # noqa: E731
  el.audit.append({"outer_step": t, "step": int(step), "lost": sorted(int(w) for w in lost),
                   "keep": np.asarray(keep).copy(), "weights": np.asarray(weights).copy(),
                   "prev_params": get(prev[0]), "prev_opt_state": get(prev[1]),
                   "deltas": {w: get(d) for w, d in enumerate(deltas) if keep[w]},
                   "params": get(new[0]), "opt_state": get(new[1])})
