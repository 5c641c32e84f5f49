"""The island side of the Ray backend: one actor per island, owning that island's JAX devices.

Internal to ``pathways_lite.ray_islands`` (users see only Futures). The actor
keeps every output of the island in a store keyed by the controller's ids and
never runs user Python other than the jitted functions it is sent:

- ``call(key, fn_id, fn_ref, spec)``: ``spec`` is the call's argument pytree
  with :class:`Ref` leaves (values already in this store) and host leaves
  (numpy arrays, numbers: placed replicated on the island's mesh, as the local
  runtime does). The function arrives once per actor (``fn_ref``: an ObjectRef
  of the cloudpickled function, fetched on first use) and is jitted once;
  jax caches its compiles per input shapes.
- ``export(key, wire)``: the value as a host payload in the wire format
  (``network.encode`` on the island, then to host), returned into the Ray
  object store; the controller hands that ObjectRef to the destination actor,
  so the bytes go island -> object store -> island, never through the controller.
- ``import_(key, src, source, wire, spec, link)``: awaits the payload, holds the
  link for ``latency + bytes / bandwidth`` (real clock; one transfer at a time
  per source link), decodes it onto the island's devices.
- ``fetch(key)``: the value as numpy (for ``Future.result()``); ``free(keys)``.

The actor is an asyncio actor: waiting on inputs never blocks it. A call is
dispatched from the event loop as soon as its inputs exist (JAX dispatch is
asynchronous; the first call of a shape compiles there) and, unless already
done, awaited on a helper thread; transfers and fetches run on another
thread, so they overlap with computation. Outputs are found by key, whatever
order Ray delivers the method calls in.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import time

import numpy as np


class Ref:
    """An argument leaf that names a value already in the island's store."""

    __slots__ = ("key",)

    def __init__(self, key: int):
        self.key = key

    def __getstate__(self):
        return self.key

    def __setstate__(self, key):
        self.key = key


class Leaf:
    """One array of an exported payload: wire arrays (numpy) plus how to rebuild it."""

    __slots__ = ("arrays", "shape", "dtype", "spec", "mesh")

    def __init__(self, arrays, shape, dtype, spec, mesh):
        self.arrays, self.shape, self.dtype, self.spec, self.mesh = arrays, shape, dtype, spec, mesh

    def __getstate__(self):
        return (self.arrays, self.shape, self.dtype, self.spec, self.mesh)

    def __setstate__(self, s):
        self.arrays, self.shape, self.dtype, self.spec, self.mesh = s

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


class DependencyFailed(Exception):
    """An input of this work failed; the controller fails the work with that input's error."""


class SourceLost(Exception):
    """The payload of a transfer could not be fetched from its source island."""


_ERR = object()


