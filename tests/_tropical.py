"""What the tropical attention test modules share."""

import _helpers
import pytest
import torch

from geokern.ops import tropical as ops


def need(backend, dtype=torch.float32, D=1):
    """_helpers.need, and the CUDA kernel's own limits (float64 and D > 128 go elsewhere)."""
    _helpers.need(backend)
    if backend == "cuda" and (dtype == torch.float64 or D > ops._CUDA_MAX_D):
        pytest.skip("the CUDA kernel takes 16/32-bit inputs and D <= 128 (checked in test_bad_input)")
