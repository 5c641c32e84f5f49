"""Gang scheduling: one computation over several islands, enqueued in one global order.

Part of :class:`pathways_lite.runtime.Runtime` (see its docstring for the API):

    fs = rt.gang(lambda x: jax.lax.psum(x, GANG_AXIS) + 1, [a, b], islands=["w0", "w1"])

Every gang gets the next number of one global sequence and gangs are
dispatched strictly in that order, under one lock: a gang whose inputs are not
available yet (waiting on a slow link) holds back the gangs after it, so all
participants see collectives in the same order and two gangs that share
islands can never deadlock, even when issued from several threads. Each
argument is a list with one entry per island (or one value for all); entries
that are island k's parts of one earlier gang over the same islands are used
as the global array they already are (chained gangs never leave the union).
"""
from __future__ import annotations

import collections
import itertools
import threading

import jax

from pathways_lite.controller import _check, _Failed, _fn_name, _island_list
from pathways_lite.futures import FINISHED, MISSING, PENDING, Future
from pathways_lite.islands import GangResult, Union


class _Missing(Exception):
    """An input's value is not available yet (waiting on a link / deferred work)."""

    def __init__(self, fut):
        self.fut = fut


class GangMixin:
    """The gang half of Runtime (needs its _engine, _lookup, _resolve, _now and Controller's checks)."""

    def _init_gangs(self):
        self._gang_specs = {}
        self._gang_jit = {}
        self._gang_lock = threading.RLock()
        self._gang_q = collections.deque()
        self._gang_seq = itertools.count()
        self._pumping = False

    def gang(self, fn, *args, islands, cost=None, name=None) -> list[Future]:
        """Run ``fn`` on every island of ``islands`` at once (collectives over GANG_AXIS)."""
        self._check_open("gang")
        islands = _island_list(islands)
        label = name or _fn_name(fn)
        now = self._now()
        try:
            spec = self._gang_specs.get(tuple(islands))
        except TypeError:   # unhashable entries
            spec = None
        if spec is None:
            try:
                spec = self._gang_spec(islands)
            except Exception as e:
                futs = [Future(self, str(getattr(i, "name", i)), label, "gang") for i in islands]
                for f in futs:
                    f._t_enq = now
                    self._engine.fail_now(f, e)
                return futs
        isls, union, names = spec
        futs = []
        for nm in names:
            f = Future(self, nm, label, "gang")
            f._t_enq = now
            futs.append(f)
        try:
            cost = _check(fn, cost, "gang", label)
        except Exception as e:
            for f in futs:
                self._engine.fail_now(f, e)
            return futs
        with self._gang_lock:
            self._gang_q.append((futs, (fn, args, isls, union, cost, names)))
            self._pump_gangs()
        return futs

    def _gang_spec(self, islands):
        """(islands, Union, names) for a list of island names; cached; raises on bad input."""
        if not islands:
            raise ValueError("gang: islands is empty")
        isls = [self._lookup(i) for i in islands]
        for isl, i in zip(isls, islands):
            if isl is None:
                raise ValueError(self._unknown(i))
        spec = (isls, Union(isls), tuple(i.name for i in isls))
        self._gang_specs[tuple(islands)] = spec
        return spec

    def _pump_gangs(self):
        """Dispatch queued gangs strictly in submission order (call with the gang lock held)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            q = self._gang_q
            while q:
                futs, job = q[0]
                exc = None
                for f in futs:
                    if f._state >= FINISHED:   # cancelled or failed while queued
                        exc = f._exc
                        break
                if exc is not None:
                    for f in futs:
                        self._engine.fail_now(f, exc)
                    q.popleft()
                    continue
                if not self._try_gang(futs, job):
                    for queued, qjob in itertools.islice(self._gang_q, 1, None):
                        for f in queued:   # waiting behind the head: not started, cancellable
                            if f._state != PENDING and f._state < FINISHED:
                                self._engine.defer(f, qjob)
                    break
                q.popleft()
        finally:
            self._pumping = False

    def _repump(self):
        with self._gang_lock:
            self._pump_gangs()

    def _try_gang(self, futs, job) -> bool:
        """Dispatch one gang; False if an input is not available yet (it stays queued)."""
        fn, args, isls, union, cost, names = job
        deps = []
        memo = futs[0]._memo if futs[0]._memo is not None else {}
        try:
            gargs = [self._gang_arg(a, isls, union, deps, memo) for a in args]
        except _Missing as m:
            futs[0]._memo = memo
            for f in futs:
                if f._state != PENDING:
                    self._engine.defer(f, job)
            if not self._engine.add_waiter(m.fut, self._repump):
                return self._try_gang(futs, job)
            return False
        except Exception as e:
            exc = e.exc if isinstance(e, _Failed) else e
            for f in futs:
                self._engine.fail_now(f, exc)
            return True
        deferred = futs[0]._state == PENDING
        if deferred and not all([self._engine.claim(f) for f in futs]):
            exc = next(f._exc for f in futs if f._exc is not None)   # the cancelled one's
            for f in futs:
                self._engine.fail_now(f, exc)
            return True
        try:
            jf = self._gang_jit.get((fn, union))
            if jf is None:
                jf = self._gang_jit[(fn, union)] = union.compile(fn)
            out = jf(*gargs)
        except Exception as e:
            for f in futs:
                self._engine.fail_now(f, e)
            return True
        res = GangResult(out, union, futs)
        seq = str(next(self._gang_seq))
        parents = tuple(deps)
        for f in futs:
            f._parents = parents
            f._src = seq
        futs[0]._memo = None
        self._engine.submit(futs[0], out, names, cost, gang=res)
        k = 0
        for f in futs:
            f._gang = (res, k)
            k += 1
        if deferred:
            for f in futs:
                self._engine.publish(f, MISSING)
                self._engine.undefer(f)
        return True

    def _gang_arg(self, a, isls, union, deps, memo):
        n = len(isls)
        entries = a if (type(a) is list and len(a) == n) else [a] * n
        e0 = entries[0]
        if type(e0) is Future and e0._gang is not None and e0._gang[0].union is union:
            res, k = e0._gang[0], 0
            for e in entries:   # island k's part of one earlier gang over the same islands?
                if type(e) is not Future or e._gang is None or e._gang[0] is not res or e._gang[1] != k:
                    break
                k += 1
            else:
                if e0._exc is not None:
                    raise _Failed(e0._exc)
                deps.append(e0)
                return res.out
        per = [self._resolve(e, isl, deps, memo) for e, isl in zip(entries, isls)]
        flat = [jax.tree_util.tree_flatten(p) for p in per]
        tdef = flat[0][1]
        for (leaves, td), isl in zip(flat, isls):
            if td != tdef:
                raise ValueError(f"gang: island {isl.name!r} got an argument of structure {td}, "
                                 f"island {isls[0].name!r} got {tdef}; per-island values must match")
        stacked = [union.stack([f[0][i] for f in flat]) for i in range(len(flat[0][0]))]
        return jax.tree_util.tree_unflatten(tdef, stacked)
