"""pathways_lite: a single-controller JAX runtime running DiLoCo-family outer loops.

    import pathways_lite as pl
    islands = pl.make_islands(2)
    with pl.Runtime(islands, clock="virtual") as rt:
      f = rt.call(step, x, island=islands[0].name)
      g = rt.call(step, f, island=islands[1].name)   # the transfer is inserted
      print(g.result())

The outer loops live in `pathways_lite.outer` (`outer.run(config, workdir)`),
Ray-hosted islands in `pathways_lite.ray_islands` (`make_runtime(backend="ray")`;
Ray itself is imported only when a Ray runtime is made).
"""
from pathways_lite.checkpoint import Checkpointer, CheckpointError, SavePolicy
from pathways_lite.clock import RealClock, VirtualClock
from pathways_lite.futures import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future,
                                   as_completed, wait)
from pathways_lite.islands import GANG_AXIS, Island, make_islands
from pathways_lite.network import Link, LinkModel
from pathways_lite.ray_islands import IslandLost, RayIsland, make_runtime  # Ray imported on use
from pathways_lite.runtime import Runtime
from pathways_lite.trace import Trace

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "GANG_AXIS",
    "Checkpointer", "CheckpointError", "Future", "Island", "IslandLost", "Link", "LinkModel",
    "RayIsland", "RealClock", "Runtime", "SavePolicy", "Trace", "VirtualClock",
    "as_completed", "make_islands", "make_runtime", "wait",
]
