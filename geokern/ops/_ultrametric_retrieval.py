"""Ultrametric retrieval ops: random-hyperplane signatures fused into the projection, and top-1
bucket retrieval (spec section 3, issue #18 items 3 and 4). Re-exported by geokern.ops.ultrametric
(this module keeps that file under its size limit); the definitions are
geokern.reference.ultrametric.hyperplane_signatures and .ultrametric_top1, the kernels
geokern.kernels.ultrametric.signatures and .top1.

Choices:
- Signatures are discrete: the op is not differentiable. Its int8 output carries no gradient, and
  no gradient reaches x, planes or weight (they are read detached); a model that needs a
  gradient through its digits uses ultrametric_soft_digits / the straight-through option of
  ultrametric_attention.
- Top-1 is differentiable in v only (y is a mean of picked rows of v, a torch gather over the
  kernel's indices); the pick is discrete in q, k and the digits.
- Backends: "triton" and "torch" (the reference, float64 inside); "cuda" raises (not written).
  "auto" takes Triton for CUDA tensors, the reference for CPU tensors. float64 inputs run on
  "torch" only. The Triton kernels compute in float32 ("ieee" dots for float32 inputs, tensor-core
  dots with float32 accumulation for 16-bit inputs): a plane dot or a cosine within rounding of
  a tie may decide differently from the float64 reference.
- Knobs: block_t (tokens per signature program), block_m / block_n (queries per program, keys
  per tile of top-1); 0 chooses. Carried in the custom ops' schemas.
"""

import torch

from geokern import _backend
from geokern._checks import GRID_ROWS, check_grid_rows, check_same
from geokern.kernels.ultrametric import signatures as ks
from geokern.kernels.ultrametric import top1 as kt
from geokern.ops._registry import triton_op
from geokern.reference import ultrametric as ref

__all__ = ["ultrametric_signatures", "ultrametric_top1"]

_SIG, _TOP = "ultrametric_signatures", "ultrametric_top1"
_MAX_BD = 256  # head dim (padded) of the Triton kernels' register tiles
_MAX_K = 128  # signature bits per head in the Triton kernel


def _no_cuda(op):
    return (f"{op}: backend='cuda' is not built for this op (the Triton kernel and the reference are); "
            "use backend='triton' or 'torch'")


def _backend_for(op, backend, device):
    if _backend.requested(backend) == "cuda":
        raise RuntimeError(_no_cuda(op))
    return _backend.resolve(op, backend, device, ("triton",))


def _check_knob(op, name, x):
    if isinstance(x, bool) or not isinstance(x, int) or x < 0 or (x and x & (x - 1)) or 0 < x < 16:
        raise ValueError(f"{op}: {name} must be 0 (choose) or a power of two >= 16, got {x!r}")


# ---- custom ops ------------------------------------------------------------------


def _ultrametric_signatures_triton(x: torch.Tensor, weight: torch.Tensor | None, planes: torch.Tensor, heads: int,
                                   block_t: int) -> torch.Tensor:
    K = planes.shape[1]
    B, T = x.shape[0], (x.shape[1] if weight is not None else x.shape[2])
    out = torch.empty((B, heads, T, K), dtype=torch.int8, device=x.device)
    if out.numel():
        ks.ultrametric_signatures_fwd(x, weight, planes, out, block_t)
    return out


def _ultrametric_top1_triton(q: torch.Tensor, k: torch.Tensor, q_digits: torch.Tensor, k_digits: torch.Tensor,
                             keep: torch.Tensor | None, causal: bool, block_m: int,
                             block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, _ = q.shape
    idx = torch.empty((B, H, Tq), dtype=torch.int64, device=q.device)
    lcp = torch.empty((B, H, Tq), dtype=torch.int32, device=q.device)
    sim = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    kt.ultrametric_top1_fwd(q, k, q_digits, k_digits, keep, idx, lcp, sim, causal, block_m, block_n)
    return idx, lcp, sim


_KERNELS = {
    "triton": (triton_op("ultrametric_signatures_triton", _ultrametric_signatures_triton),
               triton_op("ultrametric_top1_triton", _ultrametric_top1_triton)),
}


# ---- public ops ------------------------------------------------------------------


def ultrametric_signatures(x, planes, weight=None, *, block_t=0, backend=None):
    """Random-hyperplane bit signatures, int8 [B, H, T, K] in {0, 1}: digit l of head h is
    [planes[h, l] . x_h > 0] (p = 2), usable as q_digits / k_digits of ultrametric_attention and
    ultrametric_top1 (geokern.reference.ultrametric.hyperplane_signatures).

    weight None: x [B, H, T, D] are head vectors. weight [H * D, Din] (an nn.Linear weight): x
    [B, T, Din] is projected and split into H heads of D, fused: the projections stay in registers
    and only the digits are written. planes [H, K, D] per head, or [K, D] shared by every head.
    x and weight share one dtype; planes may be any float dtype (float32 in the kernel).

    Ties: a dot of exactly 0 gives digit 0, as does a NaN dot. Not differentiable (module docstring).
    block_t: tokens per program of the Triton kernel (0 chooses).
    """
    try:
        B, H, T, D, K = ref.check_signature_inputs(x, planes, weight)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_SIG}: {e}") from None
    if weight is not None:
        check_same(_SIG, {"x": x, "weight": weight})
    if planes.device != x.device:
        raise ValueError(f"{_SIG}: planes is on {planes.device} but x is on {x.device}")
    _check_knob(_SIG, "block_t", block_t)
    be = _backend_for(_SIG, backend, x.device)
    if be == "torch":
        return ref.hyperplane_signatures(x, planes, weight)
    if x.dtype == torch.float64:
        raise ValueError(f"{_SIG}: the Triton backend takes float16 / bfloat16 / float32 x, got float64 "
                         "(use backend='torch')")
    if max(16, D) > _MAX_BD or K > _MAX_K:
        raise ValueError(f"{_SIG}: the Triton backend takes head dim D <= {_MAX_BD} and K <= {_MAX_K} planes, got "
                         f"D={D}, K={K} (use backend='torch')")
    if H > GRID_ROWS or B > GRID_ROWS:
        raise ValueError(f"{_SIG}: the Triton backend launches a (heads, batch) grid of at most {GRID_ROWS} each, "
                         f"got H={H}, B={B} (use backend='torch')")
    P = planes.detach().to(torch.float32)
    P = (P if P.dim() == 3 else P.unsqueeze(0)).contiguous()
    w = None if weight is None else weight.detach().contiguous()
    return _KERNELS[be][0](x.detach().contiguous(), w, P, H, block_t)


