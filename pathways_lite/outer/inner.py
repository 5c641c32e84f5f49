"""The computations the outer loops send to islands, as pure jitted functions.

- `phase(state, start_params, batches_HxBxL1) -> (state, delta, metrics)`: the
  worker restarts from `start_params` (its inner optimizer state carries on,
  never synced), takes H inner steps as one `lax.scan` of the single-island
  train step (pathways_lite.train) over H batches, and returns its
  pseudo-gradient delta = start_params - params (f32) with the phase's
  metrics. One compile per distinct H (DyLU has at most M).
- `dispatch_phase(rt, loop, ...)`: the same phase sent to an island, either as
  that one scan call (`loop="scan"`) or as a chain of H single-step calls
  (`"steps"`: `restart`, H x `chain_step`, `finish`), which gives the same
  outputs (up to float reassociation inside XLA) and the same simulated time.
  `resolve_inner_loop` turns `outer.inner_loop="auto"` into one of them.
- `steps(state, batches)`: H steps without a restart (streaming DiLoCo).
- `grads(params, batch)`, `apply(state, grads)`: DDP's split step.
- `evaluate(params, batches)`: token-weighted validation loss.

A phase's outputs go to several consumers (the host reads the metrics one
step late, the delta travels to the server, the state feeds the next phase),
so the runtime cannot donate them between calls; inside a phase the scan
carries the state without copies, and the "steps" chain donates it from call
to call (only the chain itself reads those intermediate values).

Why two inner loops (outer.inner_loop):
- "scan": one jitted `lax.scan` per phase: one dispatch, no Python per step.
  On GPU, XLA drives the while loop from the dispatching thread, so the call
  blocks it for the whole phase; the runtime moves such a call to its island's
  own dispatch thread after 3 timed slow dispatches (pathways_lite/dispatch.py),
  after which the islands' phases run at once. Measured on 2×H200 (jax 0.11.2,
  125M LM, 16 x 1024, H=100, launch/results/bench_diloco_125m_scan_2xh200.json):
  33.9 ms a step, the same as the chain, and two islands at 0.989 of twice one.
- "steps": a chain of single-step calls, each returning from its dispatch at
  once (the GPU runs ahead), so the controller enqueues every island's chain
  without a dispatch thread, and the trace shows every step. Same run: 33.7 ms
  a step, two islands at 0.967 of twice one. Local runtime only: a Ray island's
  actor completes each call before the next, so a chain would sync every step.
- "auto" (the default): "scan". (Earlier measurements that made "steps" the GPU
  default, 85 vs 36 ms a step, compared a phase on corpus batches with a step
  on random ids: the step's speed depended on the tokens; models/decoder.py,
  embed_tokens, says why and how that was fixed.)

Islands of several devices (outer.island_data x outer.island_tensor > 1):
`Inner.on(island)` is a copy of the run's Inner whose pieces are jitted for
that island's (data, fsdp, tensor) mesh: batches are split over "data" (and
"fsdp"), every output TrainState / delta / gradient is constrained to the
models/sharding rules for the mesh (optimizer moments like their params,
scalars replicated), `place(tree, island)` puts a host tree there with the
same rules, and every call runs under `jax.set_mesh(mesh)`, which the
decoder's shard_map blocks need with model.tp_collectives "xla" | "pallas"
(their collectives run over "tensor"). One-device islands use the plain
pieces (`on` returns the Inner itself).

Workers are `train.TrainState`s (step, params, inner optimizer state, RNG),
all made by `init_state(seed)`: every worker starts from the same params.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import sharding as sharding_rules
from models.config import ModelConfig
from models.decoder import DecoderLM
from models.loss import cross_entropy
from pathways_lite import train as train_lib
from pathways_lite.outer import rules
from pathways_lite.outer.config import OuterConfig
from pathways_lite.runtime import Runtime

INNER_LOOPS = ("scan", "steps")   # what "auto" resolves to (outer.inner_loop)


def make_inner_optimizer(train_cfg, ocfg: OuterConfig) -> tuple[optax.GradientTransformation, Any]:
  """The inner optimizer: AdamW of the single-island run, or plain SGD on the same schedule."""
  schedule = train_lib.make_lr_schedule(train_cfg)
  if ocfg.inner_optimizer == "sgd":
    opt = optax.sgd(schedule)
    if train_cfg.grad_clip > 0:
      opt = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), opt)
    return opt, schedule
  return train_lib.make_optimizer(train_cfg, schedule), schedule


def _summary(metrics) -> dict:
  return {"loss": jnp.mean(metrics["loss"]), "last_loss": metrics["loss"][-1],
          "grad_norm": jnp.mean(metrics["grad_norm"]),
          "num_tokens": jnp.sum(metrics["num_tokens"]), "lr": metrics["lr"][-1]}


@dataclasses.dataclass(eq=False)
class Inner:
  """The jitted pieces of one run (model, inner optimizer)."""

  model_cfg: ModelConfig
  optimizer: optax.GradientTransformation
  schedule: Callable
  seq_len: int

  def __post_init__(self):
    step = train_lib.make_train_step(self.model_cfg, self.optimizer, self.schedule)

    def steps(state, batches_HxBxL1):
      state, metrics = jax.lax.scan(step, state, batches_HxBxL1)
      return state, _summary(metrics)

    def finish_phase(start_params, state, summary):
      delta = rules.pseudo_gradient(start_params, state.params)
      summary["delta_norm"] = rules.tree_norm(delta)
      return state, delta, summary

    def phase(state, start_params, batches_HxBxL1):
      state = state.replace(params=start_params)
      state, summary = steps(state, batches_HxBxL1)
      return finish_phase(start_params, state, summary)

    # "steps": the phase as a chain of calls. Each call's output is (carry, metrics of this
    # step); the next call donates the carry (state, step index, the phase's per-step metrics
    # [H]) and ignores the metrics, which stay alive (jit prunes unused inputs, so they are
    # not donated) for the runtime to see the call finish.
    def restart(state, start_params, batches_HxBxL1):
      H = batches_HxBxL1.shape[0]
      _, m = jax.eval_shape(step, state, batches_HxBxL1[0])
      zeros = {k: jnp.zeros((H,) + v.shape, v.dtype) for k, v in m.items()}
      carry = {"state": state.replace(params=start_params), "i": jnp.zeros((), jnp.int32),
               "metrics": zeros}
      return carry, {k: jnp.zeros(v.shape, v.dtype) for k, v in m.items()}

    def chain_step(prev, batches_HxBxL1):
      carry = prev[0]
      i = carry["i"]
      batch = jax.lax.dynamic_index_in_dim(batches_HxBxL1, i, keepdims=False)
      state, m = step(carry["state"], batch)
      metrics = {k: v.at[i].set(m[k]) for k, v in carry["metrics"].items()}
      return {"state": state, "i": i + 1, "metrics": metrics}, m

    def finish(start_params, prev):
      carry = prev[0]
      return finish_phase(start_params, carry["state"], _summary(carry["metrics"]))

    model = DecoderLM(self.model_cfg)

    def grads(params, batch_BxL1):
      def loss_fn(p):
        logits = model.apply({"params": p}, batch_BxL1[:, :-1])
        return cross_entropy(logits, batch_BxL1[:, 1:])
      (loss, n), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return g, {"loss": loss, "num_tokens": n, "grad_norm": rules.tree_norm(g)}

    def apply(state, g):
      updates, opt_state = self.optimizer.update(g, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    self.apply_fn = apply
    self.mesh = None          # None: plain pieces (one-device islands); see on()
    self._on = {}
    self._raw = {"steps": steps, "phase": phase, "restart": restart, "chain_step": chain_step,
                 "finish": finish, "grads": grads, "apply": apply,
                 "eval_step": train_lib.make_eval_step(self.model_cfg)}
    self._init = {}
    self.steps = jax.jit(steps)
    self.phase = jax.jit(phase)
    self.restart = jax.jit(restart)
    self.chain_step = jax.jit(chain_step, donate_argnums=0)
    self.finish = jax.jit(finish)   # (donating would free the state's copy, not the [H] metrics)
    self.grads = jax.jit(grads)
    self.apply = jax.jit(apply)
    self.eval_step = jax.jit(train_lib.make_eval_step(self.model_cfg))

  def on(self, island) -> "Inner":
    """The pieces for `island`: self for a one-device island, else a copy jitted for its mesh."""
    mesh = island.mesh
    if mesh.devices.size == 1:
      return self
    if mesh not in self._on:
      self._on[mesh] = _on_mesh(self, mesh)
    return self._on[mesh]

  def place(self, tree, island):
    """A host (or any) pytree on `island`, laid out by tree_shardings (one-device: as is)."""
    if island.mesh.devices.size == 1:
      return tree
    return jax.device_put(tree, tree_shardings(tree, island.mesh))

  def init_state(self, seed: int) -> train_lib.TrainState:
    if seed not in self._init:
      self._init[seed] = train_lib.init_train_state(self.model_cfg, self.optimizer, seed,
                                                    self.seq_len)
    return self._init[seed]

  def evaluate(self, params, batches) -> dict:
    return train_lib.evaluate(self.eval_step, params, batches)

  def dispatch_phase(self, rt, loop: str, state, start_params, batches_HxBxL1, *, island: str,
                     name: str):
    """One worker phase on `island`; returns the Future of (state, delta, summary) at once.

    loop="scan": one call of `phase` (cost H). loop="steps": `restart`, H `chain_step`s
    and `finish`, chained through Futures, each returning at once. Under the virtual clock
    the chain costs H units like the scan, booked on `finish` (the restart and the steps
    cost 0), so every simulated time is the very same float as the scan's (H additions of a
    step time would round differently); the real clock's trace shows each step's span.

    The batches go to the island first as one transfer (a host array), so that every call
    of the phase takes the runtime's fast path (all inputs already on the island): that
    path times each dispatch, and pathways_lite/dispatch.py moves a (fn, island) whose
    dispatch blocks the controller (a scan on GPU, any call on a CPU without async
    dispatch) to the island's own thread, so that islands still run at once.
    """
    H = int(np.shape(batches_HxBxL1)[0])
    local_real = isinstance(rt, Runtime) and not rt.virtual
    spec = None if self.mesh is None else P(None, sharding_rules.BATCH_AXES, None)
    if loop == "scan":
      b = rt.transfer(batches_HxBxL1, island=island, spec=spec, name=f"{name} batches") \
          if local_real or spec is not None else batches_HxBxL1
      return rt.call(self.phase, state, start_params, b, island=island, cost=H, name=name)
    if loop != "steps":
      raise ValueError(f"inner loop {loop!r} is not one of {list(INNER_LOOPS)} (resolve "
                       "outer.inner_loop with resolve_inner_loop first)")
    b = rt.transfer(batches_HxBxL1, island=island, spec=spec, name=f"{name} batches")
    c = rt.call(self.restart, state, start_params, b, island=island, cost=0,
                name=f"{name} restart")
    for i in range(H):
      c = rt.call(self.chain_step, c, b, island=island, cost=0, name=f"{name} step {i}")
    return rt.call(self.finish, start_params, c, island=island, cost=H, name=f"{name} delta")


def tree_shardings(tree, mesh):
  """NamedShardings for a TrainState / params / optimizer-state / delta pytree on `mesh`.

  A leaf whose (parent, name) and rank match a models/sharding rule gets that rule
  (axes that do not divide a dim dropped), so params, their optimizer moments,
  pseudo-gradients and gradients share one layout; every other leaf (step, RNG,
  optimizer counts, metrics) is replicated.
  """
  def one(path, leaf):
    try:
      spec = sharding_rules._fit(sharding_rules._rule(path, leaf), np.shape(leaf), mesh)
    except ValueError:
      spec = P()
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, tree)


def _constrain(tree, mesh):
  return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh))


class _OnMesh:
  """A jitted function called (and lowered) under `jax.set_mesh(mesh)`."""

  def __init__(self, jf, mesh):
    self.jf, self.mesh = jf, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jf(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jf.lower(*args)


def _on_mesh(inner: Inner, mesh) -> Inner:
  """A copy of `inner` whose pieces run on `mesh` (see the module docstring)."""
  r = inner._raw
  hb = NamedSharding(mesh, P(None, sharding_rules.BATCH_AXES, None))   # [H, B, L+1]
  b1 = NamedSharding(mesh, sharding_rules.batch_partition_spec())      # [B, L+1]
  wsc = jax.lax.with_sharding_constraint

  def steps(state, batches):
    state, summary = r["steps"](state, wsc(batches, hb))
    return _constrain(state, mesh), summary

  def phase(state, start_params, batches):
    state, delta, summary = r["phase"](state, start_params, wsc(batches, hb))
    return _constrain(state, mesh), _constrain(delta, mesh), summary

  def restart(state, start_params, batches):
    carry, m = r["restart"](state, start_params, wsc(batches, hb))
    return dict(carry, state=_constrain(carry["state"], mesh)), m

  def chain_step(prev, batches):
    carry, m = r["chain_step"](prev, wsc(batches, hb))
    return dict(carry, state=_constrain(carry["state"], mesh)), m

  def finish(start_params, prev):
    state, delta, summary = r["finish"](start_params, prev)
    return _constrain(state, mesh), _constrain(delta, mesh), summary

  def grads(params, batch):
    g, m = r["grads"](params, wsc(batch, b1))
    return _constrain(g, mesh), m

  def apply(state, g):
    return _constrain(r["apply"](state, g), mesh)

  def eval_step(params, batch):
    return r["eval_step"](params, wsc(batch, b1))

  out = copy.copy(inner)
  out.mesh = mesh
  out._on = {}
  for name, fn, donate in (("steps", steps, ()), ("phase", phase, ()), ("restart", restart, ()),
                           ("chain_step", chain_step, (0,)), ("finish", finish, ()),
                           ("grads", grads, ()), ("apply", apply, ()),
                           ("eval_step", eval_step, ())):
    setattr(out, name, _OnMesh(jax.jit(fn, donate_argnums=donate), mesh))
  return out


_CACHE: dict = {}


def make_inner(config, model_cfg: ModelConfig, ocfg: OuterConfig) -> Inner:
  """The run's Inner; runs with the same model, train section and inner optimizer share one
  (so a suite of runs in one process, or a test module, compiles each piece once)."""
  key = (model_cfg, tuple(sorted(config.train.to_dict().items())), ocfg.inner_optimizer,
         config.data.seq_len)
  if key not in _CACHE:
    opt, schedule = make_inner_optimizer(config.train, ocfg)
    _CACHE[key] = Inner(model_cfg, opt, schedule, config.data.seq_len)
  return _CACHE[key]


def resolve_inner_loop(loop: str, rt, island: str) -> str:
  """outer.inner_loop ("auto" | "scan" | "steps") -> "scan" or "steps" for `island` of `rt`.

  "auto": "scan" (the module docstring gives the measurements). "steps" on Ray islands raises
  ValueError: an island actor completes each call before the next, so the chain would sync
  every step. `island` names the island the loop runs on (kept for the error message).
  """
  if loop not in ("auto",) + INNER_LOOPS:
    raise ValueError(f"config field 'outer.inner_loop'={loop!r} is not allowed; allowed values: "
                     f"{['auto', *INNER_LOOPS]}")
  if loop == "steps" and not isinstance(rt, Runtime):
    raise ValueError("config field 'outer.inner_loop'='steps' needs runtime.backend='local' "
                     f"(got a {type(rt).__name__} for island {island!r}); allowed here: "
                     "['auto', 'scan']")
  return "scan" if loop == "auto" else loop


def stack_batches(batches) -> np.ndarray:
  """H host batches [B, L+1] -> one [H, B, L+1] host array (the scan's input)."""
  return np.stack([np.asarray(b) for b in batches])


# Selectors: one output of a call as its own future (jitted once, module-level, so every
# runtime and run reuses the compiled selector).
pick0 = jax.jit(lambda out: out[0])
pick1 = jax.jit(lambda out: out[1])
pick2 = jax.jit(lambda out: out[2])
pick_params = jax.jit(lambda state: state.params)
pick_state, pick_delta, pick_summary = pick0, pick1, pick2
