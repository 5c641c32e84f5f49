"""Ring collectives and collective matmul for Hopper GPUs, in Mosaic GPU Pallas.

Peer-to-peer only: data moves by stores into a neighbour's buffers through
`plgpu.remote_ref`, and `pl.semaphore_signal/wait` say when it has landed.
Every transfer is between one pair of GPUs (see DESIGN.md's rule for the GPU
machines).

Ring collectives (`all_reduce`, `reduce_scatter`, `all_gather`). The flat
per-device array is cut into N blocks of TPC tiles of T elements. CTA b of
every device owns tiles [b*tpc, (b+1)*tpc) of every block and runs its own
ring on them, talking only to CTA b of its neighbours, with block-local
semaphores; even CTAs send right (i+1) and odd CTAs left (i-1), so both rings
(both directions of every link) carry half the data. Reduce-scatter step s:
CTA adds its block c = (i - sigma (s+1)) mod N, in float32, to the partial that
arrived at step s-1 and stores the sum into the neighbour's receive buffer,
then signals it. Partials travel as float32 when N > 2 (so bf16 is accumulated
in float32); with N = 2 a step only forwards raw inputs, which travel in the
input dtype, and the single add is done in float32. The all-gather phase
stores each final tile to the local and the neighbour's output at once and
forwards blocks for N-2 more steps.

Two transports. "tma" (all_reduce's default): each tile goes gmem -> shared
memory (TMA load), through registers only where an add is needed, and reaches
the neighbour by a TMA bulk store into its buffer: 353 GB/s bus bandwidth at
1 GiB on 2xH200, 1.26x lax.psum (NOTES.md). "registers": plain vector loads
and stores from registers straight into peer memory: simpler, but measured at
about 130 GB/s; reduce_scatter and all_gather still use it.

all_gather_matmul lives in pallas_gpu_agmm.py (re-exported here).

These import Mosaic GPU lazily: on CPU nothing here is imported or run.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ops.collectives import layout

TILE = 4096          # elements per tile of the ring collectives
VEC = 4              # elements per vector access
DEFAULT_CTAS = 264   # 2 per SM on an H100/H200: more loads in flight


def is_available() -> tuple[bool, str]:
  """(True, '') on a Hopper-or-newer NVIDIA GPU with Mosaic GPU importable."""
  try:
    dev = jax.devices()[0]
  except RuntimeError as e:  # pragma: no cover
    return False, str(e)
  if dev.platform != "gpu":
    return False, f"default device is {dev.platform}, not an NVIDIA GPU"
  cc = getattr(dev, "compute_capability", None)
  try:
    major = int(str(cc).split(".")[0])
  except ValueError:
    return False, f"unknown compute capability {cc!r}"
  if major < 9:
    return False, f"Mosaic GPU kernels need sm_90+, got compute capability {cc}"
  try:
    from jax.experimental.pallas import mosaic_gpu  # noqa: F401
  except ImportError as e:  # pragma: no cover
    return False, f"Mosaic GPU unavailable: {e}"
  return True, ""


def _num_sms() -> int:
  return int(getattr(jax.devices()[0], "core_count", 132) or 132)


# --------------------------------------------------------------------------
# Ring collectives


def _mod(v, n):
  return lax.rem(v + 4 * n, n)


def _ring_body(*refs, mode, axis_name, n, tpc, directions, wire_dtype, tile,
               vec):
  import jax.experimental.pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  if mode == "ar":
    x_ref, out_ref, recv_ref, sems = refs
  elif mode == "rs":
    x_ref, out_ref, recv_ref, sems = refs
  else:
    x_ref, out_ref, sems = refs
    recv_ref = None
  f32 = jnp.float32
  i = lax.axis_index(axis_name)
  b = lax.axis_index("cta")
  if len(directions) == 2:
    sigma = 1 - 2 * lax.rem(b, 2)
  else:
    sigma = jnp.int32(directions[0])
  to = {axis_name: _mod(i + sigma, n)}
  frm = {axis_name: _mod(i - sigma, n)}
  ready, rs_sem, ag_sem = sems.at[0], sems.at[1], sems.at[2]
  lay = plgpu.Layout.WG_STRIDED((tile,), vec_size=vec)

  def load(ref):
    return plgpu.load(ref, layout=lay)

  def tiles(fn):
    def body(j, carry):
      fn(b * tpc + j)
      return carry
    lax.fori_loop(0, tpc, body, None)

  # The neighbour we store into must be inside this kernel (its buffers live).
  pl.semaphore_signal(ready, 1, device_id=frm)
  pl.semaphore_wait(ready, 1)

  if mode in ("ar", "rs"):
    for s in range(n - 1):
      c = _mod(i - sigma * (s + 1), n)
      if s > 0:
        pl.semaphore_wait(rs_sem, 1)

      def rs_tile(t, c=c, s=s):
        v = load(x_ref.at[c, t])
        if s > 0:
          v = (v.astype(f32) + load(recv_ref.at[c, t]).astype(f32))
        plgpu.remote_ref(recv_ref, to).at[c, t][...] = v.astype(wire_dtype)

      tiles(rs_tile)
      pl.semaphore_signal(rs_sem, 1, device_id=to)
    pl.semaphore_wait(rs_sem, 1)

    def final_tile(t):
      v = (load(x_ref.at[i, t]).astype(f32)
           + load(recv_ref.at[i, t]).astype(f32)).astype(out_ref.dtype)
      if mode == "rs":
        out_ref.at[t][...] = v
      else:
        out_ref.at[i, t][...] = v
        if n > 1:
          plgpu.remote_ref(out_ref, to).at[i, t][...] = v

    tiles(final_tile)
    if mode == "rs":
      return
    first_forward = 1
  else:  # all-gather: step 0 sends our own block
    def own_tile(t):
      v = load(x_ref.at[t])
      out_ref.at[i, t][...] = v
      plgpu.remote_ref(out_ref, to).at[i, t][...] = v

    tiles(own_tile)
    first_forward = 1

  pl.semaphore_signal(ag_sem, 1, device_id=to)
  for s in range(first_forward, n - 1):
    c = _mod(i - sigma * s, n)
    pl.semaphore_wait(ag_sem, 1)

    def ag_tile(t, c=c):
      plgpu.remote_ref(out_ref, to).at[c, t][...] = load(out_ref.at[c, t])

    tiles(ag_tile)
    pl.semaphore_signal(ag_sem, 1, device_id=to)
  pl.semaphore_wait(ag_sem, 1)


def _ring_body_tma(x_ref, out_ref, recv_ref, sems, xs, rs, ow, od, bars, *,
                   axis_name, n, tpc, directions, wire_dtype, vec):
  """All-reduce ring as _ring_body, but every tile moves through shared memory
  and reaches the neighbour by a TMA (bulk async) store, not register stores.
  Tiles are (rows, 256); x/out/recv are (N, TPC, rows, 256)."""
  import jax.experimental.pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  f32 = jnp.float32
  dtype = x_ref.dtype
  i = lax.axis_index(axis_name)
  b = lax.axis_index("cta")
  if len(directions) == 2:
    sigma = 1 - 2 * lax.rem(b, 2)
  else:
    sigma = jnp.int32(directions[0])
  to = {axis_name: _mod(i + sigma, n)}
  frm = {axis_name: _mod(i - sigma, n)}
  ready, rs_sem, ag_sem = sems.at[0], sems.at[1], sems.at[2]
  lay = plgpu.Layout.WG_STRIDED(xs.shape, vec_size=vec)

  def tiles(fn):
    def body(j, carry):
      fn(b * tpc + j)
      return carry
    lax.fori_loop(0, tpc, body, None)

  def fetch(pairs):
    for k, (src, dst) in enumerate(pairs):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[k])
    for k in range(len(pairs)):
      plgpu.barrier_wait(bars.at[k])

  pl.semaphore_signal(ready, 1, device_id=frm)
  pl.semaphore_wait(ready, 1)

  for s in range(n - 1):
    c = _mod(i - sigma * (s + 1), n)
    if s > 0:
      pl.semaphore_wait(rs_sem, 1)

    def rs_tile(t, c=c, s=s):
      dst = plgpu.remote_ref(recv_ref, to).at[c, t]
      if s == 0 and wire_dtype == dtype:
        fetch([(x_ref.at[c, t], xs)])
        plgpu.copy_smem_to_gmem(xs, dst)
      else:
        pairs = [(x_ref.at[c, t], xs)]
        if s > 0:
          pairs.append((recv_ref.at[c, t], rs))
        fetch(pairs)
        v = plgpu.load(xs, layout=lay).astype(f32)
        if s > 0:
          v = v + plgpu.load(rs, layout=lay).astype(f32)
        ow[...] = v.astype(wire_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ow, dst)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    tiles(rs_tile)
    plgpu.wait_smem_to_gmem(0)
    pl.semaphore_signal(rs_sem, 1, device_id=to)
  pl.semaphore_wait(rs_sem, 1)

  def final_tile(t):
    fetch([(x_ref.at[i, t], xs), (recv_ref.at[i, t], rs)])
    v = plgpu.load(xs, layout=lay).astype(f32) + plgpu.load(rs, layout=lay).astype(f32)
    od[...] = v.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(od, out_ref.at[i, t])
    plgpu.copy_smem_to_gmem(od, plgpu.remote_ref(out_ref, to).at[i, t])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  tiles(final_tile)
  plgpu.wait_smem_to_gmem(0)
  pl.semaphore_signal(ag_sem, 1, device_id=to)
  for s in range(1, n - 1):
    c = _mod(i - sigma * s, n)
    pl.semaphore_wait(ag_sem, 1)

    def ag_tile(t, c=c):
      fetch([(out_ref.at[c, t], xs)])
      plgpu.copy_smem_to_gmem(xs, plgpu.remote_ref(out_ref, to).at[c, t])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    tiles(ag_tile)
    plgpu.wait_smem_to_gmem(0)
    pl.semaphore_signal(ag_sem, 1, device_id=to)
  pl.semaphore_wait(ag_sem, 1)


def all_reduce_tma(x, axis_name, *, direction="both", max_ctas=512, rows=16,
                   vec=4):
  """psum(x) by the ring kernel whose remote traffic is TMA bulk stores."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  n = lax.axis_size(axis_name)
  if n == 1:
    return x
  dirs = layout.ring_dirs(direction)
  tile = rows * 256
  length = x.size
  ctas, tpc = _ring_geometry(-(-length // n), max_ctas, tile)
  flat = x.reshape(-1)
  total = n * ctas * tpc * tile
  if total != length:
    flat = jnp.pad(flat, (0, total - length))
  xb = flat.reshape(n, ctas * tpc, rows, 256)
  dtype = x.dtype
  wire = dtype if n == 2 else jnp.float32
  body = functools.partial(_ring_body_tma, axis_name=axis_name, n=n, tpc=tpc,
                           directions=dirs, wire_dtype=wire, vec=vec)
  out, _ = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(xb.shape, dtype),
                jax.ShapeDtypeStruct(xb.shape, wire)),
      scratch_types=[plgpu.SemaphoreType.REGULAR((3,)),
                     plgpu.SMEM((rows, 256), dtype),
                     plgpu.SMEM((rows, 256), wire),
                     plgpu.SMEM((rows, 256), wire),
                     plgpu.SMEM((rows, 256), dtype),
                     plgpu.Barrier(num_barriers=2)],
      grid=(ctas,),
      grid_names=("cta",),
      compiler_params=plgpu.CompilerParams(),
  )(xb)
  out = out.reshape(-1)
  return (out if total == length else out[:length]).reshape(x.shape)


