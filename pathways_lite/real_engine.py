"""RealEngine: futures finish when their outputs are ready (wall clock).

Internal to the runtime (see ``scheduler.py`` for the engines' common state
machine). One completion thread per island takes that island's futures in
enqueue order and finishes each once its outputs are ready; a
thread per delayed link holds each transfer for ``latency + bytes /
bandwidth``. The controller never blocks on either. Two details keep the
completion threads from slowing the controller down (they share the GIL):
outputs that are already computed are blocked on together, in one call
(``block_until_ready`` releases the GIL even for ready arrays), after a short
batching pause (``batch_s``); work still running is waited for alone and
finished the moment it completes; a run of ready, fine outputs finishes
under one lock acquisition (``finish_many``), and readiness is probed with
a binary search (``is_ready`` costs about a microsecond), not per future.
``result()`` and ``wait(ALL_COMPLETED)`` finish ready futures (and their ancestors) on the waiting thread itself
(``help``), so awaiting one result costs no thread hand-off.
"""
from __future__ import annotations

import queue
import threading
import time

import jax

from pathways_lite.futures import FINISHED, MISSING, PENDING, RUNNING
from pathways_lite.scheduler import Engine, _block, _is_ready

_STOP = object()


def _ready_run(items, i, n) -> int:
    """End of the run of ready outputs starting at ``items[i]`` (at least ``i + 1``).

    ``is_ready`` costs about a microsecond, so instead of asking every item: if the first is
    ready and so is the last, the run is everything; else a binary search for the last ready
    one (outputs of one island become ready in order). Should an item inside the run still be
    running, blocking on the run only waits for it.
    """
    if n - i == 1 or not _is_ready(items[i][2]):
        return i + 1
    if _is_ready(items[n - 1][2]):
        return n
    lo, hi = i, n - 1          # items[lo] ready, items[hi] not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _is_ready(items[mid][2]):
            lo = mid
        else:
            hi = mid
    return lo + 1


def _post_order(root):
    """Unfinished ``root`` and its unfinished ancestors, ancestors before dependants."""
    order, stack, seen = [], [(root, False)], set()
    while stack:
        f, expanded = stack.pop()
        if f._state >= FINISHED:
            continue
        if expanded:
            order.append(f)
            continue
        if id(f) in seen:
            continue
        seen.add(id(f))
        stack.append((f, True))
        stack.extend((p, False) for p in f._parents if p._state < FINISHED)
    return order


