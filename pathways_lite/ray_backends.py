"""Pick the runtime backend by name: ``make_runtime(backend="local"|"ray"|"pathways", ...)``.

Config (the ``runtime`` section; defaults in ``ray_islands.RUNTIME_DEFAULTS``):

=========================  ====================================================================
field                      meaning
=========================  ====================================================================
runtime.backend            "local": islands are device subsets of this process (Runtime);
                           "ray": one Ray actor per island (RayRuntime);
                           "pathways": Cloud TPU + Pathways, one island per TPU slice (Runtime)
runtime.ray_address        "" starts a local Ray instance; "HOST:PORT", "ray://HOST:PORT" or
                           "auto" joins a running cluster (checked first: no hang on a bad one)
runtime.island_num_cpus    Ray CPUs each island actor reserves
runtime.island_num_gpus    GPUs per island actor (0: CPU islands)
runtime.server_num_gpus    GPUs of the outer loops' ``server`` island (the outer optimizer);
                           -1 (default): island_num_gpus. 0 puts it on a CPU actor, so M
                           workers own M GPUs, one each (the local backend instead shares
                           a worker's device)
runtime.island_devices     JAX devices per island (CPU islands get as many fake host devices)
runtime.start_timeout_s    islands not started by then raise IslandStartError (e.g. the
                           cluster lacks the resources)
runtime.replace_lost       outer loops: a lost island is replaced by a fresh actor that joins
                           at the next outer step (False: the run goes on with the survivors)
=========================  ====================================================================

``make_runtime_from_config(config.runtime, names, clock=..., links=...)`` is
what a launcher calls; a loop that already builds a local Runtime (the outer
loops' ``topology.make_runtime``) wraps it: ``from_local(config.runtime, rt)``
returns it unchanged for "local" and Ray islands with the same names, clock
and links for "ray". The loops keep calling ``rt.call`` etc. unchanged.
"""
from __future__ import annotations

import collections
import importlib
import math

import numpy as np
from jax.sharding import Mesh

from pathways_lite.islands import Island, make_islands
from pathways_lite.network import LinkModel
from pathways_lite.ray_islands import BACKENDS, RUNTIME_DEFAULTS, RayIsland


def _choice(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"config field {field!r}={value!r} is not allowed; allowed values: {list(allowed)}")


def runtime_config(runtime_cfg) -> dict:
    """The ``runtime`` section as a dict with defaults filled in; ValueError naming a bad field."""
    d = dict(runtime_cfg.to_dict() if hasattr(runtime_cfg, "to_dict") else runtime_cfg)
    unknown = sorted(set(d) - set(RUNTIME_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config field(s) {['runtime.' + k for k in unknown]}; allowed: "
                         f"{['runtime.' + k for k in RUNTIME_DEFAULTS]}")
    d = {**RUNTIME_DEFAULTS, **d}
    _choice("runtime.backend", d["backend"], BACKENDS)
    if not isinstance(d["ray_address"], str):
        raise ValueError(f"config field 'runtime.ray_address' must be a string ('' starts a local Ray "
                         f"instance; 'HOST:PORT' joins one), got {d['ray_address']!r}")
    for f, lo_open in (("island_num_cpus", False), ("island_num_gpus", False), ("start_timeout_s", True)):
        v = d[f]
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (
            v > 0 if lo_open else v >= 0)
        if not ok:
            raise ValueError(f"config field 'runtime.{f}' must be a finite number "
                             f"{'> 0' if lo_open else '>= 0'}, got {v!r}")
    v = d["server_num_gpus"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v == -1 or 0 <= v < math.inf):
        raise ValueError(f"config field 'runtime.server_num_gpus' must be -1 (as island_num_gpus) or "
                         f"a finite number >= 0, got {v!r}")
    v = d["island_devices"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"config field 'runtime.island_devices' must be an int >= 1, got {v!r}")
    if not isinstance(d["replace_lost"], bool):
        raise ValueError(f"config field 'runtime.replace_lost' must be a bool, got {d['replace_lost']!r}")
    return d


def islands_from_slices(devices, *, mesh_axes=("data",), prefix: str = "slice") -> list[Island]:
    """One Island per TPU slice: devices grouped by ``device.slice_index`` (missing: slice 0).

    Islands are named ``{prefix}{slice_index}`` in slice order; an island's
    devices keep their order in ``devices``; every slice must have the same
    number of devices (gangs need equal meshes).
    """
    devices = list(devices)
    if not devices:
        raise ValueError("islands_from_slices: devices is empty")
    groups = collections.defaultdict(list)
    for d in devices:
        s = getattr(d, "slice_index", 0)
        if s is None:
            s = 0
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"islands_from_slices: device {d!r} has slice_index={s!r}; expected an int >= 0")
        groups[int(s)].append(d)
    sizes = {s: len(g) for s, g in groups.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"islands_from_slices: slices have different device counts {dict(sorted(sizes.items()))}; "
                         "every island (slice) needs the same mesh")
    mesh_axes = tuple(mesh_axes)
    if len(mesh_axes) != 1:
        raise ValueError(f"islands_from_slices: mesh_axes must name one axis, got {mesh_axes}")
    return [Island(f"{prefix}{s}", tuple(g), Mesh(np.array(g, dtype=object), mesh_axes))
            for s, g in sorted(groups.items())]


