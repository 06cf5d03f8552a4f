"""Fused tropical (max-plus) attention: checks, backends, custom ops, autograd.

Public: tropical_attention. Definition, causal mask, tie and gradient conventions in
geokern.reference.tropical (model_guided_research's
`tropical_max_plus_attention` at beta = None).

The kernels (Triton: geokern.kernels.tropical; CUDA: csrc/tropical)
compute the core: scores, causal mask, score centring, value stage, routes and margins,
in one pass over the visible keys with O(T D) memory. The gauge fixes (each of q, k, v
and y minus its max over D) and evt_shift are elementwise and run in PyTorch around the
core, with the same code as the reference, so their gradients are the reference's.

Choices where theirs is silent or differs:
- causal=False (theirs is always causal) lets every query see every key.
- evt_shift with score_center cancels exactly in exact arithmetic (the centring removes
  any per-query constant); the kernels then skip it. Without centring it is subtracted
  from y (max-plus is shift-equivariant), which equals subtracting it from the scores.
- Their finite-beta (Maslov-smoothed) variant is not implemented.
- k and v may have fewer heads than q (grouped-query attention) without a copy.
- A value that the causal mask hides from a query never reaches it (keys past the mask
  are not visited), so a +inf there does not turn that query's output into NaN as the
  materialised (-inf) + (+inf) does in theirs.

Sums are in float32 (float64 for float64 inputs) and rounded once to the output dtype.
The backward routes gradients along the argmaxes: recorded by the forward whenever a
gradient is needed (an int32 per (query, channel) and per query), and along the score
argmax over D, which the backward recomputes. dq, dk, dv are accumulated with atomic
adds in float32: their last bits may vary from run to run, except under
torch.use_deterministic_algorithms(True), where the backward on CUDA tensors runs
deterministic torch ops (TropicalAttentionBackwardFunction says at what cost).

Edge cases, the same in every backend (the rules: geokern.reference.tropical):
- NaN propagates through every max; an output is NaN exactly when its formula reads a
  NaN (or forms inf - inf); a key hidden by the causal mask contributes nothing to a
  query, whatever its values.
- Empty inputs (B, H, Tq or D zero) give empty outputs and zero gradients of the inputs'
  shapes; no kernel runs.
- Double backward is supported (to any order) by every backend: the backward is linear
  in the incoming gradient along the routes and flat in q, k, v between route changes.
- Autocast: not on autocast's cast lists (there is no matmul in max-plus to run in
  bf16): it runs in its inputs' dtype, sums in float32 either way; inside an autocast
  region, q, k, v of mixed float dtypes are promoted to the widest (autocast's "promote"
  rule); outside one they are an error.
- Sizes: the Triton and CUDA backends take B * H <= 65535 and T * D < 2**31 per head and
  say so before any launch; offsets into whole tensors and strided views are 64-bit.
- Any CUDA stream and CUDA-graph capture are supported, and torch.compile(dynamic=True).
  The Triton backward failed there (Inductor, torch 2.11: the node-count assertion of
  decompose_triton_kernel_wrapper_functional) while its kernel looked to torch as if it
  wrote q and k, which torch.compile then cloned: kernels/tropical.py says why it no
  longer does.
"""

import math
import numbers

import torch

from geokern import _backend
from geokern._checks import FLOAT_DTYPES, autocast_promote, check_grid_rows, check_same, check_tensor
from geokern.kernels import tropical as tk
from geokern.ops._registry import bound_once, cuda_op, triton_op
from geokern.reference import tropical as ref

__all__ = ["tropical_attention"]

_PREFER = ("cuda", "triton")  # measured on H100: see benchmarks/results
_OP = "tropical_attention"
_INT32_MAX = 2**31 - 1
_CUDA_MAX_D = 128  # the CUDA kernel keeps a query block's D channels in registers


# ---- custom ops ------------------------------------------------------------------
# forward: (q, k, v, causal, center, want_argmax, want_margin) -> (y, argmax, rowarg,
# margin); argmax int32 (B, H, Tq, D), rowarg int32 (B, H, Tq), margin (B, H, Tq); those
# not asked for are empty. backward: (grad, q, k, argmax, rowarg, center) -> (dq, dk, dv).


def _fwd_shapes(q, want_argmax, want_margin):
    B, H, Tq, D = q.shape
    return (B, H, Tq, D), ((B, H, Tq, D) if want_argmax else (0,)), ((B, H, Tq) if want_argmax else (0,)), \
        ((B, H, Tq) if want_margin else (0,))


def _tropical_attention_fake(q, k, v, causal, center, want_argmax, want_margin):
    sy, si, sr, sm = _fwd_shapes(q, want_argmax, want_margin)
    return q.new_empty(sy), q.new_empty(si, dtype=torch.int32), q.new_empty(sr, dtype=torch.int32), q.new_empty(sm)


