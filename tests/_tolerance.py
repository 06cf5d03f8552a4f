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


# unit roundoff: the largest relative error of one rounding to the dtype
UNIT = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def lse_weight_floor(n_keys, max_weight, roundings=4, dtype=torch.float32):
    """The added floor for a result built from weights exp2(s - log2 den) where log2 den, the
    log-sum-exp of up to n_keys weights each at most max_weight (>= 1), is stored and
    recomputed in `dtype` (a flash-style backward from the forward's lse). Every rounding of a
    value of magnitude M = log2(n_keys * max_weight) leaves an absolute error up to UNIT * M in
    the exponent, ln 2 * UNIT * M relative in every weight: the error grows with the log of the
    accumulation length, which the dtype's fixed FLOOR does not. `roundings`: how many times
    the kernel rounds such a value on the way (count them in the kernel)."""
    M = math.log2(max(2.0, n_keys * max(1.0, max_weight)))
    return roundings * math.log(2) * UNIT[dtype] * M


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    den = ref.norm()
    return ((out - ref).norm() / den).item() if den > 0 else (out - ref).norm().item()


def assert_close(name, out, ref64, same_dtype_ref=None, extra_floor=0.0):
    """`out` vs the float64 reference `ref64`, judged by `same_dtype_ref`'s error; extra_floor is
    added to the dtype's FLOOR where the caller derives a larger rounding error (lse_weight_floor)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (unwritten or wrong)"
    base = rel_err(same_dtype_ref, ref64) if same_dtype_ref is not None else 0.0
    if not math.isfinite(base):
        # plain PyTorch overflowed in this dtype (e.g. a float16 sum past 65504 on the GPU): it sets
        # no bound, the dtype's rounding floor alone judges (stricter, never NaN)
        base = 0.0
    bound = FACTOR * base + FLOOR[out.dtype] + extra_floor
    err = rel_err(out, ref64)
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e} (same-dtype torch: {base:.3e}, {out.dtype})"
