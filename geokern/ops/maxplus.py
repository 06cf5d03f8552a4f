"""Max-plus / min-plus matrix product: checks, backends, custom ops, autograd.

Public: maxplus_matmul. Definition and conventions (ties to the smallest k, -inf as
the semiring zero, NaN propagation, margin) in geokern.reference.maxplus. Kernels sum
in float32 (float64 for float64 inputs); because rounding is monotone, the result
equals the reference's float64 result rounded to the output dtype, except where
a + b itself overflows or loses bits (operands of very different magnitude).

The backward routes dC along the argmax only; the forward records the argmax whenever
A or B requires grad. dA and dB are accumulated in float32 with atomic adds on the
GPU: their last bits may vary from run to run where several entries share a route. A float32
sum stops counting past 2^24 equal terms (x + 1 == x there), so a buffer whose entries can
gather more than EXACT_FAN_IN terms (a B broadcast over a batch of many rows) accumulates in
float64 instead (float64 atomics): per buffer on the Triton backend, both buffers on the CUDA one
(csrc/maxplus/maxplus.cu applies the same rule).
Under torch.use_deterministic_algorithms(True) the backward scatters with the
reference's scatter_add_ instead (a fixed order; torch's own deterministic kernel). The
backward is linear in dC, so double backward is supported: the gradient of (dA, dB) in
dC gathers along the same route (second derivatives in A and B are zero).

Integer inputs (int16, int32; the sentinel, the overflow marker and the exact range are
documented in geokern.reference.maxplus) run forward only: integer tensors cannot require
grad, so they bypass the autograd Function; margin is float-only. Entries that read an
out-of-range input are the overflow marker in every backend, device-side with no host
sync (CUDA graphs capture it): each kernel flags out-of-range rows of A and columns of B
in the pass that copies (CUDA) or clamps (Triton) the operands and marks the flagged
entries after the product.
"""

import math

import torch

from geokern import _backend
from geokern._checks import FLOAT_DTYPES, broadcast_shapes, check_same, check_tensor
from geokern.kernels import maxplus as tk
from geokern.ops._registry import bound_once, cuda_op, triton_op
from geokern.reference import maxplus as ref

__all__ = ["maxplus_matmul"]

_PREFER = ("cuda", "triton")  # measured on H100: see benchmarks/results
_OP = "maxplus_matmul"
_INT32_MAX = 2**31 - 1
_DTYPES = FLOAT_DTYPES + ref.INT_DTYPES


# ---- custom ops ----------------------------------------------------------------
# forward: (a, b, minplus, want_argmax, want_margin, num_splits) -> (C, argmax, margin);
# outputs not asked for are empty (0 elements); num_splits steers the CUDA kernel's split-K
# (see maxplus_matmul) and is ignored by the others. backward: (grad, argmax, a_shape,
# b_shape) -> (dA, dB) in grad's dtype, summed over broadcast batch dims.


def _out_shape(a, b):
    lead = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return tuple(lead) + (a.shape[-2], b.shape[-1])


def _maxplus_fake(a, b, minplus, want_argmax, want_margin, num_splits):
    shape = _out_shape(a, b)
    c = a.new_empty(shape)
    idx = a.new_empty(shape if want_argmax else (0,), dtype=torch.int64)
    mg = a.new_empty(shape if want_margin else (0,))
    return c, idx, mg


def _maxplus_backward_fake(grad, argmax, a_shape, b_shape):
    return grad.new_empty(a_shape), grad.new_empty(b_shape)


def _semiring_zero(dtype, minplus):
    """The value an empty K gives: -inf / +inf, or the integer sentinel."""
    if dtype.is_floating_point:
        return float("inf") if minplus else float("-inf")
    return ref.int_sentinel(dtype, "minplus" if minplus else "maxplus")


