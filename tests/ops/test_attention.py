"""Flash attention on CPU: the Mosaic TPU kernel in interpret mode, the api, the reference.

Every kernel case compares the forward and jax.grad (via a random dO) with
reference.py on fresh random inputs. Sizes are tiny: interpret mode is slow.
Most cases use pallas' HLO interpreter (interpret=True); the cases marked
TPU_INTERPRETER run under pltpu.InterpretParams(), which also simulates the
TPU's DMAs and semaphores (about 4x slower).
"""
from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu

from ops.attention import api, pallas_tpu, reference
from tests.ops.test_attention_helpers import (check_against_reference, make_inputs,
                                              rel_err)

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (B, T, S, H, K, D, dtype, causal, segments, sm_scale, block_q, block_k)
CASES = {
    "bf16_causal_gqa": (1, 128, 128, 4, 2, 64, BF16, True, None, None, 64, 64),
    "f16_causal_odd_len": (2, 100, 100, 2, 2, 32, F16, True, None, None, 32, 64),
    "bf16_mqa_cross_len": (1, 96, 160, 4, 1, 32, BF16, False, None, None, 32, 64),
    "bf16_causal_segments": (2, 128, 128, 2, 1, 32, BF16, True, "self", None, 64, 32),
    "f32_segment_pair_empty_rows": (1, 64, 96, 2, 2, 32, F32, False, "pair", None, 32, 32),
    "bf16_sm_scale": (1, 128, 128, 2, 2, 64, BF16, True, None, 0.3, 64, 64),
    "bf16_d128_causal": (1, 128, 128, 1, 1, 128, BF16, True, None, None, 64, 64),
    "bf16_d256": (1, 64, 64, 1, 1, 256, BF16, False, None, None, 32, 32),
}


TPU_INTERPRETER = ("bf16_causal_segments",)


def _kernel(causal, seg, sm_scale, bq, bk, interpret=True):
  def fn(q, k, v):
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    q_ids, kv_ids = reference.split_segment_ids(seg, B, T, S)
    return pallas_tpu.flash_attention(
        q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
        sm_scale=sm_scale, block_q=bq, block_k=bk, interpret=interpret)
  return fn


@pytest.mark.parametrize("name", sorted(CASES))
def test_tpu_kernel_interpret_matches_reference(name):
  B, T, S, H, K, D, dtype, causal, segs, scale, bq, bk = CASES[name]
  q, k, v, do, seg = make_inputs(zlib.crc32(name.encode()) % 1000, B, T, S, H, K, D, dtype, segs)
  interpret = pltpu.InterpretParams() if name in TPU_INTERPRETER else True
  check_against_reference(_kernel(causal, seg, scale, bq, bk, interpret), q, k, v, do,
                          causal=causal, segment_ids=seg, sm_scale=scale, what=name)


def test_tpu_kernel_random_sweep():
  """Seeded random shapes: odd lengths, GQA ratios, all options."""
  rng = np.random.default_rng(6)
  for trial in range(2):
    K = int(rng.choice([1, 2]))
    H = K * int(rng.choice([1, 2, 3]))
    T = int(rng.integers(17, 140))
    causal = bool(rng.integers(2))
    S = T if causal or trial == 0 else int(rng.integers(17, 140))
    segs = "self" if (S == T and rng.integers(2)) else None
    dtype = [BF16, F16, F32][int(rng.integers(3))]
    q, k, v, do, seg = make_inputs(100 + trial, 1, T, S, H, K, 32, dtype, segs)
    check_against_reference(_kernel(causal, seg, None, 32, 64), q, k, v, do,
                            causal=causal, segment_ids=seg, sm_scale=None,
                            what=f"trial {trial}: T={T} S={S} H={H} K={K} {dtype} "
                                 f"causal={causal} segs={segs}")


def test_tpu_kernel_lse_and_empty_rows():
  q, k, v, _, seg = make_inputs(7, 1, 64, 96, 2, 2, 32, F32, "pair")
  out, lse = pallas_tpu.forward_with_lse(
      q, k, v, q_segment_ids=seg[0], kv_segment_ids=seg[1], block_q=32,
      block_k=32, interpret=pltpu.InterpretParams())
  ref_out, ref_lse = reference.attention_with_lse(q, k, v, segment_ids=seg)
  empty = np.isinf(np.asarray(ref_lse))
  assert empty.any(), "the pair segments should leave some query rows empty"
  np.testing.assert_array_equal(np.isinf(np.asarray(lse)), empty)
  np.testing.assert_allclose(np.where(empty, 0, lse), np.where(empty, 0, ref_lse),
                             atol=1e-5)
  rows = np.asarray(empty[0, 0])
  np.testing.assert_array_equal(np.asarray(out)[0, rows], 0.0)
  assert rel_err(out, ref_out) < 1e-5


