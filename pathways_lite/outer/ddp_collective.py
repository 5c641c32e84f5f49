"""DDP with real collectives: `outer.collectives = "xla" | "pallas"`.

Instead of sending every gradient to the server island (`ddp.py`, "server"),
each step is ONE gang computation over the worker islands (`Runtime.gang`):
every worker computes the gradient of its own batch, the gradients are
all-reduced across the union of the worker islands with
`ops.collectives` (bucketed, each bucket's all-reduce issued inside the
backward pass by `sync_grads`, so it overlaps the rest of the backward), and
every worker applies the same inner-optimizer update to its own replica. The
replicas stay bitwise identical (every worker gets the same reduced vector and
runs the same update). `"xla"` uses lax.psum (NCCL on GPU), `"pallas"` the
ring kernels of ops/collectives (Mosaic GPU on Hopper, the TPU interpreter on
CPU).

Same training as the server mode: the update uses the mean of the M
gradients (one global batch of M*B rows), equal up to f32 summation order.
Non-finite gradients: if the reduced mean is not finite, the step (all
workers alike, the predicate is computed from the identical reduced vector)
recomputes the local gradients, all-reduces the finite ones and a per-worker
finite flag, and averages over the finite workers, like the server mode; the
rejected workers are logged. If none is finite, nothing is applied.

Metrics: per worker train/loss is its own batch's loss; train/grad_norm is the
norm of the averaged gradient that was applied (the server mode logs each
worker's own gradient norm).

Needs worker islands with distinct devices (`outer.islands="devices"`, at
least num_workers devices, runtime.backend="local"); checked before anything
is compiled.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models.decoder import DecoderLM
from models.loss import cross_entropy
from ops import collectives as coll
from pathways_lite.islands import GANG_AXIS
from pathways_lite.outer import rules
from ops.collectives.bucketing import DEFAULT_BUCKET_BYTES as BUCKET_BYTES
from pathways_lite.outer.common import Run, memo


def check(run: Run, devices=None) -> None:
  """Raises ValueError naming the field if the collective mode cannot run (before compiling)."""
  ocfg = run.ocfg
  mode = ocfg.collectives
  backend = run.config.get("runtime", {}).get("backend", "local")
  if backend != "local":
    raise ValueError(f"config field 'outer.collectives'={mode!r} needs runtime.backend='local' "
                     f"(Ray islands run gangs on one island, without collectives); got {backend!r}")
  if ocfg.island_devices > 1:
    raise ValueError(f"config field 'outer.collectives'={mode!r} all-reduces across one-device "
                     f"worker islands; islands of {ocfg.island_devices} devices "
                     "(outer.island_data x outer.island_tensor) need outer.collectives='server'")
  isls = [run.rt.island(w) for w in run.workers]
  seen = set()
  for isl in isls:
    if seen & isl.device_set:
      raise ValueError(
          f"config field 'outer.collectives'={mode!r} needs worker islands with distinct devices: "
          f"{ocfg.num_workers} workers on {len(jax.devices())} device(s) share devices "
          "(use num_workers <= the number of devices, or outer.collectives='server')")
    seen |= isl.device_set


def make_collective_step(loss_fn, apply_fn, num_workers: int, implementation: str,
                         bucket_bytes: int | None = BUCKET_BYTES):
  """The per-island gang step `(carry, batch) -> (state, metrics, info)`.

  carry: the previous step's output (its [0] is the worker's TrainState-like
  state with `.params`); loss_fn(params, batch) -> (loss, num_tokens);
  apply_fn(state, grads) -> state. Collectives run over GANG_AXIS.
  """
  M = num_workers

  def step(carry, batch):
    state = carry[0]

    def synced_loss(p):
      p = coll.sync_grads(p, GANG_AXIS, bucket_bytes=bucket_bytes,
                          implementation=implementation, mean=True)
      return loss_fn(p, batch)

    (loss, n), g = jax.value_and_grad(synced_loss, has_aux=True)(state.params)

    def all_finite(_):
      return g, jnp.ones((M,), bool)

    def finite_only(_):
      (_, _), local = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
      ok = rules.tree_is_finite(local)
      mine = jax.nn.one_hot(lax.axis_index(GANG_AXIS), M, dtype=jnp.float32)
      flags = lax.psum(jnp.where(ok, mine, 0.0), GANG_AXIS)  # M flags: no kernel needed
      clean = jax.tree.map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), local)
      total = coll.all_reduce_tree(clean, GANG_AXIS, bucket_bytes=bucket_bytes,
                                   implementation=implementation)
      count = jnp.maximum(jnp.sum(flags), 1.0)
      mean = jax.tree.map(lambda x: (x.astype(jnp.float32) / count).astype(x.dtype), total)
      return mean, flags > 0.5

    g, finite = lax.cond(rules.tree_is_finite(g), all_finite, finite_only, None)
    applied = jnp.any(finite)
    new = apply_fn(state, g)
    new = jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, state)
    metrics = {"loss": loss.astype(jnp.float32), "num_tokens": jnp.asarray(n, jnp.int32),
               "grad_norm": rules.tree_norm(g)}
    return new, metrics, {"finite": finite, "applied": applied}

  return step


def make_ddp_step(inner, num_workers: int, implementation: str):
  """The gang step of one run's model and inner optimizer (one compile per process)."""
  def make():
    model = DecoderLM(inner.model_cfg)

    def loss_fn(params, batch_BxL1):
      logits = model.apply({"params": params}, batch_BxL1[:, :-1])
      return cross_entropy(logits, batch_BxL1[:, 1:])

    return make_collective_step(loss_fn, inner.apply_fn, num_workers, implementation)
  return memo(("ddp_collective_step", id(inner), num_workers, implementation), make)


