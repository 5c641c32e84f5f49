"""RayRuntime: the single controller over islands hosted by Ray actors (see ``ray_islands``)."""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import weakref

import jax
from jax.sharding import PartitionSpec

from pathways_lite import network
from pathways_lite.clock import RealClock
from pathways_lite.controller import Controller, _check, _Failed, _fn_name, _island_list
from pathways_lite.futures import FINISHED, Future
from pathways_lite.islands import check_axes
from pathways_lite.network import Link, LinkModel
from pathways_lite.ray_actor import DependencyFailed, Ref, SourceLost
from pathways_lite.ray_engine import Membership, RayRealEngine, RayTrace, RayVirtualEngine
from pathways_lite.ray_islands import (RayIsland, _ById, _GangFn, _host_leaf, _host_tree, _Index, _Island,
                                       _RayFuture, _repo_pythonpath, check_address)
from pathways_lite.ray_membership import MembershipMixin, _brief

log = logging.getLogger(__name__)
_FREE_BATCH = 256
_FN_CACHE_MAX = 4096


def _akey(aval):
    leaves, tdef = jax.tree_util.tree_flatten(aval)
    return (tdef, tuple((tuple(x.shape), x.dtype, getattr(x, "weak_type", False)) for x in leaves))


class RayRuntime(MembershipMixin, Controller):
    """The controller of Ray-hosted islands; the API of ``pathways_lite.runtime.Runtime``."""

    _NAME, _REMEDY, _future_cls = "RayRuntime", "make a new one", _RayFuture

    def __init__(self, islands, *, clock="real", links: LinkModel | None = None, trace: bool = True,
                 address: str | None = None, start_timeout_s: float = 120.0, inline_bytes: int = 1 << 16,
                 runtime_env: dict | None = None, init_kwargs: dict | None = None,
                 compile_cache_dir: str | None = None, name: str | None = None):
        """``compile_cache_dir``: a JAX persistent compilation cache shared by the island actors
        (a replacement island then loads its executables instead of compiling them).
        ``name``: the island actors become detached Ray actors ``<name>.<island>`` (namespace
        "pathways_lite"); a controller started again with the same name after a crash attaches
        to them (their state is reset: the run restores its checkpoint and sends it again)."""
        import ray
        clock_arg = clock
        specs = [RayIsland(i) if isinstance(i, str) else i for i in list(islands)]
        if not specs or not all(isinstance(s, RayIsland) for s in specs):
            raise ValueError(f"RayRuntime needs a non-empty list of RayIsland (or names), got {islands!r}")
        names = [s.name for s in specs]
        if not (isinstance(start_timeout_s, (int, float)) and start_timeout_s > 0):
            raise ValueError(f"RayRuntime: start_timeout_s must be a number > 0, got {start_timeout_s!r}")
        self.islands = tuple(specs)
        # validated now (also sets virtual, links); a "real" clock restarts once the islands are up
        clock = self._setup(names, clock, links)
        self.trace = RayTrace(names) if trace else None
        self.inline_bytes = int(inline_bytes)
        self.start_timeout_s = float(start_timeout_s)
        self.membership: list[Membership] = []
        self._listeners = []
        self._lock = threading.RLock()
        self._keys = itertools.count(1)
        self._fids = itertools.count(1)
        self._fn_ids, self._fn_refs, self._shapes = {}, {}, {}
        self._gang_fns, self._index_fns = {}, {}
        self._gang_seq = itertools.count()
        self._frees = collections.deque()   # (island, generation, key) of garbage-collected Futures
        self._link_seq: dict = {}
        self._closed = False
        self._owns_ray = False
        self._runtime_env = runtime_env
        if name is not None and (not isinstance(name, str) or not name or "." in name):
            raise ValueError(f"RayRuntime: name must be a non-empty string without '.', got {name!r}")
        self._name = name
        self._cache_env = {} if not compile_cache_dir else {
            "JAX_COMPILATION_CACHE_DIR": str(compile_cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        if not ray.is_initialized():
            if address:
                check_address(address)
                ray.init(address=address, **(init_kwargs or {}))
            else:
                ray.init(address="local", include_dashboard=False, **(init_kwargs or {}))
                self._owns_ray = True
        self._pythonpath = _repo_pythonpath()
        self._st = {s.name: _Island(s) for s in specs}
        try:
            self._check_resources(specs)
            started = {n: self._spawn(st.spec) for n, st in self._st.items()}
            infos = self._await_start(started)
        except BaseException:
            self._kill_all()
            if self._owns_ray:
                ray.shutdown()
            raise
        if clock_arg == "real":
            clock = RealClock()
        self.clock = clock
        engine_cls = RayVirtualEngine if self.virtual else RayRealEngine
        self._engine = engine_cls(clock, self.trace, self._on_done)
        self._wall0 = time.time() - (0.0 if self.virtual else clock.now())
        for n, st in self._st.items():
            st.actor, st.info, st.alive = started[n][0], infos[n], True
            attached = infos[n]["attachments"] > 1
            self._record(n, "joined", 0, f"attached to the running actor (pid {infos[n]['pid']})"
                         if attached else "start")

    # -- public API (also Controller's transfer, now, state_dict) ------------------------------
    def island(self, name) -> RayIsland:
        return super().island(name).spec

    def call(self, fn, *args, island, cost=None, name=None) -> Future:
        """Run ``jax.jit(fn)(*args)`` on ``island``'s actor; returns its Future at once."""
        st, fut = self._new_future("call", island, name or _fn_name(fn))
        if st is None:
            return fut
        try:
            cost = _check(fn, cost, "call", fut.name)
            self._dispatch(fut, st, fn, args, cost, (st.name,))
        except _Failed as f:
            self._engine.fail_now(fut, f.exc)
        except Exception as e:
            self._engine.fail_now(fut, e)
        return fut

    def gang(self, fn, *args, islands, cost=None, name=None) -> list[Future]:
        """``fn`` per island with collectives over GANG_AXIS; runs vmapped on the first island."""
        self._check_open("gang")
        islands = list(_island_list(islands))
        sts = [self._lookup(i) for i in islands]
        label = name or _fn_name(fn)
        futs = [_RayFuture(self, st.name if st is not None else str(i), label, "gang")
                for st, i in zip(sts, islands)]
        now = self._engine.now()
        for f in futs:
            f._t_enq = now
        try:
            if not futs:
                raise ValueError("gang: islands is empty")
            for st, i in zip(sts, islands):
                if st is None:
                    raise ValueError(self._unknown(i))
            if len({st.name for st in sts}) != len(sts):
                raise ValueError(f"gang: islands must be distinct, got {islands}")
            cost = _check(fn, cost, "gang", label)
            n = len(sts)
            bcast = tuple(not (type(a) is list and len(a) == n) for a in args)
            gkey = (fn, n, bcast)
            gfn = self._gang_fns.get(gkey)
            if gfn is None:
                gfn = self._gang_fns[gkey] = _GangFn(fn, n, bcast)
            lead = sts[0]
            whole = _RayFuture(self, lead.name, f"{label} (stacked)", "gang")
            whole._t_enq = now
            self._dispatch(whole, lead, gfn, args, cost, tuple(st.name for st in sts))
            seq = str(next(self._gang_seq))
            for k, st in enumerate(sts):
                if k == 0:
                    self._dispatch(futs[0], lead, self._index(0), (whole,), 0.0, (lead.name,))
                else:
                    part = _RayFuture(self, lead.name, f"{label}[{k}]")
                    part._t_enq = now
                    self._dispatch(part, lead, self._index(k), (whole,), 0.0, (lead.name,))
                    self._start_transfer(futs[k], part, None, lead.name, st, None, None)
                futs[k]._src = seq
        except Exception as e:
            exc = e.exc if isinstance(e, _Failed) else e
            for f in futs:
                if f._cf is None and f._state < FINISHED:
                    self._engine.fail_now(f, exc)
        return futs

    def shutdown(self, wait: bool = True, cancel_pending: bool = False, kill_islands: bool = True) -> None:
        """Finish (``wait``) in-flight work, stop the completion thread, kill the island actors
        (``kill_islands=False`` leaves a named runtime's actors for the next controller)."""
        if self._closed:
            return
        if wait:
            self._engine.drain()
        self._closed = True
        self._engine.stop()
        if kill_islands:
            self._kill_all()
        if self._owns_ray:
            import ray
            ray.shutdown()

    def pending(self) -> list[dict]:
        if self.virtual:
            return self._engine.pending()
        return [{"name": f.name, "island": f.island, "kind": f.kind} for f in list(self._engine.inflight)]

    # -- dispatch ------------------------------------------------------------------------------
    def _dispatch(self, fut, st, fn, args, cost, book):
        if not st.alive:
            raise _Failed(self._lost(st, st.gen))
        if len(self._frees) >= _FREE_BATCH:
            self._flush_frees()
        leaves, tdef = jax.tree_util.tree_flatten(args)
        spec, avals, keys, deps = [], [], [], []
        for x in leaves:
            if isinstance(x, Future):
                f = self._local(x, st)
                deps.append(f)
                spec.append(Ref(f._key))
                avals.append(f._aval)
                keys.append(f._akey)
            else:
                h, k = _host_leaf(x, st.name)
                spec.append(h)
                avals.append(h)
                keys.append(k)
        fid = self._fid(fn)
        ck = (fid, tdef, tuple(keys))
        hit = self._shapes.get(ck)
        if hit is None:
            out = jax.eval_shape(fn, *jax.tree_util.tree_unflatten(tdef, avals))
            hit = self._shapes[ck] = (out, _akey(out))
        fut._aval, fut._akey = hit
        fut._parents = tuple(deps)
        fref = self._ship(fid, fn, st)
        key = next(self._keys)
        ref = st.actor.call.remote((key, fid, fref, jax.tree_util.tree_unflatten(tdef, spec), not args,
                                    self.inline_bytes))
        self._launched(fut, st, key, ref)
        if self.virtual:
            self._engine.submit(fut, None, book, cost)
        else:
            self._engine.submit(fut)

    def _launched(self, fut, st, key, ref):
        fut._key, fut._gen, fut._cf = key, st.gen, ref.future()
        weakref.finalize(fut, self._release, st.name, st.gen, key)

    def _local(self, x, st):
        """Future ``x`` as a value on ``st``: itself, or its (cached) transfer there."""
        self._check_future(x)
        if x._exc is not None:
            raise _Failed(x._exc)
        xst = self._st[x.island]
        if x._gen != xst.gen or not xst.alive:
            raise _Failed(self._lost(xst, x._gen))
        if x.island == st.name:
            return x
        copies = x._copies
        if copies is None:
            copies = x._copies = {}
        t = copies.get(st.name)
        if t is None or t._gen != st.gen or (t._exc is not None and x._exc is None):
            t = _RayFuture(self, st.name, f"{x.name}->{st.name}", "transfer")
            t._t_enq = self._engine.now()
            copies[st.name] = t
            self._start_transfer(t, x, None, x.island, st, None, None)
        if t._exc is not None:
            raise _Failed(t._exc)
        return t

    def _start_transfer(self, fut, src, value, src_name, st, wire, spec):
        if not st.alive:
            raise _Failed(self._lost(st, st.gen))
        link = self.links.link(src_name, st.name) if src_name != "host" else Link()
        if wire is None:
            wire = link.wire_dtype
        fut._src = src_name
        if src is not None:
            sst = self._st[src_name]
            if src._gen != sst.gen or not sst.alive:
                raise _Failed(self._lost(sst, src._gen))
            fut._parents = (src,)
            payload = sst.actor.export.remote(src._key, wire, link.block_size)
            fut._export = payload
            source, aval, akey = ("ref", payload), src._aval, src._akey
        else:
            host = _host_tree(value, st.name)
            source = ("host", host)
            aval = jax.eval_shape(lambda t: t, host)
            akey = _akey(aval)
        delay = None
        if not self.virtual and src_name != "host" and link.delayed:   # held by the destination actor
            lk = (src_name, st.name, st.gen)
            seq = self._link_seq.get(lk, 0)
            self._link_seq[lk] = seq + 1
            delay = (link.latency_s, link.bandwidth_bytes_per_s, seq)
        key = next(self._keys)
        ref = st.actor.import_.remote((key, src_name, source, wire, link.block_size, spec, delay,
                                       self.inline_bytes))
        fut._aval, fut._akey = aval, akey
        if src_name != "host":
            fut._link = (src_name, st.name)
        self._launched(fut, st, key, ref)
        if self.virtual:
            nb = sum(network.payload_nbytes(tuple(x.shape), x.dtype, wire, link.block_size)
                     for x in jax.tree_util.tree_leaves(aval))
            fut._nbytes = nb
            if src_name != "host":
                self.links.record(src_name, st.name, nb)
            self._engine.submit_transfer(fut, (src_name, st.name), link.seconds(nb) if link.delayed else 0.0)
        else:
            self._engine.submit(fut)

    def _fid(self, fn):
        with self._lock:
            if len(self._fn_ids) >= _FN_CACHE_MAX:   # e.g. a new functools.partial every call
                self._forget_functions()
            try:
                fid = self._fn_ids.get(fn)
            except TypeError:   # unhashable callable: by identity
                fn = _ById(fn)
                fid = self._fn_ids.get(fn)
            if fid is None:
                fid = self._fn_ids[fn] = next(self._fids)
            return fid

    def _forget_functions(self):
        """Drop every shipped function (controller caches and the actors' jitted copies)."""
        fids = list(self._fn_ids.values())
        for st in self._st.values():
            if st.alive:
                st.actor.forget.remote(fids)
            st.shipped = set()
        self._fn_ids.clear()
        self._fn_refs.clear()
        self._shapes.clear()

    def _ship(self, fid, fn, st):
        """None if ``st``'s actor has the function, else a one-element list with its ObjectRef."""
        import ray
        if fid in st.shipped:
            return None
        with self._lock:
            ref = self._fn_refs.get(fid)
            if ref is None:
                try:
                    ref = self._fn_refs[fid] = ray.put(fn)
                except Exception as e:
                    raise TypeError(f"call: function {_fn_name(fn)!r} cannot be shipped to island actors "
                                    f"(cloudpickle failed: {e}); define it at module level or close over "
                                    "picklable values only") from e
            st.shipped.add(fid)
        return [ref]

    def _index(self, k):
        f = self._index_fns.get(k)
        if f is None:
            f = self._index_fns[k] = _Index(k)
        return f

    # -- completion, errors, membership --------------------------------------------------------
    def _on_done(self, f, exc):
        """Called by the engine once ``f``'s actor reported; returns its exception (or None)."""
        cf, meta = f._cf, None
        if exc is None and cf is not None:
            e = cf.exception()
            if e is None:
                meta = cf.result()
            else:
                exc = self._map_error(f, e)
        if not self.virtual:
            if meta is not None:
                f._t_start = max(f._t_enq, meta["t0"] - self._wall0)
                f._t_end = max(f._t_start, meta["t1"] - self._wall0)
            else:
                f._t_start = f._t_end = max(f._t_enq, self.clock.now())
        if meta is not None:
            if meta.get("value") is not None:
                f._value = meta["value"]
            nb = meta.get("nbytes")
            if nb is not None and not self.virtual:
                f._nbytes = nb
                link = getattr(f, "_link", None)
                if link is not None:
                    self.links.record(link[0], link[1], nb)
        f._cf = f._export = None
        return exc

    def _map_error(self, f, e):
        import ray
        if isinstance(e, ray.exceptions.RayActorError):
            return self._lose(f.island, f._gen, _brief(e))
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, DependencyFailed):
            p = self._engine.failed_parent(f)
            if p is not None:
                return p
            for p in f._parents:
                pst = self._st[p.island]
                if p._gen != pst.gen or not pst.alive:
                    return self._lost(pst, p._gen)
        if isinstance(cause, SourceLost) and f._parents:
            src = f._parents[0]
            return self._lose(src.island, src._gen, str(cause))
        return e

    def _fetch(self, f):
        import ray
        st = self._st[f.island]
        if f._gen != st.gen or not st.alive:
            raise self._lost(st, f._gen)
        try:
            return ray.get(st.actor.fetch.remote(f._key))
        except ray.exceptions.RayActorError as e:
            raise self._lose(f.island, f._gen, _brief(e)) from None

    def _release(self, name, gen, key):
        self._frees.append((name, gen, key))   # (from the garbage collector) sent in batches

    def _flush_frees(self):
        by = collections.defaultdict(list)
        while self._frees:
            name, gen, key = self._frees.popleft()
            st = self._st[name]
            if st.gen == gen and st.alive:
                by[name].append(key)
        for name, keys in by.items():
            self._st[name].actor.free.remote(keys)

    # -- helpers -------------------------------------------------------------------------------
    def _lookup(self, island):
        try:
            return self._st.get(island)
        except TypeError:
            return None

    @staticmethod
    def _check_spec(st, spec):
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"island {st.name!r}: spec must be a PartitionSpec, got {spec!r}")
        check_axes(st.name, spec, st.spec.mesh_axes)
