"""Ring collectives and collective matmul for Hopper GPUs, in Mosaic GPU Pallas.

Peer-to-peer only: data moves by stores into a neighbour's buffers through
`plgpu.remote_ref`, and `pl.semaphore_signal/wait` say when it has landed.
No NVLink multicast anywhere (no multimem, no multicast semaphores, nothing
built on them): see DESIGN.md.

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

all_gather_matmul: N matmul steps of (M, K) x (K, F), using jax's Hopper
warp-specialised matmul kernel (`hopper_matmul_mgpu.kernel`) as the engine.
While step s multiplies the row block it holds, every lhs tile that the
pipeline has already brought into shared memory is also stored (TMA) into the
left neighbour's receive buffer, so the transfer rides on the loads the
matmul does anyway and overlaps its math. A CTA signals the neighbour once its
stores for the step are complete; step s+1 starts when all CTAs of the sender
have signalled.

These import Mosaic GPU lazily: on CPU nothing here is imported or run.
"""
from __future__ import annotations

import dataclasses
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


def all_reduce(x, axis_name, *, direction="both", max_ctas=DEFAULT_CTAS,
               tile=TILE, vec=VEC):
  """psum(x) by the ring kernel; any shape, float32/bfloat16/float16."""
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


# --------------------------------------------------------------------------
# all_gather_matmul


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
  """Tiling of jax's Hopper matmul kernel (hopper_matmul_mgpu.TuningConfig)."""
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  max_concurrent_steps: int = 4
  grid_minor_dim: str = "N"      # "M" or "N"
  grid_tile_width: int = 4
  wg_dimension: str = "N"        # "M" or "N"

  def to_jax(self):
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    dim = hm.MatmulDimension
    return hm.TuningConfig(
        tile_m=self.tile_m, tile_n=self.tile_n, tile_k=self.tile_k,
        max_concurrent_steps=self.max_concurrent_steps,
        grid_minor_dim=dim[self.grid_minor_dim],
        grid_tile_width=self.grid_tile_width,
        wg_dimension=dim[self.wg_dimension])

  def cta_tiles(self):
    cta_m = self.tile_m * (2 if self.wg_dimension == "M" else 1)
    cta_n = self.tile_n * (2 if self.wg_dimension == "N" else 1)
    return cta_m, cta_n


DEFAULT_MATMUL_CONFIG = MatmulConfig()


def agmm_unsupported_reason(x, w, config: MatmulConfig = DEFAULT_MATMUL_CONFIG):
  """None if all_gather_matmul's GPU kernel takes these operands, else why."""
  if x.ndim != 2 or w.ndim != 2:
    return "the GPU kernel takes 2-D x and w"
  if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
    return "the GPU kernel takes bfloat16 or float16 x and w of one dtype"
  m, k = x.shape
  f = w.shape[1]
  cta_m, cta_n = config.cta_tiles()
  if m % cta_m or f % cta_n or k % config.tile_k:
    return (f"the GPU kernel needs M % {cta_m} == F % {cta_n} == "
            f"K % {config.tile_k} == 0, got M={m} K={k} F={f}")
  return None


def _agmm_body(x_ref, w_ref, out_ref, scratch_ref, *, axis_name, n, sigma,
               num_ctas, config):
  import jax.experimental.pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

  sems = pl.get_global(plgpu.SemaphoreType.REGULAR((2,)))
  ready, landed = sems.at[0], sems.at[1]
  wg = lax.axis_index("wg")
  i = lax.axis_index(axis_name)
  m = x_ref.shape[0]
  cta_m, _ = config.cta_tiles()
  tile_k = config.tile_k
  # Blocks travel to i + sigma; the block held at step s came from i - sigma*s.
  to = {axis_name: _mod(i + sigma, n)}
  frm = {axis_name: _mod(i - sigma, n)}
  jax_config = config.to_jax()

  @pl.when(wg == 0)
  def _hello():
    pl.semaphore_signal(ready, 1, device_id=frm)
  pl.semaphore_wait(ready, num_ctas, decrement=False)

  for s in range(n):
    src = x_ref if s == 0 else scratch_ref.at[s - 1]
    origin = _mod(i - sigma * s, n)
    sending = s < n - 1
    callback = None
    if sending:
      dst = plgpu.remote_ref(scratch_ref.at[s], to)

      def callback(m_idx, n_idx, k_idx, a_smem, b_smem, dst=dst):
        del b_smem
        # Each lhs tile is loaded once per column of output tiles: send it
        # from the first column only.
        @pl.when((wg == 0) & (n_idx == 0))
        def _send():
          plgpu.copy_smem_to_gmem(
              a_smem, dst.at[pl.ds(m_idx * cta_m, cta_m),
                             pl.ds(k_idx * tile_k, tile_k)])
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)

    hm.kernel(src, w_ref, None, out_ref.at[pl.ds(origin * m, m)],
              config=jax_config, pipeline_callback=callback, delay_release=1)
    if sending:
      @pl.when(wg == 0)
      def _done():
        plgpu.wait_smem_to_gmem(0, wait_read_only=False)
        pl.semaphore_signal(landed, 1, device_id=to)
      pl.semaphore_wait(landed, (s + 1) * num_ctas, decrement=False)
  plgpu.wait_smem_to_gmem(0, wait_read_only=False)


def all_gather_matmul(x, w, axis_name, *, direction="left",
                      config: MatmulConfig = DEFAULT_MATMUL_CONFIG):
  """all_gather(x) @ w with x (M, K) per device and w (K, F): (N*M, F)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  n = lax.axis_size(axis_name)
  dirs = layout.ring_dirs(direction)
  if n == 1:
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  sigma = dirs[-1]  # "both" is not split for the matmul: one ring
  m, k = x.shape
  num_ctas = _num_sms()
  body = functools.partial(_agmm_body, axis_name=axis_name, n=n, sigma=sigma,
                           num_ctas=num_ctas, config=config)
  out, _ = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((n * m, w.shape[1]), x.dtype),
                jax.ShapeDtypeStruct((n - 1, m, k), x.dtype)),
      grid=(num_ctas,),
      grid_names=("cluster_grid",),
      cluster=(1,),
      cluster_names=("cluster",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(x, w)
  return out
