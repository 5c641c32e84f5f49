"""Completion engines behind the Runtime: when futures finish, in which order, at what time.

Internal to the runtime (users see only Futures). The runtime *dispatches*
work (JAX enqueues it asynchronously) and hands the future to an engine:

- ``RealEngine`` (``real_engine.py``): futures finish when their outputs are
  ready, on one completion thread per island (wall clock).
- ``VirtualEngine``: every submission is booked on the ``VirtualClock``
  (start = max(now, island free, inputs arrived)); futures finish only when
  the controller waits, in (simulated time, sequence number) order.

Both finish a future the same way (:meth:`Engine.finish`): a future whose
input failed takes that input's exception object; otherwise a failure of its
own computation (seen when blocking on its outputs) is its exception.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading

import jax

from pathways_lite.futures import (CANCELLED, FINISHED, MISSING, PENDING, RUNNING, CancelledError,
                                   run_callback)
from pathways_lite.trace import Span

try:
    from jax._src.array import ArrayImpl
    from jax._src.lib import xla_client as _xc
    _batched_block = _xc.batched_block_until_ready
except (ImportError, AttributeError):  # pragma: no cover
    ArrayImpl = None

    def _batched_block(values):
        jax.block_until_ready(values)

_tls = threading.local()    # waiters queued by publish() on this thread
_new_tuple = tuple.__new__   # builds a Span without NamedTuple's Python-level __new__
log = logging.getLogger(__name__)


def _is_ready(value) -> bool:
    """Whether every array in ``value`` is computed (True when that cannot be told)."""
    try:
        if type(value) is ArrayImpl:
            return value.is_ready()
        return all(x.is_ready() for x in jax.tree_util.tree_leaves(value))
    except Exception:
        live = _live(value)   # some leaf was donated to a later call: ask the others
        try:
            return live is None or all(x.is_ready() for x in live if hasattr(x, "is_ready"))
        except Exception:
            return True


def _live(values):
    """The leaves of ``values`` that were not donated to a later call (deleted); None if none was.

    A call that donates its input (``jax.jit(..., donate_argnums=...)``, e.g. a chain of train
    steps) deletes the arrays of the Future it consumed, maybe before that Future finished. That
    Future finishes when its other leaves are computed (a chain keeps a small undonated output
    per call, so its times stay exact); with nothing left, at once (its consumer is after it).
    """
    leaves = jax.tree_util.tree_leaves(values)
    live = [x for x in leaves if not (isinstance(x, jax.Array) and x.is_deleted())]
    return None if len(live) == len(leaves) else live


def _block(values) -> None:
    """Block until every output in ``values`` is computed (one call for the lot); raises its error.

    Arrays donated to a later call since (deleted) are skipped (see ``_live``)."""
    try:
        for v in values:
            if type(v) is not ArrayImpl:
                jax.block_until_ready(values)
                return
        if len(values) == 1:
            values[0].block_until_ready()
        else:
            _batched_block(values)
    except Exception:
        live = _live(values)
        if live is None:
            raise
        jax.block_until_ready(live)


def run_waiters(ws):
    for w in ws:
        try:
            w()
        except Exception:  # a dataflow retry must never kill an engine thread
            log.exception("pathways_lite: dispatching deferred work failed")


class Engine:
    """State transitions shared by both clocks; ``cond`` guards every future's state."""

    def __init__(self, clock, trace):
        self.clock = clock
        self.trace = trace
        self._lock = threading.Lock()
        self.cond = threading.Condition(self._lock)
        self._done_ctr = itertools.count()
        self.deferred = set()   # futures PENDING (waiting on inputs or a link)

    def now(self) -> float:
        return self.clock.now()

    # -- the one way a future finishes ---------------------------------------------------------
    def finish(self, fut, exc=None, state=FINISHED, times=None) -> bool:
        """FINISHED/CANCELLED with ``exc``; ``times`` = (start, end) if given. False if already done."""
        with self._lock:
            if fut._state >= FINISHED:
                return False
            if times is not None:
                fut._t_start, fut._t_end = times
            fut._exc = exc
            fut._state = state
            fut._done_seq = next(self._done_ctr)
            cbs = fut._callbacks
            ws = fut._waiters
            if cbs is not None:
                fut._callbacks = None
            if ws is not None:
                fut._waiters = None
            if fut._listeners:
                for listener in fut._listeners:
                    listener(fut)
                fut._listeners = None
            if self.deferred:
                self.deferred.discard(fut)
            if self.cond._waiters:
                self.cond.notify_all()
        if fut._parents:
            fut._parents = ()
        if fut._job is not None:
            fut._job = None
        if self.trace is not None:
            self.trace.spans.append(_new_tuple(Span, (
                fut.kind, fut.name, fut.island, fut._t_enq, fut._t_start, fut._t_end, fut._id, fut._nbytes,
                fut._src, "ok" if exc is None else ("cancelled" if state == CANCELLED else "error"))))
        if ws:
            run_waiters(ws)
        if cbs:
            for cb in cbs:
                run_callback(cb, fut)
        return True

    def finish_many(self, batch, t_end) -> None:
        """Finish [(fut, t_start)] fine at ``t_end``, in order, under one lock (the fast path)."""
        ctr = self._done_ctr
        later, done = [], []
        with self._lock:
            deferred = self.deferred
            for fut, t_start in batch:
                if fut._state >= FINISHED:
                    continue
                fut._t_start = t_start
                fut._t_end = t_end
                fut._state = FINISHED
                fut._done_seq = next(ctr)
                done.append(fut)
                if fut._callbacks is not None or fut._waiters is not None:
                    later.append((fut, fut._callbacks, fut._waiters))
                    fut._callbacks = fut._waiters = None
                if fut._listeners:
                    for listener in fut._listeners:
                        listener(fut)
                    fut._listeners = None
                if deferred:
                    deferred.discard(fut)
            if self.cond._waiters:
                self.cond.notify_all()
        trace = self.trace
        if trace is not None:
            spans = trace.spans
            for fut in done:
                spans.append(_new_tuple(Span, (fut.kind, fut.name, fut.island, fut._t_enq, fut._t_start,
                                               fut._t_end, fut._id, fut._nbytes, fut._src, "ok")))
        for fut in done:
            if fut._parents:
                fut._parents = ()
            if fut._job is not None:
                fut._job = None
        for fut, cbs, ws in later:
            if ws:
                run_waiters(ws)
            if cbs:
                for cb in cbs:
                    run_callback(cb, fut)

    def fail_now(self, fut, exc):
        """Fail at dispatch time (bad input, tracing error, failed input)."""
        t = max(fut._t_enq, self.now())
        self.finish(fut, exc, times=(t, t))
        return fut

    def help(self, fut) -> None:
        """Finish ``fut`` on the calling thread if it can be (RealEngine); a no-op otherwise."""

    def publish(self, fut, value):
        """Make a PENDING future's value available to dependants (before it counts as done)."""
        with self.cond:
            fut._value = value
            ws, fut._waiters = fut._waiters, None
        if not ws:
            return
        later = getattr(_tls, "later", None)
        if later is not None:      # inside a publish on this thread: run after it (no deep recursion)
            later.extend(ws)
            return
        _tls.later = later = collections.deque(ws)
        try:
            while later:
                run_waiters((later.popleft(),))
        finally:
            _tls.later = None

    def add_waiter(self, fut, fn) -> bool:
        """Call ``fn()`` once ``fut``'s value is available or it failed; False if it already is."""
        with self.cond:
            if fut._value is not MISSING or fut._gang is not None or fut._state >= FINISHED:
                return False
            if fut._waiters is None:
                fut._waiters = []
            fut._waiters.append(fn)
            return True

    def add_callback(self, fut, fn) -> bool:
        with self.cond:
            if fut._state >= FINISHED:
                return False
            if fut._callbacks is None:
                fut._callbacks = []
            fut._callbacks.append(fn)
            return True

    def listen(self, fut, fn) -> bool:
        with self.cond:
            if fut._state >= FINISHED:
                return False
            if fut._listeners is None:
                fut._listeners = []
            fut._listeners.append(fn)
            return True

    def unlisten(self, fut, fn) -> None:
        with self.cond:
            if fut._listeners and fn in fut._listeners:
                fut._listeners.remove(fn)

    def defer(self, fut, job) -> None:
        with self.cond:
            fut._state = PENDING
            fut._job = job
            self.deferred.add(fut)

    def claim(self, fut) -> bool:
        """PENDING -> RUNNING for a deferred future about to start; False if it was cancelled."""
        with self.cond:
            if fut._state != PENDING:
                return False
            fut._state = RUNNING
            return True

    def undefer(self, fut) -> None:
        """A deferred future was dispatched (its completion is now queued)."""
        with self.cond:
            self.deferred.discard(fut)
            self.cond.notify_all()

    def cancel(self, fut) -> bool:
        with self.cond:
            if fut._state == CANCELLED:
                return True
            if fut._state != PENDING:
                return False
        t = self.now()
        return self.finish(fut, CancelledError(f"future {fut.name!r} was cancelled"), CANCELLED, (t, t)) \
            or fut._state == CANCELLED

    @staticmethod
    def failed_parent(fut):
        for p in fut._parents:
            if p._exc is not None:
                return p._exc
        return None