def ultrametric_top1(q, k, v, q_digits, k_digits, *, p=2, causal=False, key_padding_mask=None,
                     return_details=False, block_m=0, block_n=0, check_digits=True, backend=None):
    """Top-1 bucket retrieval (their demo's `attend`; geokern.reference.ultrametric.ultrametric_top1):
    for each head and query, the deepest non-empty prefix bucket among the visible keys (the largest
    LCP; at LCP 0 every visible key), in it the key with the best cosine similarity q.k / (|q| |k|),
    ties to the lowest key index; y = the mean over heads of the picked keys' v.

    q [B, H, Tq, D], k [B, Hkv, Tk, D] (one float dtype), v [B, Hkv, Tk, Dv], q_digits [B, H, Tq, K],
    k_digits [B, Hkv, Tk, K] integer digits in [0, p - 1] (e.g. from ultrametric_signatures); Hkv
    divides H. causal / key_padding_mask as ultrametric_attention (default non-causal: retrieval
    over every stored key). Returns y [B, Tq, Dv] in v's dtype; with return_details also (index
    [B, H, Tq] int64, -1 where no key is visible; lcp [B, H, Tq] int64, -1 there; sim [B, H, Tq]
    float32 (float64 on the torch backend), -inf there, NaN where the picked cosine is NaN, which
    makes y NaN). Differentiable in v only. check_digits=False skips the digits' range check (a
    host read; digits are compared for equality only, so an out-of-range digit is harmless to the
    kernel). block_m / block_n: queries per program and keys per tile (0 chooses).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"{_TOP}: causal must be a bool, got {type(causal).__name__}")
    try:
        B, H, Hkv, Tq, Tk, K, Dv = ref.check_inputs(q_digits, k_digits, v, 2.0, p, causal, key_padding_mask,
                                                     values=check_digits)
        ref.check_top1_vectors(q, k, B, H, Hkv, Tq, Tk)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_TOP}: {e}") from None
    check_same(_TOP, {"q": q, "k": k})
    for name, t in (("v", v), ("q_digits", q_digits), ("k_digits", k_digits), ("key_padding_mask", key_padding_mask)):
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"{_TOP}: {name} is on {t.device} but q is on {q.device}")
    _check_knob(_TOP, "block_m", block_m)
    _check_knob(_TOP, "block_n", block_n)
    be = _backend_for(_TOP, backend, q.device)
    if be == "torch" or B * H * Tq == 0 or Tk == 0:
        y, index, lcp, sim = ref.ultrametric_top1(q, k, v, q_digits, k_digits, p=p, causal=causal,
                                                  key_padding_mask=key_padding_mask, return_details=True)
        if be != "torch":
            sim = sim.float()
    else:
        if q.dtype == torch.float64:
            raise ValueError(f"{_TOP}: the Triton backend takes float16 / bfloat16 / float32 q and k, got float64 "
                             "(use backend='torch')")
        if max(16, q.shape[3]) > _MAX_BD:
            raise ValueError(f"{_TOP}: the Triton backend takes head dim D <= {_MAX_BD}, got {q.shape[3]} "
                             "(use backend='torch')")
        check_grid_rows(_TOP, "triton", B, H)
        keep = None if key_padding_mask is None else key_padding_mask.contiguous()
        index, lcp, sim = _KERNELS[be][1](q.detach().contiguous(), k.detach().contiguous(), q_digits.contiguous(),
                                          k_digits.contiguous(), keep, causal, block_m, block_n)
        lcp = lcp.long()
        y = ref.top1_values(v, index, sim)
    return (y, index, lcp, sim) if return_details else y
