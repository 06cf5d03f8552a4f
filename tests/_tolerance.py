"""One table of tolerances for the whole suite, and the comparison every test uses.

A result is judged against the float64 reference the way flash-attention judges it:
its relative error ||out - ref|| / ||ref|| may be at most FACTOR times the error the
same-dtype PyTorch reference makes, plus a rounding floor for the dtype.
"""

import math

import torch

FACTOR = 2.0
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    den = ref.norm()
    return ((out - ref).norm() / den).item() if den > 0 else (out - ref).norm().item()


def assert_close(name, out, ref64, same_dtype_ref=None):
    """`out` vs the float64 reference `ref64`, judged by `same_dtype_ref`'s error."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (unwritten or wrong)"
    base = rel_err(same_dtype_ref, ref64) if same_dtype_ref is not None else 0.0
    if not math.isfinite(base):
        # plain PyTorch overflowed in this dtype (e.g. a float16 sum past 65504 on the GPU): it sets
        # no bound, the dtype's rounding floor alone judges (stricter, never NaN)
        base = 0.0
    bound = FACTOR * base + FLOOR[out.dtype]
    err = rel_err(out, ref64)
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e} (same-dtype torch: {base:.3e}, {out.dtype})"
