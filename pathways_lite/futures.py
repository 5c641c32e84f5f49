"""Futures: handles to results of work the runtime has enqueued (``concurrent.futures``-shaped).

    f = rt.call(step, x, island="w0")   # returns at once
    f.done(); f.result(timeout=None)    # the output pytree, placed on island "w0"
    f.exception(); f.cancel()           # cancel: only work that has not started
    f.add_done_callback(lambda f: ...)  # called once f finishes (at once if it has)
    done, not_done = wait(fs, return_when=FIRST_COMPLETED)
    for f in as_completed(fs): ...

Users never construct a Future; pass Futures as arguments to ``rt.call`` /
``rt.transfer`` / ``rt.gang`` to build a dataflow graph without waiting.

Semantics: a future that fails carries the exception raised by its
computation (or transfer); every future that depends on it fails with *the
same exception object*. ``cancel()`` succeeds only for work not yet started
(waiting on inputs or on a link, or, under the virtual clock, not yet
started in simulated time); its dependants fail with ``CancelledError``.
Timeouts are in seconds of the runtime's clock: under the virtual clock,
``wait(fs, timeout=5)`` advances simulated time by at most 5 s.
Completion order (``as_completed``, ``FIRST_COMPLETED``) is real completion
order under the real clock and simulated-time order (ties broken by
submission order) under the virtual clock.
"""
from __future__ import annotations

import collections
import concurrent.futures as _cf
import itertools
import logging

from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, CancelledError

__all__ = ["Future", "wait", "as_completed", "FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED",
           "CancelledError", "DoneAndNotDone"]

log = logging.getLogger(__name__)

DoneAndNotDone = _cf._base.DoneAndNotDoneFutures

# States (ints, compared often).
PENDING, RUNNING, FINISHED, CANCELLED = 0, 1, 2, 3
_STATE_NAMES = ("pending", "running", "finished", "cancelled")
MISSING = object()   # the value is not available yet (waiting on inputs / a link)

_ids = itertools.count()


class Future:
    """A result the runtime will produce; see the module docstring."""

    # Defaults live on the class so that creating a future (on the dispatch path) sets only a few
    # attributes; everything below is internal to the runtime.
    kind = "call"          # "call" | "gang" | "transfer"
    _state = RUNNING
    _value = MISSING
    _exc = None
    _callbacks = None
    _waiters = None        # dataflow retries run when the value appears (or the future fails)
    _listeners = None      # wait()/as_completed() hooks, run under the engine lock
    _parents = ()
    _t_enq = _t_start = _t_end = 0.0
    _done_seq = -1
    _gang = None           # (GangResult, index) for gang outputs
    _copies = None         # {island name: transfer Future} cache of implicit transfers
    _nbytes = 0
    _src = ""
    _job = None            # the deferred job while PENDING
    _memo = None           # transfers a deferred job already started (see Runtime._resolve)

    def __init__(self, rt, island: str, name: str, kind: str | None = None):
        self._rt = rt
        self._id = next(_ids)
        self.name = name
        self.island = island          # name of the island holding the result
        if kind is not None:
            self.kind = kind

    # -- concurrent.futures API ---------------------------------------------------------------
    def done(self) -> bool:
        """True once the future finished (result or exception) or was cancelled."""
        return self._state >= FINISHED

    def running(self) -> bool:
        return self._state == RUNNING

    def cancelled(self) -> bool:
        return self._state == CANCELLED

    def cancel(self) -> bool:
        """Cancel work that has not started; True if the future is (now) cancelled."""
        return self._rt._engine.cancel(self)

    def result(self, timeout: float | None = None):
        """The output pytree (on ``self.island``); raises the failure; waits up to ``timeout``."""
        if self._state < FINISHED:
            self._wait(timeout)
        if self._state == CANCELLED:
            raise CancelledError(f"future {self.name!r} was cancelled")
        if self._exc is not None:
            raise self._exc
        return self._get_value()

    def exception(self, timeout: float | None = None):
        """The exception the future failed with, or None; waits up to ``timeout``."""
        if self._state < FINISHED:
            self._wait(timeout)
        if self._state == CANCELLED:
            raise CancelledError(f"future {self.name!r} was cancelled")
        return self._exc

    def add_done_callback(self, fn) -> None:
        """Call ``fn(future)`` when the future finishes (at once if it has). Errors are logged."""
        if not callable(fn):
            raise TypeError(f"add_done_callback takes a callable, got {fn!r}")
        if not self._rt._engine.add_callback(self, fn):
            run_callback(fn, self)

    # -- internals -----------------------------------------------------------------------------
    def _wait(self, timeout):
        engine = self._rt._engine
        if timeout is None:
            engine.help(self)
        engine.wait_until(lambda: self._state >= FINISHED, timeout)
        if self._state < FINISHED:
            raise TimeoutError(f"future {self.name!r} on island {self.island!r} not done after {timeout} s")

    def _get_value(self):
        v = self._value
        if v is MISSING and self._gang is not None:
            v = self._value = self._gang[0].view(self._gang[1])
        return v

    @property
    def times(self) -> tuple[float, float, float]:
        """(enqueued, started, ended) on the runtime's clock (started/ended set once finished)."""
        return self._t_enq, self._t_start, self._t_end

    def __repr__(self):
        extra = f" error={type(self._exc).__name__}" if self._exc is not None else ""
        return (f"<Future {self.name!r} on {self.island!r} {_STATE_NAMES[self._state]}{extra}>")


