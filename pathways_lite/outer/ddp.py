"""DDP: synchronous data parallelism, the baseline. Gradients are all-reduced every step.

Each step, every worker computes the gradient of its own batch at the current
params (on its island), sends it to the server (outer.wire_dtype on the wire,
f32 sum), the server averages the M gradients uniformly (one global batch of
M*B rows), applies the inner optimizer once and sends the params back. So M
workers with batch B train like one worker with batch M*B, at M times the
communication of H-step DiLoCo per step. Non-finite gradients are rejected
and logged like pseudo-gradients (the step uses the finite ones).
This is `outer.collectives="server"`; "xla" / "pallas" all-reduce the
gradients across the worker islands instead (ddp_collective.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pathways_lite.outer import rules
from pathways_lite.outer.common import Run, memo, wire
from pathways_lite.outer.inner import pick0, pick1, pick_params
from pathways_lite.outer.topology import SERVER


def make_ddp_update(inner):
  def update(state, grads, keep):
    finite = jnp.stack([rules.tree_is_finite(g) for g in grads])
    ok = finite & keep
    w = ok.astype(jnp.float32) / jnp.maximum(jnp.sum(ok), 1).astype(jnp.float32)
    clean = [jax.tree.map(lambda x, o=ok[i]: jnp.where(o, x, 0.0), g) for i, g in enumerate(grads)]
    g = rules.weighted_sum(clean, [w[i] for i in range(len(grads))])
    new = inner.apply_fn(state, g)
    applied = jnp.any(ok)
    new = jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, state)
    return new, {"finite": finite, "applied": applied}
  return memo(("ddp_update", id(inner)), lambda: jax.jit(update))


def train(run: Run) -> dict:
  if run.ocfg.collectives != "server":  # all-reduce across the worker islands: ddp_collective.py
    from pathways_lite.outer import ddp_collective
    return ddp_collective.train(run)
  rt, inner, ocfg, M = run.rt, run.inner, run.ocfg, run.M
  update = make_ddp_update(inner)
  init = inner.init_state(run.seed)
  state = run.place(init, SERVER, "init state")   # islands of k devices: sharded
  params = rt.call(pick_params, state, island=SERVER, cost=0, name="params")
  keep = np.ones(M, bool)
  resumed = run.resume_or_evaluate({"global": {"state": state}}, init.params)
  if resumed is not None:                 # continue after the checkpoint's step
    state = resumed[0]["global"]["state"]
    params = rt.call(pick_params, state, island=SERVER, cost=0, name="params")
  pending = None
  for step in range(resumed[1]["step"] + 1 if resumed else 1, run.total_steps + 1):
    grads, metrics = [], {}
    for w, isl in enumerate(run.workers):
      p = rt.transfer(params, island=isl, name=f"params->{isl}")
      out = rt.call(run.inner_on(isl).grads, p, run.batches(w, 1)[0], island=isl, cost=1, name="grads")
      g = rt.call(pick0, out, island=isl, cost=0, name="g")
      grads.append(rt.transfer(g, island=SERVER, wire_dtype=wire(ocfg), name=f"grads {w}"))
      metrics[w] = rt.call(pick1, out, island=isl, cost=0, name="metrics")
    upd = rt.call(update, state, grads, keep, island=SERVER, cost=0, name="ddp update")
    state = rt.call(pick0, upd, island=SERVER, cost=0, name="state")
    params = rt.call(pick_params, state, island=SERVER, cost=0, name="params")
    info = rt.call(pick1, upd, island=SERVER, cost=0, name="info")
    if pending is not None:
      _consume(run, *pending)
    pending = (step, metrics, info)
    if run.eval_due(step) or run.save_due(step):   # records up to `step` precede its checkpoint
      _consume(run, *pending)
      pending = None
      if run.eval_due(step):
        run.evaluate(step, params)
    run.commit(step, {"global": {"state": state}})
  if pending is not None:
    _consume(run, *pending)
  return run.summary(params, inner_steps=1)


def _consume(run: Run, step: int, metrics: dict, info) -> None:
  log_every = run.config.train.log_every
  inf = jax.device_get(info.result())
  for w in metrics:
    if not inf["finite"][w]:
      run.reject(step, w, "non-finite gradient (NaN/Inf); not applied")
  if step % log_every and step != run.total_steps:
    return
  for w, m in metrics.items():
    v = jax.device_get(m.result())
    run.last_train[w] = float(v["loss"])
    run.write(step, {"train/loss": v["loss"], "train/grad_norm": v["grad_norm"]}, worker=w)
  run.progress(step)
