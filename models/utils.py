"""Parameter counts, training FLOPs per token, device peak FLOP/s and MFU.

FLOPs formula (PaLM, Chowdhery et al. 2022, appendix B):
  flops_per_token = 6 * N + 12 * n_layers * n_heads * head_dim * seq_len
where N counts the weights of every matmul a token goes through: all attention
and MLP projections plus the output head (D * V, counted whether or not it is
tied to the embedding); the embedding lookup and norm scales are not matmuls
and are not counted. 6 = 2 (multiply-add) * 3 (forward + backward). The
attention term is the QK^T and AV matmuls, non-causal (PaLM's convention,
which does not halve it for the causal mask).
"""
from __future__ import annotations

import jax
import numpy as np

from models.config import ModelConfig

# bf16 dense peak FLOP/s per chip (vendor numbers, no sparsity).
_PEAK_BF16 = (
    # (substring of lower-cased device_kind, peak) - checked in order
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
)


def param_count(params) -> int:
  """Total number of scalars in a param pytree."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(params)))


def matmul_param_count(cfg: ModelConfig) -> int:
  """N in the FLOPs formula: attention + MLP projection weights + output head."""
  D, H, K, E = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  attn = D * H * E * 2 + D * K * E * 2  # q, o + k, v
  mlp = 3 * D * cfg.resolved_d_ff  # gate, up, down
  return cfg.num_layers * (attn + mlp) + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token at this sequence length."""
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
  return float(6 * matmul_param_count(cfg) + attn)


def peak_flops_per_s(device=None) -> float | None:
  """bf16 dense peak FLOP/s of one device, or None when unknown (e.g. CPU)."""
  if device is None:
    device = jax.devices()[0]
  kind = str(getattr(device, "device_kind", device)).lower()
  for key, peak in _PEAK_BF16:
    if key in kind:
      return peak
  return None


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, device=None,
        num_devices: int = 1) -> float | None:
  """Model FLOPs utilization in [0, 1]: achieved / (peak * num_devices); None if peak unknown."""
  peak = peak_flops_per_s(device)
  if peak is None:
    return None
  return tokens_per_s * flops_per_token(cfg, seq_len) / (peak * num_devices)