class VirtualEngine(Engine):
    """Futures finish in simulated-time order when the controller waits."""

    def __init__(self, clock, trace):
        super().__init__(clock, trace)
        self.lock = threading.RLock()

    def now(self) -> float:
        return self.clock.now

    def submit(self, fut, value, islands, cost, gang=None):
        """Book ``islands`` for ``cost`` once ``fut``'s parents are done; queue its completion."""
        with self.lock:
            clock = self.clock
            now = clock.now
            ready = now
            for p in fut._parents:
                if p._t_end > ready:
                    ready = p._t_end
            start, end = clock.reserve(islands, ready, cost)
            for f in (gang.futures if gang is not None else (fut,)):
                f._t_enq, f._t_start, f._t_end = now, start, end
                clock.push(end, f)

    def submit_transfer(self, fut, key, seconds):
        with self.lock:
            clock = self.clock
            ready = clock.now
            for p in fut._parents:
                if p._t_end > ready:
                    ready = p._t_end
            fut._t_enq = clock.now
            fut._t_start, fut._t_end = clock.reserve_link(key, ready, seconds)
            clock.push(fut._t_end, fut)

    def _deliver(self, fut):
        if fut._state >= FINISHED:   # cancelled while queued
            return
        exc = self.failed_parent(fut)
        if exc is None:
            try:
                value = fut._value if fut._gang is None else fut._gang[0].out
                _block([value])
            except BaseException as e:
                exc = e
        self.finish(fut, exc)

    def cancel(self, fut) -> bool:
        with self.lock:
            if fut._state == CANCELLED:
                return True
            if fut._state >= FINISHED or self.clock.now >= fut._t_start:
                return False
            return self.finish(fut, CancelledError(f"future {fut.name!r} was cancelled"), CANCELLED)

    def wait_until(self, pred, timeout=None) -> bool:
        with self.lock:
            clock = self.clock
            deadline = None if timeout is None else clock.now + max(0.0, timeout)
            while not pred():
                t = clock.peek_time()
                if t is None:
                    if timeout is None:
                        raise RuntimeError("virtual clock: nothing is left to run but the awaited "
                                           "futures are not done")
                    clock.advance_to(deadline)
                    return False
                if deadline is not None and t > deadline:
                    clock.advance_to(deadline)
                    return False
                self._deliver(clock.pop()[2])
            return True

    def drain(self, timeout=None) -> bool:
        return self.wait_until(lambda: self.clock.peek_time() is None, timeout)

    def stop(self, timeout=None):
        pass

    def pending(self):
        return [{"t_end": t, "seq": seq, "name": f.name, "island": f.island, "kind": f.kind,
                 "t_start": f._t_start} for t, seq, f in self.clock.pending() if f._state < FINISHED]
