"""Plain-jnp forward of DecoderLM from its param pytree: the spec the tests check against.

Written without flax and without models/decoder.py or models/attention.py:
positions come from counting same-segment tokens, GQA repeats k/v heads, RoPE
is applied with an explicit rotation of the two half-vectors, the mask is
additive. Always deterministic (no dropout), always f32 math on f32 params.

Letters: B batch, L sequence, D d_model, H query heads, E head dim, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import RMS_NORM_EPS, ModelConfig


def _rms_norm(x, scale):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + RMS_NORM_EPS) * scale


def _positions(tokens_BxL, segment_ids_BxL):
  B, L = tokens_BxL.shape
  if segment_ids_BxL is None:
    return jnp.tile(jnp.arange(L)[None], (B, 1))
  # number of earlier tokens in the same segment (segments are contiguous)
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  earlier_LxL = jnp.arange(L)[None, :] < jnp.arange(L)[:, None]
  return jnp.sum(same_BxLxL & earlier_LxL[None], axis=-1)


def _rope(x_BxLxHxE, pos_BxL, theta):
  E = x_BxLxHxE.shape[-1]
  half = E // 2
  freqs = 1.0 / (theta ** (2.0 * jnp.arange(half) / E))
  ang = pos_BxL[:, :, None, None].astype(jnp.float32) * freqs  # [B, L, 1, E/2]
  a, b = x_BxLxHxE[..., :half], x_BxLxHxE[..., half:]
  c, s = jnp.cos(ang), jnp.sin(ang)
  return jnp.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def _attention_block(p, x_BxLxD, pos_BxL, segment_ids_BxL, cfg: ModelConfig):
  H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  L = x_BxLxD.shape[1]
  q = jnp.einsum("bld,dhe->blhe", x_BxLxD, p["q"]["kernel"])
  k = jnp.einsum("bld,dhe->blhe", x_BxLxD, p["k"]["kernel"])
  v = jnp.einsum("bld,dhe->blhe", x_BxLxD, p["v"]["kernel"])
  q = _rope(q, pos_BxL, cfg.rope_theta)
  k = _rope(k, pos_BxL, cfg.rope_theta)
  k = jnp.repeat(k, H // K, axis=2)
  v = jnp.repeat(v, H // K, axis=2)
  scores_BxHxLxL = jnp.einsum("bqhe,bkhe->bhqk", q, k) / jnp.sqrt(float(E))
  allowed = jnp.arange(L)[None, :] <= jnp.arange(L)[:, None]
  allowed = allowed[None, None]
  if segment_ids_BxL is not None:
    allowed = allowed & (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
  scores_BxHxLxL = scores_BxHxLxL + jnp.where(allowed, 0.0, -1e30)
  scores_BxHxLxL = scores_BxHxLxL - jnp.max(scores_BxHxLxL, axis=-1, keepdims=True)
  w = jnp.exp(scores_BxHxLxL)
  w = w / jnp.sum(w, axis=-1, keepdims=True)
  o_BxLxHxE = jnp.einsum("bhqk,bkhe->bqhe", w, v)
  return jnp.einsum("blhe,hed->bld", o_BxLxHxE, p["o"]["kernel"])


def _mlp_block(p, x_BxLxD):
  g = x_BxLxD @ p["gate"]["kernel"]
  u = x_BxLxD @ p["up"]["kernel"]
  return (g * jax.nn.sigmoid(g) * u) @ p["down"]["kernel"]


def forward_from_embeddings(params, x_BxLxD, cfg: ModelConfig, segment_ids=None):
  B, L, _ = x_BxLxD.shape
  pos_BxL = _positions(jnp.zeros((B, L), jnp.int32), segment_ids)
  x = x_BxLxD.astype(jnp.float32)
  for i in range(cfg.num_layers):
    p = params[f"blocks_{i}"]
    x = x + _attention_block(p["attn"], _rms_norm(x, p["attn_norm"]["scale"]),
                             pos_BxL, segment_ids, cfg)
    x = x + _mlp_block(p["mlp"], _rms_norm(x, p["mlp_norm"]["scale"]))
  x = _rms_norm(x, params["final_norm"]["scale"])
  if cfg.tie_embeddings:
    return x @ params["embed"]["embedding"].T
  return x @ params["lm_head"]["kernel"]


def forward(params, tokens_BxL, cfg: ModelConfig, segment_ids=None):
  """f32 logits [B, L, V] for int tokens [B, L]."""
  x_BxLxD = params["embed"]["embedding"][tokens_BxL]
  return forward_from_embeddings(params, x_BxLxD, cfg, segment_ids)
