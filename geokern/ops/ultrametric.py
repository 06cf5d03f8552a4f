"""Ultrametric (LCP-bucketed) attention, hard and soft mode: checks, backends, custom ops, autograd, decode.

Public: ultrametric_attention, ultrametric_soft_digits, ultrametric_hard_digits, UltrametricCache,
ultrametric_decode_step_. The definition (digits, prefix codes, alpha^LCP weights, causal /
chunked-prefill / decode semantics, padding, grouped-query heads, lse, non-finite values) is
geokern.reference.ultrametric (spec section 3); the kernels and their design are in
geokern.kernels.ultrametric (README.md there).

Choices:
- Digits are integer tensors (any integer dtype), checked in [0, p - 1]; they are discrete, so
  no gradient reaches them: y is differentiable in v only. Straight-through: pass the soft digits
  they were rounded from as q_soft / k_soft, and their gradient is the soft LCP kernel's
  (reference.soft_lcp_attention at lcp_beta, v detached) at the same inputs, while y keeps the
  hard value exactly: y = hard(q, k, v) + (soft(q_soft, k_soft, sg(v)) - sg(soft(...))), sg the
  stop-gradient. So dL/dq_soft = sum_ij dL/dW_ij dW_ij/dq_soft with dL/dW_ij = dy_i . (v_j - y_i)
  / den_i of the soft weights: v's weighting gradient, passed through the soft digits. That
  gradient is dense: O(Tq Tk K) time, query-chunked memory (only when a soft digit needs it).
- alpha is a Python number > 0 (it is a schema float of the custom ops); p an int >= 2.
- The kernels hold dense bucket tables: the Triton and CUDA backends take sum_{l<=K} p^l <= 2^16
  codes (e.g. p = 2, K <= 15) and say so beyond; the torch backend (the reference) takes any size
  up to 63-bit codes.
- Backends: "triton", "cuda" and "torch". "cuda" runs the hard mode (csrc/ultrametric/attention.cu:
  the Triton design, warp per row, float32 FMA loops), forward and backward, and the soft mode
  (csrc/ultrametric/soft.cu: a warp per query row forward; backward a query-owner pass for dq and a
  key-owner pass for dk and dv, no atomics; K <= 16 digits and D <= 256 channels, held in
  registers, more is refused naming backend='triton'); the hard mode's straight-through part (the
  soft kernel's gradient) stays on Triton under backend='cuda'. float64 runs on "torch" only.
  "auto" takes Triton for CUDA tensors, the reference for CPU tensors: the CUDA kernels (of both
  modes and of the decode state, _ultrametric_cache) are not yet measured (the soft mode's not yet
  run on a GPU either), and auto picks them only once they are faster.
- Tuning knobs: chunk (positions per scan chunk, 0: 64 on the GPU) and num_segments (parallel
  segments per (batch, key head), 0: enough for two programs per SM), carried in the schema; the
  CUDA backend plans the same chunks and segments.
- Sums are float32 (the Triton dense in-chunk part is a float32 "ieee" dot, the CUDA one a float32
  FMA loop); y is v's dtype, lse float32. The backward adds each key's gradient in one program (a
  warp, CUDA): deterministic, no atomics on dv; the bucket tables are filled with float32 atomics
  (their order varies, so the last bits of y and dv may vary from run to run), so under
  torch.use_deterministic_algorithms(True) the Triton and CUDA hard mode, the soft mode's Triton
  backward (dq: float32 atomics) and the Triton and CUDA UltrametricCache.append raise as torch's
  nondeterministic ops do (warn with warn_only=True); backend='torch' is the deterministic
  alternative (and for the soft mode backend='cuda', whose every output row has one owner).
- Empty inputs (B, H, Tq or D zero, or no key) take the reference: y zeros / empty, lse -inf.
- Double backward through the Triton and CUDA backends is refused (backend='torch' has it).
- mode="soft": the soft LCP kernel (reference.soft_lcp_attention) on float digits, differentiable
  in q, k and v; the Triton backend is one fused flash-style kernel (O(T) memory, K + 1
  exponentials per pair forward, 2K + 1 backward; geokern.kernels.ultrametric.soft); the CUDA
  backend has the same numerics, K + 1 forward and 2 (2K + 1) backward (two recomputing passes
  instead of atomics). The straight-through gradient of the hard mode uses the Triton kernel.
"""

