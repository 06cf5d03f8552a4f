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

Quaternion and octonion linear layers: quaternion_linear(x, Wr, Wi, Wj, Wk, bias=None),
octonion_linear(x, W0, ..., W7, bias=None).
y = x @ expand_weight(W)^T + bias (geokern.reference.hypercomplex): each component W_c is [out/n, in/n] in nn.Linear orientation, the features are n blocks
[r | i | j | k] (octonions: [e0 | ... | e7]), and output quaternion o is
sum_i W[o, i] (x) x_i, the Hamilton (Cayley-Dickson) product with the weight on the left.

The Triton kernels (geokern.kernels.hypercomplex_linear) are one tensor-core GEMM with
float32 accumulation whose weight tiles are read from the component matrices with a sign,
forward and dx, and one that reduces dW straight into the n component matrices; the
forward of at most decode_max_rows rows (64 by default, not yet timed) runs a decode kernel
instead, one program per column tile of all n output blocks, which reads each weight element
once instead of n times (the backward keeps the GEMM kernels); more rows run the GEMM kernel
in variant gemm_variant ("stepwise", the default, or "blocked": a K loop per component block
with the sign on the accumulator, not yet timed; dx always runs "stepwise"); the
n x n expanded weight never exists. float16 / bfloat16 / float32 (tf32 as nn.Linear
uses it: when torch.get_float32_matmul_precision() is not "highest"); float64 runs on the
reference (backend="torch"). The CUDA backend of these ops is not built yet: asking for it
is an error.

The layers' edge cases, the same in every backend:
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
from geokern._checks import autocast_promote, FLOAT_DTYPES, broadcast_leading, broadcast_shapes, check_same, check_tensor
from geokern.kernels import hypercomplex as tk
from geokern.kernels import hypercomplex_linear as tkl
from geokern.ops._registry import bound_once, cuda_op, refuse_double_backward, triton_op
from geokern.reference import hypercomplex as ref

__all__ = ["quaternion_mul", "quaternion_conj", "octonion_mul", "octonion_conj", "quaternion_linear", "octonion_linear"]

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


_LINEAR_NAMES = {4: "quaternion_linear", 8: "octonion_linear"}
_LINEAR_PREFER = ("triton",)  # no CUDA kernel yet
_LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# n -> the sign table of left multiplication, read once here: left_mul_blocks derives it with
# tensor ops, which torch.compile traced inside the ops' bodies as data-dependent values
# (fullgraph failed on the H100: "Could not guard on data-dependent expression Eq(u0, 1)")
_LINEAR_SIGNS = {n: ref.left_mul_blocks(n)[1] for n in _LINEAR_NAMES}


def _matmul_precision(dtype):
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


# ---- linear layers: custom ops ----------------------------------------------------------------
# forward: (x [M, n I], weights n x [O, I], bias [n O] or None) -> y [M, n O].
# backward: (grad [M, n O], x, weights, need_input, need_weight, need_bias) ->
# (dx [M, n I], dw [n, O, I], db [n O]); a gradient not asked for is empty (0 elements).
# torch.library.triton_op traces the bodies for their fakes (wrap_triton skips the kernels).


def _linear_triton(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                   decode_max_rows: int = tkl.DECODE_MAX_ROWS, decode_block_n: int = 0,
                   decode_splits: int = 0, gemm_variant: str = tkl.GEMM_VARIANT) -> torch.Tensor:
    n = len(weights)
    out = x.new_empty((x.shape[0], n * weights[0].shape[0]))
    return tkl.hypercomplex_linear_fwd(x, _shared_strides(weights), None if bias is None else bias.contiguous(),
                                      out, _LINEAR_SIGNS[n], _matmul_precision(x.dtype), decode_max_rows, decode_block_n,
                                      decode_splits, gemm_variant)


def _linear_backward_triton(
    grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], need_input: bool, need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, (O, I) = len(weights), weights[0].shape
    sign = _LINEAR_SIGNS[n]
    prec = _matmul_precision(x.dtype)
    dx, dw, db = x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))
    if need_input:
        dx = tkl.hypercomplex_linear_bwd_input(grad, _shared_strides(weights), x.new_empty(x.shape), sign, prec)
    if need_weight:
        dw = tkl.hypercomplex_linear_bwd_weight(grad, x, x.new_empty((n, O, I)), sign, prec)
    if need_bias:
        db = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return dx, dw, db


# n -> (forward op, backward op): geokern::<op>_triton, geokern::<op>_backward_triton
_LINEAR_KERNELS = {
    n: (triton_op(f"{name}_triton", _linear_triton), triton_op(f"{name}_backward_triton", _linear_backward_triton))
    for n, name in _LINEAR_NAMES.items()
}


# ---- linear layers: autograd ------------------------------------------------------------------


