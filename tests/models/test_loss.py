"""cross_entropy vs a direct numpy computation; PAD and masks; the chunked variant."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import PAD_ID
from models.loss import chunked_cross_entropy, cross_entropy

B, L, V = 2, 8, 259


def data(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, L, V)).astype(np.float32) * 3
  targets = rng.integers(0, 256, size=(B, L))
  targets[0, 5:] = PAD_ID
  return logits, targets


def numpy_ce(logits, targets, keep):
  x = logits.astype(np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return nll[keep].mean(), keep.sum()


def test_matches_numpy_and_ignores_pad():
  logits, targets = data()
  loss, n = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  want, want_n = numpy_ce(logits, targets, targets != PAD_ID)
  assert int(n) == want_n == B * L - 3
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  # the logits at PAD targets do not matter at all
  other = logits.copy()
  other[0, 5:] += 100.0
  assert float(cross_entropy(jnp.asarray(other), jnp.asarray(targets))[0]) == float(loss)


def test_mask_is_combined_with_pad_rule_and_stable():
  logits, targets = data(1)
  mask = np.ones((B, L), bool)
  mask[1, :2] = False
  loss, n = cross_entropy(jnp.asarray(logits) + 1e4, jnp.asarray(targets), jnp.asarray(mask))
  want, want_n = numpy_ce(logits, targets, mask & (targets != PAD_ID))
  assert int(n) == want_n
  np.testing.assert_allclose(float(loss), want, rtol=1e-3)  # huge offset: still finite, shift-invariant
  empty = cross_entropy(jnp.asarray(logits), jnp.full((B, L), PAD_ID))
  assert float(empty[0]) == 0.0 and int(empty[1]) == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_equals_plain(dtype):
  logits, targets = data(2)
  logits = jnp.asarray(logits, dtype)
  f_plain = lambda x: cross_entropy(x, jnp.asarray(targets))[0]
  f_chunk = lambda x: chunked_cross_entropy(x, jnp.asarray(targets), chunk_size=2)[0]
  (a, ga), (b, gb) = jax.value_and_grad(f_plain)(logits), jax.value_and_grad(f_chunk)(logits)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ga, np.float32), np.asarray(gb, np.float32), rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="chunk_size"):
    chunked_cross_entropy(logits, jnp.asarray(targets), chunk_size=3)