def test_reference_matches_naive_softmax():
  q, k, v, _, seg = make_inputs(3, 1, 8, 8, 2, 1, 4, F32, "self")
  got = reference.attention(q, k, v, causal=True, segment_ids=seg, sm_scale=0.7)
  qn, kn, vn, sn = (np.asarray(x, np.float64) for x in (q, k, v, seg))
  want = np.zeros(qn.shape)
  for h in range(2):
    s = 0.7 * qn[0, :, h] @ kn[0, :, 0].T
    ok = np.tril(np.ones((8, 8), bool)) & (sn[0][:, None] == sn[0][None, :])
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want[0, :, h] = (p / p.sum(-1, keepdims=True)) @ vn[0, :, 0]
  np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------ api
def test_api_xla_and_default_match_reference():
  q, k, v, do, seg = make_inputs(11, 2, 48, 48, 4, 2, 16, F32, "self")
  for impl in ("xla", None):
    fn = functools.partial(api.dot_product_attention, causal=True,
                           segment_ids=seg, implementation=impl)
    check_against_reference(fn, q, k, v, do, causal=True, segment_ids=seg,
                            sm_scale=None, what=f"api {impl}")


def test_api_pallas_on_cpu_uses_the_interpret_kernel():
  q, k, v, do, seg = make_inputs(12, 1, 64, 64, 2, 1, 32, BF16, "self")
  fn = functools.partial(api.dot_product_attention, causal=True, segment_ids=seg,
                         implementation="pallas")
  check_against_reference(fn, q, k, v, do, causal=True, segment_ids=seg,
                          sm_scale=None, what="api pallas")


def test_api_rejects_bad_inputs_with_clear_errors():
  q = jnp.ones((1, 16, 4, 32), F32)
  kv = jnp.ones((1, 16, 2, 32), F32)
  with pytest.raises(ValueError, match=r"allowed: \[None, 'pallas', 'cudnn', 'xla'\]"):
    api.dot_product_attention(q, kv, kv, implementation="triton")
  with pytest.raises(ValueError, match="must divide"):
    api.dot_product_attention(q, jnp.ones((1, 16, 3, 32)), jnp.ones((1, 16, 3, 32)))
  with pytest.raises(ValueError, match="rank 4"):
    api.dot_product_attention(q[0], kv, kv)
  with pytest.raises(ValueError, match="same shape"):
    api.dot_product_attention(q, kv, kv[:, :8])
  with pytest.raises(ValueError, match="head_dim must be equal"):
    api.dot_product_attention(q, kv[..., :16], kv[..., :16])
  with pytest.raises(ValueError, match="share one dtype"):
    api.dot_product_attention(q, kv.astype(BF16), kv)
  with pytest.raises(ValueError, match="supports dtypes"):
    api.dot_product_attention(q.astype(jnp.int32), kv.astype(jnp.int32),
                              kv.astype(jnp.int32), implementation="pallas")
  with pytest.raises(ValueError, match="head_dim a multiple of 8"):
    api.dot_product_attention(q[..., :12], kv[..., :12], kv[..., :12],
                              implementation="pallas")
  with pytest.raises(ValueError, match="segment_ids shapes"):
    api.dot_product_attention(q, kv, kv, segment_ids=jnp.zeros((1, 8), jnp.int32))
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="cuDNN needs an NVIDIA GPU"):
      api.dot_product_attention(q.astype(BF16), kv.astype(BF16), kv.astype(BF16),
                                implementation="cudnn")


def test_api_under_jit_and_model_call_signature():
  """The models' call: causal=True, segment_ids=[B, L], implementation='pallas'."""
  q, k, v, _, seg = make_inputs(13, 2, 64, 64, 4, 2, 32, F32, "self")
  fn = jax.jit(lambda q, k, v, s: api.dot_product_attention(
      q, k, v, causal=True, segment_ids=s, implementation="pallas"))
  want = reference.attention(q, k, v, causal=True, segment_ids=seg)
  assert rel_err(fn(q, k, v, seg), want) < 1e-5
