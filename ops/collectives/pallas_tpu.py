"""Ring collectives as Pallas TPU kernels: remote DMAs and semaphores.

Call these inside `shard_map` (with `check_vma=False`). On CPU they run in the
TPU interpreter (`pltpu.InterpretParams()`), which simulates the remote DMAs
and semaphores between the fake devices: that is how CI covers them.

The rings. Device i of an axis of size N talks only to its neighbours
i+1 ("right") and i-1 ("left"). With `direction="both"` every piece of data is
halved and the halves travel the two rings at once, using both links of each
device. Each half is further cut into `num_chunks` chunks, and the ring step of
chunk k+1 is in flight while chunk k is being added (or multiplied): the
kernels start a DMA and only wait on it when its data is needed.

Reduce-scatter (ring of sigma = +-1): at step s = 0..N-2 device i adds its own
block c = (i - sigma (s+1)) mod N to the partial sum it received at step s-1
and sends the result on; after N-1 steps it holds the full sum of block i.
Partials travel in float32, so bf16 inputs are accumulated in float32.
All-gather: at step s device i forwards block (i - sigma s) mod N.
All-reduce: the two phases in one kernel.

Collective matmul. all_gather_matmul: at step s the row block that arrived at
step s-1 is sent on (DMA started) and then multiplied by the local weights
while the DMA runs. matmul_reduce_scatter: the partial product of step s is
computed before waiting for the partial sum of step s-1, then added and sent.

Buffers are never reused within a kernel (each ring step has its own slot and
its own DMA semaphore), so the only synchronisation needed is a barrier at
entry that makes sure the neighbours we write to are inside the kernel.
Whole per-device arrays live in VMEM; larger arrays are cut by the caller into
pieces of at most `max_piece_bytes` (one kernel call each).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.collectives import layout

_COLLECTIVE_IDS = {"rs": 0, "ag": 1, "ar": 2, "agmm": 3, "mmrs": 4}
DEFAULT_MAX_PIECE_BYTES = 8 * 2**20


def _mod(v, n: int):
  return lax.rem(v + 4 * n, n)  # v >= -2n in every use below


def _neighbour(i, sigma: int, n: int):
  return _mod(i + sigma, n)


def _remote_copy(src, dst, send_sem, recv_sem, axis_name, dev):
  return pltpu.make_async_remote_copy(
      src, dst, send_sem, recv_sem, device_id={axis_name: dev})


def _entry_barrier(i, n: int, dirs, axis_name):
  """Wait until every device we will write to has entered the kernel."""
  sem = pltpu.get_barrier_semaphore()
  # We write to i + sigma; the device that writes to us is i - sigma.
  for sigma in dirs:
    pl.semaphore_signal(sem, 1, device_id={axis_name: _neighbour(i, -sigma, n)})
  pl.semaphore_wait(sem, len(dirs))


def _rs_ring(i, n, dirs, n_chunks, contrib, finalize, buf, send_sem, recv_sem,
             axis_name):
  """Reduce-scatter ring. contrib(c, d, k) -> f32 block; finalize(d, k, sum).

  buf: (D, N, K, ...) f32. Slot 0 stages step 0's send; slot s+1 receives the
  partial sent at step s. Returns the DMA descriptors (their sends to wait).
  """
  descs = {}
  for s in range(n - 1):
    for k in range(n_chunks):
      for d, sigma in enumerate(dirs):
        c = _mod(i - sigma * (s + 1), n)
        part = contrib(c, d, k)  # computed while step s-1's DMA is in flight
        if s == 0:
          buf[d, 0, k] = part
        else:
          descs[d, k, s - 1].wait_recv()
          buf[d, s, k] = buf[d, s, k] + part
        desc = _remote_copy(buf.at[d, s, k], buf.at[d, s + 1, k],
                            send_sem.at[d, s, k], recv_sem.at[d, s + 1, k],
                            axis_name, _neighbour(i, sigma, n))
        desc.start()
        descs[d, k, s] = desc
  for k in range(n_chunks):
    for d in range(len(dirs)):
      part = contrib(i, d, k)
      descs[d, k, n - 2].wait_recv()
      finalize(d, k, buf[d, n - 1, k] + part)
  return list(descs.values())


def _ag_ring(i, n, dirs, n_chunks, out_ref, send_sem, recv_sem, axis_name):
  """All-gather ring over out_ref (N, D, K, ...) whose block i is filled."""
  descs = {}
  for s in range(n - 1):
    for k in range(n_chunks):
      for d, sigma in enumerate(dirs):
        if s > 0:
          descs[d, k, s - 1].wait_recv()
        c = _mod(i - sigma * s, n)
        desc = _remote_copy(out_ref.at[c, d, k], out_ref.at[c, d, k],
                            send_sem.at[d, s, k], recv_sem.at[d, s, k],
                            axis_name, _neighbour(i, sigma, n))
        desc.start()
        descs[d, k, s] = desc
  for k in range(n_chunks):
    for d in range(len(dirs)):
      descs[d, k, n - 2].wait_recv()
  return list(descs.values())


def _wait_sends(descs):
  for desc in descs:
    desc.wait_send()


# --------------------------------------------------------------------------
# Kernels


def _rs_kernel(x_ref, o_ref, buf, send_sem, recv_sem, *, axis_name, n, dirs,
               n_chunks):
  i = lax.axis_index(axis_name)
  _entry_barrier(i, n, dirs, axis_name)

  def contrib(c, d, k):
    return x_ref[c, d, k].astype(jnp.float32)

  def finalize(d, k, total):
    o_ref[d, k] = total.astype(o_ref.dtype)

  _wait_sends(_rs_ring(i, n, dirs, n_chunks, contrib, finalize, buf, send_sem,
                       recv_sem, axis_name))


def _ag_kernel(x_ref, o_ref, send_sem, recv_sem, *, axis_name, n, dirs,
               n_chunks):
  i = lax.axis_index(axis_name)
  _entry_barrier(i, n, dirs, axis_name)
  o_ref[i] = x_ref[...]
  _wait_sends(_ag_ring(i, n, dirs, n_chunks, o_ref, send_sem, recv_sem,
                       axis_name))


def _ar_kernel(x_ref, o_ref, buf, rs_send, rs_recv, ag_send, ag_recv, *,
               axis_name, n, dirs, n_chunks):
  i = lax.axis_index(axis_name)
  _entry_barrier(i, n, dirs, axis_name)

  def contrib(c, d, k):
    return x_ref[c, d, k].astype(jnp.float32)

  def finalize(d, k, total):
    o_ref[i, d, k] = total.astype(o_ref.dtype)

  rs = _rs_ring(i, n, dirs, n_chunks, contrib, finalize, buf, rs_send, rs_recv,
                axis_name)
  ag = _ag_ring(i, n, dirs, n_chunks, o_ref, ag_send, ag_recv, axis_name)
  _wait_sends(rs + ag)


def _agmm_kernel(x_ref, w_ref, o_ref, buf, send_sem, recv_sem, *, axis_name, n,
                 dirs):
  """x (D, Mh, K), w (K, F), o (N, D, Mh, F), buf (D, N-1, Mh, K)."""
  i = lax.axis_index(axis_name)
  _entry_barrier(i, n, dirs, axis_name)
  descs = {}
  for s in range(n):
    for d, sigma in enumerate(dirs):
      if s == 0:
        src = x_ref.at[d]
      else:
        descs[d, s - 1].wait_recv()
        src = buf.at[d, s - 1]
      if s < n - 1:  # forward the block first, then multiply it
        desc = _remote_copy(src, buf.at[d, s], send_sem.at[d, s],
                            recv_sem.at[d, s], axis_name,
                            _neighbour(i, sigma, n))
        desc.start()
        descs[d, s] = desc
      origin = _mod(i - sigma * s, n)
      o_ref[origin, d] = jnp.dot(
          src[...], w_ref[...],
          preferred_element_type=jnp.float32).astype(o_ref.dtype)
  _wait_sends(descs.values())


def _mmrs_kernel(x_ref, w_ref, o_ref, buf, send_sem, recv_sem, *, axis_name, n,
                 dirs):
  """x (N, D, Mh, K), w (K, F), o (D, Mh, F), buf f32 (D, N, 1, Mh, F)."""
  i = lax.axis_index(axis_name)
  _entry_barrier(i, n, dirs, axis_name)

  def contrib(c, d, k):
    del k
    return jnp.dot(x_ref[c, d], w_ref[...], preferred_element_type=jnp.float32)

  def finalize(d, k, total):
    del k
    o_ref[d] = total.astype(o_ref.dtype)

  _wait_sends(_rs_ring(i, n, dirs, 1, contrib, finalize, buf, send_sem,
                       recv_sem, axis_name))


# --------------------------------------------------------------------------
# pallas_call wrappers (per-device arrays, inside shard_map)


def _vmem_spec():
  return pl.BlockSpec(memory_space=pltpu.VMEM)


def _call(kernel, name, out_shape, scratch, n_in, interpret):
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      in_specs=[_vmem_spec() for _ in range(n_in)],
      out_specs=_vmem_spec(),
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          collective_id=_COLLECTIVE_IDS[name], has_side_effects=True),
      interpret=interpret if interpret is not None else False,
  )


def _dma_sems(*shape):
  return pltpu.SemaphoreType.DMA(shape)


def _piece_elems(n, itemsize, n_dirs, n_chunks, max_piece_bytes):
  """Flat elements per device per kernel call, so f32 scratch fits the budget."""
  unit = n_dirs * n_chunks * layout.SUBLANES * layout.LANES
  per_elem = n * (itemsize + 4) + itemsize  # input + f32 slots + output
  return max(unit, (max_piece_bytes // per_elem) // unit * unit)


def _by_pieces(fn, x_BxL, piece):
  length = x_BxL.shape[1]
  if length <= piece:
    return fn(x_BxL)
  outs = [fn(x_BxL[:, a:a + piece]) for a in range(0, length, piece)]
  return jnp.concatenate(outs, axis=1)


def reduce_scatter(x, axis_name, *, direction="both", num_chunks=2,
                   interpret=None, max_piece_bytes=DEFAULT_MAX_PIECE_BYTES):
  """psum_scatter(x, tiled=True) over rows; x: (N*M, ...) -> (M, ...)."""
  n = lax.axis_size(axis_name)
  dirs = layout.ring_dirs(direction)
  m = x.shape[0] // n
  if n == 1:
    return x
  x_NxL = x.reshape(n, -1)

  def one(x_NxL):
    length = x_NxL.shape[1]
    xb = layout.to_pieces(x_NxL, len(dirs), num_chunks)
    piece_shape = xb.shape[3:]
    kernel = functools.partial(_rs_kernel, axis_name=axis_name, n=n, dirs=dirs,
                               n_chunks=num_chunks)
    out = _call(
        kernel, "rs", jax.ShapeDtypeStruct(xb.shape[1:], x.dtype),
        [pltpu.VMEM((len(dirs), n, num_chunks, *piece_shape), jnp.float32),
         _dma_sems(len(dirs), n - 1, num_chunks),
         _dma_sems(len(dirs), n, num_chunks)],
        1, interpret)(xb)
    return layout.from_pieces(out[None], length)

  piece = _piece_elems(n, x.dtype.itemsize, len(dirs), num_chunks,
                       max_piece_bytes)
  return _by_pieces(one, x_NxL, piece).reshape(m, *x.shape[1:])


def all_gather(x, axis_name, *, direction="both", num_chunks=2,
               interpret=None, max_piece_bytes=DEFAULT_MAX_PIECE_BYTES):
  """all_gather(x, tiled=True) over rows; x: (M, ...) -> (N*M, ...)."""
  n = lax.axis_size(axis_name)
  dirs = layout.ring_dirs(direction)
  if n == 1:
    return x
  x_1xL = x.reshape(1, -1)

  def one(x_1xL):
    length = x_1xL.shape[1]
    xb = layout.to_pieces(x_1xL, len(dirs), num_chunks)[0]
    kernel = functools.partial(_ag_kernel, axis_name=axis_name, n=n, dirs=dirs,
                               n_chunks=num_chunks)
    out = _call(
        kernel, "ag", jax.ShapeDtypeStruct((n, *xb.shape), x.dtype),
        [_dma_sems(len(dirs), n - 1, num_chunks),
         _dma_sems(len(dirs), n - 1, num_chunks)],
        1, interpret)(xb)
    return layout.from_pieces(out, length)

  piece = _piece_elems(1, x.dtype.itemsize * n, len(dirs), num_chunks,
                       max_piece_bytes)
  out_NxL = _by_pieces(one, x_1xL, piece)
  return out_NxL.reshape(n * x.shape[0], *x.shape[1:])


def all_reduce(x, axis_name, *, direction="both", num_chunks=2,
               interpret=None, max_piece_bytes=DEFAULT_MAX_PIECE_BYTES):
  """psum(x): reduce-scatter then all-gather, one kernel."""
  n = lax.axis_size(axis_name)
  dirs = layout.ring_dirs(direction)
  if n == 1:
    return x
  x_1xL = x.reshape(1, -1)

  def one(x_1xL):
    length = x_1xL.shape[1]
    # Split the flat vector into N blocks of D x K pieces each.
    per_block = -(-length // n)
    unit = len(dirs) * num_chunks * layout.SUBLANES * layout.LANES
    per_block = layout.padded_len(per_block, unit)
    flat = jnp.pad(x_1xL[0], (0, n * per_block - length))
    xb = layout.to_pieces(flat.reshape(n, per_block), len(dirs), num_chunks)
    piece_shape = xb.shape[3:]
    kernel = functools.partial(_ar_kernel, axis_name=axis_name, n=n, dirs=dirs,
                               n_chunks=num_chunks)
    sems = [_dma_sems(len(dirs), n - 1, num_chunks),
            _dma_sems(len(dirs), n, num_chunks),
            _dma_sems(len(dirs), n - 1, num_chunks),
            _dma_sems(len(dirs), n - 1, num_chunks)]
    out = _call(
        kernel, "ar", jax.ShapeDtypeStruct(xb.shape, x.dtype),
        [pltpu.VMEM((len(dirs), n, num_chunks, *piece_shape), jnp.float32),
         *sems],
        1, interpret)(xb)
    return out.reshape(1, -1)[:, :length]

  piece = _piece_elems(n, x.dtype.itemsize, len(dirs), num_chunks,
                       max_piece_bytes) * n
  return _by_pieces(one, x_1xL, piece).reshape(x.shape)


def all_gather_matmul(x, w, axis_name, *, direction="both", interpret=None):
  """all_gather(x) @ w; x: (M, K) per device, w: (K, F) -> (N*M, F)."""
  n = lax.axis_size(axis_name)
  dirs = layout.ring_dirs(direction)
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  m = x.shape[0]
  if n == 1:
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)
  xs = layout.split_rows(x, len(dirs))  # (D, Mh, K)
  mh = xs.shape[1]
  kernel = functools.partial(_agmm_kernel, axis_name=axis_name, n=n, dirs=dirs)
  out = _call(
      kernel, "agmm",
      jax.ShapeDtypeStruct((n, len(dirs), mh, w.shape[1]), out_dtype),
      [pltpu.VMEM((len(dirs), n - 1, mh, x.shape[1]), x.dtype),
       _dma_sems(len(dirs), n - 1), _dma_sems(len(dirs), n - 1)],
      2, interpret)(xs, w)
  out = out.reshape(n, len(dirs) * mh, w.shape[1])[:, :m]
  return out.reshape(n * m, w.shape[1])


def matmul_reduce_scatter(x, w, axis_name, *, direction="both",
                          interpret=None):
  """reduce_scatter(x @ w); x: (N*M, K) per device, w: (K, F) -> (M, F)."""
  n = lax.axis_size(axis_name)
  dirs = layout.ring_dirs(direction)
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  if n == 1:
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)
  m = x.shape[0] // n
  xs = jax.vmap(lambda b: layout.split_rows(b, len(dirs)))(
      x.reshape(n, m, x.shape[1]))  # (N, D, Mh, K)
  mh = xs.shape[2]
  f = w.shape[1]
  kernel = functools.partial(_mmrs_kernel, axis_name=axis_name, n=n, dirs=dirs)
  out = _call(
      kernel, "mmrs", jax.ShapeDtypeStruct((len(dirs), mh, f), out_dtype),
      [pltpu.VMEM((len(dirs), n, 1, mh, f), jnp.float32),
       _dma_sems(len(dirs), n - 1, 1), _dma_sems(len(dirs), n, 1)],
      2, interpret)(xs, w)
  return out.reshape(len(dirs) * mh, f)[:m]
