"""Metric-weighted retrieval cost and fused retrieval attention: checks, backends, autograd.

Public: retrieval_cost, retrieval_attention, curvature_scalar (definitions, shapes and broadcasting in
geokern.reference.retrieval; metrics in geokern.metric).

Backends. "torch" runs the reference (float64-capable, chunked over queries).
"triton" runs the flash-style kernels of geokern.kernels.retrieval for
retrieval_attention (float16 / bfloat16 / float32; forward and backward, gradients to
query, keys, values, R and the metric; a shared memory bank as a second key segment of
the same launch). Those kernels expand the squared distance as
|q|^2_w + |k|^2_w - 2 (w q).k on tensor cores (see the kernel module for its error
when q is close to k); non-diagonal metrics are applied as a linear feature map in
PyTorch first, so the kernels see a diagonal metric. "cuda" runs the CUDA C++ kernels of
csrc/retrieval for both ops (float16 / bfloat16 / float32): they form dv = k - q directly
(no expansion, no cancellation when q is close to k) and accumulate in float32. The
attention kernel is flash-decoding shaped (split over keys, a shared bank read once for
many rows, partials merged by log-sum-exp): fast in the decode regime (few queries per
row), correct but slow for long query sequences (no tensor cores; use "triton" there).
Its backward runs dP = dO V^T and dV = P^T dO as float32 cuBLAS GEMMs over chunks of
queries. The CUDA op (torch.ops.geokern.retrieval_attention_cuda) also takes up to 4 key
segments in one launch: the public function passes the row's keys and, with bank=, the
shared bank as the second segment. "auto" picks "cuda" for one query per row (measured
faster than "triton" there, forward and backward) and "triton" otherwise. retrieval_cost has the reference and both kernels
(geokern.kernels.retrieval_cost for Triton); "auto" runs the reference there (the
kernels are not yet measured against it).
"""

import dataclasses
import math
import numbers
import os
from typing import Optional

import torch

from geokern import _backend
from geokern._checks import broadcast_shapes, check_same, check_tensor
from geokern.kernels import retrieval as tk
from geokern.kernels import retrieval_cost as tkc
from geokern.metric import Diag, Metric
from geokern.ops._registry import bound_once, cuda_op, triton_op
from geokern.reference import retrieval as ref

__all__ = ["retrieval_cost", "retrieval_attention", "curvature_scalar"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREFER = ("triton",)
# one query per row (the decode regime): the CUDA kernel, measured on the H100 (B32, 512 own keys +
# a 4096-key bank, d_v 768) at 0.60 / 0.66 ms forward (fp32 / bf16) against Triton's 0.77 / 0.70,
# and 1.75 / 1.90 ms forward + backward against 2.41 / 5.92
_DECODE_PREFER = ("cuda", "triton")


def _cuda_unavailable(op, backend, device):
    if backend == "cuda" or (backend is None and os.environ.get("GEOKERN_BACKEND") == "cuda"):
        raise RuntimeError(f"{op}: backend='cuda' is unavailable: this op family has no CUDA C++ kernel yet "
                           "(use backend='triton' or 'torch')")


# ---- custom ops ------------------------------------------------------------------


def _lead(q, k, v):
    return tuple(broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2]))


def _attn_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, r: torch.Tensor,
                   mask: Optional[torch.Tensor], bk: Optional[torch.Tensor], bv: Optional[torch.Tensor],
                   br: Optional[torch.Tensor], beta: float, eps: float,
                   launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    return tk.attn_fwd(q, k, v, w, r, mask, bk, bv, br, beta, eps, launch)


def _attn_bwd_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                   r: torch.Tensor, mask: Optional[torch.Tensor], bk: Optional[torch.Tensor],
                   bv: Optional[torch.Tensor], br: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                   dlse: Optional[torch.Tensor], beta: float, eps: float, need_dr: bool,
                   launch=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor, torch.Tensor, torch.Tensor]:
    return tk.attn_bwd(do, q, k, v, w, r, mask, bk, bv, br, out, lse, dlse, beta, eps, need_dr, launch)


_attn_fwd_tri = triton_op("retrieval_attention_fwd_triton", _attn_fwd_impl)
_attn_bwd_tri = triton_op("retrieval_attention_bwd_triton", _attn_bwd_impl)