import math

import torch

from geokern import _backend
from geokern._checks import check_grid_rows, check_same, check_tensor, host_reads_allowed
from geokern.kernels import ultrametric as tk
from geokern.ops._registry import alert_nondeterministic, bound_once, cuda_op, refuse_double_backward, triton_op
from geokern.ops._ultrametric_cache import UltrametricCache, ultrametric_decode_step_  # noqa: F401
from geokern.ops._ultrametric_retrieval import ultrametric_signatures, ultrametric_top1  # noqa: F401
from geokern.reference import ultrametric as ref

__all__ = ["ultrametric_attention", "ultrametric_soft_digits", "ultrametric_hard_digits", "UltrametricCache",
           "ultrametric_decode_step_"]
__all__ += ["ultrametric_signatures", "ultrametric_top1"]  # signatures and top-1 retrieval (their module)

_OP = "ultrametric_attention"
_PREFER = ("triton",)
_SOFT_CUDA_MAX_K, _SOFT_CUDA_MAX_D = 16, 256  # csrc/ultrametric/soft.cu: digits and channels held in registers


# ---- custom ops ------------------------------------------------------------------


def _ultrametric_attention_triton(
    q_digits: torch.Tensor, k_digits: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, alpha: float,
    p: int, causal: bool, chunk: int, num_segments: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Tq, _ = q_digits.shape
    y = v.new_empty((B, H, Tq, v.shape[3]))
    lse = v.new_empty((B, H, Tq), dtype=torch.float32)
    tk.ultrametric_attention_fwd(q_digits, k_digits, v, keep, y, lse, alpha, p, ref.num_codes(p, q_digits.shape[3]),
                                 causal, chunk, num_segments)
    return y, lse


def _ultrametric_attention_backward_triton(
    grad: torch.Tensor, q_digits: torch.Tensor, k_digits: torch.Tensor, lse: torch.Tensor,
    keep: torch.Tensor | None, alpha: float, p: int, causal: bool, chunk: int, num_segments: int,
) -> torch.Tensor:
    B, Hkv, Tk, _ = k_digits.shape
    dv = grad.new_empty((B, Hkv, Tk, grad.shape[3]))
    tk.ultrametric_attention_bwd(q_digits, k_digits, grad, lse, keep, dv, alpha, p,
                                 ref.num_codes(p, q_digits.shape[3]), causal, chunk, num_segments)
    return dv


def _ultrametric_soft_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, alpha: float, lcp_beta: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Tq, _ = q.shape
    y = v.new_empty((B, H, Tq, v.shape[3]))
    lse = v.new_empty((B, H, Tq), dtype=torch.float32)
    tk.ultrametric_soft_attention_fwd(q, k, v, keep, y, lse, alpha, lcp_beta, causal)
    return y, lse


def _ultrametric_soft_attention_backward_triton(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
    y: torch.Tensor, lse: torch.Tensor, alpha: float, lcp_beta: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq = q.new_empty(q.shape, dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    tk.ultrametric_soft_attention_bwd(grad, q, k, v, keep, y, lse, dq, dk, dv, alpha, lcp_beta, causal)
    return dq.to(q.dtype), dk, dv


def _ultrametric_soft_attention_fake(q, k, v, keep, alpha, lcp_beta, causal):
    B, H, Tq, _ = q.shape
    return v.new_empty((B, H, Tq, v.shape[3])), v.new_empty((B, H, Tq), dtype=torch.float32)


def _ultrametric_soft_attention_cpu(q, k, v, keep, alpha, lcp_beta, causal):
    """The CUDA soft op on CPU tensors: the reference."""
    y, lse = ref.soft_lcp_attention(q, k, v, alpha, lcp_beta, causal=causal, key_padding_mask=keep, return_lse=True)
    return y, lse.float()


def _ultrametric_soft_attention_backward_fake(grad, q, k, v, keep, y, lse, alpha, lcp_beta, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ultrametric_soft_attention_backward_cpu(grad, q, k, v, keep, y, lse, alpha, lcp_beta, causal):
    """The CUDA soft backward op on CPU tensors: the gradient formulas of kernels/ultrametric/soft.py
    written out densely ([B, H, Tq, Tk, K]: for small inputs, opcheck's; the op layer runs the torch
    backend on CPU tensors, never this). y and lse are recomputed (the reference's)."""
    B, H, Tq, K = q.shape
    Hkv, Tk, acc = k.shape[1], k.shape[2], ref.acc_dtype(v.dtype)
    R = H // Hkv
    kr, vr = k.to(acc).repeat_interleave(R, dim=1), v.to(acc).repeat_interleave(R, dim=1)
    d = q.to(acc)[:, :, :, None] - kr[:, :, None]  # [B, H, Tq, Tk, K]
    P = torch.exp(-lcp_beta * d.square()).cumprod(-1)
    lcp = P.sum(-1)
    vis = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=v.device)
    if causal:
        vis = vis & (torch.arange(Tk, device=v.device) <= torch.arange(Tq, device=v.device)[:, None] + Tk - Tq)
    if keep is not None:
        vis = vis & keep[:, None, None, :]
    w = torch.where(vis, torch.tensor(float(alpha), dtype=acc) ** lcp, 0.0)
    den = w.sum(-1, keepdim=True)
    pc = w / den.clamp_min(ref.CLAMP)
    dy = grad.to(acc)
    yy = pc @ vr
    delta = torch.where(den > ref.CLAMP, (dy * yy).sum(-1, keepdim=True), 0.0)
    g = torch.where(vis, pc * (dy @ vr.transpose(-1, -2) - delta) * math.log(alpha), 0.0)
    rest = P.flip(-1).cumsum(-1).flip(-1)  # R_m = sum_{l>=m} P_l
    h = g[..., None] * rest * d
    dq = -2.0 * lcp_beta * h.sum(3)
    dk = (2.0 * lcp_beta * h.sum(2)).view(B, Hkv, R, Tk, K).sum(2)
    dv = (pc.transpose(-1, -2) @ dy).view(B, Hkv, R, Tk, v.shape[3]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _ultrametric_attention_fake(q_digits, k_digits, v, keep, alpha, p, causal, chunk, num_segments):
    B, H, Tq, _ = q_digits.shape
    return v.new_empty((B, H, Tq, v.shape[3])), v.new_empty((B, H, Tq), dtype=torch.float32)


def _ultrametric_attention_cpu(q_digits, k_digits, v, keep, alpha, p, causal, chunk, num_segments):
    """The CUDA op on CPU tensors: the reference (chunk and num_segments only steer the kernels)."""
    y, lse = ref.ultrametric_attention(q_digits, k_digits, v, alpha, p=p, causal=causal, key_padding_mask=keep,
                                       return_lse=True)
    return y, lse.float()


def _ultrametric_attention_backward_fake(grad, q_digits, k_digits, lse, keep, alpha, p, causal, chunk, num_segments):
    B, Hkv, Tk, _ = k_digits.shape
    return grad.new_empty((B, Hkv, Tk, grad.shape[3]))


def _ultrametric_attention_backward_cpu(grad, q_digits, k_digits, lse, keep, alpha, p, causal, chunk, num_segments):
    """The CUDA backward op on CPU tensors: dv_j = sum over the queries i that see j of alpha^lcp_ij
    dy_i / max(exp(lse_i), 1e-9), with the pair weights dense ([B, H, Tq, Tk]: for small inputs,
    opcheck's; the op layer runs the torch backend on CPU tensors, never this)."""
    B, H, Tq, _ = q_digits.shape
    Hkv, Tk, acc = k_digits.shape[1], k_digits.shape[2], ref.acc_dtype(grad.dtype)
    kd = k_digits.repeat_interleave(H // Hkv, dim=1)
    lcp = (q_digits[:, :, :, None] == kd[:, :, None]).long().cumprod(-1).sum(-1)
    vis = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=grad.device)
    if causal:
        vis = vis & (torch.arange(Tk, device=grad.device) <= torch.arange(Tq, device=grad.device)[:, None] + Tk - Tq)
    if keep is not None:
        vis = vis & keep[:, None, None, :]
    seen = lse != float("-inf")
    w = torch.where(vis & seen[..., None], torch.tensor(float(alpha), dtype=acc) ** lcp.to(acc), 0.0)
    src = torch.where(seen[..., None], grad.to(acc) / lse.to(acc).exp().clamp_min(ref.CLAMP)[..., None], 0.0)
    dv = torch.einsum("bhij,bhid->bhjd", w, src).view(B, Hkv, H // Hkv, Tk, grad.shape[3]).sum(2)
    return dv.to(grad.dtype)


_SOFT_KERNELS = {  # (forward, backward) per kernel backend
    "triton": (
        triton_op("ultrametric_soft_attention_triton", _ultrametric_soft_attention_triton),
        triton_op("ultrametric_soft_attention_backward_triton", _ultrametric_soft_attention_backward_triton),
    ),
    "cuda": (  # None without geokern._C
        cuda_op("ultrametric_soft_attention_cuda", _ultrametric_soft_attention_fake, _ultrametric_soft_attention_cpu),
        cuda_op("ultrametric_soft_attention_backward_cuda", _ultrametric_soft_attention_backward_fake,
                _ultrametric_soft_attention_backward_cpu),
    ),
}

# (forward, backward) per kernel backend (the decode state's kernels: _ultrametric_cache); the CUDA
# pair is None without geokern._C
_KERNELS = {
    "triton": (
        triton_op("ultrametric_attention_triton", _ultrametric_attention_triton),
        triton_op("ultrametric_attention_backward_triton", _ultrametric_attention_backward_triton),
    ),
    "cuda": (
        cuda_op("ultrametric_attention_cuda", _ultrametric_attention_fake, _ultrametric_attention_cpu),
        cuda_op("ultrametric_attention_backward_cuda", _ultrametric_attention_backward_fake,
                _ultrametric_attention_backward_cpu),
    ),
}


# ---- autograd --------------------------------------------------------------------


@bound_once
class UltrametricAttentionFunction(torch.autograd.Function):
    """(y, lse) of hard-mode attention; y is linear in v (dv = A^T dy for the fixed weights A),
    lse does not depend on v."""

    @staticmethod
    def forward(q_digits, k_digits, v, keep, alpha, p, causal, chunk, num_segments, backend):
        return _KERNELS[backend][0](q_digits, k_digits, v, keep, alpha, p, causal, chunk, num_segments)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q_digits, k_digits, v, keep, alpha, p, causal, chunk, num_segments, backend = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(q_digits, k_digits, output[1], keep)
        ctx.args = (alpha, p, causal, chunk, num_segments)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, gy, _glse):
        refuse_double_backward(_OP)
        q_digits, k_digits, lse, keep = ctx.saved_tensors
        dv = None
        if ctx.needs_input_grad[2]:
            dv = _KERNELS[ctx.backend][1](gy.contiguous(), q_digits, k_digits, lse, keep, *ctx.args)
        return None, None, dv, None, None, None, None, None, None, None


@bound_once
class UltrametricSoftAttentionFunction(torch.autograd.Function):
    """(y, lse) of the soft LCP kernel; gradients to the float digits q, k and to v (lse is
    returned without a gradient of its own, as the hard mode's)."""

    @staticmethod
    def forward(q, k, v, keep, alpha, lcp_beta, causal, backend):
        return _SOFT_KERNELS[backend][0](q, k, v, keep, alpha, lcp_beta, causal)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, keep, alpha, lcp_beta, causal, backend = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(q, k, v, keep, *output)
        ctx.args = (alpha, lcp_beta, causal)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, gy, _glse):
        refuse_double_backward(_OP)
        q, k, v, keep, y, lse = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:3]):
            return (None,) * 8
        if ctx.backend == "triton":  # dq: float32 atomics (the CUDA backward has an owner per output row)
            alert_nondeterministic(f"{_OP} backward (mode='soft', backend='triton')", "backend='torch' or 'cuda'")
        dq, dk, dv = _SOFT_KERNELS[ctx.backend][1](gy.contiguous(), q, k, v, keep, y, lse, *ctx.args)
        need = ctx.needs_input_grad
        return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None, None, None


# ---- checks ----------------------------------------------------------------------


def _check_knob(name, x):
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{_OP}: {name} must be an int >= 0 (0 chooses), got {x!r}")


def _check(q_digits, k_digits, v, alpha, p, causal, key_padding_mask, chunk, num_segments, values):
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}")
    check_tensor(_OP, "v", v)
    for name, t in (("q_digits", q_digits), ("k_digits", k_digits), ("key_padding_mask", key_padding_mask)):
        if isinstance(t, torch.Tensor) and t.device != v.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but v is on {v.device}")
    if values and not host_reads_allowed(v):
        values = False  # a host read would break the capture or the trace; the kernels keep every access in bounds
    try:
        dims = ref.check_inputs(q_digits, k_digits, v, alpha, p, causal, key_padding_mask, values=values)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_OP}: {e}") from None
    _check_knob("chunk", chunk)
    _check_knob("num_segments", num_segments)
    return dims