def _maxplus_cpu(a, b, minplus, want_argmax, want_margin, num_splits):
    semiring = "minplus" if minplus else "maxplus"
    if not a.dtype.is_floating_point:  # no margin for integers
        c, idx = ref.maxplus_matmul(a, b, True, False, semiring)
        mg = a.new_empty((0,))
    else:
        c, idx, mg = ref.maxplus_matmul(a, b, True, True, semiring)
    empty = a.new_empty((0,))
    return (
        c.contiguous(),
        idx.contiguous() if want_argmax else empty.to(torch.int64),
        mg.contiguous() if want_margin else empty,
    )


def _maxplus_backward_cpu(grad, argmax, a_shape, b_shape):
    return ref.maxplus_matmul_backward(grad, argmax, a_shape, b_shape)


def _maxplus_triton(
    a: torch.Tensor, b: torch.Tensor, minplus: bool, want_argmax: bool, want_margin: bool, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the Triton kernel has no split-K: num_splits is in the schema that both backends share
    shape = _out_shape(a, b)
    c = a.new_empty(shape)
    idx = a.new_empty(shape if want_argmax else (0,), dtype=torch.int64)
    mg = a.new_empty(shape if want_margin else (0,))
    if a.shape[-1] == 0:  # empty K: the semiring zero, no route
        c.fill_(_semiring_zero(a.dtype, minplus))
        idx.fill_(-1)
        if want_margin:
            mg.fill_(float("inf"))
        return c, idx, mg
    tk.maxplus_fwd(a, b, c, idx if want_argmax else None, mg if want_margin else None, shape[:-2], minplus)
    return c, idx, mg


# Most terms a float32 gradient entry may gather: past 2^24, adding 1 to the sum changes nothing
EXACT_FAN_IN = 2**24


def _accumulator(grad, lead, shape, other):
    """float32, or float64 for float64 grads and for a buffer of `shape` whose entries can
    gather more than EXACT_FAN_IN terms: the batch entries broadcast onto one of its matrices
    times `other` (N for dA, M for dB)."""
    fan_in = math.prod(lead) // max(1, math.prod(shape[:-2])) * other
    return torch.float64 if grad.dtype == torch.float64 or fan_in > EXACT_FAN_IN else torch.float32


def _maxplus_backward_triton(
    grad: torch.Tensor, argmax: torch.Tensor, a_shape: list[int], b_shape: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    lead = tuple(grad.shape[:-2])
    acc_a = _accumulator(grad, lead, a_shape, grad.shape[-1])
    acc_b = _accumulator(grad, lead, b_shape, grad.shape[-2])
    da = grad.new_zeros(a_shape, dtype=acc_a)
    db = grad.new_zeros(b_shape, dtype=acc_b)
    if not tk.batch_layout_ok(lead, da, db):  # rare: many unmergeable batch dims
        da = grad.new_zeros(lead + tuple(a_shape[-2:]), dtype=acc_a)
        db = grad.new_zeros(lead + tuple(b_shape[-2:]), dtype=acc_b)
    tk.maxplus_bwd(grad.contiguous(), argmax.contiguous(), da, db, lead)
    return da.sum_to_size(a_shape).to(grad.dtype), db.sum_to_size(b_shape).to(grad.dtype)


# backend -> (forward op, backward op); the CUDA pair is None without geokern._C
_KERNELS = {
    "cuda": (
        cuda_op("maxplus_cuda", _maxplus_fake, _maxplus_cpu),
        cuda_op("maxplus_backward_cuda", _maxplus_backward_fake, _maxplus_backward_cpu),
    ),
    "triton": (
        triton_op("maxplus_triton", _maxplus_triton),
        triton_op("maxplus_backward_triton", _maxplus_backward_triton),
    ),
}


# ---- autograd ------------------------------------------------------------------


def _route_scatter(grad, idx, a_shape, b_shape, backend):
    """(dA, dB): dC scattered along the route by the backend's backward kernel."""
    if torch.are_deterministic_algorithms_enabled():
        # the kernels' atomic adds land in no fixed order; torch's scatter_add_ is
        # deterministic in this mode (or raises, as torch's own ops do)
        return _maxplus_backward_cpu(grad, idx, a_shape, b_shape)
    return _KERNELS[backend][1](grad, idx, a_shape, b_shape)


@bound_once
class MaxplusMatmulFunction(torch.autograd.Function):
    """(C, argmax, margin) = maxplus(A, B); the gradient follows the argmax route."""

    @staticmethod
    def forward(a, b, minplus, want_argmax, want_margin, num_splits, backend):
        return _KERNELS[backend][0](a, b, minplus, want_argmax, want_margin, num_splits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, minplus, want_argmax, want_margin, num_splits, backend = inputs
        c, idx, mg = output
        ctx.mark_non_differentiable(idx, mg)
        ctx.save_for_backward(idx)
        ctx.a_shape, ctx.b_shape, ctx.backend = list(a.shape), list(b.shape), backend

    @staticmethod
    def backward(ctx, grad, _gidx, _gmg):
        (idx,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the backward itself is differentiated
            da, db = MaxplusBackwardFunction.apply(grad, idx, ctx.a_shape, ctx.b_shape, ctx.backend)
        else:
            da, db = _route_scatter(grad, idx, ctx.a_shape, ctx.b_shape, ctx.backend)
        return (
            da if ctx.needs_input_grad[0] else None,
            db if ctx.needs_input_grad[1] else None,
            None, None, None, None, None,
        )


@bound_once
class MaxplusBackwardFunction(torch.autograd.Function):
    """(dA, dB) = the route scatter of dC; differentiable in dC (double backward)."""

    @staticmethod
    def forward(grad, idx, a_shape, b_shape, backend):
        return _route_scatter(grad, idx, a_shape, b_shape, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, idx, a_shape, b_shape, backend = inputs
        ctx.save_for_backward(idx)
        ctx.a_shape, ctx.b_shape = a_shape, b_shape

    @staticmethod
    def backward(ctx, gda, gdb):
        # linear in dC: d<gda, dA> / d dC[i, j] = gda[i, argmax], likewise gdb
        (idx,) = ctx.saved_tensors
        lead = tuple(idx.shape[:-2])
        M, N, K = idx.shape[-2], idx.shape[-1], ctx.a_shape[-1]
        gg = None
        if K > 0 and gda is not None:
            gg = gda.expand(*lead, M, K).gather(-1, idx)
        if K > 0 and gdb is not None:
            t = gdb.expand(*lead, K, N).gather(-2, idx)
            gg = t if gg is None else gg + t
        if gg is None:
            gg = idx.new_zeros(idx.shape, dtype=(gda if gda is not None else gdb).dtype)
        return gg, None, None, None, None


# ---- public op -----------------------------------------------------------------


def _check(A, B, return_argmax, return_margin, semiring, num_splits):
    check_tensor(_OP, "A", A, dtypes=_DTYPES, min_dim=2)
    check_tensor(_OP, "B", B, dtypes=_DTYPES, min_dim=2)
    check_same(_OP, {"A": A, "B": B})
    if A.shape[-1] != B.shape[-2]:
        raise ValueError(
            f"{_OP}: A (..., M, K) and B (..., K, N) disagree on K: A has shape {tuple(A.shape)}, "
            f"B has shape {tuple(B.shape)}"
        )
    try:
        broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{_OP}: batch dims of A {tuple(A.shape)} and B {tuple(B.shape)} do not broadcast"
        ) from None
    if semiring not in ref.SEMIRINGS:
        raise ValueError(f"{_OP}: semiring must be one of {ref.SEMIRINGS}, got {semiring!r}")
    for name, flag in (("return_argmax", return_argmax), ("return_margin", return_margin)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_OP}: {name} must be a bool, got {type(flag).__name__}")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool):
        raise TypeError(f"{_OP}: num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"{_OP}: num_splits must be >= 0 (0: choose), got {num_splits}")
    if return_margin and not A.dtype.is_floating_point:
        raise TypeError(f"{_OP}: return_margin is float-only, got {A.dtype} inputs (argmax is supported)")


def maxplus_matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    return_argmax: bool = False,
    return_margin: bool = False,
    semiring: str = "maxplus",
    num_splits: int = 0,
    backend: str | None = None,
):
    """C[..., i, j] = max_k A[..., i, k] + B[..., k, j] (min_k for semiring="minplus").

    A is (..., M, K), B is (..., K, N); batch dims broadcast; any strides. Returns C, or
    (C, argmax) / (C, margin) / (C, argmax, margin) as asked: argmax (int64) is the
    winning k (ties -> smallest k), margin the gap to the runner-up (see
    geokern.reference.maxplus). Differentiable in A and B along the argmax route.

    NaN: C[..., i, j] (and its margin) is NaN exactly when a sum it reads is NaN: a NaN in
    row i of A or column j of B, or -inf + inf; argmax there is some k in [0, K). A tie
    has margin 0, at infinity too. Empty inputs give empty outputs (K = 0: the semiring
    zero, argmax -1, margin +inf) and zero gradients of the inputs' shapes.

    Also takes int16 / int32 (forward only, no margin): the dtype's minimum acts as -inf
    for max-plus, its maximum as +inf for min-plus (the sentinel); exact for inputs in
    [-INT_BOUND, INT_BOUND] = [-5460, 5460] (int16), [-357913940, 357913940] (int32) or the
    sentinel. An entry that reads any other value (row i of A, column j of B) is the
    overflow marker ref.int_overflow (the opposite extreme: iinfo.max for max-plus,
    iinfo.min for min-plus), argmax 0: check `(C == marker).any()`; results beyond
    INT_BOUND are marked when fed back in. The check runs on the device, no host sync, in
    every backend: the kernels flag out-of-range rows of A and columns of B in the pass that
    copies (CUDA) or clamps (Triton) the operands, and mark the flagged entries after the
    product (no extra pass over A, B or C).

    num_splits (CUDA backend; the others ignore it): how many slices of K the kernel
    computes in parallel and combines in k order (split-K, for outputs with too few tiles to
    fill the GPU: skinny M or N, long K). 0 (default) chooses: enough slices for two blocks
    per SM when the output tiles alone are too few, each slice at least 256 k. n forces n
    slices (at most 256 and one per 32 k; 1 turns split-K off). Results, ties included, are
    the same for every value; with return_margin K is never split.
    """
    _check(A, B, return_argmax, return_margin, semiring, num_splits)
    be = _backend.resolve(_OP, backend, A.device, _PREFER)
    if be == "torch":
        return ref.maxplus_matmul(A, B, return_argmax, return_margin, semiring)
    # the kernels pad M and N up to a multiple of 128 (CUDA) in 32-bit sizes: keep room for it
    M, N = A.shape[-2], B.shape[-1]
    if max(A.shape[-2] * A.shape[-1], B.shape[-2] * B.shape[-1], M * N, M + 128, N + 128) > _INT32_MAX:
        raise ValueError(
            f"{_OP}: backend {be!r} indexes one matrix with 32-bit offsets; A {tuple(A.shape)} or "
            f"B {tuple(B.shape)} has a matrix of more than 2**31 - 1 elements (use backend='torch')"
        )
    if not A.dtype.is_floating_point:  # integers carry no gradient: no autograd Function
        c, idx, _ = _KERNELS[be][0](A, B, semiring == "minplus", return_argmax, False, num_splits)
        return (c, idx) if return_argmax else c
    need_route = torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)
    c, idx, mg = MaxplusMatmulFunction.apply(
        A, B, semiring == "minplus", return_argmax or need_route, return_margin, num_splits, be
    )
    out = (c,)
    if return_argmax:
        out += (idx,)
    if return_margin:
        out += (mg,)
    return out[0] if len(out) == 1 else out
