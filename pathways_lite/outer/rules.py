"""Pure update rules of the outer loops (no runtime, no I/O): the math the papers specify.

Notation: M workers, H inner steps, theta global params, theta_m a worker's params.

- Pseudo-gradient (DiLoCo, arXiv 2311.08105): delta_m = theta - theta_m, i.e.
  global minus local. A positive entry means "the worker moved down this
  coordinate", so feeding delta to an optimizer as a gradient moves theta
  toward the workers. The averaged pseudo-gradient is sum_m w_m delta_m with
  w_m = |shard_m| / sum |shard| (uniform for iid shards). Accumulation is
  always f32 and in worker order, so two callers summing the same trees in the
  same order get the same bits.
- Outer optimizers are optax transformations: sgd lr 1 = FedAvg, sgd+momentum,
  nesterov (DiLoCo: lr 0.7, momentum 0.9), adam with its eps.
- Streaming DiLoCo (2501.18512) merge: theta_m <- alpha*theta_m + (1-alpha)*theta.
- Eager updates (2502.12996): worker m combines its own fresh delta with the
  others' delayed ones: w_m delta_m(t) + sum_{j != m} w_j delta_j(t - d).
- Async Local-SGD (2401.09135): delayed Nesterov (DN) and dynamic local updates
  (DyLU), see `dn_update` and `dylu_steps`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

OUTER_OPTIMIZERS = ("sgd", "sgdm", "nesterov", "adam")
WEIGHTINGS = ("uniform", "shard_size")


# --------------------------------------------------------------------------- pseudo-gradients
def pseudo_gradient(global_params: PyTree, local_params: PyTree) -> PyTree:
  """delta = global - local, in f32 (the sign the tests pin)."""
  return jax.tree.map(
      lambda g, l: g.astype(jnp.float32) - l.astype(jnp.float32), global_params, local_params)


def weighted_sum(trees: Sequence[PyTree], weights: Sequence[float]) -> PyTree:
  """sum_i weights[i] * trees[i], accumulated in f32 in list order."""
  if len(trees) != len(weights) or not trees:
    raise ValueError(f"need as many weights as trees (>0), got {len(trees)} and {len(weights)}")
  acc = jax.tree.map(lambda x: jnp.float32(weights[0]) * x.astype(jnp.float32), trees[0])
  for w, t in zip(weights[1:], trees[1:]):
    acc = jax.tree.map(lambda a, x, w=w: a + jnp.float32(w) * x.astype(jnp.float32), acc, t)
  return acc


def worker_weights(shard_sizes: Sequence[float] | None, num_workers: int,
                   weighting: str = "uniform") -> list[float]:
  """Normalised weights w_m: uniform, or proportional to the shard sizes."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"outer.weighting={weighting!r} is not allowed; allowed values: {list(WEIGHTINGS)}")
  if weighting == "uniform" or shard_sizes is None:
    return [1.0 / num_workers] * num_workers
  sizes = [float(s) for s in shard_sizes]
  if len(sizes) != num_workers or min(sizes) <= 0:
    raise ValueError(f"shard sizes must be {num_workers} positive numbers, got {sizes}")
  total = sum(sizes)
  return [s / total for s in sizes]


def average_pseudo_gradient(global_params: PyTree, locals_: Sequence[PyTree],
                            weights: Sequence[float]) -> PyTree:
  """sum_m w_m (theta - theta_m)."""
  return weighted_sum([pseudo_gradient(global_params, l) for l in locals_], weights)


# --------------------------------------------------------------------------- validity
def tree_is_finite(tree: PyTree) -> jax.Array:
  """Scalar bool: every entry of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def nonfinite_reason(tree: PyTree) -> str | None:
  """None if finite; otherwise a readable reason naming the first bad leaf (host sync)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, x in flat:
    x = np.asarray(x)
    bad = ~np.isfinite(x)
    if bad.any():
      n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
      return f"non-finite pseudo-gradient at {jax.tree_util.keystr(path)}: {n_nan} NaN, {n_inf} Inf"
  return None


def tree_norm(tree: PyTree) -> jax.Array:
  """Global L2 norm in f32."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


# --------------------------------------------------------------------------- outer optimizers
def make_outer_optimizer(name: str, lr: float, momentum: float = 0.9, b1: float = 0.9,
                         b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """The outer optimizer by name; raises ValueError naming the field before any compile."""
  if name not in OUTER_OPTIMIZERS:
    raise ValueError(f"outer.optimizer={name!r} is not allowed; allowed values: {list(OUTER_OPTIMIZERS)}")
  if not (isinstance(lr, (int, float)) and lr > 0):
    raise ValueError(f"outer.lr must be a number > 0, got {lr!r}")
  if name in ("sgdm", "nesterov") and not 0.0 <= momentum < 1.0:
    raise ValueError(f"outer.momentum must be in [0, 1), got {momentum!r}")
  if name == "sgd":
    return optax.sgd(lr)
  if name == "sgdm":
    return optax.sgd(lr, momentum=momentum)
  if name == "nesterov":
    return optax.sgd(lr, momentum=momentum, nesterov=True)
  if not eps > 0:
    raise ValueError(f"outer.eps must be > 0, got {eps!r}")
  return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def outer_step(opt: optax.GradientTransformation, params: PyTree, opt_state: PyTree,
               delta: PyTree) -> tuple[PyTree, PyTree]:
  """One outer step: the pseudo-gradient plays the gradient. Params keep their dtype."""
  updates, opt_state = opt.update(delta, opt_state, params)
  new = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), params, updates)
  return new, opt_state


# --------------------------------------------------------------------------- streaming
def merge(local: PyTree, global_: PyTree, alpha: float) -> PyTree:
  """Streaming DiLoCo merge: alpha*local + (1-alpha)*global (alpha=0: replace by global)."""
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"outer.merge_alpha must be in [0, 1], got {alpha!r}")
  return jax.tree.map(
      lambda l, g: (alpha * l.astype(jnp.float32) + (1.0 - alpha) * g.astype(jnp.float32)).astype(l.dtype),
      local, global_)


def quantized_weighted_sum(trees: Sequence[PyTree], weights: Sequence[float],
                           quantize: Callable[[jax.Array], jax.Array]) -> PyTree:
  """Each worker's tree goes through `quantize` (the wire: encode+decode); the sum stays f32."""
  return weighted_sum([jax.tree.map(quantize, t) for t in trees], weights)


