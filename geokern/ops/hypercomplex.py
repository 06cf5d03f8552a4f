"""Quaternion and octonion products and conjugates: checks, backends, autograd.

Public: quaternion_mul, quaternion_conj, octonion_mul, octonion_conj. Each takes
tensors whose last dim is 4 (quaternions, (w, x, y, z)) or 8 (octonions, Cayley-Dickson
pairs of quaternions, see geokern.reference.hypercomplex) and broadcasts the leading
dims. float16 / bfloat16 / float32 / float64; arithmetic in float32 (float64 for
float64). The backward of a product is two products (dA = dC conj(B),
dB = conj(A) dC), summed over broadcast dims in float32.

Edge cases, the same in every backend:
- NaN: every component of a product row reads every component of both operand rows, so
  output row r is all NaN exactly when row r of a or of b (after broadcasting) holds a
  NaN, or when the formula forms inf * 0 or inf - inf there (the reference's arithmetic).
  conj maps NaN to NaN in place.
- Empty leading dims give empty outputs, and gradients of zeros of the inputs' shapes.
- Double backward: supported by every backend (the backward is bilinear; its own
  backward is made of the same products and conjugates), to any order.
- Autocast: not on autocast's lists, like torch.mul: the ops run in their inputs' dtype;
  inside an autocast region mixed float dtypes are promoted to the widest of them (as
  torch.mul promotes them); outside one they are an error.
- No atomics: deterministic. Any CUDA stream, CUDA-graph capture and
  torch.compile(dynamic=True) are supported. Offsets are 64-bit (tensors past 2**31
  elements work).
"""

import torch

from geokern import _backend
from geokern._checks import autocast_promote, FLOAT_DTYPES, broadcast_leading, broadcast_shapes, check_same, check_tensor
from geokern.kernels import hypercomplex as tk
from geokern.ops._registry import bound_once, cuda_op, triton_op
from geokern.reference import hypercomplex as ref

__all__ = ["quaternion_mul", "quaternion_conj", "octonion_mul", "octonion_conj"]

_NAMES = {4: "quaternion", 8: "octonion"}
_PREFER = ("cuda", "triton")  # measured on H100: see benchmarks/results


# ---- custom ops ----------------------------------------------------------------


def _hypercomplex_mul_fake(a, b, n):
    lead = broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return a.new_empty(tuple(lead) + (n,))


def _hypercomplex_mul_backward_fake(grad, a, b, n):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _hypercomplex_conj_fake(a, n):
    return a.new_empty(a.shape)


def _hypercomplex_mul_cpu(a, b, n):
    return ref.hypercomplex_mul(a, b, n)


def _hypercomplex_mul_backward_cpu(grad, a, b, n):
    return ref.hypercomplex_mul_backward(grad, a, b, n)


def _hypercomplex_conj_cpu(a, n):
    return ref.hypercomplex_conj(a, n).contiguous()


