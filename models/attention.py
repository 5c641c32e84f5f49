"""Causal (and segment-masked) dot-product attention, picked by name.

Letters: B batch, L sequence length (queries and keys: self-attention),
H query heads, K key/value heads (K divides H; G = H // K queries per kv head),
D head dim. Query head h uses kv head h // G.

impl:
  "xla"    plain jnp: einsum, f32 logits and softmax, explicit mask.
  "cudnn"  jax.nn.dot_product_attention(implementation="cudnn"); GPU only,
           bf16/fp16 inputs.
  "pallas" ops.attention.api.dot_product_attention (lands with issue 6).
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from models.config import ATTENTION_IMPLS


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
  """Position of each token inside its (contiguous) segment: 0, 1, ... per segment."""
  B, L = segment_ids_BxL.shape
  idx_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  is_start_BxL = jnp.concatenate(
      [jnp.ones((B, 1), bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]],
      axis=1)
  start_BxL = jax.lax.cummax(jnp.where(is_start_BxL, idx_BxL, 0), axis=1)
  return idx_BxL - start_BxL


def attention_mask(segment_ids_BxL: jax.Array | None, L: int) -> jax.Array:
  """Boolean [B or 1, L, L] mask: True where query q may attend key s."""
  causal_LxL = jnp.tril(jnp.ones((L, L), bool))
  if segment_ids_BxL is None:
    return causal_LxL[None]
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal_LxL[None] & same_BxLxL


def _check_shapes(q, k, v, segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"attention expects q,k,v of rank 4 [B,L,H,D]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
  B, L, H, D = q.shape
  if k.shape[0] != B or k.shape[1] != L or k.shape[3] != D:
    raise ValueError(f"k shape {k.shape} incompatible with q shape {q.shape} (self-attention)")
  if H % k.shape[2]:
    raise ValueError(f"kv heads {k.shape[2]} must divide query heads {H}")
  if segment_ids is not None and tuple(segment_ids.shape) != (B, L):
    raise ValueError(f"segment_ids shape {segment_ids.shape} must be (B, L) = {(B, L)}")


def xla_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None):
  B, L, H, D = q_BxLxHxD.shape
  K = k_BxLxKxD.shape[2]
  G = H // K
  q_BxLxKxGxD = q_BxLxHxD.reshape(B, L, K, G, D)
  logits_BxKxGxLxL = jnp.einsum(
      "bqkgd,bskd->bkgqs", q_BxLxKxGxD, k_BxLxKxD,
      preferred_element_type=jnp.float32) * (D ** -0.5)
  mask_Bx1x1xLxL = attention_mask(segment_ids_BxL, L)[:, None, None]
  logits_BxKxGxLxL = jnp.where(
      mask_Bx1x1xLxL, logits_BxKxGxLxL, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxL = jax.nn.softmax(logits_BxKxGxLxL, axis=-1)
  out_BxLxKxGxD = jnp.einsum(
      "bkgqs,bskd->bqkgd", probs_BxKxGxLxL.astype(v_BxLxKxD.dtype), v_BxLxKxD,
      preferred_element_type=jnp.float32)
  return out_BxLxKxGxD.reshape(B, L, H, D).astype(q_BxLxHxD.dtype)


def cudnn_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None):
  platforms = {d.platform for d in jax.devices()}
  if "gpu" not in platforms and "cuda" not in platforms:
    raise ValueError(
        f"attention_impl='cudnn' needs an NVIDIA GPU, but jax sees only {sorted(platforms)}; "
        f"allowed attention_impl values: {list(ATTENTION_IMPLS)} (use 'xla' on CPU/TPU)")
  if q_BxLxHxD.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"attention_impl='cudnn' needs bfloat16/float16 inputs, got {q_BxLxHxD.dtype}; "
        "set compute_dtype='bfloat16' or attention_impl='xla'")
  mask = None
  if segment_ids_BxL is not None:
    mask = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, mask=mask, is_causal=True,
      implementation="cudnn")


def pallas_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL=None):
  try:
    api = importlib.import_module("ops.attention.api")
  except ModuleNotFoundError as e:
    if e.name not in ("ops", "ops.attention", "ops.attention.api"):
      raise  # the kernel exists but one of its own imports failed: show that
    raise NotImplementedError(
        "attention_impl='pallas' needs the Pallas attention kernel "
        "(ops/attention/api.py), which lands with issue 6; use 'xla' or 'cudnn' "
        "until then") from e
  return api.dot_product_attention(
      q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, causal=True,
      segment_ids=segment_ids_BxL, implementation="pallas")


_IMPLS = {"xla": xla_attention, "cudnn": cudnn_attention, "pallas": pallas_attention}


def attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, *, segment_ids=None, impl="xla"):
  """Causal self-attention; segment_ids [B,L] (optional) block cross-segment attention.

  Returns [B, L, H, D] in q's dtype.
  """
  if impl not in _IMPLS:
    raise ValueError(
        f"attention impl={impl!r} is not allowed; allowed values: {list(ATTENTION_IMPLS)}")
  _check_shapes(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids)
  return _IMPLS[impl](q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids)
