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
- The kernels hold dense bucket tables: the Triton backend takes sum_{l<=K} p^l <= 2^16 codes
  (e.g. p = 2, K <= 15) and says so beyond; the torch backend (the reference) takes any size up
  to 63-bit codes.
- Backends: "triton" and "torch"; "cuda" raises (the CUDA kernels are issue #18). float64 runs on
  "torch" only. "auto" takes Triton for CUDA tensors, the reference for CPU tensors.
- Tuning knobs: chunk (positions per scan chunk, 0: 64 on the GPU) and num_segments (parallel
  segments per (batch, key head), 0: enough for two programs per SM), carried in the schema.
- Sums are float32 (the Triton dense in-chunk part is a float32 "ieee" dot); y is v's dtype, lse
  float32. The backward adds each key's gradient in one program: deterministic, no atomics on
  dv; the bucket tables are filled with float32 atomics (their order varies, so the last bits of
  y and dv may vary from run to run), so under torch.use_deterministic_algorithms(True) the
  Triton hard mode, the soft mode's Triton backward (dq: float32 atomics) and the Triton
  UltrametricCache.append raise as torch's nondeterministic ops do (warn with warn_only=True);
  backend='torch' is the deterministic alternative.
- Empty inputs (B, H, Tq or D zero, or no key) take the reference: y zeros / empty, lse -inf.
- Double backward through the Triton backend is refused (backend='torch' has it).
- mode="soft": the soft LCP kernel (reference.soft_lcp_attention) on float digits, differentiable
  in q, k and v; the Triton backend is one fused flash-style kernel (O(T) memory, K + 1
  exponentials per pair forward, 2K + 1 backward; geokern.kernels.ultrametric.soft). The
  straight-through gradient of the hard mode uses the same kernel on the Triton backend.
"""

import torch

from geokern import _backend
from geokern._checks import check_grid_rows, check_same, check_tensor
from geokern.kernels import ultrametric as tk
from geokern.ops._registry import alert_nondeterministic, bound_once, refuse_double_backward, triton_op
from geokern.ops._ultrametric_retrieval import ultrametric_signatures, ultrametric_top1  # noqa: F401
from geokern.reference import ultrametric as ref

__all__ = ["ultrametric_attention", "ultrametric_soft_digits", "ultrametric_hard_digits", "UltrametricCache",
           "ultrametric_decode_step_"]
__all__ += ["ultrametric_signatures", "ultrametric_top1"]  # signatures and top-1 retrieval (their module)

_OP = "ultrametric_attention"
_PREFER = ("triton",)
_NO_CUDA = ("backend='cuda' is not built for ultrametric attention (its CUDA kernels are issue #18); "
            "use backend='triton' or 'torch'")


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


def _ultrametric_cache_append_triton(
    tab: torch.Tensor, cnt: torch.Tensor, k_digits: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, p: int,
) -> None:
    tk.ultrametric_cache_append(tab, cnt, k_digits, v, keep, p)


def _ultrametric_cache_query_triton(
    tab: torch.Tensor, cnt: torch.Tensor, q_digits: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, alpha: float,
    p: int,
) -> None:
    tk.ultrametric_cache_query(tab, cnt, q_digits, y, lse, alpha, p)


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


_SOFT_KERNELS = {  # (forward, backward) per kernel backend
    "triton": (
        triton_op("ultrametric_soft_attention_triton", _ultrametric_soft_attention_triton),
        triton_op("ultrametric_soft_attention_backward_triton", _ultrametric_soft_attention_backward_triton),
    ),
}

# (forward, backward, cache append, cache query) per kernel backend
_KERNELS = {
    "triton": (
        triton_op("ultrametric_attention_triton", _ultrametric_attention_triton),
        triton_op("ultrametric_attention_backward_triton", _ultrametric_attention_backward_triton),
        triton_op("ultrametric_cache_append_triton", _ultrametric_cache_append_triton, mutates_args=("tab", "cnt")),
        triton_op("ultrametric_cache_query_triton", _ultrametric_cache_query_triton, mutates_args=("y", "lse")),
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
        alert_nondeterministic(f"{_OP} backward (mode='soft', backend='{ctx.backend}')",  # dq: float32 atomics
                               "backend='torch'")
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
    if values and v.is_cuda and torch.cuda.is_current_stream_capturing():
        values = False  # a host read would break the capture; the kernels keep every access in bounds
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


def _triton_limits(B, H, Hkv, K, p, v):
    if v.dtype == torch.float64:
        raise ValueError(f"{_OP}: the Triton backend takes float16 / bfloat16 / float32 v, got float64 "
                         "(use backend='torch')")
    n = ref.num_codes(p, K)
    if n > tk.MAX_CODES:
        raise ValueError(f"{_OP}: the Triton backend keeps dense bucket tables of sum(p**l, l <= K) codes, at most "
                         f"{tk.MAX_CODES} (2**16); p={p}, K={K} need {n} (use fewer digits, or backend='torch')")
    check_grid_rows(_OP, "triton", B, H)


def _backend_for(backend, device):
    if backend == "cuda" or (backend is None and _backend.DEFAULT_BACKEND == "cuda"):
        raise RuntimeError(f"{_OP}: {_NO_CUDA}")
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
    sqrt(lcp_beta log2 e) folded into the digits and log2 alpha into the weight) and 2K + 1
    backward; the torch backend is the dense, query-chunked reference. p, q_soft / k_soft and the
    hard-mode knobs (chunk, num_segments, check_digits) do not apply to it; q_soft / k_soft are
    refused there.

    v [B, Hkv, Tk, D] with Hkv dividing H (grouped-query heads, read in place); any strides. causal:
    query i sits at position Tk - Tq + i and sees keys at positions <= its own (prefill Tq == Tk,
    one-token decode Tq == 1, chunked prefill Tq < Tk). key_padding_mask [B, Tk] bool, True = keep.
    Returns y [B, H, Tq, D] in v's dtype, and lse [B, H, Tq] float32 (log of the weight sum, -inf
    for a query that sees no key) with return_lse. Hard mode: work O((Tq + Tk) K D), never O(Tq Tk).

    Straight-through (hard mode): pass the soft digits the hard ones were rounded from as q_soft /
    k_soft; y keeps the hard value and the soft digits get the soft kernel's gradient at lcp_beta
    (module docstring), through the fused soft kernel on the Triton backend (O(T) memory), the
    dense reference on the torch backend.

    check_digits=False skips the digits' range check, a host read of their min and max that
    waits for the GPU, for digits in range by construction (nn.UltrametricCausalSelfAttention's).
    An out-of-range digit is then not refused: the Triton kernels keep every table access in
    bounds, but the result is unspecified. The torch backend (the reference) reads and checks the
    digits on the host regardless (its code compression has a data-dependent size). Under CUDA-graph
    capture the Triton backend skips the check as check_digits=False does (a host read cannot be
    captured).
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
        _triton_limits(B, H, Hkv, K, p, v)
        # the bucket tables of the forward and the backward are filled with float32 atomics
        alert_nondeterministic(f"{_OP} (backend='{be}')", "backend='torch'")
        keep = None if key_padding_mask is None else key_padding_mask.contiguous()
        y, lse = UltrametricAttentionFunction.apply(q_digits.contiguous(), k_digits.contiguous(), v.contiguous(), keep,
                                                    float(alpha), p, causal, chunk, num_segments, be)
    if soft and torch.is_grad_enabled() and (q_soft.requires_grad or k_soft.requires_grad):
        ys, _ = _soft(q_soft, k_soft, v.detach(), alpha, lcp_beta, causal, key_padding_mask, be)
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
    if be == "torch" or B * H * Tq * D == 0 or Tk == 0:
        return ref.soft_lcp_attention(q, k, v, alpha, lcp_beta, causal=causal, key_padding_mask=key_padding_mask,
                                      return_lse=True)
    if v.dtype == torch.float64:
        raise ValueError(f"{_OP}: the Triton backend takes float16 / bfloat16 / float32 digits and v, got float64 "
                         "(use backend='torch')")
    check_grid_rows(_OP, "triton", B, H)
    keep = None if key_padding_mask is None else key_padding_mask.contiguous()
    return UltrametricSoftAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), keep, float(alpha),
                                                  float(lcp_beta), causal, be)


# ---- decode ----------------------------------------------------------------------


class UltrametricCache:
    """The constant-cost decode state of one attention layer: running bucket sums tab
    [B * Hkv, N, D] float32 and counts cnt [B * Hkv, N] int32, one row per prefix code (N =
    sum_{l<=K} p^l <= 2^16: dense tables). Appending a key adds its v to its K + 1 prefix rows;
    a query reads its K + 1 rows: O(K D) per token whatever the context length, in place, no host
    synchronisation, so a decode step can be captured in a CUDA graph (pass out= buffers to
    allocate nothing per step). Equal to ultrametric_attention over every appended key (float32
    sums: rounding grows with the context as any running float32 sum does). No gradient.

    backend: "triton" or "torch" (torch index_add_ / gathers on the same tables), "auto" as the op."""

    def __init__(self, batch, kv_heads, head_dim, K, *, p=2, alpha=2.0, device=None, backend=None):
        for name, x, lo in (("batch", batch, 1), ("kv_heads", kv_heads, 1), ("head_dim", head_dim, 1), ("K", K, 1)):
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise ValueError(f"UltrametricCache: {name} must be an int >= {lo}, got {x!r}")
        ref._check_base(p)
        ref._check_alpha(alpha)
        self.N = ref.num_codes(p, K)
        if self.N > tk.MAX_CODES:
            raise ValueError(f"UltrametricCache: dense tables hold at most {tk.MAX_CODES} (2**16) prefix codes; p={p}, "
                             f"K={K} need {self.N} (use reference.ultrametric.UltrametricDecodeState)")
        self.B, self.Hkv, self.D, self.K, self.p, self.alpha = batch, kv_heads, head_dim, K, p, float(alpha)
        device = torch.device(device or "cpu")
        self.backend = _backend_for(backend, device)
        self.tab = torch.zeros(batch * kv_heads, self.N, head_dim, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(batch * kv_heads, self.N, dtype=torch.int32, device=device)
        self.length = 0  # tokens appended through append (eager bookkeeping; not updated in a graph replay)

    def reset(self):
        self.tab.zero_()
        self.cnt.zero_()
        self.length = 0

    def _check(self, name, digits, heads, T, v=None, mask=None):
        if not isinstance(digits, torch.Tensor) or digits.dtype not in ref.INT_DTYPES or digits.dim() != 4 \
                or digits.shape[0] != self.B or digits.shape[3] != self.K or (heads and digits.shape[1] != heads) \
                or digits.shape[1] % self.Hkv or (T is not None and digits.shape[2] != T):
            raise ValueError(f"UltrametricCache: {name} must be an integer tensor ({self.B}, "
                             f"{heads or f'a multiple of {self.Hkv}'}, {T or 'T'}, {self.K}), got "
                             f"{getattr(digits, 'dtype', type(digits).__name__)} {tuple(getattr(digits, 'shape', ()))}")
        if digits.device != self.tab.device:
            raise ValueError(f"UltrametricCache: {name} is on {digits.device}, the cache on {self.tab.device}")
        if not (digits.is_cuda and torch.cuda.is_current_stream_capturing()):
            ref.check_digits(name, digits, self.p)  # a host check; under capture the kernels clamp
        if v is not None:
            want = (self.B, self.Hkv, digits.shape[2], self.D)
            if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point or tuple(v.shape) != want \
                    or v.device != self.tab.device:
                raise ValueError(f"UltrametricCache: v must be a float tensor {want} on {self.tab.device}, got "
                                 f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != (self.B, digits.shape[2])):
            raise ValueError(f"UltrametricCache: key_padding_mask must be bool ({self.B}, {digits.shape[2]}), got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")

    def _rows(self, digits, read=False):
        """[B, heads, T, K] -> table rows [B, heads, T, K + 1] (group * N + code), as torch ops; read:
        the rows a query reads and their weights instead (reference.ultrametric.read_codes)."""
        B, heads = digits.shape[:2]
        d = digits.long().clamp(0, self.p - 1)
        codes, val, base = [torch.zeros_like(d[..., 0])], torch.zeros_like(d[..., 0]), 0
        for level in range(self.K):
            base += self.p ** level
            val = val * self.p + d[..., level]
            codes.append(val + base)
        g = torch.arange(B * self.Hkv, device=d.device).view(B, self.Hkv, 1, 1)
        g = g.repeat_interleave(heads // self.Hkv, dim=1)
        if read:
            codes, w = ref.read_codes(torch.stack(codes, -1), self.p, self.alpha, torch.float32)
            return codes + g * self.N, w
        return torch.stack(codes, -1) + g * self.N

    def append(self, k_digits, v, key_padding_mask=None):
        """Add T keys: k_digits [B, Hkv, T, K], v [B, Hkv, T, D] (any float dtype), key_padding_mask
        [B, T] (True = keep) or None."""
        self._check("k_digits", k_digits, self.Hkv, None, v, key_padding_mask)
        T = v.shape[2]
        if T:
            v = v.detach()
            if self.backend == "torch":
                keep = torch.ones(self.B, T, dtype=torch.bool, device=v.device) if key_padding_mask is None \
                    else key_padding_mask
                keep4 = keep.view(self.B, 1, T, 1)
                rows = self._rows(k_digits).reshape(-1)
                vk = torch.where(keep4, v.float(), 0.0).unsqueeze(3).expand(-1, -1, -1, self.K + 1, -1)
                self.tab.view(-1, self.D).index_add_(0, rows, vk.reshape(-1, self.D))
                self.cnt.view(-1).index_add_(0, rows, keep4.expand(self.B, self.Hkv, T, self.K + 1).reshape(-1).int())
            else:  # float32 atomics into the tables
                alert_nondeterministic(f"UltrametricCache.append (backend='{self.backend}')", "backend='torch'")
                keep = None if key_padding_mask is None else key_padding_mask.contiguous()
                _KERNELS[self.backend][2](self.tab, self.cnt, k_digits.contiguous(), v.contiguous(), keep, self.p)
        self.length += T

    def query(self, q_digits, *, out=None, return_lse=False):
        """q_digits [B, H, Tq, K] against every appended key: y [B, H, Tq, D] float32 (and lse
        [B, H, Tq]); out=(y, lse) float32 buffers of those shapes are written instead of new ones."""
        self._check("q_digits", q_digits, 0, None)
        B, H, Tq, _ = q_digits.shape
        if out is None:
            out = (torch.empty(B, H, Tq, self.D, device=self.tab.device), torch.empty(B, H, Tq, device=self.tab.device))
        y, lse = out
        if tuple(y.shape) != (B, H, Tq, self.D) or tuple(lse.shape) != (B, H, Tq) or y.dtype != torch.float32 \
                or lse.dtype != torch.float32 or not (y.is_contiguous() and lse.is_contiguous()):
            raise ValueError(f"UltrametricCache: out must be contiguous float32 ({B}, {H}, {Tq}, {self.D}) and "
                             f"({B}, {H}, {Tq}), got {tuple(y.shape)} {y.dtype}, {tuple(lse.shape)} {lse.dtype}")
        if Tq:
            if self.backend == "torch":
                rows, w = self._rows(q_digits, read=True)
                num, den, seen = ref.read_buckets(self.tab.view(-1, self.D), self.cnt.view(-1), rows, w)
                yy, ll = ref._finish(num, den, seen, torch.float32)
                y.copy_(yy)
                lse.copy_(ll)
            else:
                _KERNELS[self.backend][3](self.tab, self.cnt, q_digits.contiguous(), y, lse, self.alpha, self.p)
        return (y, lse) if return_lse else y


def ultrametric_decode_step_(cache, q_digits, k_digits, v, *, key_padding_mask=None, out=None, return_lse=False):
    """One decode token in place: append the key (k_digits [B, Hkv, 1, K], v [B, Hkv, 1, D]) to
    `cache` (an UltrametricCache), then attend q_digits [B, H, 1, K] over every key so far (a query
    sees its own key, as causal attention does). Returns y [B, H, 1, D] float32 (and lse); with
    out=(y, lse) it writes those buffers and allocates nothing: capturable in a CUDA graph."""
    if not isinstance(cache, UltrametricCache):
        raise TypeError(f"ultrametric_decode_step_: cache must be an UltrametricCache, got {type(cache).__name__}")
    cache._check("k_digits", k_digits, cache.Hkv, 1)
    cache._check("q_digits", q_digits, 0, 1)
    cache.append(k_digits, v, key_padding_mask)
    return cache.query(q_digits, out=out, return_lse=return_lse)
