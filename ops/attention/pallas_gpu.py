"""Flash attention for Hopper (sm_90a) through Pallas Mosaic GPU.

Layout [B, seq, heads, D] end to end (TMA reads strided (rows, D) tiles of
one head, so no transposes). T and S are padded to the block grid (padded
keys masked, padded query rows dropped). Logits live in the log2 domain:
s2 = (q.k) * sm_scale * log2(e), so the softmax uses exp2 and one FMA per
element; lse is stored in log2 units, +inf on rows that see no key.

Forward (FlashAttention-3 structure): a CTA owns 2 * block_q query rows of
one head; warpgroups 0 and 1 each own block_q rows and compute, warpgroup 2
is the producer: it streams K/V (and key segment ids) tiles with TMA into a
ring of `stages` shared-memory slots, guarded by "loaded" barriers and
"consumed" barriers (2 arrivals, one per consumer). Each consumer issues
QK^T with wgmma (Q, K from smem), does the online softmax in f32 registers,
and issues PV with P from registers. The two consumers ping-pong on a
schedule barrier so one's softmax overlaps the other's matmuls. Causal
tiles stop at the diagonal; blocks that need no mask run an unmasked loop;
a WG that finishes early keeps arriving on the barriers (epilogue loop) so
the producer never stalls. Causal CTAs start with the longest rows.

Backward: two kernels after an XLA delta = rowsum(dO * O):
  dK/dV kernel: a CTA owns 2 * block_kv key rows of one kv head (64 per
    consumer WG, dK and dV accumulators in registers) and streams Q, dO,
    lse, delta (and query segment ids) for every query head of its group
    and every query block that can see it. Per step: S^T = K Q^T,
    P^T = exp2(S^T - lse), dP^T = V dO^T, dV += P^T dO, dS^T = P^T (dP^T -
    delta), dK += dS^T Q. GQA needs no reduction afterwards.
  dQ kernel: same skeleton as the forward (query rows, K/V ring): S = Q K^T,
    P, dP = dO V^T, dS, dQ += dS K.
  That is 7 tile matmuls per (q, k) tile pair against 5 for a fused
  backward with atomic dQ (FlashAttention-3); see NOTES.md.
  head_dim 256: dK and dV accumulators together need 256 registers/thread,
  so the dK/dV kernel runs twice (dV pass, dK pass).

GpuBlocks.overlap=1 switches the forward to FA3's intra-warpgroup overlap
(S_{j+1} issued together with PV_j, softmax while PV runs). It is correct on
the device but measured no faster non-causal and 30% slower causal on an
H100 (NOTES.md), so it is off in the table.

interpret=True runs the same kernels in the Mosaic GPU interpreter
(jax >= 0.12; CPU); there the wgmma calls become jnp.dot on the same smem
buffers, so barriers, TMA indexing, ring slots, masks and the softmax are
tested, the wgmma/layout lowering is not.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops.attention import blocks as blocks_lib

LOG2E = math.log2(math.e)
_NEG_INIT = -1e30   # running max start (log2 units), finite: no inf - inf
_COMPUTE_REGS = 232
_PRODUCER_REGS = 40


# ------------------------------------------------------------------ helpers
def _transposed(ref):
  """A (rows, D) smem ref viewed as (D, rows) for a wgmma B operand."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fn = getattr(plgpu, "transpose_ref", None)  # jax 0.11; deprecated in 0.12
  if fn is not None:
    return fn(ref, (1, 0))
  return ref.transpose((1, 0))


