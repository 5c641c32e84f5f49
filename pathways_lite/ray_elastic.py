"""Runs that survive losing an island: the outer loops' side of membership (Ray backend).

One ``Elastic`` per run (``run.elastic``); the loops call it at four points:

- ``el.batches(w, n)``: a worker's batches from its assigned shard, recording the
  shard iterator's position first (``el.shard[w]``: worker -> shard, w at start);
- ``el.settle({w: Future})`` after a sync step's pseudo-gradients are enqueued:
  ``(ok, lost)`` where lost maps worker -> :class:`IslandLost`. On a runtime
  without membership (the local one) it returns everything as ok *without
  waiting*, so local runs keep their asynchronous dispatch unchanged;
- ``el.lost(step, lost)`` after the outer step that left them out was enqueued:
  logs each loss (a warning naming the island; metrics ``outer/workers_alive``,
  ``outer/islands_lost``), rewinds the lost phase's shard iterator to the
  position recorded before it (its batches were never applied), and, with
  ``runtime.replace_lost``, starts a replacement actor (``rt.replace_island``)
  and gives it a fresh shard assignment (the unassigned shard with the least
  progress). It returns the workers that rejoin; the loop hands each the
  current global state (params, outer optimizer state where the worker holds
  one, a fresh inner optimizer state) before the next outer step, so a
  replacement never sends a pseudo-gradient computed from stale params;
- ``el.joined(step, w, start, global_params)`` at a replacement's first phase:
  checks (host) that it started from the global params and records it.

``el.events`` lists membership changes as the loop saw them ({"step", "worker",
"island", "event"}); the runtime's own ``membership`` list and trace events
(``island_lost`` / ``island_joined``) record them too. ``el.audit`` keeps, for
each step that lost a worker, what a reader needs to verify the survivors'
average (host values; only at loss steps).
"""
from __future__ import annotations

import logging

import jax
import numpy as np

from pathways_lite.ray_islands import IslandLost, split_survivors

log = logging.getLogger(__name__)

__all__ = ["Elastic", "IslandLost"]


class Elastic:
    """Membership bookkeeping of one outer-loop run (see the module docstring)."""

    def __init__(self, run):
        self.run = run
        self.rt = run.rt
        self.enabled = hasattr(self.rt, "alive_islands") and hasattr(self.rt, "replace_island")
        rcfg = getattr(run.config, "runtime", None)
        self.replace = bool(rcfg.get("replace_lost", True)) if rcfg is not None else True
        self.shard = list(range(run.M))          # worker -> shard
        self.out: set[int] = set()               # lost workers not replaced
        self._marks: dict[int, tuple] = {}       # worker -> (shard, iterator state, progress, n)
        self.events: list[dict] = []
        self.audit: list[dict] = []
        self.joins: list[dict] = []
        self.pending_join: set[int] = set()
        run.elastic = self

    # ---- membership -------------------------------------------------------------------------
    def alive(self, workers) -> list[int]:
        """The workers (indices) that take part: not lost-and-unreplaced, not known dead now."""
        if not self.enabled:
            return list(workers)
        dead = set(self.run.workers) - set(self.rt.alive_islands())
        return [w for w in workers if w not in self.out and self.run.workers[w] not in dead]

    def num_alive(self) -> int:
        return self.run.M - len(self.out)

    def batches(self, w: int, n: int) -> np.ndarray:
        s = self.shard[w]
        it = self.run.iters[s]
        self._marks[w] = (s, it.get_state(), self.run.shard_progress[s], n)
        return self.run.batches(s, n)

    def settle(self, futures: dict):
        """``(ok: {w: Future}, lost: {w: IslandLost})``; no wait on a runtime without membership."""
        if not self.enabled or not futures:
            return dict(futures), {}
        ok, lost = split_survivors(futures)
        for key, exc in lost.items():      # keys: worker, or (worker, anything)
            w = key[0] if isinstance(key, tuple) else key
            if getattr(exc, "island", None) != self.run.workers[w]:
                raise exc       # the server (or another non-worker island) was lost: not survivable
        return ok, lost

    def lost(self, step: int, lost: dict) -> list[int]:
        """Log and handle the workers lost in the step ending at ``step``; return those that rejoin."""
        run, rejoin = self.run, []
        for w, exc in sorted(lost.items()):
            isl = run.workers[w]
            log.warning("outer step ending at %d: island %r (worker %d) was lost (%s); the step "
                        "averages over the %d survivors", step, isl, w,
                        getattr(exc, "reason", exc), self.num_alive() - 1)
            self.events.append({"step": int(step), "worker": int(w), "island": isl, "event": "lost"})
            self._rewind(w)
            self.out.add(w)
        if self.replace:
            for w in sorted(lost):
                isl = run.workers[w]
                try:
                    info = self.rt.replace_island(isl)
                except Exception as e:  # noqa: BLE001 - the run goes on without it
                    log.error("island %r could not be replaced (%s); continuing without it", isl, e)
                    continue
                self.out.discard(w)
                self.shard[w] = self._free_shard(w)
                self.pending_join.add(w)
                self.events.append({"step": int(step), "worker": int(w), "island": isl,
                                    "event": "replaced", "shard": int(self.shard[w]),
                                    "pid": info.get("pid")})
                log.info("island %r replaced (pid %s); it joins at the next outer step on shard %d",
                         isl, info.get("pid"), self.shard[w])
                rejoin.append(w)
        run.write(step, {"outer/islands_lost": float(len(lost))})
        return rejoin

    def joined(self, step: int, w: int, start, global_params) -> None:
        """A replacement's first phase started from ``start``: record (host) that it equals the global params."""
        if w not in self.pending_join:
            return
        self.pending_join.discard(w)
        a = jax.device_get(_value(start))
        b = jax.device_get(_value(global_params))
        same = all(np.array_equal(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        if not same:
            raise RuntimeError(f"worker {w} rejoined at step {step} from params that are not the "
                               "global params: a stale pseudo-gradient would follow")
        isl = self.run.workers[w]
        self.events.append({"step": int(step), "worker": int(w), "island": isl, "event": "joined"})
        self.joins[:] = [j for j in self.joins if j["worker"] != w]
        self.joins.append({"step": int(step), "worker": int(w), "start": a, "global": b})
        log.info("island %r (worker %d) rejoined at step %d from the global params", isl, w, step)

    # ---- data ------------------------------------------------------------------------------
    def _rewind(self, w: int) -> None:
        mark = self._marks.pop(w, None)
        if mark is None:
            return
        s, state, progress, n = mark
        self.run.iters[s].set_state(state)
        self.run.shard_progress[s] = progress
        self.run.tokens -= n * self.run.tokens_per_step

    def _free_shard(self, w: int) -> int:
        taken = {self.shard[v] for v in range(self.run.M) if v != w and v not in self.out}
        free = [s for s in range(len(self.run.iters)) if s not in taken] or list(range(len(self.run.iters)))
        frac = {s: self.run.shard_progress[s] / max(1, self.run.iters[s].batches_per_epoch) for s in free}
        return min(free, key=lambda s: (frac[s], s))

    def meta(self) -> dict:
        return {"shard": list(self.shard), "out": sorted(self.out), "events": list(self.events)}


def _value(x):
    return x.result() if hasattr(x, "result") and callable(x.result) else x
