"""The islands and the runtime of an outer-loop run (`make_run_islands`, `make_runtime`).

Islands: one per worker (`worker<w>`) plus `server`, where the outer
optimizer runs. `outer.islands="virtual"`: all share the first device
(time-sliced; M workers on one CPU or GPU). `"devices"`: worker w gets device
w mod D; the server shares the device of worker `outer.outer_island`.
Islands of several devices (`outer.island_data` x `outer.island_tensor` = k >
1, "devices" only): worker w gets devices [w*k, (w+1)*k) as a mesh with the
model's axes (data, fsdp=1, tensor; models/sharding.py), and the server the
same devices and mesh as worker `outer.outer_island` (one mesh shape for every
island, so a transfer keeps an array's PartitionSpec: global params and
pseudo-gradients stay sharded like the workers' params, and the outer update
runs sharded). The inner computations run on the island's mesh
(`Run.inner_on`, outer/inner.py).
Clock: `outer.clock="virtual"` gives worker w the speed `outer.step_time_s[w]`
simulated seconds per inner step (a phase of H steps costs H units) and the
server speed 0 (the outer update is instant); links carry
`outer.link_bandwidth_gbps` / `outer.link_latency_s` between every pair.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from pathways_lite.clock import VirtualClock
from pathways_lite.islands import Island, make_islands
from pathways_lite.network import Link, LinkModel
from pathways_lite.outer.config import OuterConfig
from pathways_lite.runtime import Runtime

SERVER = "server"


def worker_name(w: int) -> str:
  return f"worker{w}"


def make_run_islands(ocfg: OuterConfig, devices=None) -> list[Island]:
  devices = list(jax.devices() if devices is None else devices)
  M = ocfg.num_workers
  names = [worker_name(w) for w in range(M)] + [SERVER]
  if ocfg.island_devices > 1:
    return _mesh_islands(ocfg, devices, names)
  if ocfg.islands == "virtual":
    return make_islands(M + 1, virtual=True, devices=devices[:1], names=names)
  islands = []
  shared = {}
  for w in range(M):
    shared.setdefault(w % len(devices), []).append(w)
  for w in range(M):
    d = devices[w % len(devices)]
    islands.append(Island(names[w], (d,), Mesh(np.array([d], dtype=object), ("data",)),
                          len(shared[w % len(devices)]) > 1))
  d = devices[ocfg.outer_island % len(devices)]
  islands.append(Island(SERVER, (d,), Mesh(np.array([d], dtype=object), ("data",)), True))
  return islands


def _mesh_islands(ocfg: OuterConfig, devices, names) -> list[Island]:
  """Worker w: devices [w*k, (w+1)*k) as a (data, fsdp=1, tensor) mesh; the server: worker
  outer_island's devices and mesh (a separate Island object, marked shared)."""
  from models.sharding import make_mesh
  k, M = ocfg.island_devices, ocfg.num_workers
  if M * k > len(devices):
    raise ValueError(f"config field 'outer.island_data'/'outer.island_tensor': {M} islands x {k} "
                     f"devices need {M * k} devices, only {len(devices)} available")
  islands = []
  for w in range(M):
    devs = devices[w * k:(w + 1) * k]
    islands.append(Island(names[w], tuple(devs),
                          make_mesh(devs, data=ocfg.island_data, tensor=ocfg.island_tensor)))
  host = islands[ocfg.outer_island]
  islands.append(Island(SERVER, host.devices, host.mesh, True))
  return islands


def make_runtime(ocfg: OuterConfig, devices=None) -> Runtime:
  islands = make_run_islands(ocfg, devices)
  if ocfg.clock == "virtual":
    speeds = {worker_name(w): t for w, t in enumerate(ocfg.step_times)}
    speeds[SERVER] = 0.0
    clock = VirtualClock(speeds=speeds)
  else:
    clock = "real"
  bw = ocfg.link_bandwidth_gbps * 1e9 / 8 if ocfg.link_bandwidth_gbps > 0 else math.inf
  links = LinkModel(default=Link(bandwidth_bytes_per_s=bw, latency_s=ocfg.link_latency_s))
  return Runtime(islands, clock=clock, links=links, trace=True)
