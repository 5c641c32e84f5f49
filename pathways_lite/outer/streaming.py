"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512), on the runtime.

The params are split into fragments (outer/fragments.py: the embedding etc. as
one, transformer blocks in outer.num_fragments strided or sequential groups).
Fragment f syncs every H inner steps at its own offset, so syncs are spread
over the phase and only one fragment is in flight at a time. At a sync of
fragment f, each worker sends delta_f = anchor_f - theta_w,f (anchor_f: the
last global value of f it received) quantized with outer.wire_dtype; the
server sums them in f32 with the worker weights and applies the outer
optimizer to fragment f (its own optimizer state per fragment). The workers
keep training for tau = outer.overlap_tau inner steps while this happens, then
merge: theta_w,f <- alpha*theta_w,f + (1-alpha)*theta_f (outer.merge_alpha).
Fragment syncs use the same server step as DiLoCo (weights, f32 sums,
non-finite rejection). Bytes per sync are reported per fragment
(`summary["sync_bytes"]`, one worker's upload) and at their peak
(`peak_sync_bytes`: all M uploads of the largest fragment).
"""
from __future__ import annotations

import jax
import numpy as np

from pathways_lite import network
from pathways_lite.outer import fragments, rules
from pathways_lite.outer.common import Run, memo, wire, zeros_f32
from pathways_lite.outer.diloco import make_outer_update
from pathways_lite.outer.inner import pick0, pick1, pick2, pick_params
from pathways_lite.outer.topology import SERVER
from pathways_lite.ray_elastic import Elastic


def _frag_fns(run: Run, ids, f: int):
  key = ("frag", run.model_cfg, run.ocfg.num_fragments, run.ocfg.fragment_pattern, f)

  def make():
    def split_params(params):
      return fragments.split(params, ids, f)

    def delta(state, anchor):
      return rules.pseudo_gradient(anchor, fragments.split(state.params, ids, f))

    def merge(state, new, alpha):
      local = fragments.split(state.params, ids, f)
      return state.replace(params=fragments.join(state.params, ids, f, rules.merge(local, new, alpha)))

    return jax.jit(split_params), jax.jit(delta), jax.jit(merge)
  return memo(key, make)


def schedule(total: int, H: int, offsets: list[int], tau: int):
  """Sorted event steps: {step: (fragments to sync, fragments to merge)} over 1..total."""
  events: dict[int, tuple[list, list]] = {}
  for s in range(1, total + 1):
    for f in fragments.due_fragments(s, offsets, H):
      events.setdefault(s, ([], []))[0].append(f)
      if s + tau <= total:
        events.setdefault(s + tau, ([], []))[1].append(f)
  return events


def train(run: Run) -> dict:
  rt, inner, ocfg, M, H = run.rt, run.inner, run.ocfg, run.M, run.H
  init = inner.init_state(run.seed)
  ids = fragments.fragment_ids(init.params, ocfg.num_fragments, ocfg.fragment_pattern)
  F = ocfg.num_fragments + 1
  offsets = fragments.sync_offsets(F, H)
  fns = [_frag_fns(run, ids, f) for f in range(F)]
  update = make_outer_update(run.outer_opt)
  opt_init = memo(("opt_init", run.outer_opt), lambda: jax.jit(run.outer_opt.init))
  weights = np.asarray(run.weights, np.float32)
  src = init.params if ocfg.island_devices == 1 else run.place(init.params, SERVER, "init params")
  gfrag = [rt.call(fns[f][0], src, island=SERVER, cost=0, name=f"fragment {f}")
           for f in range(F)]
  fopt = [rt.call(opt_init, g, island=SERVER, cost=0, name="outer init") for g in gfrag]
  ws = [run.place(init, w, f"init {w}") for w in run.workers]
  anchors = [[rt.transfer(g, island=w, name="anchor") for g in gfrag] for w in run.workers]
  sync_bytes = [sum(network.payload_nbytes(np.shape(x), np.float32, wire(ocfg))
                    for x in fragments.split(init.params, ids, f).values()) for f in range(F)]
  events = schedule(run.total_steps, H, offsets, ocfg.overlap_tau)
  points = sorted(set(events) | {run.total_steps})
  in_flight: dict[int, list] = {}   # fragment -> new global value on each worker
  pending, prev, syncs = None, 0, 0
  resumed = run.resume_or_evaluate({"global": {"fragments": gfrag, "opt_state": fopt},
                                    "workers": ws, "anchors": anchors}, init.params)
  if resumed is not None:   # continue after the checkpoint's point, its fragment syncs in flight
    arrays, meta = resumed
    gfrag, fopt = list(arrays["global"]["fragments"]), list(arrays["global"]["opt_state"])
    ws, anchors = list(arrays["workers"]), [list(a) for a in arrays["anchors"]]
    in_flight = {f: list(v) for f, v in zip(meta["in_flight_fragments"], arrays.get("in_flight", []))}
    prev, syncs = meta["step"], meta["syncs"]
    points = [s for s in points if s > prev]
  el = Elastic(run)     # a lost island: fragment syncs over the survivors, replace it (Ray backend)
  zfrag = [rt.call(zeros_f32, g, island=SERVER, cost=0, name="zeros") for g in gfrag] if el.enabled else None
  for s in points:
    k = s - prev
    summaries = {}
    live = el.alive(range(M))
    if k > 0:
      for w in live:
        isl = run.workers[w]
        out = rt.call(run.inner_on(isl).steps, ws[w], el.batches(w, k), island=isl, cost=k,
                      name=f"steps ->{s}")
        ws[w] = rt.call(pick0, out, island=isl, cost=0, name="state")
        summaries[w] = rt.call(pick1, out, island=isl, cost=0, name="summary")
    prev = s
    sync, merge = events.get(s, ([], []))
    ups = {}
    for f in sync:
      for w in live:
        isl = run.workers[w]
        d = rt.call(fns[f][1], ws[w], anchors[w][f], island=isl, cost=0, name=f"delta f{f}")
        ups[w, f] = rt.transfer(d, island=SERVER, wire_dtype=wire(ocfg), name=f"delta f{f} {w}")
    watch = dict(ups)
    watch.update({(w, "steps"): x for w, x in summaries.items()})
    _, lost_keys = el.settle(watch)                   # Ray: waits for this point's work
    lost = {}
    for (w, _), e in lost_keys.items():
      lost.setdefault(w, e)
    for w in lost:
      summaries.pop(w, None)
    keep_s = np.array([w in live and w not in lost for w in range(M)])
    infos = []
    for f in sync:
      fups = [ups[w, f] if keep_s[w] else zfrag[f] for w in range(M)]
      upd = rt.call(update, gfrag[f], fopt[f], fups, weights, keep_s,
                    island=SERVER, cost=0, name=f"outer step f{f}")
      gfrag[f] = rt.call(pick0, upd, island=SERVER, cost=0, name=f"fragment {f}")
      fopt[f] = rt.call(pick1, upd, island=SERVER, cost=0, name="outer state")
      infos.append(rt.call(pick2, upd, island=SERVER, cost=0, name="info"))
      in_flight[f] = [rt.transfer(gfrag[f], island=isl, name=f"f{f}->{isl}") if keep_s[w] else None
                      for w, isl in enumerate(run.workers)]
      syncs += 1
    for f in merge:
      new = in_flight.pop(f)
      for w, isl in enumerate(run.workers):
        if not keep_s[w]:
          continue
        ws[w] = rt.call(fns[f][2], ws[w], new[w], ocfg.merge_alpha, island=isl, cost=0,
                        name=f"merge f{f}")
        anchors[w][f] = new[w]
    if lost:
      _lose_and_rejoin(run, el, s, lost, init, ids, gfrag, ws, anchors, in_flight)
    if pending is not None:
      _consume(run, *pending)
    pending = (s, summaries, infos)
    if run.eval_due(s) or run.save_due(s):   # records up to `s` precede its checkpoint
      _consume(run, *pending)
      pending = None
      if run.eval_due(s):
        run.evaluate(s, global_params(init.params, ids, gfrag))
    frags = sorted(in_flight)   # a list (Orbax keeps no int keys): the fragments in meta
    run.commit(s, {"global": {"fragments": gfrag, "opt_state": fopt}, "workers": ws,
                   "anchors": anchors, "in_flight": [in_flight[f] for f in frags]},
               syncs=syncs, in_flight_fragments=frags)
  if pending is not None:
    _consume(run, *pending)
  final = global_params(init.params, ids, gfrag)
  return run.summary(final, num_fragments_total=F, sync_bytes=sync_bytes,
                     peak_sync_bytes=M * max(sync_bytes), syncs=syncs)


def _lose_and_rejoin(run, el, s, lost, init, ids, gfrag, ws, anchors, in_flight) -> None:
  """Lost workers drop out; a replacement gets the current global params (all fragments), fresh
  inner optimizer state, anchors = the server's fragments, and the in-flight fragment values."""
  from pathways_lite.outer.diloco import fresh_state
  rt = run.rt
  for w in lost:
    ws[w] = None
    anchors[w] = [None] * len(anchors[w])
    for f in in_flight:
      in_flight[f][w] = None
  rejoin = el.lost(s, lost)
  if not rejoin:
    return
  glob = global_params(init.params, ids, gfrag)
  for w in rejoin:
    isl = run.workers[w]
    ws[w] = rt.transfer(fresh_state(init, s).replace(params=glob), island=isl, name=f"join {isl}")
    anchors[w] = [rt.transfer(g, island=isl, name="anchor") for g in gfrag]
    for f in in_flight:
      in_flight[f][w] = anchors[w][f]
    el.joined(s, w, rt.call(pick_params, ws[w], island=isl, cost=0, name="params"), glob)


def global_params(like, ids, gfrag):
  """The full global params from the server's fragments (host wait)."""
  out = like
  for f, g in enumerate(gfrag):
    out = fragments.join(out, ids, f, g.result())
  return out


def _consume(run: Run, step: int, summaries: dict, infos: list) -> None:
  for w, s in summaries.items():
    run.log_phase(step, w, s.result())
  for info in infos:
    finite = jax.device_get(info.result())["finite"]
    for w in range(run.M):
      if not finite[w]:
        run.reject(step, w, "non-finite pseudo-gradient fragment (NaN/Inf); not applied")
  run.progress(step, {"outer/workers_alive": float(len(summaries))})
