"""Shared pieces of the Mosaic GPU attention kernels (pallas_gpu*.py): the
wgmma/interpret switch, layouts, shared-memory types, constants."""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


LOG2E = math.log2(math.e)
_NEG_INIT = -1e30   # running max start (log2 units), finite: no inf - inf
_COMPUTE_REGS = 232
_PRODUCER_REGS = 40


# ------------------------------------------------------------------ helpers
def _transposed(ref):
  """A (rows, D) smem ref viewed as (D, rows) for a wgmma B operand."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fn = getattr(plgpu, "transpose_ref", None)  # jax 0.11; deprecated in 0.12
  if fn is not None:
    return fn(ref, (1, 0))
  return ref.transpose((1, 0))


class _MMA:
  """wgmma on hardware; the same product as jnp.dot in interpret mode."""

  def __init__(self, interpret: bool):
    self.interpret = interpret

  def _val(self, x, transpose=False):
    v = x if isinstance(x, jax.Array) else x[...]
    return v.T if transpose else v

  def fresh(self, shapes, pairs):
    """Returns [a_i @ b_i(^T)] for each (a, b_ref, transpose_b), in f32."""
    if self.interpret:
      return [jnp.dot(self._val(a), self._val(b, tb),
                      preferred_element_type=jnp.float32) for a, b, tb in pairs]

    def f(*accs):
      for acc, (a, b, tb) in zip(accs, pairs):
        plgpu.wgmma(acc, a, _transposed(b) if tb else b)
      return [acc[...] for acc in accs]
    return pl.run_scoped(f, *[plgpu.ACC(s, jnp.float32) for s in shapes])

  def accumulate(self, accs, pairs, after_issue=None):
    """accs[i] += a_i @ b_i(^T); after_issue() runs while the wgmmas fly."""
    if self.interpret:
      out = [acc + jnp.dot(self._val(a), self._val(b, tb),
                           preferred_element_type=jnp.float32)
             for acc, (a, b, tb) in zip(accs, pairs)]
      if after_issue is not None:
        after_issue()
      return out

    def f(refs):
      for acc, (a, b, tb) in zip(refs, pairs):
        plgpu.wgmma(acc, a, _transposed(b) if tb else b)
      if after_issue is not None:
        after_issue()
    return list(pl.run_state(f)(tuple(plgpu.ACC.init(a) for a in accs)))

  def fresh_and_accumulate(self, fresh_shape, fresh_pair, accs, pairs):
    """One wgmma group: (new product, updated accumulators)."""
    if self.interpret:
      new = self.fresh([fresh_shape], [fresh_pair])[0]
      return new, self.accumulate(accs, pairs)
    zeros = plgpu.layout_cast(jnp.zeros(fresh_shape, jnp.float32),
                              plgpu.Layout.WGMMA)

    def f(refs):
      for acc, (a, b, tb) in zip(refs[:len(pairs)], pairs):
        plgpu.wgmma(acc, a, _transposed(b) if tb else b)
      a, b, tb = fresh_pair
      plgpu.wgmma(refs[-1], a, _transposed(b) if tb else b)
    outs = pl.run_state(f)(tuple(plgpu.ACC.init(a) for a in accs)
                           + (plgpu.ACC.init(zeros),))
    return outs[-1], list(outs[:-1])


def _row(x):   # [rows] vector in the layout of a reduction over columns
  return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _col_layout():
  return plgpu.Layout.WGMMA.reduce(0)


def _wgmma_zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def _sched_sync(barrier):
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def _smem(shape, dtype, tiled=True):
  if tiled:
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  return plgpu.SMEM(shape, dtype)


def _compiler_params():
  return plgpu.CompilerParams(approx_math=True)


def _interpret_params(interpret):
  if not interpret:
    return None
  return plgpu.InterpretGPUParams()

