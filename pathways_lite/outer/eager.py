"""Overlapped outer steps: eager updates and naive delayed outer gradients (Kale et al. 2025,
arXiv 2502.12996), on the runtime.

The exchange of outer step t's pseudo-gradients overlaps the next d inner
phases (d = outer.overlap_outer_steps). Every worker m keeps its own copy of
the outer params theta_m and of the outer optimizer state (on its island):

- eager:   theta_m <- OuterOpt(theta_m, w_m delta_m(t) + sum_{j!=m} w_j delta_j(t-d))
           (its own fresh pseudo-gradient, no waiting, plus the others' that
           arrived during the phases it overlapped);
- delayed: theta_m <- OuterOpt(theta_m, sum_j w_j delta_j(t-d))  (all identical).

The server only reduces: for eager it returns, for each m, the exclusive sum
sum_{j!=m} w_j delta_j (in worker order), for delayed the full sum; both
travel quantized (outer.wire_dtype) like the deltas. Until t >= d the delayed
term is zero. With d = 0 the worker waits for the fresh exchange, and both
modes are synchronous DiLoCo (each worker then applies the same average).
Non-finite deltas count as zero (and are logged), here without re-weighting.
The global model reported (evaluated) is the mean of the workers' theta_m.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pathways_lite.outer import rules
from pathways_lite.outer.common import Run, memo, wire, zeros_f32
from pathways_lite.outer.inner import pick0, pick1, pick2, pick_params
from pathways_lite.outer.topology import SERVER
from pathways_lite.ray_elastic import Elastic


def make_exchange(M: int, eager: bool):
  def exchange(deltas, weights):
    finite = jnp.stack([rules.tree_is_finite(d) for d in deltas])
    clean = [jax.tree.map(lambda x, o=finite[i]: jnp.where(o, x, 0.0), d) for i, d in enumerate(deltas)]
    if not eager:
      return [rules.weighted_sum(clean, [weights[j] for j in range(M)])], finite
    outs = []
    for m in range(M):
      others = [j for j in range(M) if j != m]
      if not others:
        outs.append(jax.tree.map(jnp.zeros_like, clean[m]))
      else:
        outs.append(rules.weighted_sum([clean[j] for j in others], [weights[j] for j in others]))
    return outs, finite
  return memo(("exchange", M, eager), lambda: jax.jit(exchange))


def make_worker_update(opt, eager: bool):
  def update(theta, opt_state, own, other, w_own):
    if eager:
      ok = rules.tree_is_finite(own)
      g = jax.tree.map(lambda a, b: jnp.where(ok, w_own * a, 0.0) + b, own, other)
    else:
      g = other
    return rules.outer_step(opt, theta, opt_state, g)
  return memo(("eager_update", opt, eager), lambda: jax.jit(update))


def _pick_i(i: int):
  return memo(("pick_list", i), lambda: jax.jit(lambda out: out[0][i]))


def train(run: Run) -> dict:
  rt, inner, ocfg, M, H = run.rt, run.inner, run.ocfg, run.M, run.H
  eager, d = ocfg.eager_mode == "eager", ocfg.overlap_outer_steps
  opt = run.outer_opt
  exchange, update = make_exchange(M, eager), make_worker_update(opt, eager)
  opt_init = memo(("opt_init", opt), lambda: jax.jit(opt.init))
  init = inner.init_state(run.seed)
  ts = [rt.transfer(init, island=w, name=f"init {w}") for w in run.workers]
  theta = [rt.call(pick_params, t, island=w, cost=0) for t, w in zip(ts, run.workers)]
  ostate = [rt.call(opt_init, th, island=w, cost=0, name="outer init")
            for th, w in zip(theta, run.workers)]
  zeros = [rt.call(zeros_f32, th, island=w, cost=0, name="zeros") for th, w in zip(theta, run.workers)]
  arrived: list[list] = [[] for _ in range(M)]   # arrived[m][t]: what worker m got for step t
  weights = np.asarray(run.weights, np.float32)
  num_outer = math.ceil(run.total_steps / H)
  pending, step, t0 = None, 0, 0
  resumed = run.resume_or_evaluate({"workers": ts, "theta": theta, "outer_opt_state": ostate},
                                   init.params)
  if resumed is not None:   # continue after the checkpoint's outer step, exchanges in flight
    arrays, meta = resumed
    ts, theta, ostate = list(arrays["workers"]), list(arrays["theta"]), list(arrays["outer_opt_state"])
    step, t0 = meta["step"], meta["outer_step"]
    kept = list(arrays.get("in_flight", [])) + [[]] * M   # Orbax may drop empty lists
    arrived = [[None] * (t0 - len(k)) + list(k) for k in kept[:M]]
  el = Elastic(run)     # a lost island: exchange over the survivors, replace it (Ray backend)
  zs = rt.call(zeros_f32, init.params, island=SERVER, cost=0, name="zeros") if el.enabled else None
  for t in range(t0, num_outer):
    h = min(H, run.total_steps - t * H)
    live = el.alive(range(M))
    own, ups, summaries = [None] * M, [zs] * M, {}
    for m in live:
      isl = run.workers[m]
      out = rt.call(inner.phase, ts[m], theta[m], el.batches(m, h), island=isl, cost=h,
                    name=f"phase {t}")
      ts[m] = rt.call(pick0, out, island=isl, cost=0, name="state")
      own[m] = rt.call(pick1, out, island=isl, cost=0, name="delta")
      summaries[m] = rt.call(pick2, out, island=isl, cost=0, name="summary")
      ups[m] = rt.transfer(own[m], island=SERVER, wire_dtype=wire(ocfg), name=f"delta {m}")
    _, lost = el.settle({m: ups[m] for m in live})      # Ray: waits for this step's deltas
    for m in lost:
      ups[m] = zs
      summaries.pop(m)
    survivors = [m for m in live if m not in lost]
    wts = weights
    if len(survivors) < M:                              # shard-size weights renormalised
      mask = np.array([m in survivors for m in range(M)], np.float32)
      wts = (weights * mask / max(float(np.sum(weights * mask)), 1e-30)).astype(np.float32)
    ex = rt.call(exchange, ups, wts, island=SERVER, cost=0, name=f"exchange {t}")
    for m in range(M):
      if m not in survivors:
        arrived[m].append(None)
        continue
      isl = run.workers[m]
      part = rt.call(_pick_i(m if eager else 0), ex, island=SERVER, cost=0, name=f"for {isl}")
      arrived[m].append(rt.transfer(part, island=isl, wire_dtype=wire(ocfg), name=f"sum->{isl}"))
    for m in survivors:
      isl = run.workers[m]
      other = arrived[m][t - d] if t >= d else zeros[m]
      upd = rt.call(update, theta[m], ostate[m], own[m], other, float(wts[m]), island=isl,
                    cost=0, name=f"outer step {t}")
      theta[m] = rt.call(pick0, upd, island=isl, cost=0, name="theta")
      ostate[m] = rt.call(pick1, upd, island=isl, cost=0, name="outer state")
      if t >= d:
        arrived[m][t - d] = None                  # consumed: let it go
    info = rt.call(pick1, ex, island=SERVER, cost=0, name="finite")
    step += h
    if lost:
      _lose_and_rejoin(run, el, step, t, d, eager, lost, survivors, init, ts, theta, ostate, zeros,
                       arrived)
    if pending is not None:
      _consume(run, *pending)
    pending = (step, summaries, info)
    if run.eval_due(step) or run.save_due(step):   # records up to `step` precede its checkpoint
      _consume(run, *pending)
      pending = None
      if run.eval_due(step):
        run.evaluate(step, consensus(theta))
    # in flight: the exchanges of outer steps t-d+1..t each worker has not applied yet
    run.commit(step, {"workers": ts, "theta": theta, "outer_opt_state": ostate,
                      "in_flight": [[a for a in arr if a is not None] for arr in arrived]},
               outer_step=t + 1, overlap_outer_steps=d, elastic=el.meta())
  if pending is not None:
    _consume(run, *pending)
  final = consensus(theta)
  return run.summary(final)


def _lose_and_rejoin(run, el, step, t, d, eager, lost, survivors, init, ts, theta, ostate, zeros,
                     arrived) -> None:
  """Lost workers drop out; replacements get the consensus params, a survivor's outer optimizer
  state, a fresh inner state, and the exchanges still in flight (delayed: a survivor's; eager:
  zeros, having sent nothing)."""
  from pathways_lite.outer.diloco import fresh_state
  rt = run.rt
  for m in lost:
    ts[m] = theta[m] = ostate[m] = zeros[m] = None
    arrived[m] = [None] * len(arrived[m])
  if not survivors:
    raise RuntimeError(f"every worker was lost at outer step {t}; nothing to continue from")
  rejoin = el.lost(step, lost)
  if not rejoin:
    return
  src = survivors[0]
  glob = consensus([theta[m] for m in survivors])
  for m in rejoin:
    isl = run.workers[m]
    ts[m] = rt.transfer(fresh_state(init, step).replace(params=glob), island=isl, name=f"join {isl}")
    theta[m] = rt.call(pick_params, ts[m], island=isl, cost=0, name="theta")
    ostate[m] = rt.transfer(ostate[src], island=isl, name=f"outer state->{isl}")
    zeros[m] = rt.call(zeros_f32, theta[m], island=isl, cost=0, name="zeros")
    for i in range(max(0, t - d + 1), t + 1):
      arrived[m][i] = zeros[m] if eager else rt.transfer(arrived[src][i], island=isl, name=f"sum->{isl}")
    el.joined(t + 1, m, theta[m], glob)


def consensus(theta) -> dict:
  """The mean of the workers' outer params (host arrays); identical copies stay bitwise equal."""
  vals = [jax.device_get(t.result()) for t in theta if t is not None]
  if all(_equal(vals[0], v) for v in vals[1:]):
    return vals[0]
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *vals)


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _consume(run: Run, step: int, summaries: dict, info) -> None:
  for m, s in summaries.items():
    run.log_phase(step, m, s.result())
  finite = jax.device_get(info.result())
  for m in summaries:
    if not finite[m]:
      run.reject(step, m, "non-finite pseudo-gradient (NaN/Inf); counted as zero")
  run.progress(step, {"outer/workers_alive": float(len(summaries))})
