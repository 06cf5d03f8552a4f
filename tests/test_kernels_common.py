"""The Triton helpers every family shares (geokern.kernels._common)."""

import pytest
import torch
import triton
import triton.language as tl
from _helpers import dtype_id, need
from conftest import DEVICE

from geokern.kernels._common import narrow


@triton.jit
def _narrow_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # x: [n] float32 -> y: [n] in y's dtype; one program covers BLOCK elements
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(y_ptr + o, narrow(tl.load(x_ptr + o, mask=m), y_ptr.dtype.element_ty), mask=m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_narrow_rounds_to_nearest_even_like_torch(dtype):
    """Every backend's 16-bit outputs are the exactly rounded value (the interpreter's own bf16
    cast truncates on Triton 3.8: 47% of these were off by one ulp before narrow rounded by hand)."""
    need("triton")
    x = torch.randn(4099, device=DEVICE) * torch.logspace(-3, 5, 4099, device=DEVICE)
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, -0.0, 1 + 2**-8], device=DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _narrow_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(dtype)
    assert torch.isnan(y[0]), "narrow: NaN did not stay NaN"
    same = (y[1:].float() == want[1:].float()) | (y[1:].isnan() & want[1:].isnan())
    assert same.all(), f"narrow to {dtype}: {(~same).sum().item()} of {x.numel() - 1} differ from torch's rounding"


def test_host_size_helpers_match_triton():
    """next_pow2 and cdiv are Triton's host helpers in plain Python (theirs cost microseconds a call):
    the same value for every plain int, and Triton's own answer for anything else (a numpy int here,
    a SymInt under torch.compile)."""
    import numpy as np
    import triton

    from geokern.kernels._common import cdiv, next_pow2

    sizes = list(range(0, 4100)) + [2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]
    assert [next_pow2(n) for n in sizes] == [triton.next_power_of_2(n) for n in sizes]
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in sizes[:600] + sizes[-4:] for b in (1, 2, 3, 16, 127, 2**20))
    assert next_pow2(np.int64(300)) == 512 and cdiv(np.int64(300), 7) == 43
