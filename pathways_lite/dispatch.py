"""Per-island dispatch threads for calls whose dispatch blocks the controller (real clock).

Internal to the runtime. ``rt.call`` normally dispatches on the caller's
thread: JAX enqueues the work and returns in microseconds, so a chain of calls
costs one jitted dispatch each. Some dispatches do not return until the work
is nearly done: on GPU a jitted loop of many small kernels is launched kernel
by kernel by the calling thread (the launch *is* the op's duration), and a
CPU backend without async dispatch runs the op inline. One controller thread
then serializes the islands: island 1's op is enqueued only once island 0's
has been launched, and the islands take turns.

``DispatchPolicy`` watches the inline dispatches of each (fn, island): after
``SLOW_IN_A_ROW`` consecutive dispatches longer than ``SLOW_S`` the pair is
*offloaded*: its calls are handed to that island's ``IslandDispatcher``
thread (FIFO), so that islands launch in parallel (JAX releases the GIL while
it launches). An offloaded call is PENDING (cancellable) until its thread
dispatches it; its value is published to dependants at dispatch, so chains
across islands stay fully enqueued. After ``FAST_IN_A_ROW`` fast dispatches
on the thread the pair goes back inline. Under the virtual clock nothing is
offloaded (the schedule must not depend on threads).
"""
from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger(__name__)
_STOP = object()

SLOW_S = 0.0002        # an inline dispatch this long (seconds) counts as blocking
SLOW_IN_A_ROW = 3      # ... this many in a row offload the (fn, island) pair
FAST_IN_A_ROW = 16     # dispatches on the thread shorter than SLOW_S / 2 in a row bring it back


class IslandDispatcher:
    """One thread that runs ``run(fut, job)`` for the jobs put to it, in order."""

    def __init__(self, island: str, run):
        self.island = island
        self._run = run
        self._q = queue.SimpleQueue()
        self.fast = {}          # fn -> fast dispatches in a row on this thread
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"pathways_lite-dispatch-{island}")
        self._thread.start()
        self.ident = self._thread.ident

    def put(self, fut, job) -> None:
        self._q.put((fut, job))

    def _loop(self):
        get = self._q.get
        while True:
            item = get()
            if item is _STOP:
                return
            try:
                self._run(*item)
            except Exception:  # the runtime fails futures itself; this must never kill the thread
                log.exception("pathways_lite: dispatch on island %s failed", self.island)

    def stop(self, timeout=None) -> None:
        self._q.put(_STOP)
        if threading.get_ident() != self.ident:
            self._thread.join(timeout)


class DispatchPolicy:
    """Which (fn, island) pairs dispatch on their island's thread (see the module docstring)."""

    def __init__(self, run):
        self._run = run
        self._lock = threading.Lock()
        self.dispatchers = {}    # island name -> IslandDispatcher (made on first offload)
        self.offloaded = {}      # (fn, island name) -> IslandDispatcher
        self._slow = {}          # (fn, island name) -> slow inline dispatches in a row

    def inline_took(self, fn, iname, seconds) -> bool:
        """Record an inline dispatch; True if the pair is now offloaded."""
        key = (fn, iname)
        if seconds <= SLOW_S:
            if self._slow:
                self._slow.pop(key, None)
            return False
        n = self._slow[key] = self._slow.get(key, 0) + 1
        if n < SLOW_IN_A_ROW:
            return False
        self._slow.pop(key, None)
        with self._lock:
            d = self.dispatchers.get(iname)
            if d is None:
                d = self.dispatchers[iname] = IslandDispatcher(iname, self._run)
            self.offloaded[key] = d
        return True

    def thread_took(self, d, fn, iname, seconds) -> bool:
        """Record a dispatch on ``d``'s thread; True if the pair goes back inline."""
        if seconds > SLOW_S / 2:
            d.fast.pop(fn, None)
            return False
        n = d.fast[fn] = d.fast.get(fn, 0) + 1
        if n < FAST_IN_A_ROW:
            return False
        d.fast.pop(fn, None)
        self.offloaded.pop((fn, iname), None)
        return True

    def stop(self, timeout=None) -> None:
        with self._lock:
            ds = list(self.dispatchers.values())
        for d in ds:
            d.stop(timeout)