def _tropical_attention_backward_fake(grad, q, k, argmax, rowarg, center):
    return grad.new_empty(q.shape), grad.new_empty(k.shape), grad.new_empty(k.shape)


def _tropical_attention_cpu(q, k, v, causal, center, want_argmax, want_margin):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    y, idx, jm, mg = ref.core(q.to(acc), k.to(acc), v.to(acc), causal, center, want_margin)

    def empty():  # one fresh tensor per output: outputs must not alias
        return torch.empty((0,), dtype=torch.int32, device=q.device)

    return (
        y.to(q.dtype).contiguous(),
        idx.contiguous() if want_argmax else empty(),
        jm.contiguous() if want_argmax else empty(),
        mg.to(q.dtype).contiguous() if want_margin else q.new_empty((0,)),
    )


def _tropical_attention_backward_cpu(grad, q, k, argmax, rowarg, center):
    return ref.core_backward(grad, q, k, argmax, rowarg, center)


def _tropical_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, center: bool, want_argmax: bool,
    want_margin: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sy, si, sr, sm = _fwd_shapes(q, want_argmax, want_margin)
    y = q.new_empty(sy)
    idx = q.new_empty(si, dtype=torch.int32)
    jm = q.new_empty(sr, dtype=torch.int32)
    mg = q.new_empty(sm)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scratch = q.new_empty((tk.scratch_numel(*q.shape[:3]),), dtype=acc)
    tk.tropical_attention_fwd(q, k, v, y, idx if want_argmax else None, jm if want_argmax else None,
                              mg if want_margin else None, scratch, causal, center)
    return y, idx, jm, mg


def _tropical_attention_backward_triton(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, argmax: torch.Tensor, rowarg: torch.Tensor,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    dq = grad.new_zeros(q.shape, dtype=acc)
    dk = grad.new_zeros(k.shape, dtype=acc)
    dv = grad.new_zeros(k.shape, dtype=acc)
    tk.tropical_attention_bwd(grad.contiguous(), q, k, argmax, rowarg, dq, dk, dv, center)
    return dq.to(grad.dtype), dk.to(grad.dtype), dv.to(grad.dtype)


# (forward, backward) per kernel backend; a CUDA entry is None without geokern._C
_KERNELS = {
    "cuda": (
        cuda_op("tropical_attention_cuda", _tropical_attention_fake, _tropical_attention_cpu),
        cuda_op("tropical_attention_backward_cuda", _tropical_attention_backward_fake,
                _tropical_attention_backward_cpu),
    ),
    "triton": (
        triton_op("tropical_attention_triton", _tropical_attention_triton),
        # opaque to torch.compile: with dynamic shapes, inductor's decomposition of this op's traced
        # launch fails its own node-count assertion (pytorch/pytorch#181735, torch 2.11 to 2.14)
        triton_op("tropical_attention_backward_triton", _tropical_attention_backward_triton,
                  opaque_fake=_tropical_attention_backward_fake),
    ),
}


# ---- autograd --------------------------------------------------------------------


@bound_once
class TropicalAttentionFunction(torch.autograd.Function):
    """(y, argmax, rowarg, margin) of the core; y's gradient follows the routes."""

    @staticmethod
    def forward(q, k, v, causal, center, want_argmax, want_margin, backend):
        return _KERNELS[backend][0](q, k, v, causal, center, want_argmax, want_margin)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, center, want_argmax, want_margin, backend = inputs
        y, idx, jm, mg = output
        ctx.mark_non_differentiable(idx, jm, mg)
        ctx.save_for_backward(q, k, idx, jm)
        ctx.center, ctx.backend = center, backend

    @staticmethod
    def backward(ctx, gy, _gi, _gj, _gm):
        q, k, idx, jm = ctx.saved_tensors
        # through a Function of its own, so that the backward is differentiable again
        dq, dk, dv = TropicalAttentionBackwardFunction.apply(gy, q, k, idx, jm, ctx.center, ctx.backend)
        need = ctx.needs_input_grad
        return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None), \
            None, None, None, None, None


