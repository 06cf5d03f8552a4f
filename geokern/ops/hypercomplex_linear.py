"""Quaternion and octonion linear layers: checks, backends, custom ops, autograd.

Public: quaternion_linear(x, Wr, Wi, Wj, Wk, bias=None), octonion_linear(x, W0, ..., W7,
bias=None). y = x @ expand_weight(W)^T + bias (geokern.reference.hypercomplex): each
component W_c is [out/n, in/n] in nn.Linear orientation, the features are n blocks
[r | i | j | k] (octonions: [e0 | ... | e7]), and output quaternion o is
sum_i W[o, i] (x) x_i, the Hamilton (Cayley-Dickson) product with the weight on the left.

The Triton kernels (geokern.kernels.hypercomplex_linear) are one tensor-core GEMM with
float32 accumulation whose weight tiles are read from the component matrices with a sign,
forward and dx, and one that reduces dW straight into the n component matrices; the
n x n expanded weight never exists. float16 / bfloat16 / float32 (tf32 as nn.Linear
uses it: when torch.get_float32_matmul_precision() is not "highest"); float64 runs on the
reference (backend="torch"). The CUDA backend of these ops is not built yet: asking for it
is an error.

Edge cases, the same in every backend:
- Autocast: as nn.Linear. Inside an autocast region x, the weights and the bias are cast
  to the region's dtype (torch.get_autocast_dtype) before the op, so the output is in that
  dtype and the gradients flow back to the parameters in theirs. (torch.library's
  register_autocast casts to one fixed dtype whatever the region asks, so it is not used.)
- Empty batch: an empty output; dW is zeros, db zeros.
- Leading dims of x are any (a 3-D (batch, seq, features) input works); x may be strided.
- Double backward: the torch backend only (the kernels refuse create_graph=True).
"""

import torch

from geokern import _backend
from geokern._checks import FLOAT_DTYPES, check_same, check_tensor
from geokern.kernels import hypercomplex_linear as tk
from geokern.ops._registry import bound_once, refuse_double_backward, triton_op
from geokern.reference import hypercomplex as ref

__all__ = ["quaternion_linear", "octonion_linear"]

_NAMES = {4: "quaternion_linear", 8: "octonion_linear"}
_PREFER = ("triton",)  # no CUDA kernel yet
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _precision(dtype):
    """tl.dot's input precision: tf32 for float32 when torch's matmuls use it (nn.Linear's rule)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _shared_strides(weights):
    """The components with one common stride pair (what the kernels index with)."""
    s = weights[0].stride()
    if all(w.stride() == s for w in weights[1:]):
        return list(weights)
    return [w.contiguous() for w in weights]


# ---- custom ops ----------------------------------------------------------------
# forward: (x [M, n I], weights n x [O, I], bias [n O] or None) -> y [M, n O].
# backward: (grad [M, n O], x, weights, need_input, need_weight, need_bias) ->
# (dx [M, n I], dw [n, O, I], db [n O]); a gradient not asked for is empty (0 elements).
# torch.library.triton_op traces the bodies for their fakes (wrap_triton skips the kernels).


def _linear_triton(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    n = len(weights)
    out = x.new_empty((x.shape[0], n * weights[0].shape[0]))
    _, sign = ref.left_mul_blocks(n)
    return tk.hypercomplex_linear_fwd(x, _shared_strides(weights), None if bias is None else bias.contiguous(),
                                      out, sign, _precision(x.dtype))


def _linear_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], need_input: bool, need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, (O, I) = len(weights), weights[0].shape
    _, sign = ref.left_mul_blocks(n)
    prec = _precision(x.dtype)
    dx, dw, db = x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))
    if need_input:
        dx = tk.hypercomplex_linear_bwd_input(grad, _shared_strides(weights), x.new_empty(x.shape), sign, prec)
    if need_weight:
        dw = tk.hypercomplex_linear_bwd_weight(grad, x, x.new_empty((n, O, I)), sign, prec)
    if need_bias:
        db = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return dx, dw, db


# n -> (forward op, backward op): geokern::<op>_triton, geokern::<op>_backward_triton
_KERNELS = {
    n: (triton_op(f"{name}_triton", _linear_triton), triton_op(f"{name}_backward_triton", _linear_backward_triton))
    for n, name in _NAMES.items()
}


# ---- autograd ------------------------------------------------------------------


@bound_once
class HypercomplexLinearFunction(torch.autograd.Function):
    """y = x @ expand(W)^T + bias on the Triton kernels; x is 2-D [M, n I]."""

    @staticmethod
    def forward(x, bias, *weights):
        return _KERNELS[len(weights)][0](x, list(weights), bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, *weights = inputs
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        n = len(ctx.saved_tensors) - 1
        refuse_double_backward(_NAMES[n])
        x, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = _KERNELS[n][1](grad.contiguous(), x, weights, need[0], any(need[2:]), need[1] and ctx.has_bias)
        dws = dw.unbind(0) if any(need[2:]) else (None,) * n
        return (dx if need[0] else None, db if need[1] and ctx.has_bias else None, *dws)


# ---- public ops ----------------------------------------------------------------


def _autocast(x, weights, bias):
    """nn.Linear's autocast rule: every floating input in the region's dtype."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, weights, bias
    dt = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t if t is None or t.dtype == dt or not t.is_floating_point() else t.to(dt)

    return cast(x), [cast(w) for w in weights], cast(bias)


