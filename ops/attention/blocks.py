"""Block sizes per shape, in one small table per backend.

GPU (Mosaic GPU, Hopper; pallas_gpu.py). The forward runs 2 consumer
warpgroups of block_q query rows each (so a CTA covers 2 * block_q rows) and
one producer warpgroup streaming K/V tiles of block_kv rows through a ring of
`stages` shared-memory slots. Shared memory must hold Q (2 * block_q * D),
the K and V rings (2 * stages * block_kv * D) in 16-bit, under ~227 KiB:
  D=64:  block_kv 128, 3 stages   2*64*64*2 + 2*3*128*64*2   = 112 KiB
  D=128: block_kv 128, 2 stages   2*64*128*2 + 2*2*128*128*2 = 160 KiB
  D=256: block_kv 64,  2 stages   2*64*256*2 + 2*2*64*256*2  = 192 KiB
The backward (dK/dV kernel, 2 consumer warpgroups of block_kv key rows;
dQ kernel, consumer warpgroups of block_q query rows) uses 64-row tiles.
Measured (H100, NOTES.md): D=128 only; (64, 128, 2) beat (64, 64, 4) by
10-15%, (64, 128, 3) does not fit shared memory by 120 bytes. The D=64 and
D=256 rows are correct on the device but their speed was not measured.

TPU (pallas_tpu.py): 128 x 128 tiles by default (v5e/v6e lanes are 128
wide); on CPU interpret mode the same table is used, and tests override the
blocks to get several grid steps out of short sequences.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
  block_q: int
  block_k: int


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
  block_q: int        # query rows per consumer warpgroup (forward)
  block_kv: int       # key rows per pipeline step (forward)
  stages: int         # K/V ring depth (forward)
  bwd_block_q: int    # query rows per step, dK/dV kernel; per warpgroup, dQ kernel
  bwd_block_kv: int   # key rows per warpgroup, dK/dV kernel; per step, dQ kernel
  bwd_stages: int
  overlap: int = 0    # 1: FA3 intra-warpgroup overlap in the forward (stages >= 2)


def tpu_blocks(q_len: int, kv_len: int, head_dim: int, causal: bool) -> TpuBlocks:
  del q_len, kv_len, head_dim, causal
  return TpuBlocks(block_q=128, block_k=128)


# head_dim -> forward (block_q, block_kv, stages); backward (bq, bkv, stages).
_GPU_TABLE = {
    64: GpuBlocks(64, 128, 3, 64, 64, 2),
    128: GpuBlocks(64, 128, 2, 64, 64, 2),
    256: GpuBlocks(64, 64, 2, 64, 64, 1),
}


def gpu_blocks(q_len: int, kv_len: int, head_dim: int, causal: bool) -> GpuBlocks:
  del q_len, kv_len, causal
  try:
    return _GPU_TABLE[head_dim]
  except KeyError:
    raise ValueError(
        f"no GPU block sizes for head_dim={head_dim}; supported: "
        f"{sorted(_GPU_TABLE)}") from None