class _MMA:
  """wgmma on hardware; the same product as jnp.dot in interpret mode."""

  def __init__(self, interpret: bool):
    self.interpret = interpret

  def _val(self, x, transpose=False):
    v = x if isinstance(x, jax.Array) else x[...]
    return v.T if transpose else v

  def fresh(self, shapes, pairs):
    """Returns [a_i @ b_i(^T)] for each (a, b_ref, transpose_b), in f32."""
    if self.interpret:
      return [jnp.dot(self._val(a), self._val(b, tb),
                      preferred_element_type=jnp.float32) for a, b, tb in pairs]

    def f(*accs):
      for acc, (a, b, tb) in zip(accs, pairs):
        plgpu.wgmma(acc, a, _transposed(b) if tb else b)
      return [acc[...] for acc in accs]
    return pl.run_scoped(f, *[plgpu.ACC(s, jnp.float32) for s in shapes])

  def accumulate(self, accs, pairs, after_issue=None):
    """accs[i] += a_i @ b_i(^T); after_issue() runs while the wgmmas fly."""
    if self.interpret:
      out = [acc + jnp.dot(self._val(a), self._val(b, tb),
                           preferred_element_type=jnp.float32)
             for acc, (a, b, tb) in zip(accs, pairs)]
      if after_issue is not None:
        after_issue()
      return out

    def f(refs):
      for acc, (a, b, tb) in zip(refs, pairs):
        plgpu.wgmma(acc, a, _transposed(b) if tb else b)
      if after_issue is not None:
        after_issue()
    return list(pl.run_state(f)(tuple(plgpu.ACC.init(a) for a in accs)))

  def fresh_and_accumulate(self, fresh_shape, fresh_pair, accs, pairs):
    """One wgmma group: (new product, updated accumulators)."""
    if self.interpret:
      new = self.fresh([fresh_shape], [fresh_pair])[0]
      return new, self.accumulate(accs, pairs)
    zeros = plgpu.layout_cast(jnp.zeros(fresh_shape, jnp.float32),
                              plgpu.Layout.WGMMA)

    def f(refs):
      for acc, (a, b, tb) in zip(refs[:len(pairs)], pairs):
        plgpu.wgmma(acc, a, _transposed(b) if tb else b)
      a, b, tb = fresh_pair
      plgpu.wgmma(refs[-1], a, _transposed(b) if tb else b)
    outs = pl.run_state(f)(tuple(plgpu.ACC.init(a) for a in accs)
                           + (plgpu.ACC.init(zeros),))
    return outs[-1], list(outs[:-1])


def _row(x):   # [rows] vector in the layout of a reduction over columns
  return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _col_layout():
  return plgpu.Layout.WGMMA.reduce(0)


def _wgmma_zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def _sched_sync(barrier):
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def _smem(shape, dtype, tiled=True):
  if tiled:
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  return plgpu.SMEM(shape, dtype)


def _compiler_params():
  return plgpu.CompilerParams(approx_math=True)


def _interpret_params(interpret):
  if not interpret:
    return None
  return plgpu.InterpretGPUParams()


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

# ----------------------------------------------------------------- wrapper
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)


def _round_up(x, m):
  return (x + m - 1) // m * m


def _pad(x, n, axis, value=0):
  extra = n - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _padded_lengths(T, S, cfg):
  tq = math.lcm(2 * cfg.block_q, 2 * cfg.bwd_block_q)
  tk = math.lcm(cfg.block_kv, 2 * cfg.bwd_block_kv, cfg.bwd_block_kv)
  return _round_up(T, tq), _round_up(S, tk)


def _fwd_impl(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret):
  B, T, H, D = q.shape
  S = k.shape[1]
  Tp, Sp = _padded_lengths(T, S, cfg)
  qp, kp, vp = _pad(q, Tp, 1), _pad(k, Sp, 1), _pad(v, Sp, 1)
  qsp = ksp = None
  if q_ids is not None:
    qsp, ksp = _pad(q_ids, Tp, 1, -1), _pad(kv_ids, Sp, 1, -2)
  out, lse = _forward(qp, kp, vp, qsp, ksp, causal=causal, scale=scale,
                      kv_len=S, cfg=cfg, interpret=interpret)
  return out, lse, (qp, kp, vp, qsp, ksp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret):
  out, _, _ = _fwd_impl(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret)
  return out[:, :q.shape[1]]


