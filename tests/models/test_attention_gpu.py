"""cuDNN attention vs the XLA path on a GPU (skipped where jax sees no GPU)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import DecoderLM, ModelConfig
from models.attention import attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_cudnn_matches_xla_forward_and_grad():
  B, L, H, K, D = 2, 128, 4, 2, 64
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, L, H, D), jnp.bfloat16)
  k = jax.random.normal(ks[1], (B, L, K, D), jnp.bfloat16)
  v = jax.random.normal(ks[2], (B, L, K, D), jnp.bfloat16)
  seg = jnp.concatenate([jnp.ones((B, 50), jnp.int32), 2 * jnp.ones((B, L - 50), jnp.int32)], 1)
  w = jax.random.normal(ks[3], (B, L, H, D), jnp.float32)
  for segment_ids in (None, seg):
    def f(q, k, v, impl):
      out = attention(q, k, v, segment_ids=segment_ids, impl=impl)
      return jnp.sum(out.astype(jnp.float32) * w)
    vg = {impl: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, impl)
          for impl in ("xla", "cudnn")}
    out = {impl: jax.jit(lambda q, k, v, impl=impl: attention(
        q, k, v, segment_ids=segment_ids, impl=impl))(q, k, v) for impl in ("xla", "cudnn")}
    assert rel_err(out["cudnn"], out["xla"]) < 2e-2
    for g_c, g_x in zip(vg["cudnn"][1], vg["xla"][1]):
      assert rel_err(g_c, g_x) < 3e-2


def test_model_with_cudnn_matches_xla():
  cfg = dataclasses.replace(ModelConfig(), num_kv_heads=2, head_dim=64, num_heads=2,
                            compute_dtype="bfloat16")
  tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, 256)
  params = DecoderLM(cfg).init(jax.random.key(0), tokens)["params"]
  run = lambda c: jax.jit(lambda p, t: DecoderLM(c).apply({"params": p}, t))(params, tokens)
  got = run(dataclasses.replace(cfg, attention_impl="cudnn"))
  assert got.dtype == jnp.float32
  assert rel_err(got, run(cfg)) < 2e-2
