"""Single-island training: the pieces (state, optimizer, step factories) and the loop.

`train_and_evaluate(config, workdir)` checks the whole config and the workdir
before anything is compiled, then runs a visible `for` loop over a pure jitted
`(state, batch) -> (state, metrics)` step with the state donated. Step n-1's
metrics are read after step n is dispatched, so the host never stalls the
device. Other outer algorithms (config.outer.algorithm != "single") are routed
to `pathways_lite.outer.run` after the same checks.

Letters: B batch size, L sequence length (batches hold L + 1 tokens), V vocab.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from models import utils as model_utils
from models.config import ModelConfig
from models.decoder import DecoderLM
from models.loss import cross_entropy
from pathways_lite import checkpoint, configuration, plots
from pathways_lite import metrics as metrics_lib
from pathways_lite import data as data_lib
from pathways_lite.metrics import MetricsWriter

Batch = Any  # int32 [B, L + 1]: inputs = batch[:, :-1], targets = batch[:, 1:]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer steps taken
  params: Any           # f32 (model.param_dtype) param tree
  opt_state: Any        # optax state of make_optimizer(...)
  rng: jax.Array        # raw uint32 [2] key, split every step (dropout)


# ---- pieces -------------------------------------------------------------------

def make_lr_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, warmup_steps=train_cfg.warmup_steps,
      decay_steps=train_cfg.steps, end_value=train_cfg.lr * train_cfg.min_lr_ratio)


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)  # no weight decay on norm scales


def make_optimizer(train_cfg, schedule: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay on matrices only) after global-norm gradient clipping."""
  schedule = make_lr_schedule(train_cfg) if schedule is None else schedule
  adamw = optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2,
                      weight_decay=train_cfg.weight_decay, mask=_decay_mask)
  if train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)
  return adamw


def init_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                     seed: int, seq_len: int) -> TrainState:
  """Fresh params from `seed` (every worker that uses the same seed starts equal)."""
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
  tokens_1xL = jnp.zeros((1, seq_len), jnp.int32)

  @jax.jit
  def init(key):
    params = DecoderLM(model_cfg).init(key, tokens_1xL)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=dropout_key)

  with threefry_kernel_lowering():
    return init(init_key)


def threefry_kernel_lowering():
  """Lowers threefry to jaxlib's GPU kernel inside the block (this thread only).

  Each param's normal init is otherwise its own compiled threefry fusion: on an H100 the
  350M init took 94 s, against 8-11 s with the kernel (which gives the same
  bits; launch/results/init_threefry_h100/). No effect off GPU. The flag is jax's
  jax_threefry_gpu_kernel_lowering; its thread-local context manager is not public API,
  so a jax without it falls back to the plain lowering.
  """
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  state = getattr(jax_config, "threefry_gpu_kernel_lowering", None)
  return state(True) if state is not None else contextlib.nullcontext()


def _loss(model: DecoderLM, params, batch_BxL1, rng, train: bool):
  inputs_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
  dropout = train and model.cfg.dropout_rate > 0
  logits_BxLxV = model.apply({"params": params}, inputs_BxL, deterministic=not dropout,
                             rngs={"dropout": rng} if dropout else None)
  return cross_entropy(logits_BxLxV, targets_BxL)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """A pure (state, batch) -> (state, metrics) step; jit it with donate_argnums=0.

  metrics: loss (mean over counted tokens), num_tokens, grad_norm (before clipping),
  lr (when a schedule is given). Pure and unjitted so outer loops can scan it.
  """
  model = DecoderLM(model_cfg)

  def train_step(state: TrainState, batch_BxL1: Batch) -> tuple[TrainState, Metrics]:
    rng, step_rng = jax.random.split(state.rng)
    (loss, num_tokens), grads = jax.value_and_grad(
        lambda p: _loss(model, p, batch_BxL1, step_rng, train=True), has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "num_tokens": num_tokens, "grad_norm": global_norm(grads)}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return train_step


