"""Drop-in nn.Modules built on geokern ops."""

from geokern.nn.retrieval import GeodesicRetrieval  # noqa: F401
from geokern.nn.tropical import TropicalLinear  # noqa: F401
from geokern.nn.tropical_attention import TropicalCausalSelfAttention  # noqa: F401

__all__ = ["GeodesicRetrieval", "TropicalCausalSelfAttention", "TropicalLinear"]