def initial_carry(state, num_workers: int):
  """The carry of step 1: (state, zero metrics, info) with the step outputs' structure."""
  metrics = {"loss": np.float32(0), "num_tokens": np.int32(0), "grad_norm": np.float32(0)}
  return (state, metrics, {"finite": np.ones(num_workers, bool), "applied": np.bool_(True)})


pick_state = jax.jit(lambda out: out[0])
pick_params = jax.jit(lambda out: out[0].params)


def train(run: Run) -> dict:
  """DDP steps as gangs over the worker islands (the loop mirrors ddp.train)."""
  check(run)
  rt, inner, M = run.rt, run.inner, run.M
  step_fn = make_ddp_step(inner, M, run.ocfg.collectives)
  init = inner.init_state(run.seed)
  w0 = run.workers[0]
  state0 = rt.transfer(init, island=w0, name="init state")
  resumed = run.resume({"global": {"state": state0}})
  if resumed is None:
    run.evaluate(0, init.params)
    carry = initial_carry(init, M)
    first = 1
  else:                                   # continue after the checkpoint's step
    carry = initial_carry(resumed[0]["global"]["state"], M)
    first = resumed[1]["step"] + 1
  params = init.params
  pending = None
  for step in range(first, run.total_steps + 1):
    batches = [run.batches(w, 1)[0] for w in range(M)]
    carry = rt.gang(step_fn, carry, batches, islands=run.workers, cost=1, name="ddp step")
    params = rt.call(pick_params, carry[0], island=w0, cost=0, name="params")
    if pending is not None:
      _consume(run, *pending)
    pending = (step, carry)
    if run.eval_due(step) or run.save_due(step):  # records up to `step` precede its checkpoint
      _consume(run, *pending)
      pending = None
      if run.eval_due(step):
        run.evaluate(step, params)
    run.commit(step, {"global": {"state": rt.call(pick_state, carry[0], island=w0, cost=0,
                                                  name="state")}})
  if pending is not None:
    _consume(run, *pending)
  run.replicas = carry                    # every worker's last (state, metrics, info) Futures
  return run.summary(params, inner_steps=1)


def _consume(run: Run, step: int, outs: list) -> None:
  inf = jax.device_get(outs[0].result()[2])   # the same on every worker
  for w in range(run.M):
    if not inf["finite"][w]:
      run.reject(step, w, "non-finite gradient (NaN/Inf); not applied")
  if step % run.config.train.log_every and step != run.total_steps:
    return
  for w, out in enumerate(outs):
    v = jax.device_get(out.result()[1])
    run.last_train[w] = float(v["loss"])
    run.write(step, {"train/loss": v["loss"], "train/grad_norm": v["grad_norm"]}, worker=w)
  run.progress(step)
