"""A decoder block in Megatron sequence-parallel style, per device (inside shard_map).

Used by `Block` when `ModelConfig.tp_collectives` is "xla" or "pallas"; the
shard_map and the specs are in models/sharding.py (`sequence_parallel`).
Letters as in decoder.py, plus T the size of the "tensor" axis, Ll = L / T
the tokens a device holds and M = B * Ll its rows; heads, kv heads and the MLP
width are split over T (Hl = H / T, Kl = K / T, Fl = F / T).

Between blocks the residual stream x_BxLlxD is sharded over tokens. Per block:

  h   = attn_norm(x)                                       (local tokens)
  qkv = all_gather_matmul(h_MxD, [Wq|Wk|Wv]_Dx(Hl+2Kl)E)    every token, local heads
  o   = attention(rope(q), rope(k), v)                     full sequence, local heads
  x  += matmul_reduce_scatter(o_TMxHlE, Wo_HlExD)           summed over heads, own tokens
  h   = mlp_norm(x)
  gu  = all_gather_matmul(h_MxD, [Wgate|Wup]_Dx2Fl)
  x  += matmul_reduce_scatter(silu(g) * u, Wdown_FlxD)

so each all-gather of activations rides on a matmul and each reduce-scatter
on the next one (ops.collectives, `implementation` "xla" or "pallas"). The
math is the gspmd block's (same params, same dtypes); only the order of the
f32 sums over heads and over F differs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.attention import attention
from models.config import RMS_NORM_EPS, ModelConfig
from ops import collectives as coll

TENSOR_AXIS = "tensor"


def _norm(cfg: ModelConfig, scale_D, x):
  module = nn.RMSNorm(epsilon=RMS_NORM_EPS, dtype=jnp.dtype(cfg.compute_dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype))
  return module.apply({"params": {"scale": scale_D}}, x)


def _tokens_to_sequence(rows_TMxC, T, B, Ll):
  """Rows gathered from the T devices ([t][b][l] order) -> [B, L, C] in sequence order."""
  return rows_TMxC.reshape(T, B, Ll, -1).transpose(1, 0, 2, 3).reshape(B, T * Ll, -1)


def _sequence_to_tokens(x_BxLxC, T):
  """[B, L, C] -> rows [t][b][l]: block t holds device t's tokens (reduce-scatter order)."""
  B, L, C = x_BxLxC.shape
  return x_BxLxC.reshape(B, T, L // T, C).transpose(1, 0, 2, 3).reshape(L * B, C)


def block(cfg: ModelConfig, p, x_BxLlxD, positions_BxL, segment_ids_BxL, *,
          implementation: str, axis_name: str = TENSOR_AXIS):
  """One decoder block on this device's tokens; p: the block's params (local shards)."""
  from models.decoder import rope  # decoder imports this module lazily
  cd = jnp.dtype(cfg.compute_dtype)
  T = coll.axis_size(axis_name)
  B, Ll, D = x_BxLlxD.shape
  E = cfg.resolved_head_dim
  ag_mm = lambda x, w: coll.all_gather_matmul(x, w, axis_name, implementation=implementation)
  mm_rs = lambda x, w: coll.matmul_reduce_scatter(x, w, axis_name,
                                                  implementation=implementation)
  x_BxLlxD = x_BxLlxD.astype(cd)

  # attention
  a = p["attn"]
  wq_DxHlxE, wk_DxKlxE, wv_DxKlxE = (a[n]["kernel"].astype(cd) for n in ("q", "k", "v"))
  Hl, Kl = wq_DxHlxE.shape[1], wk_DxKlxE.shape[1]
  w_qkv = jnp.concatenate([w.reshape(D, -1) for w in (wq_DxHlxE, wk_DxKlxE, wv_DxKlxE)], 1)
  h_MxD = _norm(cfg, p["attn_norm"]["scale"], x_BxLlxD).reshape(B * Ll, D)
  qkv_BxLxC = _tokens_to_sequence(ag_mm(h_MxD, w_qkv), T, B, Ll)
  q_BxLxHlxE = qkv_BxLxC[..., :Hl * E].reshape(B, T * Ll, Hl, E)
  k_BxLxKlxE = qkv_BxLxC[..., Hl * E:(Hl + Kl) * E].reshape(B, T * Ll, Kl, E)
  v_BxLxKlxE = qkv_BxLxC[..., (Hl + Kl) * E:].reshape(B, T * Ll, Kl, E)
  q_BxLxHlxE = rope(q_BxLxHlxE, positions_BxL, cfg.rope_theta)
  k_BxLxKlxE = rope(k_BxLxKlxE, positions_BxL, cfg.rope_theta)
  o_BxLxHlxE = attention(q_BxLxHlxE, k_BxLxKlxE, v_BxLxKlxE, segment_ids=segment_ids_BxL,
                         impl=cfg.attention_impl)
  wo_HlExD = a["o"]["kernel"].astype(cd).reshape(Hl * E, D)
  o_TMxHlE = _sequence_to_tokens(o_BxLxHlxE.reshape(B, T * Ll, Hl * E), T)
  x_BxLlxD = x_BxLlxD + mm_rs(o_TMxHlE, wo_HlExD).reshape(B, Ll, D)

  # MLP
  m = p["mlp"]
  w_gate_DxFl, w_up_DxFl = m["gate"]["kernel"].astype(cd), m["up"]["kernel"].astype(cd)
  Fl = w_gate_DxFl.shape[1]
  h_MxD = _norm(cfg, p["mlp_norm"]["scale"], x_BxLlxD).reshape(B * Ll, D)
  gu_TMx2Fl = ag_mm(h_MxD, jnp.concatenate([w_gate_DxFl, w_up_DxFl], 1))
  h_TMxFl = nn.silu(gu_TMx2Fl[:, :Fl]) * gu_TMx2Fl[:, Fl:]
  out_MxD = mm_rs(h_TMxFl, m["down"]["kernel"].astype(cd))
  return x_BxLlxD + out_MxD.reshape(B, Ll, D)
