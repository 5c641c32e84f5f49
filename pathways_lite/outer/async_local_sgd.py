"""Asynchronous Local-SGD (Liu et al. 2023, arXiv 2401.09135), on the runtime.

Workers never wait for each other. Worker w takes the current global params,
runs H_w inner steps (its own inner optimizer state carries on), and sends
delta_w = theta_start - theta_w to the server, which applies it as soon as it
arrives (`as_completed` order: simulated time under the virtual clock, so a
run is bitwise reproducible) and hands the worker the new global params:

- naive: the outer optimizer (outer.optimizer, Nesterov by default) on every
  arrival, the delta taken whole;
- dn (delayed Nesterov): buffer N = outer.dn_buffer (0: M) arrivals; every
  arrival moves theta by lr*(delta/N + c*beta*m), every N-th first updates
  the momentum m <- beta*m + buffer/N (rules.dn_update); N=1, c=0 is naive
  Nesterov, exactly;
- DyLU (outer.dylu): H_w = floor(v_w / max v * H), v_w = 1 / step_time_s[w],
  so all workers finish a phase at about the same time;
- grace period (outer.grace_period_s > 0): after an arrival the server waits
  that long; everything arriving meanwhile is applied in arrival order and
  those workers restart together from the same, newest params;
- shard sampling (outer.shard_sampling="least_progress"): a restarting
  worker draws a data shard, favouring shards with the least progress.

Budget: M * train.steps inner steps in all, as in the synchronous loops; the
x axis ("step") is the applied inner steps / M. Non-finite deltas are
rejected on arrival with a logged reason and never applied.
"""
from __future__ import annotations

import jax

from pathways_lite.futures import ALL_COMPLETED, FIRST_COMPLETED, wait
from pathways_lite.outer import rules
from pathways_lite.outer.common import Run, memo, wire
from pathways_lite.outer.inner import pick0, pick1, pick2
from pathways_lite.outer.topology import SERVER
from pathways_lite.ray_elastic import Elastic, IslandLost

finite_fn = jax.jit(rules.tree_is_finite)


def make_naive_update(opt):
  return memo(("async_naive", opt), lambda: jax.jit(
      lambda p, s, d: rules.outer_step(opt, p, s, d)))


def make_dn_update(lr: float, beta: float, N: int, c: float, boundary: bool):
  count = N - 1 if boundary else 0   # rules.dn_update's branch: arrival number count+1
  return memo(("dn", lr, beta, N, c, boundary), lambda: jax.jit(
      lambda p, dn, d: rules.dn_update(p, dn, d, count, lr, beta, N, c)[:2]))


dn_init_fn = jax.jit(rules.dn_init)