class RealEngine(Engine):
    """Futures finish when their outputs are ready (wall clock)."""

    def __init__(self, clock, trace):
        super().__init__(clock, trace)
        self._queues = {}
        self._threads = []
        self._last_end = {}
        self._links = {}
        self._qlock = threading.Lock()

    def _queue(self, island):
        q = self._queues.get(island)
        if q is None:
            with self._qlock:
                q = self._queues.get(island)
                if q is None:
                    q = queue.SimpleQueue()
                    t = threading.Thread(target=self._complete_loop, args=(q,), daemon=True,
                                         name=f"pathways_lite-complete-{island}")
                    t.start()
                    self._threads.append(t)
                    self._queues[island] = q
        return q

    def queue_put(self, island):
        """``put`` of ``island``'s completion queue: ``put((fut, None, value))`` is ``submit``."""
        q = self._queues.get(island)
        return (q if q is not None else self._queue(island)).put

    def submit(self, fut, value, islands=None, cost=None, gang=None):
        """``fut`` was dispatched with outputs ``value``; finish it when they are ready.

        Callers publish ``fut``'s value only after this put, so a future is always queued
        after its inputs and the completion threads (which wait for inputs) cannot deadlock.
        """
        q = self._queues.get(fut.island)
        if q is None:
            q = self._queue(fut.island)
        q.put((fut, gang, value))

    def _wait_settled(self, fut):
        if fut._state < FINISHED:
            with self.cond:
                while fut._state < FINISHED:
                    self.cond.wait()

    # Seconds a completion thread waits to gather a batch when work completes faster than it is
    # dispatched (tiny ops): fewer wake-ups competing with the controller for the GIL. Work that
    # is still running when the thread looks at it is finished the moment it completes.
    batch_s = 0.0005

    def _complete_loop(self, q):
        get, get_nowait = q.get, q.get_nowait
        while True:
            items = [get()]
            if items[0] is not _STOP and self.batch_s > 0 and _is_ready(items[0][2]):
                time.sleep(self.batch_s)
            try:
                while True:
                    items.append(get_nowait())
            except queue.Empty:
                pass
            stop = any(it is _STOP for it in items)
            self._settle_many([it for it in items if it is not _STOP and it[0]._state < FINISHED])
            if stop:
                return

    def _settle_many(self, items):
        """Finish dispatched (fut, gang, value) items in order with as few GIL releases as possible.

        ``block_until_ready`` releases the GIL even on ready arrays (a hand-off to the controller
        each time), so ready items are blocked on together in one call; an item still running
        is blocked on alone, so that it finishes as soon as it completes. Items that computed
        fine and whose inputs did too finish together under one lock acquisition.
        """
        i, n = 0, len(items)
        while i < n:
            j = _ready_run(items, i, n)
            chunk = items[i:j] if (i or j < n) else items
            try:
                _block([it[2] for it in chunk])
                ok = True
            except BaseException:      # some computation failed: find out which, one by one
                ok = False
            if ok:
                self._finish_ok(chunk)
            else:
                for fut, gang, value in chunk:
                    if fut._state < FINISHED:
                        for p in fut._parents:
                            if p._state < FINISHED:
                                self._wait_settled(p)
                        self._settle(fut, gang, value)
            i = j

    def _finish_ok(self, chunk):
        """Finish a run of items whose outputs are ready and fine (in order, one lock).

        An item whose input failed or is not finished yet (other than an earlier item of this
        run), or a gang, goes through :meth:`_settle` after the run so far is finished.
        """
        t_end = self.clock.now()
        last_end = self._last_end
        batch, run = [], set()
        for it in chunk:
            fut = it[0]
            if fut._state >= FINISHED:
                continue
            simple = it[1] is None
            t_start = fut._t_enq
            if simple:
                for p in fut._parents:
                    if p._state >= FINISHED:
                        if p._exc is not None:
                            simple = False
                            break
                        if p._t_end > t_start:
                            t_start = p._t_end
                    elif p in run:
                        t_start = t_end
                    else:
                        simple = False
                        break
            if simple:
                if fut.kind != "transfer":
                    last = last_end.get(fut.island, 0.0)
                    if last > t_start:
                        t_start = last
                    last_end[fut.island] = t_end
                batch.append((fut, t_start))
                run.add(fut)
                continue
            if batch:
                self.finish_many(batch, t_end)
                batch, run = [], set()
            for p in fut._parents:
                if p._state < FINISHED:
                    self._wait_settled(p)
            self._settle(fut, it[1], it[2], blocked=True)
        if batch:
            self.finish_many(batch, t_end)

    def _settle(self, fut, gang, value, blocked=False):
        """Finish a dispatched ``fut`` whose parents are finished, once ``value`` is ready."""
        exc = None
        for p in fut._parents:
            if p._exc is not None:
                exc = p._exc
                break
        if exc is None and not blocked:
            try:
                _block([value])
            except BaseException as e:  # the computation failed on the device
                exc = e
        t_end = self.clock.now()
        t_start = fut._t_enq
        for p in fut._parents:
            if p._t_end > t_start:
                t_start = p._t_end
        last_end = self._last_end
        for f in (gang.futures if gang is not None else (fut,)):
            if f.kind == "transfer":
                self.finish(f, exc, times=(t_start, t_end))
            else:
                last = last_end.get(f.island, 0.0)
                if self.finish(f, exc, times=(last if last > t_start else t_start, t_end)):
                    last_end[f.island] = t_end

    def help(self, root) -> None:
        """Finish ``root`` and its unfinished ancestors on this thread (lower latency for result())."""
        if root._state >= FINISHED:
            return
        order, f = [root], root      # a chain (one unfinished input each) is walked straight up
        while order is not None:
            up = None
            for p in f._parents:
                if p._state < FINISHED:
                    if up is not None:
                        order = None
                        break
                    up = p
            if up is None:
                break
            if order is not None:
                order.append(up)
                f = up
        if order is not None:
            order.reverse()
        else:
            order = _post_order(root)
        ready = []
        for f in order:
            gang = f._gang[0] if f._gang is not None else None
            value = gang.out if gang is not None else f._value
            if f._state != RUNNING or value is MISSING:
                self._settle_many(ready)
                ready = []
                self._wait_settled(f)       # deferred / on a link: its own thread finishes it
            else:
                ready.append((f, gang, value))
        self._settle_many(ready)

    # -- delayed links -------------------------------------------------------------------------
    def submit_link(self, fut, key, link, move):
        """Run ``move() -> (value, nbytes)`` on link ``key``'s thread, then hold it for the link time."""
        if fut._state != PENDING:
            self.defer(fut, move)
        else:
            fut._job = move
        q = self._links.get(key)
        if q is None:
            with self._qlock:
                q = self._links.get(key)
                if q is None:
                    q = self._links[key] = queue.SimpleQueue()
                    t = threading.Thread(target=self._link_loop, args=(q, link), daemon=True,
                                         name=f"pathways_lite-link-{key[0]}-{key[1]}")
                    t.start()
                    self._threads.append(t)
        q.put(fut)

    def _link_loop(self, q, link):
        free_at = 0.0
        while True:
            fut = q.get()
            if fut is _STOP:
                return
            move = fut._job
            if not self.claim(fut):
                continue
            for p in fut._parents:
                self._wait_settled(p)
            exc = self.failed_parent(fut)
            if exc is not None:
                self.fail_now(fut, exc)
                continue
            t0 = max(self.clock.now(), free_at)
            try:
                value, nbytes = move()
                jax.block_until_ready(value)
            except BaseException as e:
                self.fail_now(fut, e)
                continue
            fut._nbytes = nbytes
            free_at = t0 + link.seconds(nbytes)
            delay = free_at - self.clock.now()
            if delay > 0:
                time.sleep(delay)
            fut._t_start, fut._t_end = t0, self.clock.now()
            self.publish(fut, value)
            self.finish(fut)

    # -- waiting -------------------------------------------------------------------------------
    def wait_until(self, pred, timeout=None) -> bool:
        with self.cond:
            if timeout is None:
                while not pred():
                    self.cond.wait()
                return True
            deadline = time.monotonic() + max(0.0, timeout)
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def drain(self, timeout=None) -> bool:
        """Wait until no deferred work is left (then every queued item is a dispatched one)."""
        return self.wait_until(lambda: not self.deferred, timeout)

    def stop(self, timeout=None):
        """Stop the threads once they have finished what was queued (join up to ``timeout``)."""
        for q in list(self._queues.values()) + list(self._links.values()):
            q.put(_STOP)
        for t in self._threads:
            t.join(timeout)
