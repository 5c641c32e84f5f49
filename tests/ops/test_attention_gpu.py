"""The Mosaic GPU (Hopper) flash attention kernels.

On CPU they run in the Mosaic GPU interpreter (jax >= 0.12, where
plgpu.InterpretGPUParams exists): barriers, TMA copies, ring slots, masks and
the softmax are exercised; wgmma becomes jnp.dot there, so the hardware
lowering is only covered by the GPU tests at the bottom (skipped without a
Hopper GPU) and by launch/bench_attention.py, which checks correctness on
the device before timing.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops.attention import blocks, pallas_gpu, reference
from tests.ops.test_attention_helpers import (check_against_reference, make_inputs,
                                              rel_err)

BF16, F16 = jnp.bfloat16, jnp.float16
SMALL = blocks.GpuBlocks(block_q=64, block_kv=64, stages=2, bwd_block_q=64,
                         bwd_block_kv=64, bwd_stages=2)
ONE_STAGE = blocks.GpuBlocks(64, 64, 1, 64, 64, 1)
THREE_STAGES = blocks.GpuBlocks(64, 128, 3, 64, 64, 3)
OVERLAP = blocks.GpuBlocks(64, 64, 2, 64, 64, 2, overlap=1)
OVERLAP_WIDE = blocks.GpuBlocks(64, 128, 2, 64, 64, 2, overlap=1)

needs_interpreter = pytest.mark.skipif(
    not hasattr(plgpu, "InterpretGPUParams"),
    reason="this jax has no Mosaic GPU interpreter (added in jax 0.12)")

# (B, T, S, H, K, D, dtype, causal, segments, sm_scale, blocks)
CASES = {
    "f16_gqa_padded_cross": (1, 120, 200, 2, 1, 64, F16, False, None, None, SMALL),
    "bf16_causal_segments_one_stage": (1, 192, 192, 2, 2, 64, BF16, True, "self", None,
                                       ONE_STAGE),
    "bf16_segment_pair_three_stages": (1, 128, 256, 1, 1, 64, BF16, False, "pair", 0.2,
                                       THREE_STAGES),
    "bf16_d128_causal_padded": (1, 100, 100, 1, 1, 128, BF16, True, None, None, SMALL),
    "bf16_d256": (1, 128, 128, 1, 1, 256, BF16, False, None, None, ONE_STAGE),
    "overlap_bf16_causal_segments": (1, 256, 256, 2, 1, 64, BF16, True, "self", None,
                                     OVERLAP),
    "overlap_f16_padded_one_step": (1, 100, 100, 1, 1, 64, F16, True, None, None,
                                    OVERLAP_WIDE),
}


def _kernel(causal, seg, sm_scale, cfg, interpret):
  def fn(q, k, v):
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    q_ids, kv_ids = reference.split_segment_ids(seg, B, T, S)
    return pallas_gpu.flash_attention(
        q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
        sm_scale=sm_scale, blocks=cfg, interpret=interpret)
  return fn


@needs_interpreter
@pytest.mark.parametrize("name", sorted(CASES))
def test_mosaic_gpu_kernels_interpret_match_reference(name):
  B, T, S, H, K, D, dtype, causal, segs, scale, cfg = CASES[name]
  q, k, v, do, seg = make_inputs(zlib.crc32(name.encode()) % 1000, B, T, S, H, K, D,
                                 dtype, segs)
  check_against_reference(_kernel(causal, seg, scale, cfg, True), q, k, v, do,
                          causal=causal, segment_ids=seg, sm_scale=scale, what=name)


@needs_interpreter
def test_mosaic_gpu_forward_lse_and_empty_rows_interpret():
  q, k, v, _, seg = make_inputs(5, 1, 128, 128, 1, 1, 64, BF16, "pair")
  out, lse = pallas_gpu.forward_with_lse(
      q, k, v, q_segment_ids=seg[0], kv_segment_ids=seg[1], blocks=SMALL,
      interpret=True)
  ref_out, ref_lse = reference.attention_with_lse(q, k, v, segment_ids=seg)
  empty = jnp.isinf(ref_lse)
  assert bool(empty.any())
  assert bool(jnp.all(jnp.isinf(lse) == empty))
  assert float(jnp.max(jnp.abs(jnp.where(empty, 0.0, lse - ref_lse)))) < 1e-3
  assert rel_err(out, ref_out) < 1e-2


def test_unsupported_inputs_raise_value_error():
  q = jnp.ones((1, 64, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match="supports dtypes"):
    pallas_gpu.flash_attention(q, q, q)
  q = jnp.ones((1, 64, 1, 96), BF16)
  with pytest.raises(ValueError, match=r"head_dim in \(64, 128, 256\)"):
    pallas_gpu.flash_attention(q, q, q)


# ---------------------------------------------------------- on a Hopper GPU
def _on_hopper():
  dev = jax.devices()[0]
  return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


@pytest.mark.skipif(not _on_hopper(), reason="needs an NVIDIA Hopper GPU")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_mosaic_gpu_on_device(causal, D):
  q, k, v, do, seg = make_inputs(D + causal, 2, 1000, 1000, 4, 2, D, BF16,
                                 "self" if causal else None)
  check_against_reference(_kernel(causal, seg, None, None, False), q, k, v, do,
                          causal=causal, segment_ids=seg, sm_scale=None,
                          what=f"device D={D} causal={causal}")
