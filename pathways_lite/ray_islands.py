"""Islands hosted by Ray actors: the multi-process / multi-machine backend of the runtime.

    rt = RayRuntime([RayIsland("w0"), RayIsland("w1", num_gpus=1)], clock="real",
                    links=LinkModel(...), address=None)    # None: start a local Ray instance
    a = rt.call(step, x, island="w0")        # a pathways_lite Future, returned at once
    b = rt.call(step, a, island="w1")        # a's value goes w0 -> object store -> w1
    s = rt.gang(lambda v: jax.lax.psum(v, GANG_AXIS), [a, b], islands=["w0", "w1"])
    b.result()                               # numpy arrays (fetched from the island)
    rt.alive_islands(); rt.replace_island("w1"); rt.membership

The API is the local ``Runtime``'s (``call``/``transfer``/``gang``/``now``/
``trace``/``links``/``clock``/``shutdown``); ``wait``/``as_completed`` work on
its Futures. Differences: ``result()`` returns numpy arrays (the values live
in another process), ``cancel()`` works only under the virtual clock, and a
gang runs on its first island (inputs gathered there through the object
store, ``jax.vmap`` over ``GANG_AXIS``, outputs sent back): any collective
gives the local runtime's values, without a cross-process collective.

Each island is one Ray actor (``ray_actor.IslandActor``): its own process and
JAX, CPU devices (``RayIsland.devices`` fake host devices) or ``num_gpus``
GPUs. Functions are shipped once per actor (one ``ray.put`` of the
cloudpickled function) and jitted there once; output shapes are known on the
controller from ``jax.eval_shape``, so the controller never waits on the data
plane. Future arguments from another island are exported by their island into
the object store and imported by the consumer (links of ``network.py``
applied: real delay or virtual accounting, wire quantization, byte counts).

Losing an island: when its actor dies (SIGKILL, node loss), its pending and
later futures fail with :class:`IslandLost` naming it, dependants on other
islands fail with that same exception, everything else continues and the
controller stays usable. ``rt.replace_island(name)`` starts a fresh actor
(an empty store: callers send it state again; with ``compile_cache_dir`` the
islands share a persistent compilation cache, so it loads rather than
recompiles); ``rt.membership``, ``rt.on_membership(fn)`` and the trace
(``island_lost`` / ``island_joined`` events) record changes;
``split_survivors`` separates a step's results from lost islands' so a sync
outer loop can average over survivors.

Backends (``make_runtime(backend=...)``, config field ``runtime.backend``):
``"local"`` (islands are device subsets of this process), ``"ray"`` (this
module; ``runtime.ray_address`` "" starts a local Ray instance, else joins
that cluster: ``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others, then run with
``--config.runtime.ray_address=HEAD:6379``), ``"pathways"`` (Cloud TPU with
Pathways: ``pathwaysutils.initialize()``, then one island per TPU slice,
:func:`islands_from_slices`; the local runtime drives them).

Multi-host islands (design; one machine's share is tested): an island that
spans H hosts is H actors, one per host (a STRICT_SPREAD placement group of H
bundles). Each actor is started with ``IslandActor(..., distributed={
"coordinator_address": <actor 0's ip:port>, "num_processes": H, "process_id":
i})``: it calls ``jax.distributed.initialize`` (gloo collectives on CPU) and
builds the island's Mesh over the global device list, so one jitted program
sent to all H actors (SPMD: same function, same argument message, same keys)
runs as one multi-host computation. tests/ray tests exactly that with two
processes on one machine (a psum across both). What RayRuntime still has to
do for H > 1 (not implemented: it drives one actor per island): fan every
call / fetch / export out to the H actors and complete on all of them; take
inline values from actor 0 (replicated outputs) and gather sharded ones with
``multihost_utils.process_allgather`` (a collective: all H actors take part);
import a payload on all H actors (each keeps its addressable shards); lose and
replace the island as a whole (a survivor would hang in the next collective).
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket

import jax
import jax.numpy as jnp
import numpy as np

from pathways_lite.controller import _check_leaf
from pathways_lite.futures import MISSING, Future
from pathways_lite.islands import GANG_AXIS

__all__ = ["IslandLost", "IslandStartError", "RayIsland", "RayRuntime", "ray_islands", "make_runtime",
           "make_runtime_from_config", "ray_like", "from_local", "islands_from_slices", "split_survivors", "BACKENDS",
           "RUNTIME_DEFAULTS", "GANG_AXIS"]

BACKENDS = ("local", "ray", "pathways")
# The `runtime` config section (the lead adds it to configs/base.py):
RUNTIME_DEFAULTS = {
    "backend": "local",       # one of BACKENDS
    "ray_address": "",        # "" starts a local Ray instance; "HOST:PORT" / "ray://..." / "auto" joins one
    "island_num_cpus": 1.0,   # Ray CPUs each island actor reserves
    "island_num_gpus": 0.0,   # GPUs per island actor (0: CPU islands)
    "server_num_gpus": -1.0,  # GPUs of the outer loops' "server" island actor; -1: island_num_gpus
    "island_devices": 1,      # JAX devices per island (CPU islands get this many fake host devices)
    "start_timeout_s": 120.0,  # an island that has not started by then raises IslandStartError
    "replace_lost": True,     # outer loops: start a replacement for a lost island (joins next outer step)
}


class IslandLost(RuntimeError):
    """An island's actor died: its pending and later futures fail with this."""

    def __init__(self, island: str, generation: int, reason: str):
        super().__init__(f"island {island!r} was lost (its Ray actor, generation {generation}, died: "
                         f"{reason}); rt.replace_island({island!r}) starts a fresh one")
        self.island, self.generation, self.reason = island, generation, reason


