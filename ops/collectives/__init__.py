"""Overlapped collectives: ring all-reduce / reduce-scatter / all-gather and
collective matmuls in Pallas (TPU remote DMAs, Mosaic GPU peer-to-peer), with
lax references, chosen by `implementation=None|"pallas"|"xla"` (see api.py)."""
from ops.collectives.api import IMPLEMENTATIONS
from ops.collectives.api import all_gather
from ops.collectives.api import all_gather_matmul
from ops.collectives.api import all_reduce
from ops.collectives.api import axis_size
from ops.collectives.api import matmul_reduce_scatter
from ops.collectives.api import reduce_scatter
from ops.collectives.bucketing import all_reduce_tree
from ops.collectives.bucketing import plan_buckets
from ops.collectives.bucketing import sync_grads

__all__ = [
    "IMPLEMENTATIONS",
    "all_gather",
    "all_gather_matmul",
    "all_reduce",
    "all_reduce_tree",
    "axis_size",
    "matmul_reduce_scatter",
    "plan_buckets",
    "reduce_scatter",
    "sync_grads",
]
