"""Flax linen decoder-only LM: embed -> N x (pre-norm attn + pre-norm SwiGLU) -> norm -> head.

Letters: B batch, L sequence, D d_model, H query heads, K kv heads,
E head dim, F MLP width, V vocab.

Param tree (params stay in cfg.param_dtype; matmuls run in cfg.compute_dtype):
  embed/embedding                         [V, D]
  blocks_i/attn_norm/scale                [D]
  blocks_i/attn/{q,k,v}/kernel            [D, H|K, E]
  blocks_i/attn/o/kernel                  [H, E, D]
  blocks_i/mlp_norm/scale                 [D]
  blocks_i/mlp/{gate,up}/kernel           [D, F]
  blocks_i/mlp/down/kernel                [F, D]
  final_norm/scale                        [D]
  lm_head/kernel                          [D, V]   (only when not tie_embeddings)

cfg.tp_collectives "xla" / "pallas": each Block runs in Megatron sequence-parallel
style under shard_map over the mesh's "tensor" axis (models/tensor_parallel.py),
with ops.collectives of that implementation; call the model inside
`jax.set_mesh(mesh)`. Same params and math as "gspmd" (the default).

Init: normal(init_std) everywhere except the residual-branch output projections
(attn/o, mlp/down), which use init_std / sqrt(2 * num_layers) (GPT-2 style);
norm scales start at 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.attention import attention, positions_from_segments
from models.config import RMS_NORM_EPS, ModelConfig, validate_seq_len

REMAT_POLICY = {
    "none": None,
    "full": None,  # nothing saved: the whole block is recomputed
    # save weight matmuls (no batch dims), recompute attention scores/softmax
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rope(x_BxLxNxE: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-split layout (rotate first half with second half)."""
  E = x_BxLxNxE.shape[-1]
  inv_freq_E2 = theta ** (-jnp.arange(0, E, 2, dtype=jnp.float32) / E)
  angle_BxLxE2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_E2
  sin = jnp.sin(angle_BxLxE2)[:, :, None, :]
  cos = jnp.cos(angle_BxLxE2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxE.dtype)


def _dense(cfg: ModelConfig, features, axis=-1, std=None, name=None):
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=False,
      dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nn.initializers.normal(std if std is not None else cfg.init_std),
      name=name)


def _norm(cfg: ModelConfig, name):
  return nn.RMSNorm(epsilon=RMS_NORM_EPS, dtype=jnp.dtype(cfg.compute_dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), name=name)


