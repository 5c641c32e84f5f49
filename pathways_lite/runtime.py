"""The single controller: ``call`` / ``transfer`` / ``gang`` return Futures at once.

    islands = make_islands(2)
    with Runtime(islands, clock="real", links=None, trace=True) as rt:
        a = rt.call(step, x, island="island0", cost=1)     # Future, returns immediately
        b = rt.call(step, a, island="island1")             # a's value is transferred to island1
        c = rt.transfer(b, island="island0", wire_dtype="int8")
        s = rt.gang(lambda v: jax.lax.psum(v, GANG_AXIS), [a, b], islands=["island0", "island1"])
        b.result()                                        # jax arrays on island1's devices
        rt.now(); rt.trace.write("trace.json")

``call(fn, *args, island, cost=None, name=None)``: runs ``jax.jit(fn)`` (one
jit per fn, compiled once per island and input shapes) on ``island``.
Arguments are pytrees whose leaves are Futures (of any island: the transfer
over the link is inserted), jax.Arrays (moved to the island if they live
elsewhere) or host values (numpy arrays, Python numbers: placed replicated on
the island). Bind static (non-array) arguments with ``functools.partial``.
``cost`` is the work in units for the virtual clock (default 1); the real
clock ignores it.

``transfer(x, island, wire_dtype=None, spec=None)``: x (a Future, array or
host value) on ``island``, through the link (quantized with ``wire_dtype``,
default the link's), laid out as ``spec`` (a PartitionSpec on the island's
mesh; default: the same spec as the source, else replicated).

``gang(fn, *args, islands)``: one computation over several islands, enqueued
on all of them in one global order (gangs never deadlock). ``fn`` is written
per island and may use collectives over the axis ``GANG_AXIS`` ("islands"),
e.g. ``jax.lax.psum(x, GANG_AXIS)``. Each arg is a *list* with one entry per
island, or any other value given to every island. Returns one Future per
island with that island's output. Disjoint islands run it with shard_map on
their union mesh; islands sharing devices (virtual) run it with vmap.

Dispatch never waits on the data plane: a chain of calls across islands is
fully enqueued while the first still runs. A call seen before whose inputs
are already on its island dispatches on the caller's thread through a cached
entry (no argument flattening; a few microseconds of Python per call).
``dispatch="auto"`` (the default, real clock): a (fn, island) whose dispatch
itself blocks (GPU: a loop of small kernels launched by the calling thread)
moves to that island's dispatch thread, so islands launch in parallel
(``pathways_lite/dispatch.py``); ``dispatch="inline"`` never does. Errors: anything raised while
resolving arguments, tracing or running ``fn`` fails that future; every
future depending on it fails with the same exception object; nothing else is
affected. ``shutdown()`` (also on leaving ``with``) waits for everything in flight.
"""
from __future__ import annotations

import atexit
import weakref
from threading import get_ident

import jax

from pathways_lite import network
from pathways_lite.controller import Controller, _check, _check_leaf, _Failed, _fn_name
from pathways_lite.dispatch import DispatchPolicy
from pathways_lite.futures import CANCELLED, FINISHED, MISSING, PENDING, Future
from pathways_lite.gangs import GangMixin, _Missing
from pathways_lite.islands import GANG_AXIS, Island, IslandIndex
from pathways_lite.network import LinkModel
from pathways_lite.real_engine import RealEngine
from pathways_lite.scheduler import VirtualEngine
from pathways_lite.trace import Trace

try:
    from jax._src.array import ArrayImpl as _ArrayType
except ImportError:  # pragma: no cover
    _ArrayType = None

__all__ = ["Runtime", "GANG_AXIS"]

_JIT_CACHE_MAX = 4096
_NUMBERS = (int, float)
_INF = float("inf")
_LIVE = weakref.WeakSet()   # runtimes not shut down yet


@atexit.register
def _stop_live_runtimes():
    """Stop runtimes left running at exit (threads blocked in XLA at exit can abort the process)."""
    live = list(_LIVE)
    for rt in live:
        rt.shutdown(wait=False)
    for rt in live:
        if rt._policy is not None:
            rt._policy.stop(2.0)
        rt._engine.stop(2.0)