# CUDA C++ ops (csrc/retrieval): 4-D inputs as above, the attention over 1 to 4 key segments
# (k, v, r, mask lists) merged by log-sum-exp. Gradients come back in float32 at the shapes
# below (_grad_shapes), which the fake and the CPU (reference) implementations share.


def _r_mode(r):
    return int(r.shape[2] != 1) + 2 * int(r.shape[3] != 1)


def _grad_shapes(lead, q, k, v, r):
    """(dq, dk, dv, dr) shapes: dq at the full batch; dk at k's batch dims (and R's, per key);
    dv at the kv batch (k's and v's); dR per query / per pair at the full batch, per key at dk's."""
    lq, m, key = q.shape[2], k.shape[2], _r_mode(r) == 2
    kb = tuple(max(k.shape[i], r.shape[i] if key else 1) for i in range(2))
    dr = {0: lead + (lq, 1), 1: lead + (lq, 1), 2: kb + (1, m), 3: lead + (lq, m)}[_r_mode(r)]
    dv = None if v is None else tuple(max(k.shape[i], v.shape[i]) for i in range(2)) + tuple(v.shape[2:])
    return lead + (lq, q.shape[3]), kb + tuple(k.shape[2:]), dv, dr


def _cost_fake(q, k, w, r, eps):
    lead = tuple(broadcast_shapes(q.shape[:2], k.shape[:2]))
    return q.new_empty(lead + (q.shape[2], k.shape[2]), dtype=torch.float32)


def _cost_bwd_fake(grad, q, k, w, r, eps):
    dq, dk, _, dr = _grad_shapes(tuple(grad.shape[:2]), q, k, None, r)
    return tuple(q.new_empty(s, dtype=torch.float32) for s in (dq, dk, dr, w.shape))


def _cost_cpu(q, k, w, r, eps):
    return ref.retrieval_cost(q, k, r, Diag(w), eps).float().contiguous()


def _cost_grads(g, q, k, w, r, eps, lead):
    """(dq, dk, dr, dw) of the cost from its gradient g, by the spec's formulas (the CPU
    implementation of the backward ops: autograd does not run inside an op's kernel)."""
    dq_s, dk_s, _, dr_s = _grad_shapes(lead, q, k, None, r)
    dv = k.float().unsqueeze(-3) - q.float().unsqueeze(-2)  # [.., LQ, M, F]
    sq = (dv * dv * w).sum(-1)
    spd = torch.sqrt(sq.clamp(min=0) + eps)
    c = torch.where(sq >= 0, g * r / spd, torch.zeros_like(spd))
    ddv = c.unsqueeze(-1) * dv * w
    full = lead + tuple(ddv.shape[2:])
    ddv = ddv.expand(full)
    dw = (0.5 * c.unsqueeze(-1) * dv * dv).expand(full).reshape(-1, w.shape[0]).sum(0)
    return (-ddv.sum(-2)).sum_to_size(dq_s), ddv.sum(-3).sum_to_size(dk_s), (g * spd).expand(full[:-1]).sum_to_size(dr_s), dw


def _cost_bwd_cpu(grad, q, k, w, r, eps):
    return tuple(t.contiguous() for t in _cost_grads(grad.float(), q, k, w, r, eps, tuple(grad.shape[:2])))


def _segs_cat(q, ks, vs, rs, masks):
    """The segments as one key set (the CPU reference of the segmented op)."""
    lead = tuple(broadcast_shapes(q.shape[:2], *[k.shape[:2] for k in ks], *[v.shape[:2] for v in vs]))
    lq = q.shape[2]
    kc = torch.cat([k.expand(lead + tuple(k.shape[2:])) for k in ks], 2)
    vc = torch.cat([v.expand(lead + tuple(v.shape[2:])) for v in vs], 2)
    rc = torch.cat([r.expand(lead + (lq, k.shape[2])) for r, k in zip(rs, ks)], 3)
    mc = None
    if any(m is not None for m in masks):
        mc = torch.cat([(torch.ones((), dtype=torch.bool, device=q.device) if m is None else m).expand(lead + (lq, k.shape[2]))
                        for m, k in zip(masks, ks)], 3)
    return lead, kc, vc, rc, mc