def initialize_pathways():
    """``pathwaysutils.initialize()`` (Pathways-on-Cloud); a clear error when it is missing."""
    try:
        pathwaysutils = importlib.import_module("pathwaysutils")
    except ImportError as e:
        raise RuntimeError("runtime.backend='pathways' needs the pathwaysutils package (pip install "
                           "pathwaysutils) on a Cloud TPU VM attached to a Pathways cluster; use "
                           "backend='local' or 'ray' elsewhere") from e
    pathwaysutils.initialize()
    return pathwaysutils


def make_runtime(backend: str = "local", *, islands=None, num_islands: int | None = None, clock="real",
                 links=None, trace: bool = True, devices=None, ray_address: str = "",
                 island_num_cpus: float = 1.0, island_num_gpus: float = 0.0, island_devices: int = 1,
                 start_timeout_s: float = 120.0, **ray_kwargs):
    """A runtime of the chosen backend over ``islands`` (Islands, RayIslands or names).

    local: ``islands`` is a list of Island (default ``make_islands(num_islands, devices)``).
    ray: ``islands`` is a list of RayIsland or names (names get the island_* resources).
    pathways: calls ``pathwaysutils.initialize()``, then one island per slice of ``jax.devices()``.
    """
    _choice("runtime.backend", backend, BACKENDS)
    if backend == "local":
        from pathways_lite.runtime import Runtime
        if islands is None:
            islands = make_islands(num_islands or 1, devices=devices)
        return Runtime(islands, clock=clock, links=links, trace=trace)
    if backend == "pathways":
        import jax
        from pathways_lite.runtime import Runtime
        initialize_pathways()
        return Runtime(islands_from_slices(jax.devices() if devices is None else devices),
                       clock=clock, links=links, trace=trace)
    from pathways_lite.ray_runtime import RayRuntime
    if islands is None:
        islands = [f"island{i}" for i in range(num_islands or 1)]
    specs = [i if isinstance(i, RayIsland) else
             RayIsland(getattr(i, "name", i), num_cpus=island_num_cpus, num_gpus=island_num_gpus,
                       devices=island_devices) for i in islands]
    return RayRuntime(specs, clock=clock, links=links, trace=trace, address=ray_address or None,
                      start_timeout_s=start_timeout_s, **ray_kwargs)


def make_runtime_from_config(runtime_cfg, islands, *, clock="real", links=None, trace=True):
    """``make_runtime`` from the ``runtime`` config section (bad or unknown fields named)."""
    d = runtime_config(runtime_cfg)
    d.pop("replace_lost")       # the outer loops' field
    backend = d.pop("backend")
    return make_runtime(backend, islands=islands, clock=clock, links=links, trace=trace, **d)


def island_specs(runtime, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 island_gpus: dict | None = None) -> list[RayIsland]:
    """The RayIsland of each island of a local ``Runtime`` (``island_gpus`` overrides num_gpus)."""
    island_gpus = island_gpus or {}
    return [RayIsland(i.name, num_cpus=num_cpus, num_gpus=island_gpus.get(i.name, num_gpus),
                      devices=len(i.devices), mesh_axes=tuple(i.mesh.axis_names),
                      mesh_shape=tuple(i.mesh.devices.shape))
            for i in runtime.islands]


def ray_like(runtime, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
             island_gpus: dict | None = None, **ray_kwargs):
    """A RayRuntime with the islands (names, device counts, mesh axes), clock and links of a local
    ``Runtime``: how a loop that builds a local runtime (``outer.topology.make_runtime``) runs on
    Ray instead, unchanged. ``island_gpus`` {name: GPUs} overrides ``num_gpus`` per island.
    The local runtime stays usable; shut it down when done with it."""
    from pathways_lite.clock import VirtualClock
    from pathways_lite.ray_runtime import RayRuntime
    clock = runtime.clock
    if clock.kind == "virtual":
        clock = VirtualClock(speeds=dict(clock.speeds), default=clock.default)
    else:
        clock = "real"
    links = LinkModel(default=runtime.links.default, links=dict(runtime.links._links), symmetric=False)
    specs = island_specs(runtime, num_cpus=num_cpus, num_gpus=num_gpus, island_gpus=island_gpus)
    return RayRuntime(specs, clock=clock, links=links, trace=runtime.trace is not None, **ray_kwargs)


def from_local(runtime_cfg, local, **ray_kwargs):
    """The runtime a run uses, given its ``runtime`` config section and the local Runtime it built:
    ``local`` itself for backend "local", ``ray_like(local)`` (same island names, clock, links)
    for "ray", one island per TPU slice for "pathways". One line in a loop's runtime factory:
    ``return from_local(config.runtime, Runtime(islands, clock=..., links=...))``."""
    d = runtime_config(runtime_cfg)
    if d["backend"] == "local":
        return local
    clock = local.clock if local.clock.kind == "virtual" else "real"
    if d["backend"] == "pathways":
        local.shutdown()
        return make_runtime("pathways", clock=clock, links=local.links, trace=local.trace is not None)
    if d["island_devices"] != 1:
        raise ValueError("config field 'runtime.island_devices' is taken from the local islands' "
                         f"device counts when converting a local runtime; leave it 1, got {d['island_devices']!r}")
    server = {"server": d["server_num_gpus"]} if d["server_num_gpus"] >= 0 else {}
    rt = ray_like(local, num_cpus=d["island_num_cpus"], num_gpus=d["island_num_gpus"], island_gpus=server,
                  address=d["ray_address"] or None, start_timeout_s=d["start_timeout_s"], **ray_kwargs)
    local.shutdown()
    return rt
