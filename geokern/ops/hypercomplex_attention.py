"""Quaternion rotor-gate attention and octonion attention: checks, backends, custom ops, autograd.

Public: quaternion_attention, octonion_attention (issue #20). The definition, the channel
layout (D / n channels of n consecutive components) and the choices where the spec is silent
are in geokern.reference.hypercomplex_attention.

The Triton kernels (geokern.kernels.hypercomplex_attention) fuse everything after the per-channel
normalisation: scores, causal mask, online softmax, the values built on chip (conj(k^) v, or
for octonions the 8 x 8 outer product per channel, whose softmax average is contracted with q^
by the structure constants in the epilogue: the trilinear form of ((q^ conj(k^)) v)), and the
backward recomputed from the log-sum-exp; a query block whose average comes out non-finite (an
inf in a visible v, or a causally hidden key's NaN / inf that the GEMM met with p = 0) is recomputed
with each non-finite key's terms formed key by key for the rows that see it (octonions: with the
definition's parenthesisation; octonion_attention says what that gives), and the backward kernels
do the same for a block whose gradients come out non-finite. A causally hidden key contributes
nothing, whatever its k and v (quaternion_attention says so). The normalisation q^ = q / |q| per channel runs in
PyTorch before the kernel (elementwise, with the reference's code), so its gradient is
autograd's; the kernel takes (q, k, v, q^, k^) and returns the gradients of all five.

Causal masking follows the tropical op (their causal_attn_mask): Tq == Tk prefill is lower
triangular, Tq == 1 (one-token decode) sees every key, Tk > Tq (chunked decode) sees the prefix
plus causal within the chunk. causal=False lets every query see every key. k and v may have
fewer heads than q (grouped-query attention), read in place.

Backends: "triton" and "torch" (the reference, and float64); backend="cuda" raises: its CUDA
kernels are not built yet (issue #20 brings the Triton path only). Sums are in float32; P and the
values meet the tensor cores in the input dtype (float32: exact "ieee" dots), as in flash
attention. Empty inputs (B, H or Tq zero) give empty outputs and zero gradients. Double backward
through the kernels is refused (backend="torch" supports it). Sizes: B * H <= 65535.
"""

import functools
import math
import numbers

import torch

from geokern import _backend
from geokern._checks import FLOAT_DTYPES, autocast_promote, check_grid_rows, check_same, check_tensor
from geokern.kernels import hypercomplex_attention as tk
from geokern.ops._registry import bound_once, refuse_double_backward, triton_op
from geokern.reference import hypercomplex_attention as ref

__all__ = ["quaternion_attention", "octonion_attention"]

_NAMES = {4: "quaternion_attention", 8: "octonion_attention"}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NO_CUDA = ("backend='cuda' is not built for {op} (its CUDA kernels are still to come: issue #20 brought the "
            "Triton kernels only); use backend='triton' or 'torch'")


@functools.lru_cache(None)
def _epilogue(device):
    """(E, E^T) float32 on `device`: the octonion epilogue matrix from the one multiplication
    table (reference.epilogue_matrix); the quaternion kernels take it and never read it."""
    e = ref.epilogue_matrix(8).to(device=device, dtype=torch.float32)
    return e, e.t().contiguous()


# ---- custom ops ----------------------------------------------------------------------
# forward: (q, k, v, qn, kn, e, et, causal, scale, n) -> (y, lse float32 (B, H, Tq)).
# backward: (grad, q, k, v, qn, kn, e, et, y, lse, causal, scale, n) -> (dq, dqn, dk, dkn, dv).


def _hypercomplex_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, e: torch.Tensor,
    et: torch.Tensor, causal: bool, scale: float, n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    tk.hypercomplex_attention_fwd(q, k, v, qn, kn, e, y, lse, causal, float(scale), n)
    return y, lse


