"""Plain-jnp attention: the specification every kernel is tested against.

Letters: B batch, T query length, S key/value length, H query heads,
K key/value heads (K divides H; query head h reads kv head h // (H // K)),
D head dim. Layout is [B, seq, heads, D], like jax.nn.dot_product_attention.

Semantics (shared by every implementation in ops/attention):
  * logits = sm_scale * q.k (sm_scale defaults to D ** -0.5), computed in f32;
  * causal: query t sees key s iff s <= t (top-left aligned, as jax.nn);
  * segment_ids: query t sees key s only if their segment ids are equal;
    either one [B, T] array (self-attention, T == S) or a pair
    (q_segment_ids [B, T], kv_segment_ids [B, S]);
  * a query row that sees no key at all returns zeros (and gets zero grads);
  * the output has q's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def split_segment_ids(segment_ids, batch: int, q_len: int, kv_len: int):
  """Returns (q_ids [B,T] int32, kv_ids [B,S] int32) or (None, None)."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(
          "segment_ids must be one [B, T] array or a pair (q_segment_ids [B, T], "
          f"kv_segment_ids [B, S]); got a sequence of length {len(segment_ids)}")
    q_ids, kv_ids = segment_ids
  else:
    q_ids = kv_ids = segment_ids
  q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
  if q_ids.shape != (batch, q_len) or kv_ids.shape != (batch, kv_len):
    raise ValueError(
        f"segment_ids shapes {q_ids.shape} / {kv_ids.shape} must be [B, T] = "
        f"{(batch, q_len)} for queries and [B, S] = {(batch, kv_len)} for keys "
        "(one [B, T] array is only allowed when T == S)")
  if not jnp.issubdtype(q_ids.dtype, jnp.integer) or not jnp.issubdtype(
      kv_ids.dtype, jnp.integer):
    raise ValueError(
        f"segment_ids must be integers, got {q_ids.dtype} / {kv_ids.dtype}")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def attention_mask(batch, q_len, kv_len, *, causal, q_ids=None, kv_ids=None):
  """Boolean [B or 1, T, S] mask, True where query t may read key s."""
  mask = jnp.ones((1, q_len, kv_len), bool)
  if causal:
    mask = mask & (jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :])[None]
  if q_ids is not None:
    mask = mask & (q_ids[:, :, None] == kv_ids[:, None, :])
  return jnp.broadcast_to(mask, (mask.shape[0], q_len, kv_len))


def attention_with_lse(q, k, v, *, causal=False, segment_ids=None, sm_scale=None):
  """Returns (out [B,T,H,D] in q.dtype, lse [B,H,T] f32, natural log).

  lse is +inf on rows that see no key (so exp(s - lse) is 0 there).
  """
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = H // K
  scale = D ** -0.5 if sm_scale is None else sm_scale
  q_ids, kv_ids = split_segment_ids(segment_ids, B, T, S)
  qf = q.astype(jnp.float32).reshape(B, T, K, G, D)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  s = jnp.einsum("btkgd,bskd->bkgts", qf, kf,
                 precision=jax.lax.Precision.HIGHEST) * scale
  mask = attention_mask(B, T, S, causal=causal, q_ids=q_ids, kv_ids=kv_ids)
  mask = mask[:, None, None]  # [B|1, 1, 1, T, S]
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m_safe)
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l == 0.0, 1.0, l)
  o = jnp.einsum("bkgts,bskd->btkgd", p / l_safe, vf,
                 precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(l == 0.0, jnp.inf, m_safe + jnp.log(l_safe))[..., 0]
  return o.reshape(B, T, H, D).astype(q.dtype), lse.reshape(B, H, T)


def attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None):
  """The reference attention; same signature as api.dot_product_attention."""
  return attention_with_lse(q, k, v, causal=causal, segment_ids=segment_ids,
                            sm_scale=sm_scale)[0]