def _check_soft(q_soft, k_soft, q_digits, k_digits, v):
    if (q_soft is None) != (k_soft is None):
        raise ValueError(f"{_OP}: pass both q_soft and k_soft (straight-through) or neither")
    for name, t, like in (("q_soft", q_soft, q_digits), ("k_soft", k_soft, k_digits)):
        check_tensor(_OP, name, t)
        if t.shape != like.shape:
            raise ValueError(f"{_OP}: {name} must have the shape of the digits it rounds to, "
                             f"{tuple(like.shape)}, got {tuple(t.shape)}")
    check_same(_OP, {"v": v, "q_soft": q_soft, "k_soft": k_soft})


def _kernel_limits(be, B, H, Hkv, K, p, v):
    name = "Triton" if be == "triton" else "CUDA"
    if v.dtype == torch.float64:
        raise ValueError(f"{_OP}: the {name} backend takes float16 / bfloat16 / float32 v, got float64 "
                         "(use backend='torch')")
    n = ref.num_codes(p, K)
    if n > tk.MAX_CODES:
        raise ValueError(f"{_OP}: the {name} backend keeps dense bucket tables of sum(p**l, l <= K) codes, at most "
                         f"{tk.MAX_CODES} (2**16); p={p}, K={K} need {n} (use fewer digits, or backend='torch')")
    if be == "triton":  # the CUDA kernels put the groups on the grid's x dimension: no such limit
        check_grid_rows(_OP, "triton", B, H)