@bound_once
class HypercomplexLinearFunction(torch.autograd.Function):
    """y = x @ expand(W)^T + bias on the Triton kernels; x is 2-D [M, n I]; knobs: the forward's
    (decode_max_rows, decode_block_n, decode_splits, gemm_variant)."""

    @staticmethod
    def forward(x, bias, knobs, *weights):
        return _LINEAR_KERNELS[len(weights)][0](x, list(weights), bias, *knobs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, _, *weights = inputs
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        n = len(ctx.saved_tensors) - 1
        refuse_double_backward(_LINEAR_NAMES[n])
        x, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = _LINEAR_KERNELS[n][1](grad.contiguous(), x, weights, need[0], any(need[3:]), need[1] and ctx.has_bias)
        dws = dw.unbind(0) if any(need[3:]) else (None,) * n
        return (dx if need[0] else None, db if need[1] and ctx.has_bias else None, None, *dws)


# ---- linear layers: public ops ----------------------------------------------------------------


def _linear_autocast(x, weights, bias):
    """nn.Linear's autocast rule: every floating input in the region's dtype."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, weights, bias
    dt = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t if t is None or t.dtype == dt or not t.is_floating_point() else t.to(dt)

    return cast(x), [cast(w) for w in weights], cast(bias)


def _linear_check(op, n, x, weights, bias):
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


def _check_decode_knobs(op, max_rows, block_n, splits, gemm_variant=tkl.GEMM_VARIANT):
    if not isinstance(gemm_variant, str) or gemm_variant not in tkl.GEMM_VARIANTS:
        raise ValueError(f"{op}: gemm_variant must be one of {', '.join(map(repr, tkl.GEMM_VARIANTS))}, "
                         f"got {gemm_variant!r}")
    for name, v in (("decode_max_rows", max_rows), ("decode_splits", splits)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{op}: {name} must be an int >= 0 (0: {'never the decode kernel' if name == 'decode_max_rows' else 'the plan picks'}), got {v!r}")
    if isinstance(block_n, bool) or not isinstance(block_n, int) or (block_n != 0 and (block_n < 16 or block_n & (block_n - 1))):
        raise ValueError(f"{op}: decode_block_n must be 0 (the plan picks) or a power of two >= 16, got {block_n!r}")


def _linear(x, weights, bias, backend, decode_max_rows=tkl.DECODE_MAX_ROWS, decode_block_n=0, decode_splits=0,
            gemm_variant=tkl.GEMM_VARIANT):
    n = len(weights)
    op = _LINEAR_NAMES[n]
    _linear_check(op, n, x, weights, bias)
    x, weights, bias = _linear_autocast(x, weights, bias)
    requested = _backend.requested(backend)
    if requested == "cuda":
        raise RuntimeError(f"{op}: backend='cuda' is unavailable: the CUDA kernel of this op is not built yet "
                           "(use backend='triton' or 'torch')")
    be = _backend.resolve(op, backend, x.device, _LINEAR_PREFER)
    if be == "triton" and x.dtype not in _LINEAR_DTYPES:
        if backend in (None, "auto"):
            be = "torch"  # float64: the reference is the float64 implementation
        else:
            raise TypeError(f"{op}: backend='triton' takes float16, bfloat16 or float32, got {x.dtype} "
                            "(backend='torch' runs float64)")
    if be == "torch":
        return ref.hypercomplex_linear(x, weights, bias)
    _check_decode_knobs(op, decode_max_rows, decode_block_n, decode_splits, gemm_variant)
    lead = x.shape[:-1]
    knobs = (decode_max_rows, decode_block_n, decode_splits, gemm_variant)
    y = HypercomplexLinearFunction.apply(x.reshape(lead.numel(), x.shape[-1]), bias, knobs, *weights)  # in may be 0
    return y.reshape(*lead, y.shape[-1])


def quaternion_linear(x, Wr, Wi, Wj, Wk, bias=None, *, backend: str | None = None,
                      decode_max_rows: int = tkl.DECODE_MAX_ROWS, decode_block_n: int = 0,
                      decode_splits: int = 0, gemm_variant: str = tkl.GEMM_VARIANT) -> torch.Tensor:
    """Quaternion linear layer: x [..., in] -> [..., out], components [out/4, in/4] each
    (nn.Linear orientation), features in blocks [r | i | j | k]; equals
    F.linear(x, [[Wr, -Wi, -Wj, -Wk], [Wi, Wr, -Wk, Wj], [Wj, Wk, Wr, -Wi], [Wk, -Wj, Wi, Wr]], bias).

    Triton forward knobs: at most decode_max_rows rows (of x flattened to 2-D) run the decode
    kernel, which reads each weight element once (0: always the GEMM kernel); decode_block_n
    and decode_splits are its column tile and K-slice count (0: its plan's choice; see
    geokern.kernels.hypercomplex_linear.decode_plan). More rows run the GEMM kernel in variant
    gemm_variant: "stepwise" (the default until timed: one K loop over all blocks, each x tile
    sign-flipped in registers) or "blocked" (a K loop per block, the sign on the accumulator).
    The result is the same up to rounding (the two GEMM variants: the same sums, bit for bit
    under the interpreter)."""
    return _linear(x, [Wr, Wi, Wj, Wk], bias, backend, decode_max_rows, decode_block_n, decode_splits,
                   gemm_variant)


def octonion_linear(x, W0, W1, W2, W3, W4, W5, W6, W7, bias=None, *, backend: str | None = None,
                    decode_max_rows: int = tkl.DECODE_MAX_ROWS, decode_block_n: int = 0,
                    decode_splits: int = 0, gemm_variant: str = tkl.GEMM_VARIANT) -> torch.Tensor:
    """Octonion linear layer: as quaternion_linear with eight components [out/8, in/8] and
    the Cayley-Dickson table (geokern.reference.hypercomplex.left_mul_blocks(8)); the same
    Triton forward knobs."""
    return _linear(x, [W0, W1, W2, W3, W4, W5, W6, W7], bias, backend, decode_max_rows, decode_block_n,
                   decode_splits, gemm_variant)