class IslandStartError(RuntimeError):
    """Island actors did not start (no resources, bad environment, timeout)."""


@dataclasses.dataclass(frozen=True)
class RayIsland:
    """One island actor: its name, the Ray resources it reserves and its JAX devices."""

    name: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    devices: int = 1                   # JAX devices; CPU islands get this many fake host devices
    mesh_axes: tuple = ("data",)
    mesh_shape: tuple | None = None
    env: tuple = ()                    # extra (NAME, value) environment variables for the actor
    resources: tuple = ()              # extra (resource, amount) Ray custom resources

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == "host":
            raise ValueError(f"RayIsland.name must be a non-empty string other than 'host', got {self.name!r}")
        for f in ("num_cpus", "num_gpus"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"RayIsland({self.name!r}).{f} must be a finite number >= 0, got {v!r}")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"RayIsland({self.name!r}).devices must be an int >= 1, got {self.devices!r}")
        shape = self.mesh_shape or (self.devices,)
        if len(shape) != len(self.mesh_axes) or math.prod(shape) != self.devices:
            raise ValueError(f"RayIsland({self.name!r}): mesh_shape {shape} must have one size per axis "
                             f"of {self.mesh_axes} and multiply to devices={self.devices}")

    def actor_env(self, pythonpath: str | None) -> dict:
        env = {}
        if self.num_gpus == 0:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={self.devices}"
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        env.update(dict(self.env))
        return env


def ray_islands(names, **kw) -> list[RayIsland]:
    """``RayIsland(name, **kw)`` for each name (an int n gives island0..island{n-1})."""
    if isinstance(names, int):
        names = [f"island{i}" for i in range(names)]
    return [RayIsland(n, **kw) for n in names]


def split_survivors(futures: dict):
    """Wait for ``{key: Future}``; return ``(ok: {key: value-future}, lost: {key: IslandLost})``.

    Other failures are raised. A sync outer loop averages over ``ok`` (weights
    renormalised, e.g. DiLoCo's ``keep`` mask) and logs ``lost``.
    """
    from pathways_lite.futures import wait
    wait(list(futures.values()))
    ok, lost = {}, {}
    for k, f in futures.items():
        e = f.exception()
        if e is None:
            ok[k] = f
        elif isinstance(e, IslandLost):
            lost[k] = e
        else:
            raise e
    return ok, lost


class _RayFuture(Future):
    """A Future whose value lives in an island actor; fetched on ``result()``."""

    _cf = None        # concurrent.futures view of the completion ref
    _key = -1
    _gen = 0
    _aval = None
    _export = None    # the export ref a transfer waits on (kept alive until it finishes)

    def _get_value(self):
        v = self._value
        if v is MISSING:
            v = self._value = self._rt._fetch(self)
        return v


class _GangFn:
    """A gang's per-island ``fn`` as one computation over stacked per-island inputs (vmap)."""

    def __init__(self, fn, n, bcast):
        self.fn, self.n, self.bcast = fn, n, bcast
        self.__name__ = getattr(fn, "__name__", "gang")

    def __call__(self, *args):
        stacked = [a if b else jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *a)
                   for a, b in zip(args, self.bcast)]
        axes = tuple(None if b else 0 for b in self.bcast)
        return jax.vmap(self.fn, in_axes=axes, axis_name=GANG_AXIS)(*stacked)


class _Index:
    def __init__(self, k):
        self.k = k
        self.__name__ = f"gang[{k}]"

    def __call__(self, out):
        return jax.tree_util.tree_map(lambda g: g[self.k], out)


class _Island:
    """Controller-side state of one island (its current actor generation)."""

    def __init__(self, spec):
        self.spec, self.name = spec, spec.name
        self.actor, self.gen, self.alive, self.info = None, 0, False, None
        self.shipped: set = set()
        self.lost: dict[int, IslandLost] = {}


def _repo_pythonpath() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError naming ``address`` if nothing listens there (before ray.init hangs)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"runtime.ray_address={address!r} must be 'HOST:PORT', 'ray://HOST:PORT', "
                         "'auto' or '' (start a local Ray instance)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"runtime.ray_address={address!r}: no Ray cluster reachable there within "
                              f"{timeout_s} s ({e}); start one with `ray start --head` or fix the address") from None


class _ById:
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __hash__(self):
        return id(self.fn)

    def __eq__(self, other):
        return isinstance(other, _ById) and other.fn is self.fn


_SCALARS = (bool, int, float, complex, np.generic)


def _host_leaf(x, island):
    """(value to send, shape-cache key) for a non-Future argument leaf."""
    if isinstance(x, np.ndarray):
        return x, ("h", x.shape, x.dtype)
    if isinstance(x, jax.Array):
        x = np.asarray(x)
        return x, ("h", x.shape, x.dtype)
    if isinstance(x, _SCALARS):
        return x, ("s", type(x))
    _check_leaf(x, island)
    x = np.asarray(x)
    return x, ("h", x.shape, x.dtype)


def _host_tree(value, island):
    leaves, tdef = jax.tree_util.tree_flatten(value)
    out = []
    for x in leaves:
        if isinstance(x, Future):
            raise TypeError(f"transfer to {island!r}: pass a Future itself, not a pytree holding Futures")
        out.append(_host_leaf(x, island)[0])
    return jax.tree_util.tree_unflatten(tdef, out)


def __getattr__(name):   # the controller and the factory live in their own files (size)
    if name == "RayRuntime":
        from pathways_lite.ray_runtime import RayRuntime
        return RayRuntime
    if name in ("make_runtime", "make_runtime_from_config", "islands_from_slices", "initialize_pathways",
                "ray_like", "from_local"):
        from pathways_lite import ray_backends
        return getattr(ray_backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
