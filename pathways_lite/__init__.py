"""pathways_lite: a single-controller JAX runtime running DiLoCo-family outer loops.

The public API is re-exported here explicitly as the modules land.
"""

__version__ = "0.1.0"
