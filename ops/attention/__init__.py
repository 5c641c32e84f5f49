"""Flash attention: reference (the spec), Pallas kernels (Mosaic GPU, Mosaic TPU), api."""
from ops.attention.api import IMPLEMENTATIONS, dot_product_attention

__all__ = ["IMPLEMENTATIONS", "dot_product_attention"]