class IslandActor:
    """One island: ``num_devices`` of the process's JAX devices in a Mesh."""

    def __init__(self, name: str, num_devices: int, mesh_axes, mesh_shape, distributed=None):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        if distributed:   # multi-host island: one actor per host (see ray_islands' docstring)
            if os.environ.get("JAX_PLATFORMS") == "cpu":   # CPU collectives across processes
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(**distributed)
        devs = jax.devices() if distributed else jax.local_devices()
        if num_devices > len(devs):
            raise ValueError(f"island {name!r} asks for {num_devices} devices, its process has "
                             f"{len(devs)}: {devs}")
        self.name = name
        self.devices = devs[:num_devices]
        shape = tuple(mesh_shape) if mesh_shape else (num_devices,)
        self.mesh = Mesh(np.array(self.devices, dtype=object).reshape(shape), tuple(mesh_axes))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        # one-device island on the default device: jit places host arguments there itself (faster)
        self.default_is_island = len(self.devices) == 1 and self.devices[0] == jax.devices()[0]
        self.store: dict[int, asyncio.Future] = {}
        self.raw: dict = {}      # fn_id -> asyncio future of the function as shipped
        self.fns: dict = {}      # (fn_id, zero_arg) -> its jitted form
        self.compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-compute")
        self.io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-io")
        self.link_free: dict[str, float] = {}
        self.attachments = 0

    # -- introspection ---------------------------------------------------------------------------
    async def info(self) -> dict:
        import jax
        return {"island": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "platform": self.devices[0].platform, "devices": [str(d) for d in self.devices],
                "jax": jax.__version__, "time": time.time()}

    async def attach(self) -> dict:
        """A controller takes this actor over: forget everything sent before, return ``info``."""
        self.attachments += 1
        if self.attachments > 1:
            self.store.clear()
            self.raw.clear()
            self.fns.clear()
            self.link_free.clear()
        return {**(await self.info()), "attachments": self.attachments}

    async def ping(self) -> float:
        return time.time()

    async def stats(self) -> dict:
        """Values held, functions received and compiled executables (for tests and benchmarks)."""
        compiled = sum(f._cache_size() for f in self.fns.values() if hasattr(f, "_cache_size"))
        return {"values": len(self.store), "functions": len(self.fns), "compiled": compiled}

    # -- the store -------------------------------------------------------------------------------
    def _slot(self, key):
        s = self.store.get(key)
        if s is None:
            s = self.store[key] = asyncio.get_running_loop().create_future()
        return s

    async def _get(self, key):
        v = await self._slot(key)
        if type(v) is tuple and v and v[0] is _ERR:
            raise DependencyFailed(f"island {self.name!r}: input {key} failed: {v[1]}")
        return v

    def _fail(self, slot, e):
        if not slot.done():
            slot.set_result((_ERR, f"{type(e).__name__}: {str(e)[:200]}"))

    async def free(self, keys) -> int:
        for k in keys:
            self.store.pop(k, None)
        return len(self.store)

    async def forget(self, fn_ids) -> None:
        """Drop the jitted forms (and their executables); a call still on its way re-jits."""
        for f in fn_ids:
            self.fns.pop((f, False), None)
            self.fns.pop((f, True), None)

    # -- computations ----------------------------------------------------------------------------
    async def call(self, msg):
        """``msg = (key, fn_id, fn_ref, spec, zero_arg, inline_bytes)`` (one argument: cheaper to send)."""
        import jax
        key, fn_id, fn_ref, spec, zero_arg, inline_bytes = msg
        slot = self._slot(key)
        try:
            fn = self.fns.get((fn_id, zero_arg))
            if fn is None:
                f = await self._function(fn_id, fn_ref)
                if zero_arg:
                    fn = jax.jit(f, out_shardings=self.replicated)
                else:
                    fn = f if hasattr(f, "lower") else jax.jit(f)
                self.fns[(fn_id, zero_arg)] = fn
            leaves, tdef = jax.tree_util.tree_flatten(spec, is_leaf=lambda x: type(x) is Ref)
            vals = [(await self._get(x.key)) if type(x) is Ref else x for x in leaves]
            t0 = time.time()
            out = self._launch(fn, tdef, vals)     # dispatch is asynchronous: returns at once
            leaves = jax.tree_util.tree_leaves(out)
            if not all(x.is_ready() for x in leaves if hasattr(x, "is_ready")):
                await asyncio.get_running_loop().run_in_executor(self.compute, jax.block_until_ready, out)
            jax.block_until_ready(out)             # done: raises a failure of the computation
            host = self._inline(out, inline_bytes)
            t1 = time.time()
        except BaseException as e:
            self._fail(slot, e)
            raise
        slot.set_result(out)
        return {"t0": t0, "t1": t1, "value": host}

    async def _function(self, fn_id, fn_ref):
        """The shipped function: the first call for ``fn_id`` carries its ref; others may start
        before that call fetched it, so all wait on one slot."""
        slot = self.raw.get(fn_id)
        if slot is None:
            slot = self.raw[fn_id] = asyncio.get_running_loop().create_future()
        if fn_ref is not None and not slot.done():
            slot.set_result(await fn_ref[0])
        return await slot

    def _launch(self, fn, tdef, vals):
        import jax
        host = [i for i, v in enumerate(vals) if not isinstance(v, jax.Array)]
        if host and not self.default_is_island:   # jit would put host values on the default device
            placed = jax.device_put([vals[i] for i in host], self.replicated)
            for i, v in zip(host, placed):
                vals[i] = v
        return fn(*jax.tree_util.tree_unflatten(tdef, vals))

    @staticmethod
    def _inline(out, limit):
        """Small outputs go back with the completion (no second round trip for result())."""
        import jax
        leaves = jax.tree_util.tree_leaves(out)
        if sum(getattr(x, "nbytes", 0) for x in leaves) > limit:
            return None
        if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
            if not all(x.sharding.is_fully_replicated for x in leaves):
                return None      # parts live in other processes of a multi-host island
            return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), out)
        return jax.device_get(out)

    # -- transfers -------------------------------------------------------------------------------
    async def export(self, key, wire, block):
        v = await self._get(key)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io, self._encode, v, wire, block)

    def _encode(self, v, wire, block):
        import jax
        from jax.sharding import NamedSharding
        from pathways_lite import network
        leaves, tdef = jax.tree_util.tree_flatten(v)
        out = []
        for x in leaves:
            if not isinstance(x, jax.Array):
                x = jax.device_put(np.asarray(x), self.replicated)
            sh = x.sharding
            spec, mesh = None, None
            if isinstance(sh, NamedSharding):
                spec, mesh = sh.spec, (tuple(sh.mesh.axis_names), tuple(sh.mesh.devices.shape))
            if wire is None or not np.issubdtype(x.dtype, np.floating):
                arrays = (np.asarray(jax.device_get(x)),)
            else:
                arrays = tuple(np.asarray(a) for a in jax.device_get(network.encoder(wire, block)(x)))
            out.append(Leaf(arrays, tuple(x.shape), np.dtype(x.dtype), spec, mesh))
        return jax.tree_util.tree_unflatten(tdef, out)

    async def import_(self, msg):
        """``msg = (key, src, source, wire, block, spec, link, inline_bytes)``."""
        import jax
        key, src, source, wire, block, spec, link, inline_bytes = msg
        slot = self._slot(key)
        loop = asyncio.get_running_loop()
        try:
            if source[0] == "ref":
                try:
                    payload = await source[1]
                except Exception as e:  # noqa: BLE001 - classify what the source reported
                    cause = getattr(e, "cause", e)
                    if isinstance(cause, DependencyFailed):
                        raise DependencyFailed(str(cause)) from None
                    raise SourceLost(f"transfer {src!r} -> {self.name!r}: the source's payload is gone "
                                     f"({type(e).__name__}: {str(e)[:300]})") from None
            else:
                payload = await loop.run_in_executor(self.io, self._encode_host, source[1], wire, block)
            leaves = jax.tree_util.tree_leaves(payload, is_leaf=lambda x: type(x) is Leaf)
            nbytes = sum(x.nbytes for x in leaves)
            t0 = time.time()
            if link is not None:
                await self._hold_link(src, link, nbytes)
            out, host = await loop.run_in_executor(self.io, self._decode, payload, wire, block, spec,
                                                   inline_bytes)
            t1 = time.time()
        except BaseException as e:
            self._fail(slot, e)
            raise
        finally:
            if link is not None:   # the next transfer on this link may go (also after a failure)
                done = self._link_turn(src, link[2])
                if not done.done():
                    done.set_result(None)
        slot.set_result(out)
        return {"t0": t0, "t1": t1, "nbytes": nbytes, "value": host}

    def _link_turn(self, src, seq):
        return self._slot(("link", src, seq))

    async def _hold_link(self, src, link, nbytes):
        """Hold link ``src`` -> here for ``latency + nbytes / bandwidth``: one transfer at a time,
        in the controller's order (``link = (latency_s, bandwidth, seq)``)."""
        latency, bandwidth, seq = link
        if seq > 0:
            await self._link_turn(src, seq - 1)
            self.store.pop(("link", src, seq - 1), None)
        now = time.monotonic()
        start = max(now, self.link_free.get(src, 0.0))
        self.link_free[src] = end = start + latency + nbytes / bandwidth
        await asyncio.sleep(end - now)

    def _encode_host(self, value, wire, block):
        """A host value in the wire format, encoded on this island (as the local runtime does)."""
        import jax
        from pathways_lite import network
        leaves, tdef = jax.tree_util.tree_flatten(value)
        out = []
        for x in leaves:
            x = np.asarray(x) if not hasattr(x, "dtype") else x
            if wire is None or not np.issubdtype(x.dtype, np.floating):
                out.append(Leaf((x,), tuple(np.shape(x)), None, None, None))
                continue
            dev = jax.device_put(x, self.replicated)
            arrays = tuple(jax.device_put(network.encoder(wire, block)(dev), self.replicated))
            out.append(Leaf(arrays, tuple(dev.shape), np.dtype(dev.dtype), None, None))
        return jax.tree_util.tree_unflatten(tdef, out)

    def _decode(self, payload, wire, block, spec, inline_bytes):
        import jax
        from jax.sharding import NamedSharding
        from pathways_lite import network
        leaves, tdef = jax.tree_util.tree_flatten(payload, is_leaf=lambda x: type(x) is Leaf)
        mine = (tuple(self.mesh.axis_names), tuple(self.mesh.devices.shape))
        out = []
        for lf in leaves:
            if spec is not None:
                target = NamedSharding(self.mesh, spec)
            elif lf.spec is not None and lf.mesh == mine:
                target = NamedSharding(self.mesh, lf.spec)
            else:
                target = self.replicated
            if len(lf.arrays) == 1 and (lf.dtype is None or lf.arrays[0].dtype == lf.dtype):
                out.append(jax.device_put(lf.arrays[0], target))
                continue
            moved = jax.device_put(lf.arrays, self.replicated)
            out.append(network.decoder(wire, block, lf.shape, lf.dtype, target)(moved))
        value = jax.tree_util.tree_unflatten(tdef, out)
        jax.block_until_ready(value)
        return value, self._inline(value, inline_bytes)

    async def fetch(self, key):
        import jax
        v = await self._get(key)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io, jax.device_get, v)