def _backend_for(backend, device):
    if _backend.requested(backend) == "cuda":
        if device.type != "cuda":  # before resolve's generic message: name the tensor and the way out
            raise RuntimeError(f"{_OP}: backend='cuda' needs CUDA tensors, v is on {device} (use backend='torch' "
                               "on the CPU)")
    return _backend.resolve(_OP, backend, device, _PREFER)


# ---- public ops ------------------------------------------------------------------


def ultrametric_soft_digits(x, weight, *, p=2):
    """Soft digits sigmoid(x @ weight.T) * (p - 1) in [0, p - 1]: x [..., D], weight [K, D] (their
    to_digits, a bias-free linear map); differentiable in both."""
    check_tensor("ultrametric_soft_digits", "x", x)
    check_tensor("ultrametric_soft_digits", "weight", weight, last_dim=x.shape[-1] if x.dim() else None, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"ultrametric_soft_digits: weight must be 2-D (K, D), got shape {tuple(weight.shape)}")
    return ref.soft_digits(x, weight, p)


def ultrametric_hard_digits(soft, *, p=2):
    """Hard digits round(soft) (half to even) clamped to [0, p - 1], int64, no gradient. Pass the soft
    digits too (q_soft / k_soft of ultrametric_attention) for a straight-through gradient."""
    check_tensor("ultrametric_hard_digits", "soft", soft)
    try:
        return ref.hard_digits(soft.detach(), p)
    except (TypeError, ValueError) as e:
        raise type(e)(f"ultrametric_hard_digits: {e}") from None