def _attn_cuda_fake(q, ks, vs, w, rs, masks, beta, eps):
    lead = tuple(broadcast_shapes(q.shape[:2], *[k.shape[:2] for k in ks], *[v.shape[:2] for v in vs]))
    return (q.new_empty(lead + (q.shape[2], vs[0].shape[3]), dtype=vs[0].dtype),
            q.new_empty(lead + (q.shape[2],), dtype=torch.float32))


def _attn_cuda_cpu(q, ks, vs, w, rs, masks, beta, eps):
    _, kc, vc, rc, mc = _segs_cat(q, ks, vs, rs, masks)
    out, lse = ref.retrieval_attention(q, kc, vc, rc, Diag(w), beta, eps, mc, True)
    return out.contiguous(), lse.float().contiguous()


def _attn_bwd_cuda_fake(dout, q, ks, vs, w, rs, masks, out, lse, dlse, beta, eps):
    lead = tuple(dout.shape[:2])
    shapes = [_grad_shapes(lead, q, k, v, r) for k, v, r in zip(ks, vs, rs)]
    f32 = lambda s: q.new_empty(s, dtype=torch.float32)  # noqa: E731
    return (f32(shapes[0][0]), [f32(s[1]) for s in shapes], [f32(s[2]) for s in shapes], [f32(s[3]) for s in shapes],
            f32(w.shape))


def _attn_bwd_cuda_cpu(dout, q, ks, vs, w, rs, masks, out, lse, dlse, beta, eps):
    lead = tuple(dout.shape[:2])
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    finite = torch.isfinite(lse).unsqueeze(-1)
    dq, dw, dks, dvs, drs = 0, 0, [], [], []
    for k, v, r, m in zip(ks, vs, rs, masks):
        spd = torch.sqrt((((k.float().unsqueeze(-3) - q.float().unsqueeze(-2)) ** 2) * w).sum(-1).clamp(min=0) + eps)
        logit = -beta * r * spd
        if m is not None:
            logit = logit.masked_fill(~m, -math.inf)
        p = torch.where(finite, torch.exp(logit - lse.unsqueeze(-1)), torch.zeros_like(logit))
        dp = dout.float() @ v.float().transpose(-1, -2)
        dcost = -beta * p * (dp - delta.unsqueeze(-1))
        gq, gk, gr, gw = _cost_grads(dcost, q, k, w, r, eps, lead)
        dq, dw = dq + gq, dw + gw
        dks.append(gk.contiguous())
        drs.append(gr.contiguous())
        dvs.append((p.transpose(-1, -2) @ dout.float()).sum_to_size(_grad_shapes(lead, q, k, v, r)[2]).contiguous())
    return dq.contiguous(), dks, dvs, drs, dw


def _cost_triton(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, r: torch.Tensor, eps: float,
                 launch=None) -> torch.Tensor:
    return tkc.cost_fwd(q, k, w, r, eps, launch)