def _out_std(cfg: ModelConfig) -> float:
  return cfg.init_std / (2 * cfg.num_layers) ** 0.5


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL):
    cfg = self.cfg
    E = cfg.resolved_head_dim
    q_BxLxHxE = _dense(cfg, (cfg.num_heads, E), name="q")(x_BxLxD)
    k_BxLxKxE = _dense(cfg, (cfg.num_kv_heads, E), name="k")(x_BxLxD)
    v_BxLxKxE = _dense(cfg, (cfg.num_kv_heads, E), name="v")(x_BxLxD)
    q_BxLxHxE = rope(q_BxLxHxE, positions_BxL, cfg.rope_theta)
    k_BxLxKxE = rope(k_BxLxKxE, positions_BxL, cfg.rope_theta)
    o_BxLxHxE = attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE,
                          segment_ids=segment_ids_BxL, impl=cfg.attention_impl)
    return _dense(cfg, cfg.d_model, axis=(-2, -1), std=_out_std(cfg), name="o")(o_BxLxHxE)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    F = cfg.resolved_d_ff
    gate_BxLxF = _dense(cfg, F, name="gate")(x_BxLxD)
    up_BxLxF = _dense(cfg, F, name="up")(x_BxLxD)
    h_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
    return _dense(cfg, cfg.d_model, std=_out_std(cfg), name="down")(h_BxLxF)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic):
    cfg = self.cfg
    if cfg.tp_collectives != "gspmd" and not self.is_initializing():
      return self._sequence_parallel(x_BxLxD, positions_BxL, segment_ids_BxL)
    drop = (lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)) \
        if cfg.dropout_rate > 0 else (lambda y: y)
    h_BxLxD = _norm(cfg, "attn_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + drop(Attention(cfg, name="attn")(h_BxLxD, positions_BxL, segment_ids_BxL))
    h_BxLxD = _norm(cfg, "mlp_norm")(x_BxLxD)
    return x_BxLxD + drop(Mlp(cfg, name="mlp")(h_BxLxD))

  def _sequence_parallel(self, x_BxLxD, positions_BxL, segment_ids_BxL):
    """The same block in Megatron sequence-parallel style over the mesh's "tensor" axis
    (models/tensor_parallel.py; shard_map in models/sharding.py). Init takes the path above,
    so both paths have one param tree."""
    import functools
    from models import sharding, tensor_parallel
    cfg = self.cfg
    fn = functools.partial(tensor_parallel.block, cfg, implementation=cfg.tp_collectives)
    return sharding.sequence_parallel(fn, cfg, self.variables["params"], x_BxLxD,
                                      positions_BxL, segment_ids_BxL)


class LMHead(nn.Module):
  """Untied output projection [D, V]; logits accumulate in f32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    kernel_DxV = self.param("kernel", nn.initializers.normal(cfg.init_std),
                            (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
    return jnp.einsum("bld,dv->blv", x_BxLxD, kernel_DxV.astype(x_BxLxD.dtype),
                      preferred_element_type=jnp.float32)


class DecoderLM(nn.Module):
  """Decoder-only LM. `apply({'params': p}, tokens_BxL, segment_ids=None,
  deterministic=True, rngs={'dropout': key})` -> f32 logits [B, L, V]."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg.validate()
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.compute_dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nn.initializers.normal(cfg.init_std))
    block_cls = Block
    if cfg.remat != "none":
      block_cls = nn.remat(Block, policy=REMAT_POLICY[cfg.remat], static_argnums=(4,))
    self.blocks = [block_cls(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = _norm(cfg, None)
    if not cfg.tie_embeddings:
      self.lm_head = LMHead(cfg)
    if cfg.dropout_rate > 0:
      self.embed_dropout = nn.Dropout(cfg.dropout_rate)

  def embed_tokens(self, tokens_BxL):
    """Token ids [B, L] -> embeddings [B, L, D] in compute dtype."""
    tokens_BxL = jnp.asarray(tokens_BxL)
    if tokens_BxL.ndim != 2 or not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
      raise ValueError(
          f"tokens must be an int array of shape [B, L], got {tokens_BxL.dtype}{tokens_BxL.shape}")
    # Gather rows of the table in (at least) f32, then cast. Not flax's Embed call, which
    # gathers from the table cast to compute dtype: its backward is a scatter-add of B*L rows
    # into [V, D] in bf16, whose atomics serialize on the rows of frequent tokens (a space is
    # ~30% of code bytes). On one H100 (125M, 16 x 1024, jax 0.11.2) that made the train step
    # 58 ms on the stdlib corpus and 86 ms on one repeated token against 36 ms on random ids;
    # in f32 all three take 35-36 ms (launch/results/diloco_inner_step_h100/), and thousands of
    # a row's updates are summed in f32, not rounded to bf16 after each one.
    table_VxD = self.embed.embedding
    table_VxD = table_VxD.astype(jnp.promote_types(table_VxD.dtype, jnp.float32))
    return jnp.take(table_VxD, tokens_BxL, axis=0).astype(jnp.dtype(self.cfg.compute_dtype))

  def logits_from_embeddings(self, x_BxLxD, segment_ids=None, deterministic=True):
    """The rest of the network, from input embeddings [B, L, D] to f32 logits."""
    cfg = self.cfg
    B, L, _ = x_BxLxD.shape
    validate_seq_len(cfg, L)
    if segment_ids is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    else:
      segment_ids = jnp.asarray(segment_ids)
      if segment_ids.shape != (B, L):
        raise ValueError(f"segment_ids shape {segment_ids.shape} must equal tokens shape {(B, L)}")
      positions_BxL = positions_from_segments(segment_ids)
    x_BxLxD = x_BxLxD.astype(jnp.dtype(cfg.compute_dtype))
    if cfg.dropout_rate > 0:
      x_BxLxD = self.embed_dropout(x_BxLxD, deterministic=deterministic)
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, positions_BxL, segment_ids, deterministic)
    x_BxLxD = self.final_norm(x_BxLxD)
    if cfg.tie_embeddings:
      emb_VxD = self.embed.embedding.astype(x_BxLxD.dtype)
      return jnp.einsum("bld,vd->blv", x_BxLxD, emb_VxD, preferred_element_type=jnp.float32)
    return self.lm_head(x_BxLxD)

  def __call__(self, tokens_BxL, segment_ids=None, deterministic=True):
    return self.logits_from_embeddings(
        self.embed_tokens(tokens_BxL), segment_ids=segment_ids, deterministic=deterministic)
