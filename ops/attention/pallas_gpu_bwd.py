"""Mosaic GPU flash attention backward: the dQ and the dK/dV kernels; see
pallas_gpu.py."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops.attention.pallas_gpu_common import (
    LOG2E, _COMPUTE_REGS, _PRODUCER_REGS, _MMA, _col_layout, _wgmma_zeros, _iota, _bcast, _smem, _compiler_params, _interpret_params)


# ------------------------------------------------------------- dQ kernel
def _dq(q, k, v, do, lse, delta, q_ids, kv_ids, *, causal, scale, kv_len, cfg,
        interpret):
  B, Tp, H, D = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = H // K
  dtype = q.dtype
  bq, bkv = cfg.bwd_block_q, cfg.bwd_block_kv
  nkv = Sp // bkv
  stages = max(1, min(cfg.bwd_stages, nkv))
  n_tiles = Tp // (2 * bq)
  has_seg = q_ids is not None
  full_kv = kv_len // bkv
  c = scale * LOG2E
  mma = _MMA(interpret)

  def body(*refs):
    if has_seg:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref,
       smem, bars, cons) = refs
    else:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
       smem, bars, cons) = refs
      qs_ref = ks_ref = None
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem = smem[:6]
    q_bar, k_bar, v_bar = bars[:3]
    qs_smem, ks_smem = smem[6:8] if has_seg else (None, None)
    ks_bar = bars[3] if has_seg else None
    k_cons, v_cons = cons

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("q_seq")
    if causal:
      tile = n_tiles - 1 - tile
    tile_base = tile * (2 * bq)
    if causal:
      cta_steps = jnp.minimum(lax.div(tile_base + 2 * bq + bkv - 1, bkv), nkv)
    else:
      cta_steps = nkv

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(_COMPUTE_REGS, action="increase")
      q_base = tile_base + wg * bq
      rows_q = (b, pl.ds(q_base, bq), h)
      qw, dow = q_smem.at[wg], do_smem.at[wg]
      bar = q_bar.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[rows_q], qw, bar)
      plgpu.copy_gmem_to_smem(do_ref.at[rows_q], dow, q_bar.at[2 + wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(q_base, bq)], lse_smem.at[wg],
                              q_bar.at[4 + wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(q_base, bq)],
                              delta_smem.at[wg], q_bar.at[6 + wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(qs_ref.at[b, pl.ds(q_base, bq)], qs_smem.at[wg],
                                q_bar.at[8 + wg])
      for i in range(5 if has_seg else 4):
        plgpu.barrier_wait(q_bar.at[2 * i + wg])
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      lse_w = plgpu.load(lse_smem.at[wg], layout=row_layout)
      delta_w = plgpu.load(delta_smem.at[wg], layout=row_layout)
      qseg = plgpu.load(qs_smem.at[wg], layout=row_layout) if has_seg else None
      if causal:
        steps = jnp.minimum(lax.div(q_base + bq + bkv - 1, bkv), nkv)
      else:
        steps = nkv
      if has_seg:
        n_plain = 0
      elif causal:
        n_plain = jnp.minimum(lax.div(q_base, bkv), full_kv)
      else:
        n_plain = full_kv

      def step(j, dq, masked):
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        s, dp = mma.fresh([(bq, bkv), (bq, bkv)],
                          [(qw, k_smem.at[slot], True), (dow, v_smem.at[slot], True)])
        plgpu.barrier_arrive(v_cons.at[slot])
        s = s * c
        if masked:
          mask = None
          cols = j * bkv + _iota((bq, bkv), 1)
          if causal:
            mask = (q_base + _iota((bq, bkv), 0)) >= cols
          if kv_len != Sp:
            in_len = cols < kv_len
            mask = in_len if mask is None else mask & in_len
          if has_seg:
            plgpu.barrier_wait(ks_bar.at[slot])
            kseg = plgpu.load(ks_smem.at[slot], layout=_col_layout())
            same = _bcast(qseg, (bq, bkv), 0) == _bcast(kseg, (bq, bkv), 1)
            mask = same if mask is None else mask & same
          if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp2(s - _bcast(lse_w, (bq, bkv), 0))
        ds = p * (dp - _bcast(delta_w, (bq, bkv), 0))
        (dq,) = mma.accumulate([dq], [(ds.astype(dtype), k_smem.at[slot], False)])
        plgpu.barrier_arrive(k_cons.at[slot])
        return dq

      dq = _wgmma_zeros((bq, D))
      dq = lax.fori_loop(0, n_plain, functools.partial(step, masked=False), dq)
      dq = lax.fori_loop(n_plain, steps, functools.partial(step, masked=True), dq)
      if causal:
        def epilogue(j, _):   # see the forward's epilogue
          slot = lax.rem(j, stages)
          plgpu.barrier_wait(k_bar.at[slot])
          plgpu.barrier_wait(v_bar.at[slot])
          if has_seg:
            plgpu.barrier_wait(ks_bar.at[slot])
          plgpu.barrier_arrive(v_cons.at[slot])
          plgpu.barrier_arrive(k_cons.at[slot])
          return _
        lax.fori_loop(steps, cta_steps, epilogue, None)
      qw[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qw, dq_ref.at[rows_q])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")
      kvh = lax.div(h, G)

      def load(j, slot, wait):
        rows = pl.ds(j * bkv, bkv)
        if wait:
          plgpu.barrier_wait(k_cons.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[slot], k_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], ks_smem.at[slot], ks_bar.at[slot])
        if wait:
          plgpu.barrier_wait(v_cons.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[slot], v_bar.at[slot])

      for s0 in range(stages):
        pl.when(s0 < cta_steps)(functools.partial(load, s0, s0, False))

      def refill(j, _):
        load(j, lax.rem(j, stages), True)
        return _
      lax.fori_loop(stages, cta_steps, refill, None)

  smem = [_smem((2, bq, D), dtype), _smem((2, bq, D), dtype),
          _smem((2, bq), jnp.float32, False), _smem((2, bq), jnp.float32, False),
          _smem((stages, bkv, D), dtype), _smem((stages, bkv, D), dtype)]
  bars = [plgpu.Barrier(num_barriers=10), plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages)]
  if has_seg:
    smem += [_smem((2, bq), jnp.int32, False), _smem((stages, bkv), jnp.int32, False)]
    bars += [plgpu.Barrier(num_barriers=stages)]
  cons = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages))
  operands = [q, k, v, do, lse, delta] + ([q_ids, kv_ids] if has_seg else [])
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=[tuple(smem), tuple(bars), cons],
      grid=(H, n_tiles, B),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=_compiler_params(),
      interpret=_interpret_params(interpret),
  )(*operands)


# ----------------------------------------------------------- dK/dV kernel
def _dkv(q, k, v, do, lse, delta, q_ids, kv_ids, *, causal, scale, cfg,
         interpret, want=("dk", "dv")):
  B, Tp, H, D = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = H // K
  dtype = q.dtype
  bq, bkv = cfg.bwd_block_q, cfg.bwd_block_kv
  nq = Tp // bq
  stages = max(1, min(cfg.bwd_stages, nq))
  n_tiles = Sp // (2 * bkv)
  has_seg = q_ids is not None
  c = scale * LOG2E
  mma = _MMA(interpret)
  want_dk, want_dv = "dk" in want, "dv" in want

  def body(*refs):
    n_in = 8 if has_seg else 6
    ins, rest = refs[:n_in], refs[n_in:]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins[:6]
    qs_ref, ks_ref = ins[6:8] if has_seg else (None, None)
    n_out = int(want_dk) + int(want_dv)
    outs, (smem, bars, cons) = rest[:n_out], rest[n_out:]
    outs = list(outs)
    dk_ref = outs.pop(0) if want_dk else None
    dv_ref = outs.pop(0) if want_dv else None
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = smem[:6]
    kv_bar, q_bar, do_bar = bars[:3]
    qs_smem, ks_smem = smem[6:8] if has_seg else (None, None)
    q_cons, do_cons = cons
    n_qbars = 4 if has_seg else 3

    b = lax.axis_index("batch")
    kvh = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("kv_seq")
    kv_tile_base = tile * (2 * bkv)
    if causal:
      i0 = lax.div(kv_tile_base, bq)        # first query block that sees the tile
      n_i = nq - i0
      # query blocks (from i0) that straddle the diagonal of this tile
      n_diag = jnp.minimum(lax.div(kv_tile_base + 2 * bkv - 1, bq) + 1 - i0, n_i)
    else:
      i0, n_i, n_diag = 0, nq, 0
    total = G * n_i

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(_COMPUTE_REGS, action="increase")
      kv_base = kv_tile_base + wg * bkv
      rows_kv = (b, pl.ds(kv_base, bkv), kvh)
      kw, vw = k_smem.at[wg], v_smem.at[wg]
      plgpu.copy_gmem_to_smem(k_ref.at[rows_kv], kw, kv_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[rows_kv], vw, kv_bar.at[2 + wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(ks_ref.at[b, pl.ds(kv_base, bkv)], ks_smem.at[wg],
                                kv_bar.at[4 + wg])
      for i in range(3 if has_seg else 2):
        plgpu.barrier_wait(kv_bar.at[2 * i + wg])
      kseg = (plgpu.load(ks_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
              if has_seg else None)

      def step(t, i, carry, masked):
        dk, dv = carry
        slot = lax.rem(t, stages)
        qt, dot = q_smem.at[slot], do_smem.at[slot]
        for r in range(n_qbars):   # Q, lse, delta (, query segment ids)
          plgpu.barrier_wait(q_bar.at[r * stages + slot])
        (st,) = mma.fresh([(bkv, bq)], [(kw, qt, True)])
        lse = plgpu.load(lse_smem.at[slot], layout=_col_layout())
        delta = plgpu.load(delta_smem.at[slot], layout=_col_layout())
        st = st * c
        if masked:
          mask = None
          qcols = i * bq + _iota((bkv, bq), 1)
          if causal:
            mask = qcols >= kv_base + _iota((bkv, bq), 0)
          if has_seg:
            qseg = plgpu.load(qs_smem.at[slot], layout=_col_layout())
            same = _bcast(kseg, (bkv, bq), 0) == _bcast(qseg, (bkv, bq), 1)
            mask = same if mask is None else mask & same
          if mask is not None:
            st = jnp.where(mask, st, -jnp.inf)
        pt = jnp.exp2(st - _bcast(lse, (bkv, bq), 1))
        plgpu.barrier_wait(do_bar.at[slot])
        if want_dv and want_dk:
          dpt, (dv,) = mma.fresh_and_accumulate(
              (bkv, bq), (vw, dot, True), [dv], [(pt.astype(dtype), dot, False)])
        elif want_dv:
          (dv,) = mma.accumulate([dv], [(pt.astype(dtype), dot, False)])
        else:
          (dpt,) = mma.fresh([(bkv, bq)], [(vw, dot, True)])
        plgpu.barrier_arrive(do_cons.at[slot])
        if want_dk:
          dst = pt * (dpt - _bcast(delta, (bkv, bq), 1))
          (dk,) = mma.accumulate([dk], [(dst.astype(dtype), qt, False)])
        plgpu.barrier_arrive(q_cons.at[slot])
        return dk, dv

      def group(g, carry):
        def run(lo, hi, masked, carry):
          def f(ii, carry):
            return step(g * n_i + ii, i0 + ii, carry, masked)
          return lax.fori_loop(lo, hi, f, carry)
        if has_seg:
          return run(0, n_i, True, carry)
        carry = run(0, n_diag, True, carry)
        return run(n_diag, n_i, False, carry)

      zero = _wgmma_zeros((bkv, D))
      dk, dv = lax.fori_loop(0, G, group, (zero, zero))
      if want_dk:
        kw[...] = (dk * scale).astype(dtype)
      if want_dv:
        vw[...] = dv.astype(dtype)
      plgpu.commit_smem()
      if want_dk:
        plgpu.copy_smem_to_gmem(kw, dk_ref.at[rows_kv])
      if want_dv:
        plgpu.copy_smem_to_gmem(vw, dv_ref.at[rows_kv])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")

      def load(t, slot, wait):
        g = lax.div(t, n_i)
        i = i0 + lax.rem(t, n_i)
        h = kvh * G + g
        rows = pl.ds(i * bq, bq)
        if wait:
          plgpu.barrier_wait(q_cons.at[slot])
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot],
                                q_bar.at[stages + slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot],
                                q_bar.at[2 * stages + slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qs_smem.at[slot],
                                  q_bar.at[3 * stages + slot])
        if wait:
          plgpu.barrier_wait(do_cons.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])

      for s0 in range(stages):
        pl.when(s0 < total)(functools.partial(load, s0, s0, False))

      def refill(t, _):
        load(t, lax.rem(t, stages), True)
        return _
      lax.fori_loop(stages, total, refill, None)

  n_qbars = 4 if has_seg else 3
  smem = [_smem((2, bkv, D), dtype), _smem((2, bkv, D), dtype),
          _smem((stages, bq, D), dtype), _smem((stages, bq, D), dtype),
          _smem((stages, bq), jnp.float32, False), _smem((stages, bq), jnp.float32, False)]
  bars = [plgpu.Barrier(num_barriers=6),
          plgpu.Barrier(num_barriers=n_qbars * stages),
          plgpu.Barrier(num_barriers=stages)]
  if has_seg:
    smem += [_smem((stages, bq), jnp.int32, False), _smem((2, bkv), jnp.int32, False)]
  cons = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages))
  kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
  out_type = [kv_type] * (int(want_dk) + int(want_dv))
  operands = [q, k, v, do, lse, delta] + ([q_ids, kv_ids] if has_seg else [])
  outs = plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=[tuple(smem), tuple(bars), cons],
      grid=(K, n_tiles, B),
      grid_names=("heads", "kv_seq", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=_compiler_params(),
      interpret=_interpret_params(interpret),
  )(*operands)
  outs = list(outs)
  dk = outs.pop(0) if want_dk else None
  dv = outs.pop(0) if want_dv else None
  return dk, dv