def _hypercomplex_attention_backward_triton(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor,
    e: torch.Tensor, et: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dqn = q.new_empty(q.shape), q.new_empty(q.shape)
    dk, dkn, dv = k.new_empty(k.shape), k.new_empty(k.shape), k.new_empty(k.shape)
    tk.hypercomplex_attention_bwd(q, k, v, qn, kn, e, et, grad.contiguous(), y, lse, dq, dqn, dk, dkn, dv,
                                  causal, float(scale), n)
    return dq, dqn, dk, dkn, dv


_FWD = triton_op("hypercomplex_attention_triton", _hypercomplex_attention_triton)
_BWD = triton_op("hypercomplex_attention_backward_triton", _hypercomplex_attention_backward_triton)


# ---- autograd --------------------------------------------------------------------------


@bound_once
class HypercomplexAttentionFunction(torch.autograd.Function):
    """(y, lse) of the fused kernel from (q, k, v, q^, k^); gradients for all five."""

    @staticmethod
    def forward(q, k, v, qn, kn, e, et, causal, scale, n):
        return _FWD(q, k, v, qn, kn, e, et, causal, scale, n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, qn, kn, e, et, causal, scale, n = inputs
        y, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, qn, kn, e, et, y, lse)
        ctx.causal, ctx.scale, ctx.n = causal, scale, n

    @staticmethod
    def backward(ctx, gy, _glse):
        refuse_double_backward(_NAMES[ctx.n])
        q, k, v, qn, kn, e, et, y, lse = ctx.saved_tensors
        dq, dqn, dk, dkn, dv = _BWD(gy, q, k, v, qn, kn, e, et, y, lse, ctx.causal, ctx.scale, ctx.n)
        return dq, dk, dv, dqn, dkn, None, None, None, None, None


# ---- public ops --------------------------------------------------------------------------


def _check(op, n, q, k, v, causal, scale, normalize):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, min_dim=4)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    check_same(op, {"q": q, "k": k, "v": v})
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    _, Hkv, Tk, Dk = k.shape
    if k.shape[0] != B or Dk != D:
        raise ValueError(f"{op}: k (B, Hkv, Tk, D) must match q (B, H, Tq, D) in B and D, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if D % n:
        raise ValueError(f"{op}: the head dim D holds {n}-component channels: D must be a multiple of {n}, "
                         f"got q {tuple(q.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{op}: k's head count {Hkv} must divide q's {H} (grouped-query attention)")
    if Tk < 1 and q.numel() > 0:
        raise ValueError(f"{op}: k and v need at least one key, got k {tuple(k.shape)}")
    for name, flag in (("causal", causal), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__}")
    if causal and Tk < Tq and Tq > 1:
        raise ValueError(f"{op}: causal attention needs Tk >= Tq (or Tq == 1), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"{op}: scale must be None or a positive finite number, got {scale!r}")


def _attention(n, q, k, v, causal, scale, normalize, backend):
    op = _NAMES[n]
    q, k, v = autocast_promote(q, k, v)
    _check(op, n, q, k, v, causal, scale, normalize)
    requested = _backend.requested(backend)
    if requested == "cuda":
        raise RuntimeError(f"{op}: " + _NO_CUDA.format(op=op))
    be = _backend.resolve(op, backend, q.device, ("triton",))
    if be == "triton" and q.dtype not in _KERNEL_DTYPES:
        if backend in (None, "auto"):
            be = "torch"  # float64: the reference is the float64 implementation
        else:
            raise TypeError(f"{op}: backend='triton' takes float16, bfloat16 or float32, got {q.dtype} "
                            "(backend='torch' runs float64)")
    scale = ref.default_scale(q.shape[-1]) if scale is None else float(scale)
    fn = ref.quaternion_attention if n == 4 else ref.octonion_attention
    if be == "torch" or q.numel() == 0:  # empty: the reference's empty result (and zero gradients)
        return fn(q, k, v, causal, scale, normalize)
    check_grid_rows(op, "triton", q.shape[0], q.shape[1])
    qn, kn = (ref.normalize_channels(q, n), ref.normalize_channels(k, n)) if normalize else (q, k)
    e, et = _epilogue(q.device)
    y, _ = HypercomplexAttentionFunction.apply(q, k, v, qn, kn, e, et, causal, scale, n)
    return y


def quaternion_attention(q, k, v, *, causal: bool = True, scale: float | None = None, normalize: bool = True,
                         backend: str | None = None) -> torch.Tensor:
    """Quaternion rotor-gate attention: y_i = q^_i (sum_j p_ij conj(k^_j) v_j) per quaternion channel,
    p = softmax(q k^T * scale) (raw q, k; scale 1 / sqrt(D) by default), q^ / k^ the per-channel unit
    quaternions of q / k (normalize=False: q and k themselves).

    q (B, H, Tq, D), k and v (B, Hkv, Tk, D), D a multiple of 4 holding D / 4 channels (w, x, y, z)
    of consecutive components; Hkv divides H; any strides. Returns y (B, H, Tq, D), differentiable
    in q, k, v. D = 0 gives an empty y (the default scale is then 1). An infinite entry of a visible
    v makes A_i infinite in its channel's components, and y_i = q^_i A_i meets inf - inf: NaN there
    (+-inf where only one term is infinite), in both backends.

    Masking: a key that the causal mask hides from row i contributes nothing to y_i, whatever its k
    and v (NaN and inf included), and nothing to the gradients through row i: both backends, any
    tile size (the reference selects hidden (query, key) pairs away; the Triton kernels recompute a
    block whose result is non-finite with the non-finite keys taken one by one for the rows that see
    them). Likewise a NaN or inf in q_i or in the upstream gradient of row i never reaches dk, dv of
    the keys hidden from row i. Every key is seen by the last query (causal needs Tk >= Tq), so a
    key's own gradient is the sum over the rows that see it: with garbage in the key it is
    non-finite exactly where the reference's autograd is."""
    return _attention(4, q, k, v, causal, scale, normalize, backend)


def octonion_attention(q, k, v, *, causal: bool = True, scale: float | None = None, normalize: bool = True,
                       backend: str | None = None) -> torch.Tensor:
    """Octonion attention: y_i = sum_j p_ij ((q^_i conj(k^_j)) v_j) per octonion channel, with that
    parenthesisation (octonions do not associate); scores, normalisation and shapes as
    quaternion_attention, with D a multiple of 8 (channels of 8 consecutive components).

    An infinite entry of a visible v: the definition multiplies it by one component of
    q^_i conj(k^_j) per output component, so y is +-inf in its channel (NaN where that component or
    p_ij is 0, or where infinite terms of both signs meet), in both backends. The Triton kernel's
    fast path contracts the averaged 8 x 8 outer products with q^ (the trilinear form), which would
    add infinite terms of both signs; a query block whose average comes out non-finite is computed
    again with those terms formed key by key (a NaN in v gives NaN in its channel, both backends).
    Masking as quaternion_attention: a causally hidden key contributes nothing, whatever its k and v
    (NaN and inf included), to y and to the gradients through the rows it is hidden from, in both
    backends. The backward with an inf in a visible v: dv is finite and exact (its formula never
    reads v); dq and dk are NaN where the reference's autograd gives NaN (the rows that see the key,
    and the keys they see)."""
    return _attention(8, q, k, v, causal, scale, normalize, backend)
