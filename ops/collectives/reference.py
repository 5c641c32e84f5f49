"""The spec: collectives written with lax, for use inside `shard_map`.

Every function here is what `implementation="xla"` runs, and what the Pallas
kernels are tested against. Shapes follow the tiled lax conventions:

  all_reduce(x_S)            -> x_S summed over the axis          (psum)
  reduce_scatter(x_NMx...)   -> x_Mx... : device i gets block i   (psum_scatter, tiled)
  all_gather(x_Mx...)        -> x_NMx...: blocks in axis order     (all_gather, tiled)
  all_gather_matmul(x_MxK, w_KxF)       -> all_gather(x) @ w       : (N*M) x F
  matmul_reduce_scatter(x_NMxK, w_KxF)  -> reduce_scatter(x @ w)   : M x F

N is the axis size, M the per-device block of rows. Matmuls accumulate in
float32 (`preferred_element_type`) and return the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def all_reduce(x: jax.Array, axis_name) -> jax.Array:
  return lax.psum(x, axis_name)


def reduce_scatter(x: jax.Array, axis_name) -> jax.Array:
  return lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)


def all_gather(x: jax.Array, axis_name) -> jax.Array:
  return lax.all_gather(x, axis_name, axis=0, tiled=True)


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  out = jnp.dot(x, w, preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(x.dtype, w.dtype))


def all_gather_matmul(x: jax.Array, w: jax.Array, axis_name) -> jax.Array:
  return _matmul(all_gather(x, axis_name), w)


def matmul_reduce_scatter(x: jax.Array, w: jax.Array, axis_name) -> jax.Array:
  return reduce_scatter(_matmul(x, w), axis_name)


def all_reduce_f32(x: jax.Array, axis_name) -> jax.Array:
  """psum accumulated in float32, cast back: the numerics the kernels promise."""
  return lax.psum(x.astype(jnp.float32), axis_name).astype(x.dtype)


def reduce_scatter_f32(x: jax.Array, axis_name) -> jax.Array:
  return reduce_scatter(x.astype(jnp.float32), axis_name).astype(x.dtype)


def matmul_reduce_scatter_f32(x: jax.Array, w: jax.Array, axis_name) -> jax.Array:
  out = jnp.dot(x, w, preferred_element_type=jnp.float32)
  return reduce_scatter(out, axis_name).astype(jnp.result_type(x.dtype, w.dtype))
