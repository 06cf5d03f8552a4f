"""Pure-PyTorch references: the meaning of every geokern op (any device, float64 too)."""

from geokern.reference.hypercomplex import (  # noqa: F401
    octonion_conj,
    octonion_mul,
    quaternion_conj,
    quaternion_mul,
)