def ultrametric_attention(
    q_digits: torch.Tensor,
    k_digits: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float = 2.0,
    p: int = 2,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    mode: str = "hard",
    q_soft: torch.Tensor | None = None,
    k_soft: torch.Tensor | None = None,
    lcp_beta: float = 32.0,
    chunk: int = 0,
    num_segments: int = 0,
    check_digits: bool = True,
    backend: str | None = None,
):
    """Ultrametric attention y[i] = sum_j alpha^lcp_ij v[j] / max(sum_j alpha^lcp_ij, 1e-9) over the
    keys visible to query i (geokern.reference.ultrametric, the module docstring above).

    mode="hard" (default): q_digits [B, H, Tq, K], k_digits [B, Hkv, Tk, K] integer digits in
    [0, p - 1], lcp_ij the number of leading digits they share; y is differentiable in v only.
    mode="soft": q_digits, k_digits are float (soft) digits of v's dtype, and lcp_ij the soft LCP
    sum_l prod_{m<=l} exp(-lcp_beta (q_m - k_m)^2) (reference.soft_lcp_attention); y is
    differentiable in q_digits, k_digits and v. On hard digits (integer values) it equals the hard
    mode where exp(-lcp_beta) stands for 0. The Triton backend runs it as one fused flash-style
    kernel: O(Tq Tk K) work, O(T) memory, K + 1 exponentials per pair forward (exp2 with
    -lcp_beta log2 e folded into one constant and log2 alpha into the weight) and 2K + 1
    backward; the CUDA backend (K <= 16, D <= 256) has the same numerics, warp per row, with a
    deterministic backward of 2 (2K + 1) exponentials per pair (not yet run on a GPU; auto keeps
    Triton, nothing measured); the torch backend is the dense, query-chunked reference. p, q_soft / k_soft and the
    hard-mode knobs (chunk, num_segments, check_digits) do not apply to it; q_soft / k_soft are
    refused there.

    v [B, Hkv, Tk, D] with Hkv dividing H (grouped-query heads, read in place); any strides. causal:
    query i sits at position Tk - Tq + i and sees keys at positions <= its own (prefill Tq == Tk,
    one-token decode Tq == 1, chunked prefill Tq < Tk). key_padding_mask [B, Tk] bool, True = keep.
    Returns y [B, H, Tq, D] in v's dtype, and lse [B, H, Tq] float32 (log of the weight sum, -inf
    for a query that sees no key) with return_lse. Hard mode: work O((Tq + Tk) K D), never O(Tq Tk).

    Straight-through (hard mode): pass the soft digits the hard ones were rounded from as q_soft /
    k_soft; y keeps the hard value and the soft digits get the soft kernel's gradient at lcp_beta
    (module docstring), through the fused soft kernel on the Triton backend (O(T) memory; under
    backend='cuda' too), the dense reference on the torch backend.

    check_digits=False skips the digits' range check, a host read of their min and max that
    waits for the GPU, for digits in range by construction (nn.UltrametricCausalSelfAttention's).
    An out-of-range digit is then not refused: the Triton and CUDA kernels keep every table access
    in bounds, but the result is unspecified. The torch backend (the reference) reads and checks the
    digits on the host regardless (its code compression has a data-dependent size). Under CUDA-graph
    capture and while torch.compile traces the op, the Triton and CUDA backends skip the check as
    check_digits=False does (a host read can be neither captured nor traced).
    """
    if mode == "soft":
        if q_soft is not None or k_soft is not None:
            raise ValueError(f"{_OP}: q_soft / k_soft are the straight-through digits of mode='hard'; in "
                             "mode='soft' q_digits and k_digits are the soft digits themselves")
        y, lse = _soft(q_digits, k_digits, v, alpha, lcp_beta, causal, key_padding_mask, backend)
        return (y, lse) if return_lse else y
    if mode != "hard":
        raise ValueError(f"{_OP}: mode must be 'hard' or 'soft', got {mode!r}")
    B, H, Hkv, Tq, Tk, K, D = _check(q_digits, k_digits, v, alpha, p, causal, key_padding_mask, chunk, num_segments,
                                     check_digits)
    soft = q_soft is not None or k_soft is not None
    if soft:
        _check_soft(q_soft, k_soft, q_digits, k_digits, v)
    be = _backend_for(backend, v.device)
    if be == "torch" or B * H * Tq * D == 0 or Tk == 0:
        y, lse = ref.ultrametric_attention(q_digits, k_digits, v, alpha, p=p, causal=causal,
                                           key_padding_mask=key_padding_mask, return_lse=True)
    else:
        _kernel_limits(be, B, H, Hkv, K, p, v)
        # the bucket tables of the forward and the backward are filled with float32 atomics
        alert_nondeterministic(f"{_OP} (backend='{be}')", "backend='torch'")
        keep = None if key_padding_mask is None else key_padding_mask.contiguous()
        y, lse = UltrametricAttentionFunction.apply(q_digits.contiguous(), k_digits.contiguous(), v.contiguous(), keep,
                                                    float(alpha), p, causal, chunk, num_segments, be)
    if soft and torch.is_grad_enabled() and (q_soft.requires_grad or k_soft.requires_grad):
        # the straight-through gradient stays on the Triton soft kernel (the CUDA one is not yet run on a GPU)
        ys, _ = _soft(q_soft, k_soft, v.detach(), alpha, lcp_beta, causal, key_padding_mask,
                      "triton" if be == "cuda" else be)
        y = y + (ys - ys.detach())
    return (y, lse) if return_lse else y