def _ring_geometry(block_elems: int, max_ctas: int, tile: int = TILE):
  """CTAs and tiles per CTA so that one block = ctas * tpc * tile (padded)."""
  tiles = max(1, -(-block_elems // tile))
  ctas = max(1, min(max_ctas, tiles))
  tpc = -(-tiles // ctas)
  return ctas, tpc


def _ring_call(x_blocks, *, mode, axis_name, n, ctas, tpc, directions, vec):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  dtype = x_blocks.dtype
  wire = dtype if n == 2 else jnp.float32
  if mode == "ar":
    out_type = (jax.ShapeDtypeStruct(x_blocks.shape, dtype),
                jax.ShapeDtypeStruct(x_blocks.shape, wire))
  elif mode == "rs":
    out_type = (jax.ShapeDtypeStruct(x_blocks.shape[1:], dtype),
                jax.ShapeDtypeStruct(x_blocks.shape, wire))
  else:
    out_type = jax.ShapeDtypeStruct((n, *x_blocks.shape), dtype)
  body = functools.partial(_ring_body, mode=mode, axis_name=axis_name, n=n,
                           tpc=tpc, directions=directions, wire_dtype=wire,
                           tile=x_blocks.shape[-1], vec=vec)
  out = plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=[plgpu.SemaphoreType.REGULAR((3,))],
      grid=(ctas,),
      grid_names=("cta",),
      compiler_params=plgpu.CompilerParams(),
  )(x_blocks)
  return out[0] if mode in ("ar", "rs") else out


def _block_view(flat_NxL, ctas, tpc, tile):
  """(N, L) -> (N, ctas*tpc, tile), zero-padded."""
  n, length = flat_NxL.shape
  lp = ctas * tpc * tile
  if lp != length:
    flat_NxL = jnp.pad(flat_NxL, ((0, 0), (0, lp - length)))
  return flat_NxL.reshape(n, ctas * tpc, tile)


def all_reduce(x, axis_name, *, direction="both", transport="tma",
               max_ctas=None, tile=TILE, vec=VEC):
  """psum(x) by the ring kernel; any shape, float32/bfloat16/float16."""
  if transport == "tma":
    return all_reduce_tma(x, axis_name, direction=direction,
                          max_ctas=max_ctas or 512, rows=tile // 256, vec=vec)
  if transport != "registers":
    raise ValueError(f"transport={transport!r} is not 'tma' or 'registers'")
  max_ctas = max_ctas or DEFAULT_CTAS
  n = lax.axis_size(axis_name)
  if n == 1:
    return x
  dirs = layout.ring_dirs(direction)
  length = x.size
  block = -(-length // n)
  ctas, tpc = _ring_geometry(block, max_ctas, tile)
  flat = x.reshape(-1)
  total = n * ctas * tpc * tile
  if total != length:
    flat = jnp.pad(flat, (0, total - length))
  xb = flat.reshape(n, ctas * tpc, tile)
  out = _ring_call(xb, mode="ar", axis_name=axis_name, n=n, ctas=ctas,
                   tpc=tpc, directions=dirs, vec=vec)
  out = out.reshape(-1)
  return (out if total == length else out[:length]).reshape(x.shape)


def reduce_scatter(x, axis_name, *, direction="both", max_ctas=DEFAULT_CTAS,
                   tile=TILE, vec=VEC):
  """psum_scatter(x, tiled=True) over rows by the ring kernel."""
  n = lax.axis_size(axis_name)
  if n == 1:
    return x
  dirs = layout.ring_dirs(direction)
  m = x.shape[0] // n
  x_NxL = x.reshape(n, -1)
  block = x_NxL.shape[1]
  ctas, tpc = _ring_geometry(block, max_ctas, tile)
  out = _ring_call(_block_view(x_NxL, ctas, tpc, tile), mode="rs",
                   axis_name=axis_name, n=n, ctas=ctas, tpc=tpc,
                   directions=dirs, vec=vec)
  return out.reshape(-1)[:block].reshape(m, *x.shape[1:])


def all_gather(x, axis_name, *, direction="both", max_ctas=DEFAULT_CTAS,
               tile=TILE, vec=VEC):
  """all_gather(x, tiled=True) over rows by the ring kernel."""
  n = lax.axis_size(axis_name)
  if n == 1:
    return x
  dirs = layout.ring_dirs(direction)
  block = x.size
  ctas, tpc = _ring_geometry(block, max_ctas, tile)
  xb = _block_view(x.reshape(1, -1), ctas, tpc, tile)[0]
  out = _ring_call(xb, mode="ag", axis_name=axis_name, n=n, ctas=ctas,
                   tpc=tpc, directions=dirs, vec=vec)
  out = out.reshape(n, -1)[:, :block]
  return out.reshape(n * x.shape[0], *x.shape[1:])


from ops.collectives.pallas_gpu_agmm import (  # noqa: E402
    DEFAULT_MATMUL_CONFIG, MatmulConfig, agmm_unsupported_reason,
    all_gather_matmul)