class Runtime(GangMixin, Controller):
    """The controller of ``islands`` (see the module docstring; its checks: ``controller.py``)."""

    def __init__(self, islands, *, clock="real", links: LinkModel | None = None, trace: bool = True,
                 dispatch: str = "auto"):
        islands = list(islands)
        if not islands or not all(isinstance(i, Island) for i in islands):
            raise ValueError(f"Runtime needs a non-empty list of Islands (see make_islands), got {islands!r}")
        names = [i.name for i in islands]
        if "host" in names:
            raise ValueError("Runtime: 'host' is reserved for host values; rename that island")
        self.islands = tuple(islands)
        self.clock = self._setup(names, clock, links)   # also sets virtual, links
        self.trace = Trace(names) if trace else None
        engine_cls = VirtualEngine if self.virtual else RealEngine
        self._engine = engine_cls(self.clock, self.trace)
        self._index = IslandIndex(islands)
        self._sh_key = self._index.sh_key        # sharding -> device-set key (hot path)
        self._isl_key = self._index.island_key
        self._book = {i.name: (i.name,) for i in islands}   # islands a call occupies
        self._now = self.clock.now if type(self._engine) is RealEngine else self._engine.now
        self._jit = {}
        self._fast = {}     # (fn, island) -> what call()'s fast path needs (see _remember)
        if dispatch not in ("auto", "inline"):
            raise ValueError(f"Runtime: dispatch must be 'auto' or 'inline', got {dispatch!r}")
        # auto: calls whose dispatch blocks move to per-island threads (see dispatch.py)
        self._policy = DispatchPolicy(self._run_call) if dispatch == "auto" and not self.virtual else None
        self._zero_arg_jit = {}
        self._init_gangs()
        self._closed = False
        _LIVE.add(self)

    # -- public API (also Controller's transfer, island, now, state_dict) ----------------------
    def call(self, fn, *args, island, cost=None, name=None) -> Future:
        """Run ``jax.jit(fn)(*args)`` on ``island``; returns its Future at once."""
        # Fast path (a call seen before; every argument a Future of this island with its value,
        # or an array on it): one dict lookup, no argument flattening, dispatch on this thread.
        try:
            ent = self._fast.get((fn, island))
        except TypeError:   # unhashable fn or island: the checks of the general path say why
            ent = None
        if ent is not None and not self._closed and (cost is None or (
                type(cost) in _NUMBERS and 0 <= cost < _INF)) and ent[5] is None:
            iname, ikey, jf, label, put, _ = ent
            vals, parents, sh_key = [], None, self._sh_key
            for a in args:
                t = type(a)
                if t is Future:
                    if a._rt is self and a._exc is None and a.island == iname and a._value is not MISSING:
                        vals.append(a._value)
                        if parents is None:
                            parents = [a]
                        else:
                            parents.append(a)
                        continue
                elif t is _ArrayType and sh_key.get(a.sharding) is ikey:
                    vals.append(a)
                    continue
                break
            else:
                fut = Future(self, iname, name or label)
                fut._t_enq = t = self._now()
                try:
                    out = jf(*vals)
                except Exception as e:
                    return self._engine.fail_now(fut, e)
                policy = self._policy
                if policy is not None and policy.inline_took(fn, iname, self._now() - t):
                    self._forget(fn, iname)
                if parents is not None:
                    fut._parents = tuple(parents)
                if put is not None:
                    put((fut, None, out))
                else:
                    self._engine.submit(fut, out, (iname,), 1.0 if cost is None else cost)
                fut._value = out
                return fut
        return self._call(fn, args, island, cost, name)

    def _call(self, fn, args, island, cost, name):
        """The general path of :meth:`call`."""
        isl, fut = self._new_future("call", island, name or _fn_name(fn))
        if isl is None:
            return fut
        try:
            cost = _check(fn, cost, "call", fut.name)
        except Exception as e:
            return self._engine.fail_now(fut, e)
        if args:
            self._remember(fn, island, isl)
        self._run_call(fut, (fn, args, isl, cost))
        return fut

    def _remember(self, fn, island, isl):
        """Cache what the fast path of ``call(fn, ..., island=island)`` needs."""
        try:
            key = (fn, island)
            if key in self._fast:
                return
        except TypeError:
            return
        jf = self._jitted(fn, isl, True)
        put = self._engine.queue_put(isl.name) if type(self._engine) is RealEngine else None
        off = self._policy.offloaded.get((fn, isl.name)) if self._policy is not None else None
        self._fast[key] = (isl.name, self._isl_key[isl.name], jf, _fn_name(fn), put, off)

    def _forget(self, fn, iname):
        """Drop the fast-path entries of (fn, island ``iname``): its dispatch mode changed."""
        for key, ent in list(self._fast.items()):
            if key[0] is fn and ent[0] == iname:
                self._fast.pop(key, None)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Finish (``wait``) or abandon in-flight work and stop the runtime's threads."""
        if self._closed:
            return
        if cancel_pending or not wait:
            for f in list(self._engine.deferred):
                f.cancel()
        if wait:
            self._engine.drain()
        self._closed = True
        _LIVE.discard(self)
        if self._policy is not None:
            self._policy.stop(None if wait else 0)
        self._engine.stop(None if wait else 0)

    def pending(self) -> list[dict]:
        """In-flight work not yet finished (virtual clock: every queued event with its times)."""
        if self.virtual:
            return self._engine.pending()
        return [{"name": f.name, "island": f.island, "kind": f.kind} for f in list(self._engine.deferred)]

    # -- calls ---------------------------------------------------------------------------------
    def _run_call(self, fut, job):
        if fut._state >= FINISHED:   # cancelled while it waited
            return None
        fn, args, isl, cost = job
        d = None
        if self._policy is not None and self._policy.offloaded:
            try:
                d = self._policy.offloaded.get((fn, isl.name))
            except TypeError:
                d = None
            if d is not None and get_ident() != d.ident:   # dispatch on the island's thread
                if fut._state != PENDING:
                    self._engine.defer(fut, job)
                d.put(fut, job)
                return None
        deps = []
        memo = fut._memo if fut._memo is not None else {}
        try:
            vals = [self._resolve(a, isl, deps, memo) for a in args]
        except _Missing as m:
            fut._memo = memo      # transfers already started are reused on the retry
            return self._defer(fut, job, m.fut, self._run_call)
        except _Failed as f:
            return self._engine.fail_now(fut, f.exc)
        except Exception as e:
            return self._engine.fail_now(fut, e)
        deferred = fut._state == PENDING
        if deferred and not self._engine.claim(fut):
            return None
        fut._parents = tuple(deps)
        t = self._now()
        try:
            out = self._jitted(fn, isl, bool(args))(*vals)
        except Exception as e:
            return self._engine.fail_now(fut, e)
        if self._policy is not None:   # time it: a blocking dispatch here also moves to a thread
            dt = self._now() - t
            try:
                moved = (self._policy.thread_took(d, fn, isl.name, dt) if d is not None
                         else self._policy.inline_took(fn, isl.name, dt))
            except TypeError:          # an unhashable fn: never offloaded
                moved = False
            if moved:
                self._forget(fn, isl.name)
        self._engine.submit(fut, out, self._book[isl.name], cost)
        if deferred:
            fut._memo = None
            self._engine.publish(fut, out)   # dependants waiting for this value go now
            self._engine.undefer(fut)
        else:
            fut._value = out
        return None

    def _defer(self, fut, job, missing, retry):
        """Park ``fut`` until ``missing``'s value exists; then ``retry(fut, job)``."""
        if fut._state != PENDING:
            self._engine.defer(fut, job)
        if fut._state == CANCELLED:
            return None
        if not self._engine.add_waiter(missing, lambda: retry(fut, job)):
            return retry(fut, job)
        return None

    def _jitted(self, fn, isl, has_args):
        if not has_args:  # no inputs to place it: pin the outputs to the island
            jf = self._zero_arg_jit.get((fn, isl.name))
            if jf is None:
                jf = self._zero_arg_jit[(fn, isl.name)] = jax.jit(fn, out_shardings=isl.replicated())
            return jf
        jf = self._jit.get(fn)
        if jf is None:
            if len(self._jit) >= _JIT_CACHE_MAX:
                self._jit.clear()
                self._fast.clear()
            jf = self._jit[fn] = fn if hasattr(fn, "lower") else jax.jit(fn)
        return jf

    # -- argument resolution -------------------------------------------------------------------
    def _resolve(self, a, isl, deps, memo):
        """One argument (a pytree) as values on ``isl``; Futures' deps appended to ``deps``.

        ``memo`` remembers the transfers started for arrays of other islands, so that a job
        resolved again after waiting (deferred) does not start them twice.
        """
        t = type(a)
        if t is Future:
            return self._future_value(a, isl, deps)
        if t is _ArrayType:
            sh = a.sharding
            key = self._sh_key.get(sh)
            if key is None:
                key = self._index.key(sh)
            if key is self._isl_key[isl.name]:
                return a
            return self._place(a, isl, deps, memo)
        leaves, tdef = jax.tree_util.tree_flatten(a)
        if len(leaves) == 1 and leaves[0] is a:
            return self._place(a, isl, deps, memo)
        return jax.tree_util.tree_unflatten(tdef, [self._resolve(x, isl, deps, memo) for x in leaves])

    def _future_value(self, a, isl, deps):
        if a._rt is not self:
            self._check_future(a)
        if a._exc is not None:
            raise _Failed(a._exc)
        if a.island != isl.name:
            a = self._copy(a, isl)
            if a._exc is not None:
                raise _Failed(a._exc)
        v = a._value
        if v is MISSING:
            if a._gang is None:
                raise _Missing(a)
            v = a._get_value()
        deps.append(a)
        return v

    def _place(self, x, isl, deps, memo):
        """A non-Future leaf on ``isl``: arrays of another island go through the link."""
        if isinstance(x, jax.Array):
            src = self._index.owner(x)
            if src is not None and src is not isl:
                hit = memo.get((id(x), isl.name))
                if hit is not None:
                    return self._future_value(hit[1], isl, deps)
                t = Future(self, isl.name, "transfer", "transfer")
                t._t_enq = self._engine.now()
                memo[(id(x), isl.name)] = (x, t)     # holding x keeps its id unique
                self._start_transfer(t, None, x, src.name, isl, None, None)
                return self._future_value(t, isl, deps)
        else:
            _check_leaf(x, isl.name)
        return jax.device_put(x, isl.replicated())

    def _lookup(self, island):
        return self._index.lookup(island)

    def _holder(self, x):
        """The island holding array ``x``'s value to transfer ("host" for host values)."""
        src = self._index.owner(x) if isinstance(x, jax.Array) else None
        return src.name if src else "host"

    @staticmethod
    def _check_spec(isl, spec):
        isl.sharding(spec)  # validates the spec against the island's mesh

    # -- transfers -----------------------------------------------------------------------------
    def _copy(self, src, isl):
        """The (cached) transfer Future of ``src``'s value to ``isl`` over the default link format."""
        copies = src._copies
        if copies is None:
            copies = src._copies = {}
        t = copies.get(isl.name)
        if t is None or t._state == CANCELLED or (t._exc is not None and src._exc is None):
            # (a transfer that failed by itself, e.g. out of memory, is tried again)
            t = Future(self, isl.name, f"{src.name}->{isl.name}", "transfer")
            t._t_enq = self._engine.now()
            copies[isl.name] = t
            try:
                self._start_transfer(t, src, None, src.island, isl, None, None)
            except Exception as e:
                self._engine.fail_now(t, e)
        return t

    def _start_transfer(self, fut, src_fut, value, src_name, isl, wire, spec):
        if fut._state >= FINISHED:
            return None
        link = self.links.link(src_name, isl.name) if src_name != "host" else network.Link()
        if wire is None:
            wire = link.wire_dtype
        fut._src = src_name
        if src_fut is not None:
            fut._parents = (src_fut,)
        key = (src_name, isl.name)

        def move():
            v = src_fut._get_value() if src_fut is not None else value
            out, nbytes = network.move(v, isl, wire, link.block_size, spec)
            if src_name != "host":
                self.links.record(src_name, isl.name, nbytes)
            return out, nbytes

        if src_fut is not None and src_fut._exc is not None:
            return self._engine.fail_now(fut, src_fut._exc)
        if src_fut is not None and src_fut._value is MISSING and src_fut._gang is None:
            return self._defer(fut, None, src_fut,
                               lambda f, _: self._start_transfer(f, src_fut, value, src_name, isl, wire, spec))
        if not self.virtual and link.delayed and src_name != "host":
            return self._engine.submit_link(fut, key, link, move)
        if fut._state == PENDING and not self._engine.claim(fut):
            return None
        deferred = fut._state != PENDING and fut in self._engine.deferred
        try:
            out, nbytes = move()
        except Exception as e:
            return self._engine.fail_now(fut, e)
        fut._nbytes = nbytes
        if self.virtual:
            self._engine.submit_transfer(fut, key, link.seconds(nbytes) if link.delayed else 0.0)
        else:
            self._engine.submit(fut, out)
        fut._value = out
        if deferred:
            self._engine.undefer(fut)
        return None