def _soft(q, k, v, alpha, lcp_beta, causal, key_padding_mask, backend):
    """(y, lse) of the soft LCP kernel (mode='soft'), checked, on the chosen backend."""
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}")
    check_tensor(_OP, "v", v)
    try:
        B, H, Hkv, Tq, Tk, K, D = ref.check_inputs(q, k, v, alpha, 2, causal, key_padding_mask, soft=True,
                                                   names=("q_digits", "k_digits"))
        ref.check_lcp_beta(lcp_beta)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_OP} (mode='soft'): {e}") from None
    check_same(_OP, {"v": v, "q_digits": q, "k_digits": k})
    if key_padding_mask is not None and key_padding_mask.device != v.device:
        raise ValueError(f"{_OP}: key_padding_mask is on {key_padding_mask.device} but v is on {v.device}")
    be = _backend_for(backend, v.device)
    if be == "triton" and D > tk.SOFT_MAX_D and _backend.requested(backend) == "auto":
        be = "torch"  # only auto may pick another backend than the one asked for
    if be == "torch" or B * H * Tq * D == 0 or Tk == 0 or K == 0:  # K = 0: lcp 0, equal weights
        return ref.soft_lcp_attention(q, k, v, alpha, lcp_beta, causal=causal, key_padding_mask=key_padding_mask,
                                      return_lse=True)
    name = "Triton" if be == "triton" else "CUDA"
    if v.dtype == torch.float64:
        raise ValueError(f"{_OP}: the {name} backend takes float16 / bfloat16 / float32 digits and v, got float64 "
                         "(use backend='torch')")
    if be == "triton" and D > tk.SOFT_MAX_D:
        raise ValueError(f"{_OP} (mode='soft'): the Triton backend's tiles hold D <= {tk.SOFT_MAX_D} channels in "
                         f"shared memory, got D = {D} (use backend='torch')")
    if be == "triton":
        check_grid_rows(_OP, "triton", B, H)
    elif K > _SOFT_CUDA_MAX_K or D > _SOFT_CUDA_MAX_D:
        raise ValueError(f"{_OP} (mode='soft'): the CUDA backend holds K <= {_SOFT_CUDA_MAX_K} digits and D <= "
                         f"{_SOFT_CUDA_MAX_D} channels per row in registers, got K = {K}, D = {D} (use "
                         f"backend='triton' for D <= {tk.SOFT_MAX_D}, else backend='torch')")
    keep = None if key_padding_mask is None else key_padding_mask.contiguous()
    return UltrametricSoftAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), keep, float(alpha),
                                                  float(lcp_beta), causal, be)
