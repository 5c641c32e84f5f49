"""Shape plumbing shared by the kernels: flatten, pad, split into ring pieces.

A per-device array is flattened to `L` elements and padded so it splits into
`D` ring directions x `K` chunks x `R` rows of `LANES` lanes. Padding is with
zeros, which every collective here (sums and copies) leaves harmless; it is
sliced off again on the way out.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LANES = 128
SUBLANES = 8

DIRECTIONS = {"both": (1, -1), "right": (1,), "left": (-1,)}


def ring_dirs(direction: str) -> tuple[int, ...]:
  if direction not in DIRECTIONS:
    raise ValueError(
        f"direction={direction!r} is not one of {sorted(DIRECTIONS)}; 'right'"
        " sends to axis_index + 1, 'left' to axis_index - 1, 'both' splits the"
        " data between the two rings.")
  return DIRECTIONS[direction]


def padded_len(length: int, unit: int) -> int:
  return max(unit, -(-length // unit) * unit)


def to_pieces(x_BxL: jax.Array, n_dirs: int, n_chunks: int,
              row_multiple: int = SUBLANES) -> jax.Array:
  """(B, L) -> (B, D, K, R, LANES), zero-padded along L."""
  b, length = x_BxL.shape
  unit = n_dirs * n_chunks * row_multiple * LANES
  lp = padded_len(length, unit)
  if lp != length:
    x_BxL = jnp.pad(x_BxL, ((0, 0), (0, lp - length)))
  rows = lp // (n_dirs * n_chunks * LANES)
  return x_BxL.reshape(b, n_dirs, n_chunks, rows, LANES)


def from_pieces(x_Bx: jax.Array, length: int) -> jax.Array:
  """(B, D, K, R, LANES) -> (B, L): the inverse of `to_pieces`."""
  b = x_Bx.shape[0]
  flat = x_Bx.reshape(b, -1)
  return flat if flat.shape[1] == length else flat[:, :length]


def split_rows(x_MxK: jax.Array, n_dirs: int, row_multiple: int = SUBLANES):
  """(M, K) -> (D, Mp/D, K), rows zero-padded to a multiple of D*row_multiple."""
  m, k = x_MxK.shape
  unit = n_dirs * row_multiple
  mp = padded_len(m, unit)
  if mp != m:
    x_MxK = jnp.pad(x_MxK, ((0, mp - m), (0, 0)))
  return x_MxK.reshape(n_dirs, mp // n_dirs, k)


def flat_size(shape) -> int:
  return int(math.prod(shape))
