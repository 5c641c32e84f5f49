"""Flash attention as a Mosaic TPU Pallas kernel; on CPU it runs in interpret mode.

Internal layout [B, H, seq, D] (heads outside the sequence so each grid step
reads contiguous (block, D) tiles). Letters as in reference.py; T and S are
padded up to the blocks (Tp, Sp); padded keys are masked, padded query rows
are computed and dropped.

Forward: grid (B, H, T blocks, S blocks); online softmax with m, l and an f32
accumulator in VMEM scratch; writes out and lse (natural log, +inf on rows
that see no key).

Backward: ONE fused kernel, grid (B, H, S blocks, T blocks): for each key
block it walks the query blocks, recomputes p = exp(s - lse) once, and from
it accumulates dV += p^T dO and dK += dS^T Q in VMEM scratch and dQ += dS K
into an f32 dQ output block that spans the whole (padded) query sequence and
stays resident while (b, h) is fixed. That is 5 matmuls per tile, the
minimum. The resident dQ block costs Tp * D * 4 bytes of VMEM (2 MiB at
T=4096, D=128); longer sequences on a real TPU would need dQ split off.
GQA: dK/dV are produced per query head in f32 and summed over the group.

On a real TPU the blocks must be multiples of (8, 128); block sizes come
from blocks.py. Causal blocks above the diagonal are skipped, and their K/V
index is clamped to the last needed block so no DMA is issued for them.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.attention import blocks as blocks_lib

_NEG_INIT = -1e30  # running-max start value: finite, so exp(m_old - m_new) never NaNs


def _interpret_arg(interpret):
  """None: compiled on TPU, pallas' HLO interpreter elsewhere; True: the HLO
  interpreter (fast); a pltpu.InterpretParams: the TPU interpreter, which
  also simulates DMAs and semaphores (about 4x slower); False: compiled."""
  if interpret is None:
    return None if jax.default_backend() == "tpu" else True
  return interpret or None


def _block_mask(i, j, bq, bk, *, causal, kv_len, kv_padded, q_ids, kv_ids):
  """[bq, bk] bool mask for query block i, key block j, or None if unmasked."""
  mask = None
  if causal or kv_padded:
    rows = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if causal:
      mask = rows >= cols
    if kv_padded:
      m2 = cols < kv_len
      mask = m2 if mask is None else mask & m2
  if q_ids is not None:
    m3 = q_ids == kv_ids  # [bq, 1] == [1, bk]
    mask = m3 if mask is None else mask & m3
  return mask


def _needed(i, j, bq, bk, causal):
  """Whether key block j holds any key that query block i may see (causal)."""
  if not causal:
    return True
  return j * bk <= i * bq + bq - 1


def _last_kv_block(i, bq, bk, nk):
  return jnp.minimum((i * bq + bq - 1) // bk, nk - 1)


# ----------------------------------------------------------------- forward
def _fwd_kernel(*refs, scale, causal, kv_len, kv_padded, has_seg, bq, bk, nk):
  if has_seg:
    q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    qs_ref = ks_ref = None
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG_INIT, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(_needed(i, j, bq, bk, causal))
  def _step():
    q = q_ref[...]
    k = k_ref[...]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
    mask = _block_mask(i, j, bq, bk, causal=causal, kv_len=kv_len,
                       kv_padded=kv_padded,
                       q_ids=None if qs_ref is None else qs_ref[...],
                       kv_ids=None if ks_ref is None else ks_ref[...])
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_old = m_sc[...]
    m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_old - m_new)
    p = jnp.exp(s - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...],
                 preferred_element_type=jnp.float32)
    acc_sc[...] = alpha * acc_sc[...] + pv
    m_sc[...] = m_new

  @pl.when(j == nk - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf,
                             m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


# ---------------------------------------------------------------- backward
def _bwd_kernel(*refs, scale, causal, kv_len, kv_padded, has_seg, bq, bk, nq):
  if has_seg:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref,
     dq_ref, dk_ref, dv_ref, dk_sc, dv_sc) = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
     dq_ref, dk_ref, dv_ref, dk_sc, dv_sc) = refs
    qs_ref = ks_ref = None
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when((j == 0) & (i == 0))
  def _zero_dq():
    dq_ref[...] = jnp.zeros(dq_ref.shape, dq_ref.dtype)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_needed(i, j, bq, bk, causal))
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    nt = (((1,), (1,)), ((), ()))  # a @ b.T
    tn = (((0,), (0,)), ((), ()))  # a.T @ b
    s = jax.lax.dot_general(q, k, nt, preferred_element_type=jnp.float32) * scale
    mask = _block_mask(i, j, bq, bk, causal=causal, kv_len=kv_len,
                       kv_padded=kv_padded,
                       q_ids=None if qs_ref is None else qs_ref[...],
                       kv_ids=None if ks_ref is None else ks_ref[...])
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - lse_ref[...])  # [bq, bk]; 0 where masked or row empty
    dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                      preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, nt, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta_ref[...])).astype(q.dtype)
    dk_sc[...] += jax.lax.dot_general(ds, q, tn,
                                      preferred_element_type=jnp.float32)
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    dq_ref[rows, :] += scale * jnp.dot(ds, k, preferred_element_type=jnp.float32)

  @pl.when(i == nq - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------- wrapper
def _pad_seq(x, n, axis, value=0):
  pad = n - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _prepare(q, k, v, segment_ids, block_q, block_k, head_dim, causal):
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  cfg = blocks_lib.tpu_blocks(T, S, D, causal)
  bq = block_q or cfg.block_q
  bk = block_k or cfg.block_k
  bq, bk = min(bq, _round_up(T, 8)), min(bk, _round_up(S, 8))
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  return B, T, H, D, S, K, bq, bk, Tp, Sp


def _round_up(x, m):
  return (x + m - 1) // m * m


def _specs(B, H, K, D, bq, bk, nq, nk, causal, *, kv_major):
  """BlockSpecs for q-like, kv-like, row-stat and segment-id operands."""
  G = H // K
  sq = pl.Squeezed()
  if kv_major:   # grid (b, h, j, i)
    qi = lambda b, h, j, i: (b, h, i, 0)
    kj = lambda b, h, j, i: (b, h // G, j, 0)
    segq = lambda b, h, j, i: (b, i, 0)
    segk = lambda b, h, j, i: (b, 0, j)
  else:          # grid (b, h, i, j)
    if causal:
      last = lambda i: _last_kv_block(i, bq, bk, nk)
      kj = lambda b, h, i, j: (b, h // G, jnp.minimum(j, last(i)), 0)
      segk = lambda b, h, i, j: (b, 0, jnp.minimum(j, last(i)))
    else:
      kj = lambda b, h, i, j: (b, h // G, j, 0)
      segk = lambda b, h, i, j: (b, 0, j)
    qi = lambda b, h, i, j: (b, h, i, 0)
    segq = lambda b, h, i, j: (b, i, 0)
  return dict(
      q=pl.BlockSpec((sq, sq, bq, D), qi),
      kv=pl.BlockSpec((sq, sq, bk, D), kj),
      row=pl.BlockSpec((sq, sq, bq, 1), qi),
      segq=pl.BlockSpec((sq, bq, 1), segq),
      segk=pl.BlockSpec((sq, 1, bk), segk),
  )


def _seg_operands(q_ids, kv_ids, Tp, Sp):
  if q_ids is None:
    return []
  qs = _pad_seq(q_ids, Tp, 1, value=-1)[:, :, None]        # [B, Tp, 1]
  ks = _pad_seq(kv_ids, Sp, 1, value=-2)[:, None, :]       # [B, 1, Sp]
  return [qs, ks]


def _forward(q, k, v, q_ids, kv_ids, *, causal, scale, block_q, block_k, interpret):
  B, T, H, D, S, K, bq, bk, Tp, Sp = _prepare(q, k, v, q_ids, block_q, block_k,
                                              q.shape[-1], causal)
  nq, nk = Tp // bq, Sp // bk
  qt = _pad_seq(q.transpose(0, 2, 1, 3), Tp, 2)
  kt = _pad_seq(k.transpose(0, 2, 1, 3), Sp, 2)
  vt = _pad_seq(v.transpose(0, 2, 1, 3), Sp, 2)
  sp = _specs(B, H, K, D, bq, bk, nq, nk, causal, kv_major=False)
  has_seg = q_ids is not None
  in_specs = [sp["q"], sp["kv"], sp["kv"]] + ([sp["segq"], sp["segk"]] if has_seg else [])
  kernel = functools.partial(
      _fwd_kernel, scale=scale, causal=causal, kv_len=S, kv_padded=Sp != S,
      has_seg=has_seg, bq=bq, bk=bk, nk=nk)
  o, lse = pl.pallas_call(
      kernel,
      grid=(B, H, nq, nk),
      in_specs=in_specs,
      out_specs=[sp["q"], sp["row"]],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, D), q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, D), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="flash_attention_fwd",
  )(qt, kt, vt, *_seg_operands(q_ids, kv_ids, Tp, Sp))
  out = o[:, :, :T].transpose(0, 2, 1, 3)
  return out, lse[:, :, :T, 0]


def _backward(q, k, v, out, lse, do, q_ids, kv_ids, *, causal, scale, block_q,
              block_k, interpret):
  B, T, H, D, S, K, bq, bk, Tp, Sp = _prepare(q, k, v, q_ids, block_q, block_k,
                                              q.shape[-1], causal)
  nq, nk = Tp // bq, Sp // bk
  G = H // K
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32),
                     do.astype(jnp.float32))
  qt = _pad_seq(q.transpose(0, 2, 1, 3), Tp, 2)
  dot_ = _pad_seq(do.transpose(0, 2, 1, 3), Tp, 2)
  kt = _pad_seq(k.transpose(0, 2, 1, 3), Sp, 2)
  vt = _pad_seq(v.transpose(0, 2, 1, 3), Sp, 2)
  lse_p = _pad_seq(lse, Tp, 2)[..., None]
  delta_p = _pad_seq(delta, Tp, 2)[..., None]
  sp = _specs(B, H, K, D, bq, bk, nq, nk, causal, kv_major=True)
  has_seg = q_ids is not None
  sq = pl.Squeezed()
  in_specs = [sp["q"], sp["kv"], sp["kv"], sp["q"], sp["row"], sp["row"]]
  in_specs += [sp["segq"], sp["segk"]] if has_seg else []
  dkv_spec = pl.BlockSpec((sq, sq, bk, D), lambda b, h, j, i: (b, h, j, 0))
  dq_spec = pl.BlockSpec((sq, sq, Tp, D), lambda b, h, j, i: (b, h, 0, 0))
  kv_dtype = jnp.float32 if G > 1 else k.dtype
  kernel = functools.partial(
      _bwd_kernel, scale=scale, causal=causal, kv_len=S, kv_padded=Sp != S,
      has_seg=has_seg, bq=bq, bk=bk, nq=nq)
  dq, dk, dv = pl.pallas_call(
      kernel,
      grid=(B, H, nk, nq),
      in_specs=in_specs,
      out_specs=[dq_spec, dkv_spec, dkv_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, Sp, D), kv_dtype),
                 jax.ShapeDtypeStruct((B, H, Sp, D), kv_dtype)],
      scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32),
                      pltpu.VMEM((bk, D), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="flash_attention_bwd",
  )(qt, kt, vt, dot_, lse_p, delta_p, *_seg_operands(q_ids, kv_ids, Tp, Sp))
  dq = dq[:, :, :T].transpose(0, 2, 1, 3).astype(q.dtype)
  dk = dk[:, :, :S].reshape(B, K, G, S, D).sum(axis=2).transpose(0, 2, 1, 3)
  dv = dv[:, :, :S].reshape(B, K, G, S, D).sum(axis=2).transpose(0, 2, 1, 3)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, q_ids, kv_ids, causal, scale, block_q, block_k, interpret):
  return _forward(q, k, v, q_ids, kv_ids, causal=causal, scale=scale,
                  block_q=block_q, block_k=block_k, interpret=interpret)[0]


def _flash_fwd(q, k, v, q_ids, kv_ids, causal, scale, block_q, block_k, interpret):
  out, lse = _forward(q, k, v, q_ids, kv_ids, causal=causal, scale=scale,
                      block_q=block_q, block_k=block_k, interpret=interpret)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(causal, scale, block_q, block_k, interpret, res, do):
  q, k, v, q_ids, kv_ids, out, lse = res
  dq, dk, dv = _backward(q, k, v, out, lse, do, q_ids, kv_ids, causal=causal,
                         scale=scale, block_q=block_q, block_k=block_k,
                         interpret=interpret)
  zero_ids = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
  return dq, dk, dv, zero_ids(q_ids), zero_ids(kv_ids)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal=False, q_segment_ids=None,
                    kv_segment_ids=None, sm_scale=None, block_q=None,
                    block_k=None, interpret=None):
  """Flash attention, [B, T, H, D] layout; inputs are validated by api.py.

  interpret: None = compiled on TPU, pallas' HLO interpreter elsewhere;
  True = the HLO interpreter; a pltpu.InterpretParams() = the TPU interpreter
  (simulates DMAs/semaphores, slower); False = compiled.
  """
  scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
  return _flash(q, k, v, q_segment_ids, kv_segment_ids, bool(causal), scale,
                block_q, block_k, interpret)


def forward_with_lse(q, k, v, *, causal=False, q_segment_ids=None,
                     kv_segment_ids=None, sm_scale=None, block_q=None,
                     block_k=None, interpret=None):
  """(out [B,T,H,D], lse [B,H,T] natural log); for tests."""
  scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
  return _forward(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                  scale=scale, block_q=block_q, block_k=block_k,
                  interpret=interpret)