def _check(op, n, x, weights, bias):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    names = ["Wr", "Wi", "Wj", "Wk"] if n == 4 else [f"W{c}" for c in range(n)]
    for name, w in zip(names, weights):
        check_tensor(op, name, w, dtypes=FLOAT_DTYPES, min_dim=2)
        if w.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D [out_features/{n}, in_features/{n}], got shape {tuple(w.shape)}")
        if w.shape != weights[0].shape:
            raise ValueError(f"{op}: {name} has shape {tuple(w.shape)} but {names[0]} has {tuple(weights[0].shape)}; "
                             "the components share one shape [out_features/{n}, in_features/{n}]".replace("{n}", str(n)))
    named = {"x": x, **dict(zip(names, weights))}
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES)
        named["bias"] = bias
    check_same(op, named)
    O, I = weights[0].shape
    if x.shape[-1] % n != 0:
        raise ValueError(f"{op}: x's last dim (in_features) must be a multiple of {n}, got shape {tuple(x.shape)}")
    if x.shape[-1] != n * I:
        raise ValueError(f"{op}: x's last dim (in_features) must be {n} * {names[0]}.shape[1] = {n * I}, "
                         f"got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n * O,):
        raise ValueError(f"{op}: bias must have shape ({n * O},) = ({n} * {names[0]}.shape[0],), got {tuple(bias.shape)}")


def _linear(x, weights, bias, backend):
    n = len(weights)
    op = _NAMES[n]
    _check(op, n, x, weights, bias)
    x, weights, bias = _autocast(x, weights, bias)
    requested = _backend.DEFAULT_BACKEND if backend is None else backend
    if requested == "cuda":
        raise RuntimeError(f"{op}: backend='cuda' is unavailable: the CUDA kernel of this op is not built yet "
                           "(use backend='triton' or 'torch')")
    be = _backend.resolve(op, backend, x.device, _PREFER)
    if be == "triton" and x.dtype not in _TRITON_DTYPES:
        if backend in (None, "auto"):
            be = "torch"  # float64: the reference is the float64 implementation
        else:
            raise TypeError(f"{op}: backend='triton' takes float16, bfloat16 or float32, got {x.dtype} "
                            "(backend='torch' runs float64)")
    if be == "torch":
        return ref.hypercomplex_linear(x, weights, bias)
    lead = x.shape[:-1]
    y = HypercomplexLinearFunction.apply(x.reshape(-1, x.shape[-1]), bias, *weights)
    return y.reshape(*lead, y.shape[-1])


def quaternion_linear(x, Wr, Wi, Wj, Wk, bias=None, *, backend: str | None = None) -> torch.Tensor:
    """Quaternion linear layer: x [..., in] -> [..., out], components [out/4, in/4] each
    (nn.Linear orientation), features in blocks [r | i | j | k]; equals
    F.linear(x, [[Wr, -Wi, -Wj, -Wk], [Wi, Wr, -Wk, Wj], [Wj, Wk, Wr, -Wi], [Wk, -Wj, Wi, Wr]], bias)."""
    return _linear(x, [Wr, Wi, Wj, Wk], bias, backend)


def octonion_linear(x, W0, W1, W2, W3, W4, W5, W6, W7, bias=None, *, backend: str | None = None) -> torch.Tensor:
    """Octonion linear layer: as quaternion_linear with eight components [out/8, in/8] and
    the Cayley-Dickson table (geokern.reference.hypercomplex.left_mul_blocks(8))."""
    return _linear(x, [W0, W1, W2, W3, W4, W5, W6, W7], bias, backend)
