"""Mosaic GPU flash attention forward (FA3 structure); see pallas_gpu.py."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops.attention.pallas_gpu_common import (
    LOG2E, _NEG_INIT, _COMPUTE_REGS, _PRODUCER_REGS, _transposed, _MMA, _row, _col_layout, _wgmma_zeros, _iota, _bcast, _sched_sync, _smem, _compiler_params, _interpret_params)


# ------------------------------------------------------------------ forward
def _forward(q, k, v, q_ids, kv_ids, *, causal, scale, kv_len, cfg, interpret):
  """q [B,Tp,H,D], k/v [B,Sp,K,D] (padded) -> out [B,Tp,H,D], lse2 [B,H,Tp]."""
  B, Tp, H, D = q.shape
  Sp, K = k.shape[1], k.shape[2]
  G = H // K
  dtype = q.dtype
  bq, bkv = cfg.block_q, cfg.block_kv
  nkv = Sp // bkv
  stages = max(1, min(cfg.stages, nkv))
  n_tiles = Tp // (2 * bq)
  has_seg = q_ids is not None
  full_kv = kv_len // bkv          # key blocks with no padded key
  overlap = bool(cfg.overlap) and stages >= 2
  c = scale * LOG2E
  mma = _MMA(interpret)

  def body(*refs):
    if has_seg:
      q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, smem, bars, cons, sched = refs
    else:
      q_ref, k_ref, v_ref, o_ref, lse_ref, smem, bars, cons, sched = refs
      qs_ref = ks_ref = None
    q_smem, k_smem, v_smem, lse_smem = smem[:4]
    q_bar, k_bar, v_bar = bars[:3]
    qs_smem, ks_smem = smem[4:6] if has_seg else (None, None)
    qs_bar, ks_bar = bars[3:5] if has_seg else (None, None)
    k_cons, v_cons = cons

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("q_seq")
    if causal:   # heaviest tiles first
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
      qw = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, bq), h], qw, q_bar.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(qs_ref.at[b, pl.ds(q_base, bq)], qs_smem.at[wg],
                                qs_bar.at[wg])
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
      plgpu.barrier_wait(q_bar.at[wg])
      qseg = None
      if has_seg:
        plgpu.barrier_wait(qs_bar.at[wg])
        qseg = plgpu.load(qs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

      m = _row(jnp.full((bq,), _NEG_INIT, jnp.float32))
      l = _row(jnp.zeros((bq,), jnp.float32))
      acc = _wgmma_zeros((bq, D))

      def mask_scores(s, j, slot):
        mask = None
        cols = j * bkv + _iota((bq, bkv), 1)
        if causal:
          rows = q_base + _iota((bq, bkv), 0)
          mask = rows >= cols
        if kv_len != Sp:
          in_len = cols < kv_len
          mask = in_len if mask is None else mask & in_len
        if has_seg:
          plgpu.barrier_wait(ks_bar.at[slot])
          kseg = plgpu.load(ks_smem.at[slot], layout=_col_layout())
          same = _bcast(qseg, (bq, bkv), 0) == _bcast(kseg, (bq, bkv), 1)
          mask = same if mask is None else mask & same
        return s if mask is None else jnp.where(mask, s, -jnp.inf)

      def softmax(s, m, l):
        m_new = jnp.maximum(m, s.max(axis=1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - _bcast(m_new, (bq, bkv), 0))
        l = l * alpha + p.sum(axis=1)
        return m_new, l, p.astype(dtype), alpha

      plgpu.barrier_wait(k_bar.at[0])
      pl.when(wg == 1)(lambda: _sched_sync(sched))

      def overlap_loop(m, l):
        """FA3 intra-warpgroup overlap: step j issues S_j = Q K_j^T and
        O += P_{j-1} V_{j-1} together, and does softmax(S_j) while the PV
        wgmma runs; O lives in one accumulator for the whole loop and is
        rescaled by alpha_j once PV_{j-1} lands (needs stages >= 2)."""
        any_mask = causal or has_seg or kv_len != Sp
        # step 0 (masked whenever any mask exists: n_plain may be 0 here)
        s0 = mma.fresh([(bq, bkv)], [(qw, k_smem.at[0], True)])[0]
        _sched_sync(sched)
        plgpu.barrier_arrive(k_cons.at[0])
        if any_mask:
          s0 = mask_scores(s0, 0, 0)
        m, l, p16, _ = softmax(s0, m, l)
        _sched_sync(sched)

        def step_interpret(j, carry, masked):
          o, m, l, p16_prev = carry
          slot, prev = lax.rem(j, stages), lax.rem(j - 1, stages)
          plgpu.barrier_wait(k_bar.at[slot])
          plgpu.barrier_wait(v_bar.at[prev])
          s = mma.fresh([(bq, bkv)], [(qw, k_smem.at[slot], True)])[0]
          pv = mma.fresh([(bq, D)], [(p16_prev, v_smem.at[prev], False)])[0]
          _sched_sync(sched)
          plgpu.barrier_arrive(k_cons.at[slot])
          if masked:
            s = mask_scores(s, j, slot)
          m, l, p16, alpha = softmax(s, m, l)
          plgpu.barrier_arrive(sched)
          plgpu.barrier_arrive(v_cons.at[prev])
          o = (o + pv) * _bcast(alpha, (bq, D), 0)
          plgpu.barrier_wait(sched)
          return o, m, l, p16

        def run_steps(step_fn, carry):
          lo = max(n_plain, 1) if isinstance(n_plain, int) else jnp.maximum(n_plain, 1)
          carry = lax.fori_loop(1, lo, functools.partial(step_fn, masked=False), carry)
          return lax.fori_loop(lo, steps, functools.partial(step_fn, masked=True), carry)

        last = lax.rem(steps - 1, stages)
        if interpret:
          o = jnp.zeros((bq, D), jnp.float32)
          o, m, l, p16 = run_steps(step_interpret, (o, m, l, p16))
          plgpu.barrier_wait(v_bar.at[last])
          o = o + mma.fresh([(bq, D)], [(p16, v_smem.at[last], False)])[0]
          plgpu.barrier_arrive(v_cons.at[last])
          return o, m, l

        def with_o(o_ref):
          def step_hw(j, carry, masked):
            m, l, p16_prev = carry
            slot, prev = lax.rem(j, stages), lax.rem(j - 1, stages)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[prev])

            def inner(s_ref):
              plgpu.wgmma(s_ref, qw, _transposed(k_smem.at[slot]))
              plgpu.wgmma(o_ref, p16_prev, v_smem.at[prev])
              _sched_sync(sched)
              s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
              plgpu.barrier_arrive(k_cons.at[slot])
              if masked:
                s = mask_scores(s, j, slot)
              m_new, l_new, p16, alpha = softmax(s, m, l)
              plgpu.barrier_arrive(sched)
              o = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
              plgpu.barrier_arrive(v_cons.at[prev])
              o_ref[...] = o * _bcast(alpha, (bq, D), 0)
              plgpu.barrier_wait(sched)
              return m_new, l_new, p16
            return pl.run_scoped(inner, plgpu.ACC((bq, bkv), jnp.float32))

          m_, l_, p16_ = run_steps(step_hw, (m, l, p16))
          plgpu.barrier_wait(v_bar.at[last])
          plgpu.wgmma(o_ref, p16_, v_smem.at[last])
          o = o_ref[...]
          plgpu.barrier_arrive(v_cons.at[last])
          return o, m_, l_
        return pl.run_scoped(with_o, plgpu.ACC((bq, D), jnp.float32))

      def step(j, carry, masked):
        acc, m, l = carry
        slot = lax.rem(j, stages)
        if interpret:
          s = mma.fresh([(bq, bkv)], [(qw, k_smem.at[slot], True)])[0]
          _sched_sync(sched)
        else:
          def qk(acc_ref):
            plgpu.wgmma(acc_ref, qw, _transposed(k_smem.at[slot]))
            _sched_sync(sched)
            return acc_ref[...]
          s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(k_cons.at[slot])
        if masked:
          s = mask_scores(s, j, slot)
        m_new = jnp.maximum(m, s.max(axis=1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - _bcast(m_new, (bq, bkv), 0))
        acc = acc * _bcast(alpha, (bq, D), 0)
        l = l * alpha
        p16 = p.astype(dtype)
        if D <= 128:
          l = l + p.sum(axis=1)
          acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
          plgpu.barrier_arrive(sched)
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_wait(sched)
        else:
          plgpu.barrier_arrive(sched)
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_wait(sched)
          l = l + p.sum(axis=1)

        def wait_next_k():
          nxt = j + 1
          @pl.when(nxt < steps)
          def _():
            plgpu.barrier_wait(k_bar.at[lax.rem(nxt, stages)])
        (acc,) = mma.accumulate([acc], [(p16, v_smem.at[slot], False)],
                                after_issue=wait_next_k)
        plgpu.barrier_arrive(v_cons.at[slot])
        return acc, m_new, l

      if overlap:
        acc, m, l = overlap_loop(m, l)
      else:
        carry = (acc, m, l)
        carry = lax.fori_loop(0, n_plain, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(n_plain, steps, functools.partial(step, masked=True), carry)
        acc, m, l = carry
      if causal:
        # Steps the other consumer still runs: observe each load and free
        # the slot (waiting first keeps this WG from arriving ahead of the
        # producer into a later phase), and keep the ping-pong in step.
        def epilogue(j, _):
          slot = lax.rem(j, stages)
          plgpu.barrier_wait(k_bar.at[slot])
          plgpu.barrier_arrive(k_cons.at[slot])
          _sched_sync(sched)
          if has_seg:
            plgpu.barrier_wait(ks_bar.at[slot])
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_arrive(v_cons.at[slot])
          _sched_sync(sched)
          return _
        lax.fori_loop(steps, cta_steps, epilogue, None)
      pl.when(wg == 0)(lambda: _sched_sync(sched))

      if has_seg:
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        inv = jnp.where(empty, 0.0, 1.0 / l_safe)
        lse = jnp.where(empty, jnp.inf, m + jnp.log(l_safe) * LOG2E)
      else:
        inv = 1.0 / l
        lse = m + jnp.log(l) * LOG2E
      qw[...] = (acc * _bcast(inv, (bq, D), 0)).astype(dtype)
      lse_smem.at[wg][...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qw, o_ref.at[b, pl.ds(q_base, bq), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q_base, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")
      kvh = lax.div(h, G)

      def load(j, slot):
        rows = pl.ds(j * bkv, bkv)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[slot], v_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], ks_smem.at[slot], ks_bar.at[slot])

      for s0 in range(stages):
        pl.when(s0 < cta_steps)(functools.partial(load, s0, s0))

      def refill(j, _):
        slot = lax.rem(j, stages)
        rows = pl.ds(j * bkv, bkv)
        plgpu.barrier_wait(k_cons.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[slot], k_bar.at[slot])
        plgpu.barrier_wait(v_cons.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[slot], v_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], ks_smem.at[slot], ks_bar.at[slot])
        return _
      lax.fori_loop(stages, cta_steps, refill, None)

  smem = [_smem((2, bq, D), dtype), _smem((stages, bkv, D), dtype),
          _smem((stages, bkv, D), dtype), _smem((2, bq), jnp.float32, False)]
  bars = [plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages)]
  if has_seg:
    smem += [_smem((2, bq), jnp.int32, False), _smem((stages, bkv), jnp.int32, False)]
    bars += [plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=stages)]
  cons = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages))
  operands = [q, k, v] + ([q_ids, kv_ids] if has_seg else [])
  out, lse = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
      scratch_types=[tuple(smem), tuple(bars), cons, plgpu.Barrier(num_arrivals=2)],
      grid=(H, n_tiles, B),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=_compiler_params(),
      interpret=_interpret_params(interpret),
  )(*operands)
  return out, lse


