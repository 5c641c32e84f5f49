"""Islands: named sets of devices, each with its own Mesh.

An island is the unit the runtime schedules on: ``rt.call(fn, x, island="w0")``
runs ``fn`` on the devices of island ``w0``. Islands either own disjoint
device subsets (8 devices -> 4 islands of 2) or are *virtual*: several
islands share the same devices and are time-sliced (4 workers on 1 GPU).

    islands = make_islands(4)                        # 8 devices -> 4 x 2
    islands = make_islands(2, devices_per_island=1)  # use 2 of the devices
    islands = make_islands(4, virtual=True, devices=jax.devices()[:1])
    isl = islands[0]
    isl.name, isl.devices, isl.mesh                  # ("island0", [...], Mesh)
    isl.sharding(PartitionSpec("data"))              # NamedSharding on its mesh
    isl.replicated()                                 # NamedSharding(mesh, P())

The gang helpers at the bottom build the *union* of several islands, used by
``Runtime.gang``: disjoint islands form a mesh with a leading ``"islands"``
axis (collectives over ``GANG_AXIS`` cross islands); islands that share one
device set are stacked on those devices and mapped with ``vmap`` over the
same axis name, so a gang program runs unchanged on both.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

GANG_AXIS = "islands"


@dataclasses.dataclass(frozen=True, eq=False)
class Island:
    """A named set of devices with a Mesh over them (``mesh.devices.flat`` == devices)."""

    name: str
    devices: tuple
    mesh: Mesh
    virtual: bool = False

    def sharding(self, spec: PartitionSpec | None = None) -> NamedSharding:
        """NamedSharding of ``spec`` (default: replicated) on this island's mesh."""
        if spec is None:
            spec = PartitionSpec()
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"island {self.name!r}: sharding() takes a PartitionSpec, got {spec!r}")
        check_axes(self.name, spec, self.mesh.axis_names)
        return NamedSharding(self.mesh, spec)

    def replicated(self) -> NamedSharding:
        """The sharding that holds a full copy on every device of the island."""
        return self._replicated

    @functools.cached_property
    def _replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @functools.cached_property
    def device_set(self) -> frozenset:
        return frozenset(self.devices)

    def __repr__(self):
        kind = ", virtual" if self.virtual else ""
        return f"Island({self.name!r}, {len(self.devices)} device(s){kind})"


def check_axes(island: str, spec: PartitionSpec, axes) -> None:
    """Raise ValueError if ``spec`` names an axis that is not one of ``axes`` (``island``'s mesh axes)."""
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None and axis not in axes:
                raise ValueError(f"island {island!r}: PartitionSpec {spec} names axis {axis!r}; "
                                 f"this island's mesh axes are {tuple(axes)}")