def _hypercomplex_mul_triton(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    lead = broadcast_shapes(a.shape[:-1], b.shape[:-1])
    c = a.new_empty(tuple(lead) + (n,))
    return tk.hypercomplex_mul_fwd(a, b, c, lead, n)


def _hypercomplex_mul_backward_triton(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    lead = grad.shape[:-1]
    reduce = tuple(a.shape) != tuple(grad.shape) or tuple(b.shape) != tuple(grad.shape)
    # broadcast dims are summed afterwards: keep the full-shape grads in float32 then
    acc = torch.float32 if reduce and a.dtype != torch.float64 else a.dtype
    da = grad.new_empty(grad.shape, dtype=acc)
    db = grad.new_empty(grad.shape, dtype=acc)
    tk.hypercomplex_mul_bwd(grad.contiguous(), a, b, da, db, lead, n)
    return da.sum_to_size(a.shape).to(a.dtype), db.sum_to_size(b.shape).to(b.dtype)


def _hypercomplex_conj_triton(a: torch.Tensor, n: int) -> torch.Tensor:
    return tk.hypercomplex_conj_fwd(a, a.new_empty(a.shape), n)


# (mul, mul backward, conj) per kernel backend; a CUDA entry is None without geokern._C
_KERNELS = {
    "cuda": (
        cuda_op("hypercomplex_mul_cuda", _hypercomplex_mul_fake, _hypercomplex_mul_cpu),
        cuda_op("hypercomplex_mul_backward_cuda", _hypercomplex_mul_backward_fake, _hypercomplex_mul_backward_cpu),
        cuda_op("hypercomplex_conj_cuda", _hypercomplex_conj_fake, _hypercomplex_conj_cpu),
    ),
    "triton": (
        triton_op("hypercomplex_mul_triton", _hypercomplex_mul_triton),
        triton_op("hypercomplex_mul_backward_triton", _hypercomplex_mul_backward_triton),
        triton_op("hypercomplex_conj_triton", _hypercomplex_conj_triton),
    ),
}


# ---- autograd ------------------------------------------------------------------


@bound_once
class HypercomplexMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(a, b, n, backend):
        return _KERNELS[backend][0](a, b, n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, n, backend = inputs
        ctx.save_for_backward(a, b)
        ctx.n, ctx.backend = n, backend

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # through a Function of its own, so that the backward is differentiable again
        da, db = HypercomplexMulBackwardFunction.apply(grad, a, b, ctx.n, ctx.backend)
        return (da if ctx.needs_input_grad[0] else None), (db if ctx.needs_input_grad[1] else None), None, None


def _sum_to(x, shape):
    """x summed over the dims where `shape` was broadcast, in float32 for 16-bit x."""
    if tuple(x.shape) == tuple(shape):
        return x
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float().sum_to_size(shape).to(x.dtype)
    return x.sum_to_size(shape)


@bound_once
class HypercomplexMulBackwardFunction(torch.autograd.Function):
    """(dA, dB) = (dC conj(B), conj(A) dC), summed to A's and B's shapes: the fused kernel
    forward; its backward (double backward of the product) in the same products.

    Bilinear in (dC, A, B); with upstream (gA, gB) of A's and B's shapes, by the adjoint
    rules <x y, z> = <y, conj(x) z> = <x, z conj(y)> of any composition algebra and
    conj(x y) = conj(y) conj(x):
        d dC = gA B + A gB,   d A = dC conj(gB),   d B = conj(gA) dC
    (the last two summed over broadcast dims)."""

    @staticmethod
    def forward(grad, a, b, n, backend):
        return _KERNELS[backend][1](grad, a, b, n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, a, b, n, backend = inputs
        ctx.save_for_backward(grad, a, b)
        ctx.n, ctx.backend = n, backend

    @staticmethod
    def backward(ctx, ga, gb):
        grad, a, b = ctx.saved_tensors
        n, be = ctx.n, ctx.backend

        def mul(x, y):
            return HypercomplexMulFunction.apply(x, y, n, be)

        def conj(x):
            return HypercomplexConjFunction.apply(x, n, be)

        need = ctx.needs_input_grad
        dg = da = db = None
        if need[0]:
            dg = mul(ga, b) + mul(a, gb)  # shape: the broadcast of a's and b's, grad's
        if need[1]:
            da = _sum_to(mul(grad, conj(gb)), a.shape)
        if need[2]:
            db = _sum_to(mul(conj(ga), grad), b.shape)
        return dg, da, db, None, None


@bound_once
class HypercomplexConjFunction(torch.autograd.Function):
    @staticmethod
    def forward(a, n, backend):
        return _KERNELS[backend][2](a, n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n, ctx.backend = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad):  # conj is linear and its own adjoint (differentiable again)
        return HypercomplexConjFunction.apply(grad, ctx.n, ctx.backend), None, None


# ---- public ops ----------------------------------------------------------------


def _mul(a, b, n, backend):
    op = f"{_NAMES[n]}_mul"
    check_tensor(op, "a", a, dtypes=FLOAT_DTYPES, last_dim=n)
    check_tensor(op, "b", b, dtypes=FLOAT_DTYPES, last_dim=n)
    a, b = autocast_promote(a, b)
    check_same(op, {"a": a, "b": b})
    broadcast_leading(op, "a", a, "b", b)
    be = _backend.resolve(op, backend, a.device, _PREFER)
    if be == "torch":
        return ref.hypercomplex_mul(a, b, n)
    return HypercomplexMulFunction.apply(a, b, n, be)


def _conj(a, n, backend):
    op = f"{_NAMES[n]}_conj"
    check_tensor(op, "a", a, dtypes=FLOAT_DTYPES, last_dim=n)
    be = _backend.resolve(op, backend, a.device, _PREFER)
    if be == "torch":
        return ref.hypercomplex_conj(a, n)
    return HypercomplexConjFunction.apply(a, n, be)


def quaternion_mul(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Hamilton product a b of quaternions (w, x, y, z) in the last dim; leading dims broadcast."""
    return _mul(a, b, 4, backend)


def octonion_mul(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Octonion product a b (Cayley-Dickson over quaternion halves); leading dims broadcast."""
    return _mul(a, b, 8, backend)


def quaternion_conj(a: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """(w, -x, -y, -z)."""
    return _conj(a, 4, backend)


def octonion_conj(a: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """(a0, -a1, ..., -a7)."""
    return _conj(a, 8, backend)
