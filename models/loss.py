"""Token-level cross-entropy for next-token prediction.

Letters: B batch, L sequence, V vocab, C chunk length.

Targets equal to PAD_ID never count. A given mask_BxL is combined (AND) with
that rule. The mean is over counted tokens (0.0 when none count).

Which one the train step uses (pathways_lite/train.py): `cross_entropy`. The
model's head already returns f32 logits, and with the byte vocabulary
(V = 259) they are small: B16 x L2048 x 259 x 4 bytes = 34 MB (and as much
for their gradient), under 1% of a 350M model's activations at that batch.
`chunked_cross_entropy` saves memory only when the logits reaching it are
16-bit and V is large (tens of thousands); it is kept for such vocabularies.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import PAD_ID


def _weights(targets_BxL, mask_BxL):
  w_BxL = targets_BxL != PAD_ID
  if mask_BxL is not None:
    if mask_BxL.shape != targets_BxL.shape:
      raise ValueError(f"mask shape {mask_BxL.shape} must equal targets shape {targets_BxL.shape}")
    w_BxL = w_BxL & mask_BxL.astype(bool)
  return w_BxL


def _check(logits, targets):
  if logits.ndim != 3 or targets.shape != logits.shape[:2]:
    raise ValueError(
        f"expected logits [B, L, V] and targets [B, L]; got {logits.shape} and {targets.shape}")


def _token_nll(logits_BxLxV, targets_BxL):
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  tgt_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return logz_BxL - tgt_BxL


def cross_entropy(logits_BxLxV, targets_BxL, mask_BxL=None):
  """Returns (mean loss over counted tokens, f32 scalar; number of counted tokens, int32)."""
  _check(logits_BxLxV, targets_BxL)
  w_BxL = _weights(targets_BxL, mask_BxL)
  nll_BxL = _token_nll(logits_BxLxV, targets_BxL)
  n = jnp.sum(w_BxL, dtype=jnp.int32)
  total = jnp.sum(jnp.where(w_BxL, nll_BxL, 0.0))
  return total / jnp.maximum(n, 1).astype(jnp.float32), n


def chunked_cross_entropy(logits_BxLxV, targets_BxL, mask_BxL=None, chunk_size=128):
  """Same value as `cross_entropy`, computed chunk by chunk over L.

  Only one [B, C, V] f32 slice exists at a time (forward and, via remat of each
  chunk, backward), so bf16 logits never get a full f32 [B, L, V] copy.
  L must be a multiple of chunk_size (or smaller than it).
  """
  _check(logits_BxLxV, targets_BxL)
  B, L, V = logits_BxLxV.shape
  C = min(chunk_size, L)
  if C < 1 or L % C:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1 and divide seq len {L}")
  w_BxL = _weights(targets_BxL, mask_BxL)
  n_chunks = L // C
  logits_NxBxCxV = logits_BxLxV.reshape(B, n_chunks, C, V).swapaxes(0, 1)
  targets_NxBxC = targets_BxL.reshape(B, n_chunks, C).swapaxes(0, 1)
  w_NxBxC = w_BxL.reshape(B, n_chunks, C).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_sum(logits_BxCxV, targets_BxC, w_BxC):
    return jnp.sum(jnp.where(w_BxC, _token_nll(logits_BxCxV, targets_BxC), 0.0))

  def body(total, xs):
    return total + chunk_sum(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (logits_NxBxCxV, targets_NxBxC, w_NxBxC))
  n = jnp.sum(w_BxL, dtype=jnp.int32)
  return total / jnp.maximum(n, 1).astype(jnp.float32), n
