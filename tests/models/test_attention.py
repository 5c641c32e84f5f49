"""attention(): GQA vs repeated-kv MHA, masking, positions, and impl selection errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import attention, positions_from_segments
from models.config import ATTENTION_IMPLS

B, L, H, D = 2, 6, 4, 8


def qkv(kv_heads, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, L, H, D)), jax.random.normal(kk, (B, L, kv_heads, D)),
          jax.random.normal(kv, (B, L, kv_heads, D)))


def numpy_attention(q, k, v, seg):
  """Loop-over-heads numpy spec; query head h reads kv head h // (H // K)."""
  q, k, v = map(np.asarray, (q, k, v))
  G = q.shape[2] // k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      for t in range(L):
        ok = [s for s in range(t + 1) if seg is None or seg[b][s] == seg[b][t]]
        sc = np.array([q[b, t, h] @ k[b, s, h // G] for s in ok]) / np.sqrt(D)
        w = np.exp(sc - sc.max())
        w /= w.sum()
        out[b, t, h] = sum(wi * v[b, s, h // G] for wi, s in zip(w, ok))
  return out


@pytest.mark.parametrize("kv_heads, seg", [(4, None), (2, [[1, 1, 2, 2, 2, 3], [0, 0, 0, 0, 1, 1]])])
def test_xla_matches_numpy(kv_heads, seg):
  q, k, v = qkv(kv_heads)
  seg_arr = None if seg is None else jnp.array(seg)
  got = jax.jit(lambda *a: attention(*a, segment_ids=seg_arr, impl="xla"))(q, k, v)
  np.testing.assert_allclose(got, numpy_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_heads():
  q, k, v = qkv(1)
  got = attention(q, k, v, impl="xla")
  want = attention(q, jnp.repeat(k, H, axis=2), jnp.repeat(v, H, axis=2), impl="xla")
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_positions_reset_per_segment():
  seg = jnp.array([[3, 3, 3, 5, 5, 0], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0], list(range(6))])


def test_bad_impl_and_shapes_raise():
  q, k, v = qkv(3 if H % 3 else 4)
  with pytest.raises(ValueError, match="allowed values"):
    attention(*qkv(4), impl="flash")
  with pytest.raises(ValueError, match="kv heads"):
    attention(q, k, v, impl="xla")
  with pytest.raises(ValueError, match="segment_ids"):
    attention(*qkv(4), segment_ids=jnp.zeros((B, L + 1), jnp.int32), impl="xla")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU error")
def test_cudnn_without_gpu_says_so():
  with pytest.raises(ValueError, match="GPU") as e:
    attention(*qkv(4), impl="cudnn")
  assert all(impl in str(e.value) for impl in ATTENTION_IMPLS)