def make_eval_step(model_cfg: ModelConfig) -> Callable[[Any, Batch], Metrics]:
  """Pure (params, batch) -> {loss_sum, num_tokens}: sum these over batches."""
  model = DecoderLM(model_cfg)

  def eval_step(params, batch_BxL1: Batch) -> Metrics:
    loss, n = _loss(model, params, batch_BxL1, None, train=False)
    return {"loss_sum": loss * n, "num_tokens": n}

  return eval_step


def evaluate(eval_step: Callable, params, batches) -> dict[str, float]:
  """Token-weighted mean loss and perplexity over fixed batches (eval_step jitted)."""
  outs = [eval_step(params, b) for b in batches]  # all dispatched before the first read
  outs = jax.device_get(outs)
  n = sum(int(o["num_tokens"]) for o in outs)
  loss = sum(float(o["loss_sum"]) for o in outs) / max(n, 1)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_tokens": n}


def check_finite(step: int, values: dict, worker: int | None = None) -> None:
  for k in ("loss", "grad_norm"):
    if k in values and not math.isfinite(float(values[k])):
      who = "" if worker is None else f" on worker {worker}"
      raise FloatingPointError(f"non-finite {k}={float(values[k])} at step {step}{who}")


def prepare_workdir(workdir: str) -> str:
  """Creates workdir and proves it writable; raises ValueError naming it otherwise."""
  if not workdir:
    raise ValueError("--workdir is required (a directory for config.json, metrics, plots)")
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
      pass
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not a writable directory: {e.strerror or e}") from e
  return path


