"""Drop-in nn.Modules built on geokern ops, one module per op family."""

from geokern.nn.hypercomplex import OctonionLinear, QuaternionLinear  # noqa: F401
from geokern.nn.hypercomplex_attention import OctonionCausalSelfAttention, QuaternionCausalSelfAttention  # noqa: F401
from geokern.nn.lior import LiorMemory  # noqa: F401
from geokern.nn.maxplus import TropicalLinear  # noqa: F401
from geokern.nn.retrieval import GeodesicRetrieval  # noqa: F401
from geokern.nn.tropical import TropicalCausalSelfAttention  # noqa: F401
from geokern.nn.ultrametric import UltrametricCausalSelfAttention  # noqa: F401

__all__ = [
    "GeodesicRetrieval", "LiorMemory", "OctonionCausalSelfAttention", "OctonionLinear", "QuaternionCausalSelfAttention",
    "QuaternionLinear", "TropicalCausalSelfAttention", "TropicalLinear",
    "UltrametricCausalSelfAttention",
]