def _flash_fwd(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret):
  out, lse, padded = _fwd_impl(q, k, v, q_ids, kv_ids, causal, scale, cfg, interpret)
  return out[:, :q.shape[1]], (padded, out, lse, q.shape[1], k.shape[1])


def _flash_bwd(causal, scale, cfg, interpret, res, do):
  (qp, kp, vp, qsp, ksp), out, lse, T, S = res
  Tp = qp.shape[1]
  dop = _pad(do, Tp, 1)
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32),
                     dop.astype(jnp.float32))
  dq = _dq(qp, kp, vp, dop, lse, delta, qsp, ksp, causal=causal, scale=scale,
           kv_len=S, cfg=cfg, interpret=interpret)
  if qp.shape[-1] > 128:   # dK and dV accumulators do not fit together
    _, dv = _dkv(qp, kp, vp, dop, lse, delta, qsp, ksp, causal=causal,
                 scale=scale, cfg=cfg, interpret=interpret, want=("dv",))
    dk, _ = _dkv(qp, kp, vp, dop, lse, delta, qsp, ksp, causal=causal,
                 scale=scale, cfg=cfg, interpret=interpret, want=("dk",))
  else:
    dk, dv = _dkv(qp, kp, vp, dop, lse, delta, qsp, ksp, causal=causal,
                  scale=scale, cfg=cfg, interpret=interpret)
  zero_ids = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
  q_ids = None if qsp is None else qsp[:, :T]
  kv_ids = None if ksp is None else ksp[:, :S]
  return (dq[:, :T], dk[:, :S], dv[:, :S], zero_ids(q_ids), zero_ids(kv_ids))


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_supported(q, k, v):
  """Raises ValueError unless the Mosaic GPU kernel handles these inputs."""
  if q.dtype not in SUPPORTED_DTYPES:
    raise ValueError(
        f"Mosaic GPU flash attention supports dtypes "
        f"{[jnp.dtype(d).name for d in SUPPORTED_DTYPES]}, got {q.dtype}")
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
    raise ValueError(
        f"Mosaic GPU flash attention supports head_dim in {SUPPORTED_HEAD_DIMS}, "
        f"got {q.shape[-1]}")


def flash_attention(q, k, v, *, causal=False, q_segment_ids=None,
                    kv_segment_ids=None, sm_scale=None, blocks=None,
                    interpret=False):
  """Flash attention on Hopper, [B, T, H, D]; validated by api.py.

  blocks: a blocks.GpuBlocks (default: blocks.gpu_blocks for the shape).
  interpret: run in the Mosaic GPU interpreter (CPU, jax >= 0.12).
  """
  check_supported(q, k, v)
  D = q.shape[-1]
  scale = float(D ** -0.5 if sm_scale is None else sm_scale)
  cfg = blocks or blocks_lib.gpu_blocks(q.shape[1], k.shape[1], D, causal)
  return _flash(q, k, v, q_segment_ids, kv_segment_ids, bool(causal), scale,
                cfg, bool(interpret))


def forward_with_lse(q, k, v, *, causal=False, q_segment_ids=None,
                     kv_segment_ids=None, sm_scale=None, blocks=None,
                     interpret=False):
  """(out [B,T,H,D], lse [B,H,T] in natural-log units); for tests."""
  check_supported(q, k, v)
  D = q.shape[-1]
  scale = float(D ** -0.5 if sm_scale is None else sm_scale)
  cfg = blocks or blocks_lib.gpu_blocks(q.shape[1], k.shape[1], D, causal)
  out, lse, _ = _fwd_impl(q, k, v, q_segment_ids, kv_segment_ids, bool(causal),
                          scale, cfg, bool(interpret))
  T = q.shape[1]
  return out[:, :T], lse[:, :, :T] / LOG2E