# --------------------------------------------------------------------------- eager updates
def eager_gradient(own_fresh: PyTree, others: Sequence[PyTree | None], me: int,
                   weights: Sequence[float]) -> PyTree:
  """w_me * own_fresh + sum_{j != me} w_j others[j] (others[me] is ignored).

  With others[j] the *fresh* deltas of step t this equals the synchronous
  average exactly (same order, same bits); with the deltas of step t-d it is
  the eager update. A None entry (nothing arrived yet) counts as zero.
  """
  trees, ws = [], []
  for j, w in enumerate(weights):
    t = own_fresh if j == me else others[j]
    if t is None:
      t = jax.tree.map(jnp.zeros_like, own_fresh)
    trees.append(t)
    ws.append(w)
  return weighted_sum(trees, ws)


# --------------------------------------------------------------------------- async: DN, DyLU
def dn_init(params: PyTree) -> dict:
  """Delayed-Nesterov state: momentum m and the buffer of arrived deltas."""
  z = lambda x: jnp.zeros(x.shape, jnp.float32)
  return {"momentum": jax.tree.map(z, params), "buffer": jax.tree.map(z, params)}


def dn_update(params: PyTree, dn: dict, delta: PyTree, count: int, lr: float, beta: float,
              buffer_size: int, c: float) -> tuple[PyTree, dict, int]:
  """Delayed Nesterov (Liu et al. 2023, Alg. DN), one arrival.

  The buffer accumulates every arrived delta. On every arrival the params move
  by lr*(delta/N + c*beta*m); on every N-th arrival the momentum is first
  updated, m <- beta*m + buffer/N, the buffer emptied, and the momentum term
  is (1 - c*N + c)*beta*m instead of c*beta*m, so over N arrivals exactly one
  Nesterov step on the buffered average is taken (for any c in [0, 1/N]).
  N=1, c=0 is Nesterov on every arrival. `count` is the number of arrivals
  before this one (host int); returns the new count.
  """
  if buffer_size < 1:
    raise ValueError(f"outer.dn_buffer must be >= 1, got {buffer_size}")
  if not 0.0 <= c <= 1.0 / buffer_size + 1e-12:
    raise ValueError(f"outer.dn_c must be in [0, 1/dn_buffer={1.0 / buffer_size}], got {c}")
  inv_n = 1.0 / buffer_size
  buf = jax.tree.map(lambda b, d: b + d.astype(jnp.float32), dn["buffer"], delta)
  count += 1
  if count % buffer_size == 0:
    mom = jax.tree.map(lambda m, b: beta * m + b * inv_n, dn["momentum"], buf)
    coef = (1.0 - c * buffer_size + c) * beta
    step = jax.tree.map(lambda m, d: coef * m + d * inv_n, mom, delta)
    buf = jax.tree.map(jnp.zeros_like, buf)
  else:
    mom = dn["momentum"]
    step = jax.tree.map(lambda m, d: c * beta * m + d * inv_n, mom, delta)
  new = jax.tree.map(lambda p, s: (p.astype(jnp.float32) - lr * s).astype(p.dtype), params, step)
  return new, {"momentum": mom, "buffer": buf}, count


def dylu_steps(step_times_s: Sequence[float], inner_steps: int) -> list[int]:
  """DyLU: worker w runs floor(v_w / max v * H) steps, v_w = 1/step_time_w (at least 1)."""
  if inner_steps < 1:
    raise ValueError(f"outer.inner_steps must be >= 1, got {inner_steps}")
  speeds = [1.0 / float(t) for t in step_times_s]
  vmax = max(speeds)
  # the small epsilon keeps exact ratios (v_w == vmax) from flooring to H-1
  return [max(1, int(math.floor(v / vmax * inner_steps + 1e-9))) for v in speeds]


def sample_shard(progress: Sequence[float], rng: np.random.Generator) -> int:
  """Pick a data shard, favouring shards with less progress: p_s ∝ max(progress) - progress_s + 1."""
  p = np.asarray(progress, np.float64)
  w = p.max() - p + 1.0
  return int(rng.choice(len(p), p=w / w.sum()))
