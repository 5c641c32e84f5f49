"""all_gather_matmul for Hopper GPUs in Mosaic GPU Pallas (peer-to-peer only).

N matmul steps of (M, K) x (K, F), with jax's Hopper warp-specialised matmul
kernel (`hopper_matmul_mgpu.kernel`) as the engine. While step s multiplies the
row block it holds, every lhs tile that the pipeline has already brought into
shared memory is also stored (TMA) into the neighbour's receive buffer, so the
transfer rides on loads the matmul does anyway and overlaps its math. A CTA
signals the neighbour once its stores for the step are complete; step s+1
starts when all CTAs of the sender have signalled (a global semaphore, which
the runtime zeroes before every call). Peer-to-peer transfers only.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from ops.collectives import layout


def _mod(v, n):
  return lax.rem(v + 4 * n, n)


def _num_sms() -> int:
  return int(getattr(jax.devices()[0], "core_count", 132) or 132)


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
  """Tiling of jax's Hopper matmul kernel (hopper_matmul_mgpu.TuningConfig)."""
  # Defaults: the fastest tiling measured at m=k=n=4096 per shard on 2xH200
  # (0.442 ms, bench_2xh200.json); 4 stages with grid_tile_width 4 ran 0.454.
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  max_concurrent_steps: int = 3
  grid_minor_dim: str = "N"      # "M" or "N"
  grid_tile_width: int = 8
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