def _cost_bwd_triton(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, r: torch.Tensor,
                     eps: float, launch=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, _, dr = _grad_shapes(tuple(grad.shape[:2]), q, k, None, r)
    return tkc.cost_bwd(grad, q, k, w, r, eps, (dq, dk, dr), launch)


_cost_tri = triton_op("retrieval_cost_triton", _cost_triton)
_cost_bwd_tri = triton_op("retrieval_cost_backward_triton", _cost_bwd_triton)
_cost_cuda = cuda_op("retrieval_cost_cuda", _cost_fake, _cost_cpu)
_cost_bwd_cuda = cuda_op("retrieval_cost_backward_cuda", _cost_bwd_fake, _cost_bwd_cpu)
_attn_fwd_cuda = cuda_op("retrieval_attention_cuda", _attn_cuda_fake, _attn_cuda_cpu)
_attn_bwd_cuda = cuda_op("retrieval_attention_backward_cuda", _attn_bwd_cuda_fake, _attn_bwd_cuda_cpu)


# ---- autograd --------------------------------------------------------------------


@bound_once
class RetrievalAttentionFunction(torch.autograd.Function):
    """Inputs are 4-D ([NB0, NB1, L, F], size-1 batch dims where shared); bk / bv / br the
    bank segment or None; gradients are reduced back to each input's shape."""

    @staticmethod
    def forward(q, k, v, w, r, mask, bk, bv, br, beta, eps, backend="triton"):
        if backend == "cuda":  # the CUDA op takes key segments as lists: the bank is the second
            ks, vs, rs, ms = _segments(k, v, r, mask, bk, bv, br)
            return _attn_fwd_cuda(q, ks, vs, w, rs, ms, beta, eps)
        return _attn_fwd_tri(q, k, v, w, r, mask, bk, bv, br, beta, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, w, r, mask, bk, bv, br, beta, eps = inputs[:11]
        ctx.backend = inputs[11] if len(inputs) > 11 else "triton"
        out, lse = output
        ctx.save_for_backward(q, k, v, w, r, mask, bk, bv, br, out, lse)
        ctx.beta, ctx.eps = beta, eps

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, w, r, mask, bk, bv, br, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        need = ctx.needs_input_grad
        # the lse is differentiable too (merging segments by their lse needs it):
        # d lse / d logit = p, which the kernels take as delta - dlse
        if ctx.backend == "cuda":
            ks, vs, rs, ms = _segments(k, v, r, mask, bk, bv, br)
            dq, dks, dvs, drs, dw = _attn_bwd_cuda(dout, q, ks, vs, w, rs, ms, out, lse, dlse, ctx.beta, ctx.eps)
            dk, dv, dr = dks[0], dvs[0], drs[0]
            dbk, dbv, dbr = (dks[1], dvs[1], drs[1]) if bk is not None else (None, None, None)
        else:
            dq, dk, dv, dr, dbk, dbv, dbr, dw = _attn_bwd_tri(dout, q, k, v, w, r, mask, bk, bv, br, out, lse, dlse,
                                                              ctx.beta, ctx.eps, bool(need[4] or need[8]))

        def red(g, x, i):
            return g.sum_to_size(x.shape).to(x.dtype) if need[i] and g is not None else None

        return (red(dq, q, 0), red(dk, k, 1), red(dv, v, 2), dw if need[3] else None, red(dr, r, 4), None,
                red(dbk, bk, 6), red(dbv, bv, 7), red(dbr, br, 8), None, None, None)


def _segments(k, v, r, mask, bk, bv, br):
    """The CUDA op's key segments (lists of keys, values, R, mask): the row's keys, then the bank."""
    if bk is None:
        return [k], [v], [r], [mask]
    return [k, bk], [v, bv], [r, br], [mask, None]


@bound_once
class RetrievalCostFunction(torch.autograd.Function):
    """The cost's kernels on 4-D inputs ([NB0, NB1, L, F], size-1 batch dims where shared)."""

    @staticmethod
    def forward(q, k, w, r, eps, backend):
        return (_cost_cuda if backend == "cuda" else _cost_tri)(q, k, w, r, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, w, r, eps, backend = inputs
        ctx.save_for_backward(q, k, w, r)
        ctx.eps, ctx.backend = eps, backend

    @staticmethod
    def backward(ctx, grad):
        q, k, w, r = ctx.saved_tensors
        bwd = _cost_bwd_cuda if ctx.backend == "cuda" else _cost_bwd_tri
        dq, dk, dr, dw = bwd(grad.float().contiguous(), q, k, w, r, ctx.eps)
        need = ctx.needs_input_grad
        return (
            dq.sum_to_size(q.shape).to(q.dtype) if need[0] else None,
            dk.sum_to_size(k.shape).to(k.dtype) if need[1] else None,
            dw if need[2] else None,
            dr.sum_to_size(r.shape) if need[3] else None,
            None, None,
        )


# ---- input checks and shape plumbing ---------------------------------------------


def _check_number(op, name, x, positive=False):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(x).__name__}")
    if not math.isfinite(x) or (positive and x <= 0) or (not positive and x < 0):
        raise ValueError(f"{op}: {name} must be finite and {'> 0' if positive else '>= 0'}, got {x}")


def _check_inputs(op, query, keys, values, R, metric, eps, mask):
    named = {"query": query, "keys": keys}
    check_tensor(op, "query", query, min_dim=2)
    check_tensor(op, "keys", keys, min_dim=2)
    if values is not None:
        check_tensor(op, "values", values, min_dim=2)
        named["values"] = values
    check_same(op, named)
    if not isinstance(metric, Metric):
        raise TypeError(f"{op}: metric must be a geokern.metric metric (diag, rotor_diag, lowrank), "
                        f"got {type(metric).__name__}")
    n = query.shape[-1]
    if keys.shape[-1] != n or metric.n != n:
        raise ValueError(f"{op}: query, keys and metric must share the coordinate dim; got query "
                         f"{tuple(query.shape)}, keys {tuple(keys.shape)}, metric n = {metric.n}")
    for name in (f.name for f in dataclasses.fields(metric)):  # vars() does not trace under dynamo
        t = getattr(metric, name)
        if isinstance(t, torch.Tensor) and t.device != query.device:
            raise ValueError(f"{op}: metric.{name} is on {t.device} but query is on {query.device}")
    if values is not None and values.shape[-2] != keys.shape[-2]:
        raise ValueError(f"{op}: values must have as many rows as keys ({keys.shape[-2]}), got {tuple(values.shape)}")
    _check_number(op, "eps", eps)
    q, k, squeeze = ref.as_batched(query, keys)
    try:
        lead = broadcast_shapes(q.shape[:-2], k.shape[:-2],
                                      *([] if values is None else [ref._values_batched(values).shape[:-2]]))
    except RuntimeError:
        raise ValueError(f"{op}: leading dims of query {tuple(query.shape)}, keys {tuple(keys.shape)}"
                         + ("" if values is None else f" and values {tuple(values.shape)}") + " do not broadcast") from None
    cost_shape = tuple(lead) + (q.shape[-2], k.shape[-2])
    user_shape = cost_shape[:-2] + cost_shape[-1:] if squeeze else cost_shape
    if isinstance(R, torch.Tensor):
        if not R.dtype.is_floating_point:
            raise TypeError(f"{op}: R must be a floating-point tensor or a number, got {R.dtype}")
        if R.device != query.device:
            raise ValueError(f"{op}: R is on {R.device} but query is on {query.device}")
        _check_broadcast(op, "R", R.shape, user_shape, squeeze)
    elif isinstance(R, bool) or not isinstance(R, numbers.Real):
        raise TypeError(f"{op}: R must be a tensor or a real number, got {type(R).__name__}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{op}: mask must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.device != query.device:
            raise ValueError(f"{op}: mask is on {mask.device} but query is on {query.device}")
        _check_broadcast(op, "mask", mask.shape, user_shape, squeeze)
    return lead, squeeze


def _check_broadcast(op, name, shape, target, squeeze):
    ok = len(shape) <= len(target)
    if ok:
        try:
            ok = tuple(broadcast_shapes(shape, target)) == tuple(target)
        except RuntimeError:
            ok = False
    if not ok:
        hint = " (a per-query value of a 2-D query is [B, 1])" if squeeze else " (per query: [..., Lq, 1])"
        raise ValueError(f"{op}: {name} of shape {tuple(shape)} must broadcast to the cost shape {tuple(target)}{hint}")


def _to4(t, lead, tail):
    """t viewed as [NB0, NB1, *tail] with size-1 batch dims where t is broadcast.

    lead is the full broadcast batch shape; t's own leading dims are right-aligned in it.
    One reshape (a view when t already has the shape: never t itself, since dynamo rejects the
    same tensor object passed twice to an autograd Function, e.g. keys that are the values).
    """
    nb = t.dim() - len(tail)
    own = (1,) * (len(lead) - nb) + tuple(t.shape[:nb])
    tail = tuple(t.shape[nb:])
    if len(lead) <= 2:
        shape = (1,) * (2 - len(lead)) + own + tail
        return t.view(shape) if tuple(t.shape) == shape else t.reshape(shape)
    inner = own[-1]
    if all(s == 1 for s in own[:-1]):
        n0 = 1
    else:
        t = t.reshape(own + tail).expand(tuple(lead[:-1]) + (inner,) + tail)  # differentiable; copies below
        n0 = math.prod(lead[:-1])
    return t.reshape((n0, inner) + tail)


def _user_to4(x, lead, squeeze, tail_rank):
    """R or mask (user shape, broadcasting to the cost) as [NB0|1, NB1|1, Lq|1, M|1]."""
    if squeeze and x.dim() >= 2:
        x = x.unsqueeze(-2)
    while x.dim() < 2:
        x = x.unsqueeze(0)
    return _to4(x, lead, x.shape[-2:])


def _kernel_backend(op, backend, device, dtype, prefer):
    """The backend to run; an explicit kernel backend with a dtype it lacks is a TypeError."""
    be = _backend.resolve(op, backend, device, prefer)
    if be in ("triton", "cuda") and dtype not in _KERNEL_DTYPES:
        if backend is None or backend == "auto":
            return "torch"
        raise TypeError(f"{op}: backend='{be}' supports query dtypes float16, bfloat16, float32; "
                        f"got {dtype} (use backend='torch')")
    return be


def _features(metric, query, keys):
    """(query, keys, w float32) with a general metric mapped to features: the kernels see diag(w)."""
    if isinstance(metric, Diag):
        return query, keys, metric.lam.to(torch.float32)
    fq, w = metric.features(query)
    fk, _ = metric.features(keys)
    return fq, fk, w.to(torch.float32)


def _r4(R, lead, squeeze, device):
    if isinstance(R, torch.Tensor):
        return _user_to4(R.to(torch.float32), lead, squeeze, 2)
    return torch.full((1, 1, 1, 1), float(R), dtype=torch.float32, device=device)


# ---- public ops ------------------------------------------------------------------


def retrieval_cost(query: torch.Tensor, keys: torch.Tensor, R, metric: Metric, eps: float = 1e-8, *,
                   backend: str | None = None) -> torch.Tensor:
    """cost = R * sqrt(max(g(keys - query, keys - query), 0) + eps), in float32 (float64 for float64).

    query [B, n] or [..., Lq, n]; keys [M, n] (shared) or [..., M, n]; R a number or a tensor
    broadcasting to the cost shape [B, M] / [..., Lq, M] (per query: [B, 1] / [..., Lq, 1]).
    Differentiable in query, keys, R and the metric's parameters. "torch" runs the reference,
    "cuda" and "triton" their kernels (dv formed directly, float32 arithmetic; float16 / bfloat16 /
    float32; "triton" up to 128 metric features).
    """
    op = "retrieval_cost"
    lead, squeeze = _check_inputs(op, query, keys, None, R, metric, eps, None)
    be = _kernel_backend(op, backend, query.device, query.dtype, ("torch",))
    if be == "torch":
        return ref.retrieval_cost(query, keys, R, metric, eps)
    if not isinstance(metric, Diag):  # the cost is float32: map rotor / lowrank features in float32 too
        query, keys = query.float(), keys.float()
    fq, fk, w = _features(metric, query, keys)
    if be == "triton" and fq.shape[-1] > tkc.MAX_F:
        raise ValueError(f"{op}: backend='triton' takes at most {tkc.MAX_F} metric features, got {fq.shape[-1]} "
                         "(use backend='cuda' or 'torch')")
    q, k, _ = ref.as_batched(fq, fk)
    lead = tuple(lead)
    cost = RetrievalCostFunction.apply(_to4(q, lead, q.shape[-2:]), _to4(k, lead, k.shape[-2:]), w.contiguous(),
                                       _r4(R, lead, squeeze, query.device), float(eps), be)
    cost = cost.reshape(lead + (q.shape[-2], k.shape[-2]))
    return cost.squeeze(-2) if squeeze else cost


def _check_bank(op, bank, query, values, R, lead, squeeze):
    """(bank_keys, bank_values, bank_R) checked; bank_R defaults to R where R does not depend on the key."""
    if not isinstance(bank, (tuple, list)) or len(bank) not in (2, 3):
        raise TypeError(f"{op}: bank must be a tuple (keys, values) or (keys, values, R), got "
                        f"{type(bank).__name__}{'' if not isinstance(bank, (tuple, list)) else f' of {len(bank)}'}")
    bk, bv = bank[0], bank[1]
    check_tensor(op, "bank keys", bk, min_dim=2)
    check_tensor(op, "bank values", bv, min_dim=2)
    check_same(op, {"query": query, "bank keys": bk, "bank values": bv})
    if bk.shape[-1] != query.shape[-1] or bv.shape[-1] != values.shape[-1] or bv.shape[-2] != bk.shape[-2]:
        raise ValueError(f"{op}: bank keys must be [..., C, {query.shape[-1]}] and bank values [..., C, "
                         f"{values.shape[-1]}]; got {tuple(bk.shape)} and {tuple(bv.shape)}")
    own = ref.as_batched(query, bk)[1].shape[:-2], ref._values_batched(bv).shape[:-2]
    for shape in own:
        try:
            ok = tuple(broadcast_shapes(shape, lead)) == tuple(lead)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: the bank's leading dims {tuple(shape)} must broadcast to the batch shape "
                             f"{tuple(lead)} of query, keys and values")
    if len(bank) == 3:
        br = bank[2]
    elif not isinstance(R, torch.Tensor) or R.dim() == 0 or R.shape[-1] == 1:
        br = R  # a number or one R per query applies to both segments
    else:
        raise ValueError(f"{op}: R of shape {tuple(R.shape)} depends on the key; pass the bank's own R as "
                         "bank=(keys, values, R)")
    cost_shape = tuple(lead) + ((1,) if squeeze else (query.shape[-2],)) + (bk.shape[-2],)
    user_shape = cost_shape[:-2] + cost_shape[-1:] if squeeze else cost_shape
    if isinstance(br, torch.Tensor):
        if not br.dtype.is_floating_point or br.device != query.device:
            raise TypeError(f"{op}: bank R must be a floating-point tensor on {query.device} or a number, "
                            f"got {br.dtype} on {br.device}")
        _check_broadcast(op, "bank R", br.shape, user_shape, squeeze)
    elif isinstance(br, bool) or not isinstance(br, numbers.Real):
        raise TypeError(f"{op}: bank R must be a tensor or a real number, got {type(br).__name__}")
    return bk, bv, br


def _merge_by_lse(o1, l1, o2, l2):
    """Outputs of two key segments merged by their log-sum-exp: one softmax over the union.
    A row that sees no key in either (lse -inf twice) gives zeros and lse -inf."""
    total = torch.logsumexp(torch.stack([l1, l2]), 0)
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    w1, w2 = torch.exp(l1 - safe).unsqueeze(-1), torch.exp(l2 - safe).unsqueeze(-1)
    return (w1 * o1.to(w1.dtype) + w2 * o2.to(w1.dtype)).to(o1.dtype), total


def retrieval_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, R, metric: Metric,
                        beta: float, eps: float = 1e-8, mask: torch.Tensor | None = None, *,
                        bank=None, return_lse: bool = False, backend: str | None = None):
    """out = softmax_m(-beta * cost) @ values, flash-style, never materialising the cost.

    query [B, n] (one query per row) or [..., Lq, n]; keys [M, n] (shared) or [..., M, n];
    values [M, d_v] or [..., M, d_v]; R and mask (bool, True = keep) broadcast to the cost
    shape [B, M] / [..., Lq, M]. Returns out ([B, d_v] / [..., Lq, d_v], values' dtype)
    and, with return_lse=True, the log-sum-exp per query (float32; -inf for a fully
    masked row, whose output is zeros).

    bank: a second key segment, (bank_keys [C, n], bank_values [C, d_v]) or
    (bank_keys, bank_values, bank_R), usually one copy shared by the whole batch (leading
    dims, if any, broadcast to the batch shape). The softmax runs over the union of the
    row's keys and the bank: the same output and lse as concatenating the bank, expanded
    per row, to keys and values, but the Triton kernel streams both segments in one launch
    and reads the bank through its own strides (never expanded or concatenated; its
    gradients are summed over the batch in place). bank_R (a number or a tensor
    broadcasting to [B, C] / [..., Lq, C]) defaults to R when R is a number or per query;
    `mask` applies to the row's keys only, the bank is never masked.
    """
    op = "retrieval_attention"
    lead, squeeze = _check_inputs(op, query, keys, values, R, metric, eps, mask)
    _check_number(op, "beta", beta)
    bk = bv = br = None
    if bank is not None:
        bk, bv, br = _check_bank(op, bank, query, values, R, lead, squeeze)
    be = _kernel_backend(op, backend, query.device, query.dtype,
                         _DECODE_PREFER if squeeze or query.shape[-2] == 1 else _PREFER)
    if be == "torch":
        out, lse = ref.retrieval_attention(query, keys, values, R, metric, beta, eps, mask, True)
        if bank is not None:
            o2, l2 = ref.retrieval_attention(query, bk, bv, br, metric, beta, eps, None, True)
            out, lse = _merge_by_lse(out, lse, o2, l2)
        return (out, lse) if return_lse else out

    # a general metric is a linear feature map plus diagonal weights: map, then run the diag kernel
    fq, fk, w = _features(metric, query, keys)
    fb = None if bk is None else _features(metric, query, bk)[1]
    q, k, _ = ref.as_batched(fq, fk)
    v = ref._values_batched(values)
    lead = tuple(lead)
    q4 = _to4(q, lead, q.shape[-2:])
    k4 = _to4(k, lead, k.shape[-2:])
    v4 = _to4(v, lead, v.shape[-2:])
    r4 = _r4(R, lead, squeeze, query.device)
    mask4 = None if mask is None else _user_to4(mask, lead, squeeze, 2)
    b4 = (None, None, None)
    if bank is not None:
        bk3, bv3 = ref.as_batched(fq, fb)[1], ref._values_batched(bv)
        b4 = (_to4(bk3, lead, bk3.shape[-2:]), _to4(bv3, lead, bv3.shape[-2:]),
              r4.view(r4.shape) if br is R else _r4(br, lead, squeeze, query.device))  # a view: see _to4
    out, lse = RetrievalAttentionFunction.apply(q4, k4, v4, w.contiguous(), r4, mask4, *b4, float(beta), float(eps), be)
    full = lead + (q.shape[-2],)
    out = out.reshape(full + (v.shape[-1],))
    lse = lse.reshape(full)
    if squeeze:
        out, lse = out.squeeze(-2), lse.squeeze(-1)
    return (out, lse) if return_lse else out


def curvature_scalar(R4: torch.Tensor, g_inv: torch.Tensor, eps: float = 1e-8, *,
                     backend: str | None = None) -> torch.Tensor:
    """R_sc = sqrt(|(1/n^2) R4[..., mu, nu, rho, sigma] g^{mu rho} g^{nu sigma}| + eps), batched.

    R4 [..., n, n, n, n]; g_inv [..., n, n], the inverse metric, per row or shared (leading
    dims broadcast). Returns the leading shape, in float32 (float64 for float64).
    Differentiable in R4 and g_inv. Two small contractions that cuBLAS already runs at
    its rate: the "torch" implementation is the only one; "triton" and "cuda" raise.
    """
    op = "curvature_scalar"
    check_tensor(op, "R4", R4, min_dim=4)
    n = R4.shape[-1]
    if tuple(R4.shape[-4:]) != (n, n, n, n):
        raise ValueError(f"{op}: R4 must end in four equal dims (..., n, n, n, n), got shape {tuple(R4.shape)}")
    check_tensor(op, "g_inv", g_inv, min_dim=2)
    if tuple(g_inv.shape[-2:]) != (n, n):
        raise ValueError(f"{op}: g_inv must end in ({n}, {n}) to match R4, got shape {tuple(g_inv.shape)}")
    check_same(op, {"R4": R4, "g_inv": g_inv})
    try:
        broadcast_shapes(R4.shape[:-4], g_inv.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{op}: leading dims of R4 {tuple(R4.shape)} and g_inv {tuple(g_inv.shape)} "
                         "do not broadcast") from None
    _check_number(op, "eps", eps)
    _cuda_unavailable(op, backend, R4.device)
    be = _backend.resolve(op, backend, R4.device, ("torch",))
    if be == "triton":
        raise RuntimeError(f"{op}: backend='triton' is unavailable: curvature_scalar has only the "
                           "PyTorch implementation (use backend='torch')")
    return ref.curvature_scalar(R4, g_inv, eps)