@bound_once
class TropicalAttentionBackwardFunction(torch.autograd.Function):
    """(dq, dk, dv) of the core along its routes: linear in the incoming gradient, and
    constant in q, k between route changes (so its derivative there is zero almost
    everywhere, as for the reference's autograd). Its backward (the double backward of
    the attention) gathers along the same routes: reference.tropical.core_backward_adjoint.

    The kernels add the routed gradients with atomics, whose order varies from run to run.
    Under torch.use_deterministic_algorithms(True) the backward on CUDA tensors runs the
    reference's formula (reference.tropical.core_backward: scatter_add_ / index_put_, which
    torch makes deterministic in that mode) instead: the same result up to rounding, at
    O(B H Tq D^2) memory for the recomputed routes and several times the time."""

    @staticmethod
    def forward(grad, q, k, argmax, rowarg, center, backend):
        if grad.is_cuda and torch.are_deterministic_algorithms_enabled():
            return ref.core_backward(grad, q, k, argmax, rowarg, center)
        return _KERNELS[backend][1](grad, q, k, argmax, rowarg, center)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, q, k, argmax, rowarg, center, backend = inputs
        ctx.save_for_backward(q, k, argmax, rowarg)
        ctx.center = center

    @staticmethod
    def backward(ctx, gdq, gdk, gdv):
        q, k, argmax, rowarg = ctx.saved_tensors
        gg = None
        if ctx.needs_input_grad[0]:
            gg = ref.core_backward_adjoint(gdq, gdk, gdv, q, k, argmax, rowarg, ctx.center)
        return gg, None, None, None, None, None, None


# ---- public op -------------------------------------------------------------------


def _check(q, k, v, causal, gauge_fix, score_center, return_margins, evt_shift):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_OP, name, t, dtypes=FLOAT_DTYPES, min_dim=4)
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    check_same(_OP, {"q": q, "k": k, "v": v})
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    _, Hkv, Tk, Dk = k.shape
    if k.shape[0] != B or Dk != D:
        raise ValueError(
            f"{_OP}: k (B, Hkv, Tk, D) must match q (B, H, Tq, D) in B and D, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{_OP}: k's head count {Hkv} must divide q's {H} (grouped-query attention)")
    if Tk < 1 and q.numel() > 0:
        raise ValueError(f"{_OP}: k and v need at least one key, got k {tuple(k.shape)}")
    for name, flag in (("causal", causal), ("gauge_fix", gauge_fix), ("score_center", score_center),
                       ("return_margins", return_margins)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_OP}: {name} must be a bool, got {type(flag).__name__}")
    if causal and Tk < Tq and Tq > 1:
        raise ValueError(f"{_OP}: causal attention needs Tk >= Tq (or Tq == 1), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if evt_shift is not None and (isinstance(evt_shift, bool) or not isinstance(evt_shift, numbers.Real)
                                  or not math.isfinite(evt_shift)):
        raise TypeError(f"{_OP}: evt_shift must be None or a finite real number, got {evt_shift!r}")


def tropical_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    gauge_fix: bool = True,
    score_center: bool = True,
    return_margins: bool = False,
    evt_shift: float | None = None,
    backend: str | None = None,
):
    """Tropical attention y[i, d] = max_j (max_e (q[i, e] + k[j, e]) + v[j, d]) with their
    gauge fixes, score centring and causal mask (geokern.reference.tropical).

    q is (B, H, Tq, D); k and v are (B, Hkv, Tk, D) with Hkv dividing H; any strides.
    Returns y (B, H, Tq, D), or (y, gamma) with return_margins: gamma (B, H, Tq) is the
    smallest winner-minus-runner-up gap of the value stage over D (+inf when Tk < 2).
    Differentiable in q, k, v along the argmax routes.
    """
    q, k, v = autocast_promote(q, k, v)
    _check(q, k, v, causal, gauge_fix, score_center, return_margins, evt_shift)
    cuda_ok = q.dtype != torch.float64 and q.shape[3] <= _CUDA_MAX_D
    be = _backend.resolve(_OP, backend, q.device, _PREFER if cuda_ok else ("triton",))
    if be == "cuda" and not cuda_ok:
        raise ValueError(f"{_OP}: backend='cuda' takes float16 / bfloat16 / float32 and head dims up to "
                         f"{_CUDA_MAX_D}, got {q.dtype} and q {tuple(q.shape)} (use backend='triton' or 'torch')")
    if be == "torch" or q.numel() == 0:  # empty: no kernel, the reference's empty result on every backend
        y, gamma = ref.tropical_attention(q, k, v, causal, gauge_fix, score_center, return_margins, evt_shift)
        return (y, gamma) if return_margins else y
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    check_grid_rows(_OP, be, B, H)
    if max(Tq, Tk) * D > _INT32_MAX:
        raise ValueError(f"{_OP}: backend {be!r} indexes one head with 32-bit offsets; T * D must be < 2**31, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)} (use backend='torch')")
    if gauge_fix:
        q, k, v = ref.gauge(q), ref.gauge(k), ref.gauge(v)
    need_route = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    y, _, _, gamma = TropicalAttentionFunction.apply(q, k, v, causal, score_center, need_route, return_margins, be)
    if evt_shift is not None and not score_center:
        y = y - evt_shift
    if gauge_fix:
        y = ref.gauge(y)
    if not return_margins:
        return y
    if Tk < 2:
        gamma = torch.full(y.shape[:3], float("inf"), dtype=y.dtype, device=y.device)
    return y, gamma
