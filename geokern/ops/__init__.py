"""geokern's public ops, one module per op family."""

from geokern.ops.hypercomplex import (  # noqa: F401
    octonion_conj,
    octonion_mul,
    quaternion_conj,
    quaternion_mul,
)

__all__ = ["octonion_conj", "octonion_mul", "quaternion_conj", "quaternion_mul"]