def prepare_run(config, workdir: str) -> tuple[ModelConfig, str]:
  """Every check that must fail before compiling: config, model shapes, workdir.
  Writes config.json. Returns (model config, absolute workdir)."""
  model_cfg = configuration.validate(config)
  workdir = prepare_workdir(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    fh.write(configuration.to_json(config) + "\n")
  return model_cfg, workdir


# ---- the loop ---------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
  """Trains config.model on config.data for config.train.steps; returns the summary dict."""
  model_cfg, workdir = prepare_run(config, workdir)
  if config.outer.algorithm != "single":
    return _run_outer(config, workdir)
  t_start = time.time()
  tc, dc = config.train, config.data
  data = data_lib.load_data(dc, seed=config.seed, num_workers=1)
  train_iter = data.train_iterator(0)
  val_batches = data.validation_batches(tc.eval_batches)

  schedule = make_lr_schedule(tc)
  optimizer = make_optimizer(tc, schedule)
  state = init_train_state(model_cfg, optimizer, config.seed, dc.seq_len)
  train_step = jax.jit(make_train_step(model_cfg, optimizer, schedule), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model_cfg))
  n_params = model_utils.param_count(state.params)
  tokens_per_step = dc.batch_size * dc.seq_len
  device = jax.devices()[0]
  mfu_of = lambda tps: model_utils.mfu(tps, model_cfg, dc.seq_len, device)

  # Resume from the latest complete checkpoint of this workdir, if any.
  ckpt = checkpoint.for_run(config, workdir)
  config_dict = json.loads(configuration.to_json(config))
  resumed = checkpoint.resume(ckpt, config_dict, state,
                              allow_config_change=config.checkpoint.allow_config_change)
  start = 0
  if resumed is not None:
    start, state, meta = resumed
    train_iter.set_state(meta["train_iterator"])
    metrics_lib.truncate_after(workdir, start)

  def save(step: int) -> None:
    ckpt.save(step, state, {"config": config_dict, "train_iterator": train_iter.get_state()})

  writer = MetricsWriter(workdir, append=resumed is not None)
  if resumed is None:
    writer.write(0, {"data/train_tokens": data.shards[0].num_tokens,
                     "data/val_tokens": sum(int(b.size) for b in val_batches),
                     "model/params": n_params})
  bar = tqdm(total=tc.steps, initial=start, desc=config.name, unit="step", mininterval=1.0)
  clock = {"t": None, "steps": 0, "timed_s": 0.0, "timed_steps": 0}
  last = {"train": None, "val": None}

  def consume(step: int, metrics) -> None:
    """Reads step `step`'s metrics (the device has moved on to the next step)."""
    values = jax.device_get(metrics)
    check_finite(step, values)
    now = time.time()
    if clock["t"] is not None:  # step 0 (compile) is not timed
      clock["timed_s"] += now - clock["t"]
      clock["timed_steps"] += 1
    clock["t"], clock["steps"] = now, clock["steps"] + 1
    last["train"] = float(values["loss"])
    bar.update(1)
    if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
      tps = tokens_per_step * clock["timed_steps"] / clock["timed_s"] if clock["timed_s"] else None
      mfu = mfu_of(tps) if tps else None
      writer.write(step + 1, {"train/loss": values["loss"], "train/grad_norm": values["grad_norm"],
                              "train/lr": values["lr"], "perf/tokens_per_s": tps, "perf/mfu": mfu})
      post = {"loss": f"{last['train']:.3f}"}
      if tps:
        post["tok/s"] = f"{tps:,.0f}"
      if mfu is not None:
        post["mfu"] = f"{100 * mfu:.1f}%"
      bar.set_postfix(post, refresh=False)

  def run_eval(step: int) -> None:
    t0 = time.time()
    ev = evaluate(eval_step, state.params, val_batches)
    last["val"] = ev
    writer.write(step, {"val/loss": ev["loss"], "val/perplexity": ev["perplexity"]})
    bar.write(f"step {step}: val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}")
    if clock["t"] is not None:
      clock["t"] += time.time() - t0  # evaluation time is not training time

  if resumed is None:
    run_eval(0)  # the starting point of the validation curve
  pending = None
  preempted = False
  for step in range(start, tc.steps):
    batch_BxL1 = next(train_iter)
    state, metrics = train_step(state, batch_BxL1)  # dispatch step n ...
    if pending is not None:
      consume(*pending)                             # ... then read step n-1
    pending = (step, metrics)
    done = step + 1
    at_eval = tc.eval_every and done % tc.eval_every == 0 and done < tc.steps
    preempted = ckpt is not None and ckpt.preempted
    at_save = ckpt is not None and (ckpt.should_save(done) or preempted)
    if at_eval or at_save:  # records up to `done` precede its checkpoint
      consume(*pending)
      pending = None
    if at_eval:
      run_eval(done)
    if at_save:
      save(done)
    if preempted:
      break
  if pending is not None:
    consume(*pending)
  if preempted:
    bar.close()
    writer.close()
    ckpt.close()
    print(f"preempted: saved step {done} in {ckpt.directory}; rerun the same command to resume")
    return {"config_name": config.name, "workdir": workdir, "preempted": True, "step": done,
            "final_val_loss": float("nan"), "final_val_perplexity": float("nan")}
  run_eval(tc.steps)
  if ckpt is not None:
    if ckpt.last_saved_step != tc.steps:
      save(tc.steps)
    ckpt.close()
  bar.close()
  writer.close()

  tps = (tokens_per_step * clock["timed_steps"] / clock["timed_s"]) if clock["timed_s"] else None
  summary = {
      "config_name": config.name, "workdir": workdir, "steps": tc.steps,
      "tokens": tc.steps * tokens_per_step, "param_count": n_params,
      "time_s": time.time() - t_start, "final_train_loss": last["train"],
      "final_val_loss": last["val"]["loss"], "final_val_perplexity": last["val"]["perplexity"],
      "tokens_per_s": tps, "mfu": mfu_of(tps) if tps else None,
      "device": f"{device.platform}:{device.device_kind}",
      "data": data.describe(), "train_iterator_state": train_iter.get_state(),
  }
  plots.plot_losses(workdir, title=config.name)
  plots.write_summary(workdir, summary)
  with open(os.path.join(workdir, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2, default=_json_default)
  return summary


def _json_default(x):
  return x.item() if isinstance(x, np.generic) else str(x)


def _run_outer(config, workdir: str) -> dict:
  """The one place where other outer algorithms leave the single-island loop."""
  try:
    from pathways_lite import outer
    run = outer.run
  except (ImportError, AttributeError) as e:
    raise NotImplementedError(
        f"outer.algorithm={config.outer.algorithm!r} needs pathways_lite.outer.run, which "
        "does not exist yet; use outer.algorithm='single'") from e
  return run(config, workdir)
