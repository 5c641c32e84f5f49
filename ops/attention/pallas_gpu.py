"""Flash attention for Hopper (sm_90a) through Pallas Mosaic GPU: the entry
point (custom_vjp, padding, validation). The kernels live in
pallas_gpu_fwd.py (forward), pallas_gpu_bwd.py (dQ, dK/dV) and
pallas_gpu_common.py (shared helpers).

Layout [B, seq, heads, D] end to end (TMA reads strided (rows, D) tiles of
one head, so no transposes). T and S are padded to the block grid (padded
keys masked, padded query rows dropped). Logits live in the log2 domain:
s2 = (q.k) * sm_scale * log2(e), so the softmax uses exp2 and one FMA per
element; lse is stored in log2 units, +inf on rows that see no key.

Forward (FlashAttention-3 structure): a CTA owns 2 * block_q query rows of
one head; warpgroups 0 and 1 each own block_q rows and compute, warpgroup 2
is the producer: it streams K/V (and key segment ids) tiles with TMA into a
ring of `stages` shared-memory slots, guarded by "loaded" barriers and
"consumed" barriers (2 arrivals, one per consumer). Each consumer issues
QK^T with wgmma (Q, K from smem), does the online softmax in f32 registers,
and issues PV with P from registers. The two consumers ping-pong on a
schedule barrier so one's softmax overlaps the other's matmuls. Causal
tiles stop at the diagonal; blocks that need no mask run an unmasked loop;
a WG that finishes early keeps arriving on the barriers (epilogue loop) so
the producer never stalls. Causal CTAs start with the longest rows.

Backward: two kernels after an XLA delta = rowsum(dO * O):
  dK/dV kernel: a CTA owns 2 * block_kv key rows of one kv head (64 per
    consumer WG, dK and dV accumulators in registers) and streams Q, dO,
    lse, delta (and query segment ids) for every query head of its group
    and every query block that can see it. Per step: S^T = K Q^T,
    P^T = exp2(S^T - lse), dP^T = V dO^T, dV += P^T dO, dS^T = P^T (dP^T -
    delta), dK += dS^T Q. GQA needs no reduction afterwards.
  dQ kernel: same skeleton as the forward (query rows, K/V ring): S = Q K^T,
    P, dP = dO V^T, dS, dQ += dS K.
  That is 7 tile matmuls per (q, k) tile pair against 5 for a fused
  backward with atomic dQ (FlashAttention-3); see NOTES.md.
  head_dim 256: dK and dV accumulators together need 256 registers/thread,
  so the dK/dV kernel runs twice (dV pass, dK pass).

GpuBlocks.overlap=1 switches the forward to FA3's intra-warpgroup overlap
(S_{j+1} issued together with PV_j, softmax while PV runs). It is correct on
the device but measured no faster non-causal and 30% slower causal on an
H100 (NOTES.md), so it is off in the table.

interpret=True runs the same kernels in the Mosaic GPU interpreter
(jax >= 0.12; CPU); there the wgmma calls become jnp.dot on the same smem
buffers, so barriers, TMA indexing, ring slots, masks and the softmax are
tested, the wgmma/layout lowering is not.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ops.attention import blocks as blocks_lib
from ops.attention.pallas_gpu_bwd import _dkv, _dq
from ops.attention.pallas_gpu_common import LOG2E
from ops.attention.pallas_gpu_fwd import _forward


# ----------------------------------------------------------------- wrapper
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)


def _round_up(x, m):
  return (x + m - 1) // m * m


def _pad(x, n, axis, value=0):
  extra = n - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _padded_lengths(T, S, cfg):
  tq = math.lcm(2 * cfg.block_q, 2 * cfg.bwd_block_q)
  tk = math.lcm(cfg.block_kv, 2 * cfg.bwd_block_kv, cfg.bwd_block_kv)
  return _round_up(T, tq), _round_up(S, tk)


def _fwd_impl(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret):
  B, T, H, D = q.shape
  S = k.shape[1]
  Tp, Sp = _padded_lengths(T, S, cfg)
  qp, kp, vp = _pad(q, Tp, 1), _pad(k, Sp, 1), _pad(v, Sp, 1)
  qsp = ksp = None
  if q_ids is not None:
    qsp, ksp = _pad(q_ids, Tp, 1, -1), _pad(kv_ids, Sp, 1, -2)
  out, lse = _forward(qp, kp, vp, qsp, ksp, causal=causal, scale=scale,
                      kv_len=S, cfg=cfg, interpret=interpret)
  return out, lse, (qp, kp, vp, qsp, ksp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret):
  out, _, _ = _fwd_impl(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret)
  return out[:, :q.shape[1]]


def _flash_fwd(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret):
  out, lse, padded = _fwd_impl(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret)
  return out[:, :q.shape[1]], (padded, out, lse, q.shape[1], k.shape[1])


def _flash_bwd(causal, scale, cfg, interpret, res, do):
  (qp, kp, vp, qsp, ksp), out, lse, T, S = res
  Tp = qp.shape[1]
  dop = _pad(do, Tp, 1)
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32),
                     dop.astype(jnp.float32))
  dq = _dq(qp, kp, vp, dop, lse, delta, qsp, ksp, causal=causal, scale=scale,
           kv_len=S, cfg=cfg, interpret=interpret)
  if qp.shape[-1] > 128:   # dK and dV accumulators do not fit together
    _, dv = _dkv(qp, kp, vp, dop, lse, delta, qsp, ksp, causal=causal,
                 scale=scale, cfg=cfg, interpret=interpret, want=("dv",))
    dk, _ = _dkv(qp, kp, vp, dop, lse, delta, qsp, ksp, causal=causal,
                 scale=scale, cfg=cfg, interpret=interpret, want=("dk",))
  else:
    dk, dv = _dkv(qp, kp, vp, dop, lse, delta, qsp, ksp, causal=causal,
                  scale=scale, cfg=cfg, interpret=interpret)
  zero_ids = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
  q_ids = None if qsp is None else qsp[:, :T]
  kv_ids = None if ksp is None else ksp[:, :S]
  return (dq[:, :T], dk[:, :S], dv[:, :S], zero_ids(q_ids), zero_ids(kv_ids))


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_supported(q, k, v):
  """Raises ValueError unless the Mosaic GPU kernel handles these inputs."""
  if q.dtype not in SUPPORTED_DTYPES:
    raise ValueError(
        f"Mosaic GPU flash attention supports dtypes "
        f"{[jnp.dtype(d).name for d in SUPPORTED_DTYPES]}, got {q.dtype}")
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
    raise ValueError(
        f"Mosaic GPU flash attention supports head_dim in {SUPPORTED_HEAD_DIMS}, "
        f"got {q.shape[-1]}")


def flash_attention(q, k, v, *, causal=False, q_segment_ids=None,
                    kv_segment_ids=None, sm_scale=None, blocks=None,
                    interpret=False):
  """Flash attention on Hopper, [B, T, H, D]; validated by api.py.

  blocks: a blocks.GpuBlocks (default: blocks.gpu_blocks for the shape).
  interpret: run in the Mosaic GPU interpreter (CPU, jax >= 0.12).
  """
  check_supported(q, k, v)
  D = q.shape[-1]
  scale = float(D ** -0.5 if sm_scale is None else sm_scale)
  cfg = blocks or blocks_lib.gpu_blocks(q.shape[1], k.shape[1], D, causal)
  return _flash(q, k, v, q_segment_ids, kv_segment_ids, bool(causal), scale,
                cfg, bool(interpret))


def forward_with_lse(q, k, v, *, causal=False, q_segment_ids=None,
                     kv_segment_ids=None, sm_scale=None, blocks=None,
                     interpret=False):
  """(out [B,T,H,D], lse [B,H,T] in natural-log units); for tests."""
  check_supported(q, k, v)
  D = q.shape[-1]
  scale = float(D ** -0.5 if sm_scale is None else sm_scale)
  cfg = blocks or blocks_lib.gpu_blocks(q.shape[1], k.shape[1], D, causal)
  out, lse, _ = _fwd_impl(q, k, v, q_segment_ids, kv_segment_ids, bool(causal),
                          scale, cfg, bool(interpret))
  T = q.shape[1]
  return out[:, :T], lse[:, :, :T] / LOG2E