def run_callback(fn, fut):
    try:
        fn(fut)
    except Exception:  # like concurrent.futures: a failing callback must not break the runtime
        log.exception("done callback %r of %r raised", fn, fut)


def _engine_of(fs):
    fs = list(fs)
    for f in fs:
        if not isinstance(f, Future):
            raise TypeError(f"expected pathways_lite Futures, got {type(f).__name__}: {f!r}")
    rts = {id(f._rt): f._rt for f in fs}
    if len(rts) > 1:
        raise ValueError("wait/as_completed: all futures must come from one Runtime")
    return fs, (next(iter(rts.values()))._engine if rts else None)


class _Collector:
    """Listener: collects futures as they finish (called under the engine lock)."""

    def __init__(self):
        self.got = collections.deque()
        self.failed = False

    def __call__(self, f):
        self.got.append(f)
        if f._exc is not None:
            self.failed = True


def _listen_all(engine, fs, col):
    """Register ``col`` on unfinished ``fs``; returns (registered, finished before)."""
    registered, before = [], []
    for f in fs:
        (registered if engine.listen(f, col) else before).append(f)
    return registered, before


def wait(fs, timeout: float | None = None, return_when: str = ALL_COMPLETED) -> DoneAndNotDone:
    """Wait for ``fs``; returns ``(done, not_done)`` sets like ``concurrent.futures.wait``."""
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED, "
                         f"got {return_when!r}")
    fs, engine = _engine_of(fs)
    fs = list(dict.fromkeys(fs))
    if engine is not None and fs:
        if return_when == ALL_COMPLETED and timeout is None:
            for f in fs:
                engine.help(f)
        col = _Collector()
        registered, before = _listen_all(engine, fs, col)
        n = len(fs)
        pre_exc = any(f._exc is not None for f in before)

        def satisfied():
            k = len(before) + len(col.got)
            if return_when == FIRST_COMPLETED:
                return k > 0
            if return_when == FIRST_EXCEPTION and (pre_exc or col.failed):
                return True
            return k >= n

        try:
            if not satisfied():
                engine.wait_until(satisfied, timeout)
        finally:
            for f in registered:
                engine.unlisten(f, col)
    done = {f for f in fs if f._state >= FINISHED}
    return DoneAndNotDone(done, set(fs) - done)


def as_completed(fs, timeout: float | None = None):
    """Yield ``fs`` as they finish (already finished ones first, in finishing order)."""
    fs, engine = _engine_of(fs)
    fs = list(dict.fromkeys(fs))
    if engine is None or not fs:
        return
    col = _Collector()
    registered, before = _listen_all(engine, fs, col)
    deadline = None if timeout is None else engine.now() + timeout
    try:
        for f in sorted(before, key=lambda f: f._done_seq):
            yield f
        left = len(registered)
        while left:
            if not col.got:
                wait_s = None if deadline is None else max(0.0, deadline - engine.now())
                engine.wait_until(lambda: len(col.got) > 0, wait_s)
                if not col.got:
                    raise TimeoutError(f"as_completed: {left} futures not done after {timeout} s")
            left -= 1
            yield col.got.popleft()
    finally:
        for f in registered:
            if f._state < FINISHED:
                engine.unlisten(f, col)
