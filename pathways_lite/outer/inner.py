"""The computations the outer loops send to islands, as pure jitted functions.

- `phase(state, start_params, batches_HxBxL1) -> (state, delta, metrics)`: the
  worker restarts from `start_params` (its inner optimizer state carries on,
  never synced), takes H inner steps as one `lax.scan` of the single-island
  train step (pathways_lite.train) over H batches, and returns its
  pseudo-gradient delta = start_params - params (f32) with the phase's
  metrics. One compile per distinct H (DyLU has at most M).
- `steps(state, batches)`: H steps without a restart (streaming DiLoCo).
- `grads(params, batch)`, `apply(state, grads)`: DDP's split step.
- `evaluate(params, batches)`: token-weighted validation loss.

A phase's outputs go to several consumers (the host reads the metrics one
step late, the delta travels to the server, the state feeds the next phase),
so the runtime cannot donate them between calls; inside a phase the scan
carries the state without copies.

Workers are `train.TrainState`s (step, params, inner optimizer state, RNG),
all made by `init_state(seed)`: every worker starts from the same params.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.config import ModelConfig
from models.decoder import DecoderLM
from models.loss import cross_entropy
from pathways_lite import train as train_lib
from pathways_lite.outer import rules
from pathways_lite.outer.config import OuterConfig


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

    def phase(state, start_params, batches_HxBxL1):
      state = state.replace(params=start_params)
      state, summary = steps(state, batches_HxBxL1)
      delta = rules.pseudo_gradient(start_params, state.params)
      summary["delta_norm"] = rules.tree_norm(delta)
      return state, delta, summary

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
    self._init = {}
    self.steps = jax.jit(steps)
    self.phase = jax.jit(phase)
    self.grads = jax.jit(grads)
    self.apply = jax.jit(apply)
    self.eval_step = jax.jit(train_lib.make_eval_step(self.model_cfg))

  def init_state(self, seed: int) -> train_lib.TrainState:
    if seed not in self._init:
      self._init[seed] = train_lib.init_train_state(self.model_cfg, self.optimizer, seed,
                                                    self.seq_len)
    return self._init[seed]

  def evaluate(self, params, batches) -> dict:
    return train_lib.evaluate(self.eval_step, params, batches)


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