def make_islands(n: int, *, devices: Sequence | None = None, devices_per_island: int | None = None,
                 virtual: bool = False, names: Sequence[str] | None = None,
                 mesh_axes: Sequence[str] = ("data",),
                 mesh_shape: Sequence[int] | None = None) -> list[Island]:
    """Split ``devices`` (default ``jax.devices()``) into ``n`` islands.

    Non-virtual: island i gets devices ``[i*k, (i+1)*k)`` with
    ``k = devices_per_island or len(devices) // n``. Virtual: every island
    gets the same ``devices_per_island or len(devices)`` devices (time-sliced).
    ``mesh_shape`` (default ``(k,)``) reshapes an island's devices to
    ``mesh_axes``; its product must be the devices per island.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"make_islands: n must be a positive int, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_islands: devices is empty")
    if len(set(devices)) != len(devices):
        raise ValueError(f"make_islands: devices contains duplicates: {devices}")
    if devices_per_island is None:
        k = len(devices) if virtual else len(devices) // n
        if k < 1:
            raise ValueError(f"make_islands: {n} islands need at least {n} devices, got {len(devices)}; "
                             "pass virtual=True to share devices between islands")
    else:
        k = devices_per_island
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"make_islands: devices_per_island must be a positive int, got {k!r}")
    need = k if virtual else n * k
    if need > len(devices):
        raise ValueError(f"make_islands: {n} islands x {k} devices need {need} devices "
                         f"({'shared' if virtual else 'disjoint'}), only {len(devices)} available")
    if names is None:
        names = [f"island{i}" for i in range(n)]
    names = list(names)
    if len(names) != n or len(set(names)) != n or not all(isinstance(s, str) and s for s in names):
        raise ValueError(f"make_islands: names must be {n} distinct non-empty strings, got {names!r}")
    mesh_axes = tuple(mesh_axes)
    if not mesh_axes or GANG_AXIS in mesh_axes or not all(isinstance(a, str) for a in mesh_axes):
        raise ValueError(f"make_islands: mesh_axes must be non-empty strings other than {GANG_AXIS!r}, "
                         f"got {mesh_axes!r}")
    if mesh_shape is None:
        if len(mesh_axes) != 1:
            raise ValueError(f"make_islands: mesh_axes {mesh_axes} has {len(mesh_axes)} axes; "
                             "pass mesh_shape with one size per axis")
        mesh_shape = (k,)
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if len(mesh_shape) != len(mesh_axes) or math.prod(mesh_shape) != k:
        raise ValueError(f"make_islands: mesh_shape {mesh_shape} must have one size per axis of "
                         f"{mesh_axes} and multiply to the {k} devices per island")
    islands = []
    for i, name in enumerate(names):
        devs = devices[:k] if virtual else devices[i * k:(i + 1) * k]
        mesh = Mesh(np.array(devs, dtype=object).reshape(mesh_shape), mesh_axes)
        islands.append(Island(name, tuple(devs), mesh, bool(virtual)))
    return islands


class IslandIndex:
    """Finds islands by name and which island an array lives on (used by the runtime).

    Device sets are canonicalized so that ``index.key(sharding) is index.island_key[name]``
    is a cheap identity test; virtual islands share one device set and own it jointly.
    """

    def __init__(self, islands: Sequence[Island]):
        self.islands = tuple(islands)
        canon = {}
        for isl in self.islands:
            canon.setdefault(isl.device_set, isl.device_set)
        self.island_key = {isl.name: canon[isl.device_set] for isl in self.islands}
        self.by_key = {}
        for isl in self.islands:
            key = canon[isl.device_set]
            self.by_key[key] = None if key in self.by_key else isl
        self._canon = canon
        self._names = {}
        for isl in self.islands:
            self._names[isl.name] = isl
            self._names[isl] = isl
        self.sh_key = {}

    def lookup(self, island):
        """The Island named ``island`` (or the Island itself), None if unknown."""
        try:
            return self._names.get(island)
        except TypeError:   # unhashable
            return None

    def key(self, sharding) -> frozenset:
        """The (canonical) device set of ``sharding``."""
        ds = frozenset(sharding.device_set)
        key = self.sh_key[sharding] = self._canon.get(ds, ds)
        return key

    def owner(self, x: jax.Array):
        """The one island whose devices hold ``x`` (all or some of them); None if none or shared."""
        key = self.sh_key.get(x.sharding)
        if key is None:
            key = self.key(x.sharding)
        owner = self.by_key.get(key)
        if owner is None:
            for isl in self.islands:
                if key <= isl.device_set and self.by_key.get(self.island_key[isl.name]) is isl:
                    return isl
        return owner


# ----------------------------------------------------------------------------------------------
# Gang helpers: the union of several islands.

class Union:
    """How a gang over ``islands`` is laid out: ``mode`` is "mesh" (disjoint) or "stack" (shared)."""

    def __init__(self, islands: Sequence[Island]):
        self.islands = tuple(islands)
        names = [i.name for i in self.islands]
        if len(set(names)) != len(names):
            raise ValueError(f"gang: islands must be distinct, got {names}")
        sets = [i.device_set for i in self.islands]
        if all(s == sets[0] for s in sets):
            self.mode = "stack"
            base = self.islands[0]
            self.sharding = base.replicated()
            self.mesh = base.mesh
        elif sum(len(s) for s in sets) == len(frozenset().union(*sets)):
            self.mode = "mesh"
            shapes = {(i.mesh.devices.shape, i.mesh.axis_names) for i in self.islands}
            if len(shapes) != 1:
                raise ValueError("gang: islands must have the same mesh shape and axis names, got "
                                 + ", ".join(f"{i.name}: {dict(i.mesh.shape)}" for i in self.islands))
            devs = np.stack([i.mesh.devices for i in self.islands])
            self.mesh = Mesh(devs, (GANG_AXIS,) + tuple(self.islands[0].mesh.axis_names))
            self.sharding = NamedSharding(self.mesh, PartitionSpec(GANG_AXIS))
        else:
            raise ValueError("gang: islands must either share exactly the same devices (virtual) or "
                             f"have disjoint devices; got {[i.name for i in self.islands]} overlapping partly")

    def compile(self, fn):
        """jit of ``fn`` mapped over the islands axis: per-island values in, per-island values out."""
        if self.mode == "stack":
            return jax.jit(jax.vmap(fn, axis_name=GANG_AXIS), out_shardings=self.sharding)

        def body(*blocks):
            local = jax.tree_util.tree_map(lambda b: b[0], blocks)
            out = fn(*local)
            return jax.tree_util.tree_map(lambda o: jnp.expand_dims(o, 0), out)

        spec = PartitionSpec(GANG_AXIS)
        # check_vma=False: fn is written per island (as under vmap), so a psum result may be fed
        # back as a per-island value (e.g. through a fori_loop carry) in both modes alike.
        mapped = jax.shard_map(body, mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False)
        return jax.jit(mapped)

    def stack(self, per_island: Sequence[jax.Array]) -> jax.Array:
        """Global array whose i-th slice is ``per_island[i]`` (an array on island i)."""
        shapes = {(tuple(v.shape), v.dtype) for v in per_island}
        if len(shapes) != 1:
            raise ValueError("gang: per-island values must have one shape and dtype, got "
                             + ", ".join(f"{i.name}: {tuple(v.shape)} {v.dtype}"
                                         for i, v in zip(self.islands, per_island)))
        shape, _ = shapes.pop()
        if self.mode == "stack":
            return _stack_fn(self.sharding)(*per_island)
        shards = []
        for isl, v in zip(self.islands, per_island):
            e = _expand_fn(isl.replicated())(v)
            shards.extend(s.data for s in e.addressable_shards)
        return jax.make_array_from_single_device_arrays((len(self.islands),) + shape, self.sharding, shards)

    def split(self, glob: jax.Array, k: int) -> jax.Array:
        """Island k's slice of a global array made by a gang computation, placed on island k."""
        isl = self.islands[k]
        if self.mode == "stack":
            return _index_fn(k, isl.replicated())(glob)
        by_dev = {s.device: s.data for s in glob.addressable_shards}
        blk = jax.make_array_from_single_device_arrays(
            (1,) + tuple(glob.shape[1:]), isl.replicated(), [by_dev[d] for d in isl.devices])
        return _index_fn(0, isl.replicated())(blk)


class GangResult:
    """The global outputs of one gang computation; island k's part is made on demand."""

    __slots__ = ("out", "union", "futures")

    def __init__(self, out, union, futures):
        self.out, self.union, self.futures = out, union, futures

    def view(self, k):
        return jax.tree_util.tree_map(lambda g: self.union.split(g, k), self.out)


@functools.lru_cache(maxsize=None)
def _expand_fn(sharding):
    return jax.jit(lambda x: jnp.expand_dims(x, 0), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _stack_fn(sharding):
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _index_fn(k, sharding):
    return jax.jit(lambda x: x[k], out_shardings=sharding)
