"""Completion engines and the trace of the Ray backend (internal to ``ray_islands``).

The engines reuse the local runtime's state machine (``scheduler.Engine``:
one ``finish``, listeners for ``wait``/``as_completed``, callbacks), so Ray
Futures behave exactly like local ones. What differs is how completion is
observed: every piece of island work has a small completion ObjectRef
(``fut._cf``, its ``concurrent.futures`` view) that resolves when the actor
finished it.

- ``RayRealEngine`` (real clock): Ray's callbacks queue the future; one
  thread finishes it, after finishing its parents (so a dependant never
  finishes before its input, and takes a failed input's exception object).
- ``RayVirtualEngine`` (virtual clock): the local VirtualEngine's schedule;
  delivering an event waits for that work's completion ref.

``RayTrace`` adds membership events (``island_lost`` / ``island_joined``) to
the trace: instant events in the Perfetto JSON, vertical lines in the PNG.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import NamedTuple

from pathways_lite.futures import FINISHED
from pathways_lite.real_engine import RealEngine
from pathways_lite.scheduler import VirtualEngine
from pathways_lite.trace import Event, Trace

log = logging.getLogger(__name__)
_STOP = object()


class RayRealEngine(RealEngine):
    """Real clock: futures finish when their actor reports them done."""

    def __init__(self, clock, trace, on_done):
        super().__init__(clock, trace)
        self._on_done = on_done          # (fut, exc or None) -> exc or None; sets times/value
        self.inflight = set()
        self._cq = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="pathways_lite-ray-complete")
        self._thread.start()

    def submit(self, fut, *unused, **unused_kw):
        with self.cond:
            self.inflight.add(fut)
        fut._cf.add_done_callback(lambda _cf, f=fut: self._cq.put(f))

    def _loop(self):
        while True:
            f = self._cq.get()
            if f is _STOP:
                return
            try:
                self._complete(f)
            except Exception:  # never let the completion thread die
                log.exception("pathways_lite.ray: finishing %r failed", f)

    def _complete(self, f):
        if f._state >= FINISHED:
            return
        for p in f._parents:
            if p._state < FINISHED and getattr(p, "_cf", None) is not None:
                concurrent.futures.wait([p._cf])
                self._complete(p)
        exc = self._on_done(f, self.failed_parent(f))
        self.finish(f, exc)
        with self.cond:
            self.inflight.discard(f)
            self.cond.notify_all()

    def fail_inflight(self, pred, exc_of) -> None:
        """Fail in-flight futures matching ``pred`` now (their actor is gone)."""
        with self.cond:
            hit = [f for f in self.inflight if pred(f)]
        for f in hit:
            f._t_start = f._t_end = max(f._t_enq, self.now())
            self.finish(f, exc_of(f))
            with self.cond:
                self.inflight.discard(f)
                self.cond.notify_all()

    def drain(self, timeout=None) -> bool:
        return self.wait_until(lambda: not self.inflight, timeout)

    def stop(self):
        self._cq.put(_STOP)
        self._thread.join(timeout=10)


class RayVirtualEngine(VirtualEngine):
    """Virtual clock: the simulated schedule of the local runtime; delivery waits for the actor."""

    def __init__(self, clock, trace, on_done):
        super().__init__(clock, trace)
        self._on_done = on_done

    def _deliver(self, fut):
        if fut._state >= FINISHED:   # cancelled while queued
            return
        exc = self.failed_parent(fut)
        cf = getattr(fut, "_cf", None)
        if cf is not None:
            concurrent.futures.wait([cf])
        self.finish(fut, self._on_done(fut, exc))

    def fail_inflight(self, pred, exc_of) -> None:
        pass   # failures arrive at their simulated times


class Membership(NamedTuple):
    t: float
    island: str
    event: str        # "lost" | "joined"
    generation: int
    reason: str


class RayTrace(Trace):
    """The runtime trace plus island membership changes."""

    KINDS = {"lost": "island_lost", "joined": "island_joined"}

    def __init__(self, islands=()):
        super().__init__(islands)
        self.membership: list[Membership] = []

    def add_membership(self, m: Membership) -> None:
        with self._lock:
            self.membership.append(m)

    def events(self) -> list[Event]:
        out = super().events()
        for m in list(self.membership):
            out.append(Event(self.KINDS[m.event], f"{m.island} {m.event}", m.island, m.t, -1, 0,
                             str(m.generation), m.reason))
        return sorted(out, key=lambda e: e.t)

    def chrome_trace(self) -> dict:
        d = super().chrome_trace()
        rows = self._rows()
        for m in self.membership:
            d["traceEvents"].append({"ph": "i", "s": "g", "name": f"{m.island} {m.event}",
                                     "cat": "membership", "pid": 0, "tid": rows.get(m.island, 0),
                                     "ts": m.t * 1e6, "args": {"generation": m.generation,
                                                               "reason": m.reason}})
        return d

    def plot(self, path, title: str | None = None) -> str:
        """The Gantt chart of ``Trace.plot`` with a vertical line per membership change."""
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        if not self.membership:
            return super().plot(path, title)
        orig_savefig = plt.Figure.savefig
        marks = list(self.membership)

        def savefig(fig, *a, **kw):   # draw the membership lines on Trace.plot's figure
            ax = fig.axes[0]
            for m in marks:
                ax.axvline(m.t, color="tab:red" if m.event == "lost" else "tab:green", ls="--", lw=1)
                ax.text(m.t, ax.get_ylim()[1], f" {m.island} {m.event}", fontsize=7, va="top",
                        color="tab:red" if m.event == "lost" else "tab:green")
            return orig_savefig(fig, *a, **kw)

        plt.Figure.savefig = savefig
        try:
            return super().plot(path, title)
        finally:
            plt.Figure.savefig = orig_savefig