def train(run: Run) -> dict:
  rt, inner, ocfg, M, H = run.rt, run.inner, run.ocfg, run.M, run.H
  dn = ocfg.async_outer == "dn"
  N = ocfg.buffer_size
  steps_w = rules.dylu_steps(ocfg.step_times, H) if ocfg.dylu else [H] * M
  budget = M * run.total_steps
  init = inner.init_state(run.seed)
  gp = rt.transfer(init.params, island=SERVER, name="init params")
  if dn:
    ostate = rt.call(dn_init_fn, gp, island=SERVER, cost=0, name="dn init")
  else:
    opt = run.outer_opt
    ostate = rt.call(memo(("opt_init", opt), lambda: jax.jit(opt.init)), gp, island=SERVER,
                     cost=0, name="outer init")
    naive = make_naive_update(opt)
  ws = [rt.transfer(init, island=w, name=f"init {w}") for w in run.workers]
  el = Elastic(run)   # a lost worker: stop hearing from it; replaced, it restarts from the global params
  book = {"dispatched": 0, "applied": 0, "version": 0, "dn_count": 0, "arrivals": 0}
  inflight: dict = {}     # delta-at-server Future -> (worker, steps, summary Future, version)
  order = {}              # dispatch order, to break ties between equal arrival times

  def launch(w: int) -> None:
    if w in el.out:
      return
    h = min(steps_w[w], budget - book["dispatched"])
    if h <= 0:
      return
    book["dispatched"] += h
    shard = el.shard[w]
    if ocfg.shard_sampling == "least_progress":
      frac = [p / it.batches_per_epoch for p, it in zip(run.shard_progress, run.iters)]
      shard = rules.sample_shard(frac, run.rng)
    isl = run.workers[w]
    start = rt.transfer(gp, island=isl, name=f"params->{isl}")
    if w in el.pending_join:               # a replacement: it starts from the current global params
      el.joined(book["applied"] // M, w, start, gp)
    out = rt.call(inner.phase, ws[w], start, run.batches(shard, h), island=isl, cost=h,
                  name=f"phase (shard {shard})")
    ws[w] = rt.call(pick0, out, island=isl, cost=0, name="state")
    d = rt.call(pick1, out, island=isl, cost=0, name="delta")
    up = rt.transfer(d, island=SERVER, wire_dtype=wire(ocfg), name=f"delta {w}")
    inflight[up] = (w, h, rt.call(pick2, out, island=isl, cost=0, name="summary"), book["version"])
    order[up] = len(order)

  resumed = run.resume({"global": {"params": gp, "opt_state": ostate}, "workers": ws})
  if resumed is None:
    run.evaluate(0, init.params)
    for w in range(M):
      launch(w)
  else:                   # the checkpoint's in-flight phases arrive when they would have
    arrays, meta = resumed
    gp, ostate, ws = arrays["global"]["params"], arrays["global"]["opt_state"], arrays["workers"]
    book.update({k: meta[k] for k in book})
    for up, s, (w, h, v) in zip(arrays["in_flight"], arrays["in_flight_summaries"],
                                meta["in_flight"]):
      inflight[up] = (w, h, s, v)
      order[up] = len(order)
  while inflight:
    done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
    group = sorted(done, key=lambda f: (_ended(f), order[f]))
    if ocfg.grace_period_s > 0:
      rest = [f for f in inflight if f not in done]
      more, _ = wait(rest, timeout=ocfg.grace_period_s, return_when=ALL_COMPLETED) if rest else ((), ())
      group += sorted(more, key=lambda f: (_ended(f), order[f]))
    restart = []
    for up in group:
      w, h, summary, version = inflight.pop(up)
      if isinstance(up.exception(), IslandLost) and up.exception().island == run.workers[w]:
        book["dispatched"] -= h               # its phase never arrives: the budget goes back
        ws[w] = init                          # its inner state is gone (a replacement starts fresh)
        for v in el.lost(book["applied"] // M, {w: up.exception()}):
          ws[v] = rt.transfer(init, island=run.workers[v], name=f"join {run.workers[v]}")
          restart.append(v)
        run.write(book["applied"] // M, {"outer/workers_alive": float(el.num_alive())})
        continue
      restart.append(w)
      book["arrivals"] += 1
      step = book["applied"] // M
      if not bool(rt.call(finite_fn, up, island=SERVER, cost=0, name="finite?").result()):
        run.reject(step, w, rules.nonfinite_reason(up.result()) or "non-finite pseudo-gradient")
        continue
      if dn:
        boundary = (book["dn_count"] + 1) % N == 0
        upd = rt.call(make_dn_update(ocfg.lr, ocfg.momentum, N, ocfg.dn_c, boundary), gp, ostate,
                      up, island=SERVER, cost=0, name="dn step")
        book["dn_count"] += 1
      else:
        upd = rt.call(naive, gp, ostate, up, island=SERVER, cost=0, name="outer step")
      gp = rt.call(pick0, upd, island=SERVER, cost=0, name="global params")
      ostate = rt.call(pick1, upd, island=SERVER, cost=0, name="outer state")
      book["applied"] += h
      book["version"] += 1
      step = book["applied"] // M
      run.log_phase(step, w, summary.result())
      run.write(step, {"outer/staleness": book["version"] - 1 - version, "outer/steps": h},
                worker=w)
      run.progress(step, {"outer/arrivals": book["arrivals"]})
      if run.eval_due(step) and step < run.total_steps:
        run.evaluate(step, gp)
    for w in restart:
      launch(w)
    run.commit(book["applied"] // M, {"global": {"params": gp, "opt_state": ostate}, "workers": ws,
                                      "in_flight": [f for f in inflight],
                                      "in_flight_summaries": [v[2] for v in inflight.values()]},
               **book, in_flight_workers=[v[0] for v in inflight.values()],
               in_flight=[[v[0], v[1], v[3]] for v in inflight.values()])
  run.evaluate(book["applied"] // M, gp)
  return run.summary(gp, arrivals=book["arrivals"], steps_per_phase=steps_w)


def _ended(f) -> float:
  t = f.times[2]
  return float("inf") if t is None else t
