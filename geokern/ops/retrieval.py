"""Metric-weighted retrieval cost and fused retrieval attention: checks, backends, custom ops, autograd.

Public: retrieval_cost, retrieval_attention, curvature_scalar. Definitions, shapes, broadcasting,
the bank segment and the backward formulas in geokern.reference.retrieval; metrics in geokern.metric.

Backends. "torch" runs the reference (float64-capable, chunked over queries). "triton" runs the
flash-style kernels of geokern.kernels.retrieval (float16 / bfloat16 / float32): they expand the
squared distance as |q|^2_w + |k|^2_w - 2 (w q).k on tensor cores (kernels/retrieval/README.md gives
its error when q is close to k) and stream a bank as a second key segment of the same launch.
"cuda" runs the CUDA C++ kernels of csrc/retrieval (float16 / bfloat16 / float32): they form
dv = k - q directly (no cancellation) and accumulate in float32; the attention is flash-decoding
shaped (split over keys, a shared bank read once for many rows, partials merged by log-sum-exp):
fast for few queries per row, correct but slow for long query sequences. Its backward runs
dP = dO V^T and dV = P^T dO as float32 cuBLAS GEMMs over chunks of queries. Non-diagonal metrics
reach both kernels as a linear feature map applied in PyTorch first (a diagonal metric on
features). "auto" picks "cuda" for one query per row and "triton" otherwise for the attention,
the reference for the cost (its kernels are not yet measured against it).
"""

import dataclasses
import math
from typing import Optional

import torch

from geokern import _backend
from geokern._checks import broadcast_shapes, check_same, check_tensor
from geokern.kernels import retrieval as tk
from geokern.metric import Diag, Metric
from geokern.ops._registry import (alert_nondeterministic, bound_once, constant, cuda_op, refuse_double_backward,
                                   triton_op)
from geokern.ops._retrieval_args import (_autocast, _check_bank, _check_broadcast,
                                         _check_knobs, _check_number, _check_r_number)
from geokern.reference import retrieval as ref

__all__ = ["retrieval_cost", "retrieval_attention", "curvature_scalar"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREFER = ("triton",)
# one query per row (the decode regime): the CUDA kernel is faster there, forward and backward
# (csrc/retrieval/README.md, "Auto's choice")
_DECODE_PREFER = ("cuda", "triton")


# ---- custom ops ------------------------------------------------------------------
# Operands are 4-D: q [NB0, NB1, LQ, F], k [NB0|1, NB1|1, M, F], v [.., M, DV], r float32 and mask
# (bool or None) broadcasting to [NB0, NB1, LQ, M], w [F] float32 (a diagonal metric on features);
# bank_k / bank_v / bank_r the bank segment in the same layout (length C for M; unmasked) or None.
#
#   retrieval_attention_<be>(q, k, v, w, r, mask, bank_k, bank_v, bank_r, float beta, float eps,
#       int num_ctas, int bank_splits, int pipeline, int norm_mma) -> (out [NB0, NB1, LQ, DV] in v's
#       dtype, lse [NB0, NB1, LQ] float32)
#   retrieval_attention_backward_<be>(dout, q, k, v, w, r, mask, bank_k, bank_v, bank_r, out, lse,
#       Tensor? dlse, float beta, float eps, bool need_dr, int chunk)
#       -> (dq, dk, dv, dr, dbank_k, dbank_v, dbank_r, dw), float32 at _attention_grad_shapes
#       (without a bank its three are empty [0]; dr / dbank_r may be zeros unless need_dr; Triton's dq /
#       dk / dv that have their input's shape come in the input's dtype: nothing is summed after them)
#   retrieval_cost_<be>(q, k, w, r, float eps) -> cost [NB0, NB1, LQ, M] float32
#   retrieval_cost_backward_<be>(grad, q, k, w, r, float eps) -> (dq, dk, dr, dw) float32
#
# Knobs (0 / -1 = choose), each read by one backend only, ignored by the other: num_ctas (CUDA:
# the forward's target grid size; 0 = 2 per SM), bank_splits (CUDA: most key splits of a bank
# shared by several rows; 0 = one per 64 keys), pipeline (Triton: issue the next key tile's GEMM
# early; -1 = from head dim 128 on, 0 off, 1 on), norm_mma (Triton: norms and row sums on tensor
# cores for 16-bit unmasked launches; -1 / 1 on, 0 off), chunk (CUDA backward: most elements of
# one dP chunk; 0 = 2^26). The fakes and the CPU implementations (the reference) are shared by
# the CUDA ops; the Triton ops are traced for their fakes and run their kernels under the
# interpreter on CPU tensors.


def _grad_shapes(lead, q, k, v, r):
    """(dq, dk, dv, dr) shapes: dq at the full batch; dk at k's batch dims (and R's, per key);
    dv at the kv batch (k's and v's); dR per query / per pair at the full batch, per key at dk's."""
    lq, m, key = q.shape[2], k.shape[2], tk.r_mode(r) == 2
    kb = tuple(max(k.shape[i], r.shape[i] if key else 1) for i in range(2))
    dr = {0: lead + (lq, 1), 1: lead + (lq, 1), 2: kb + (1, m), 3: lead + (lq, m)}[tk.r_mode(r)]
    dv = None if v is None else tuple(max(k.shape[i], v.shape[i]) for i in range(2)) + tuple(v.shape[2:])
    return lead + (lq, q.shape[3]), kb + tuple(k.shape[2:]), dv, dr


def _attention_grad_shapes(dout, q, k, v, r, bank_k, bank_v, bank_r):
    """((dq, dk, dv, dr), (dq, dbank_k, dbank_v, dbank_r) or None): the backward's output shapes."""
    lead = tuple(dout.shape[:2])
    return (_grad_shapes(lead, q, k, v, r),
            None if bank_k is None else _grad_shapes(lead, q, bank_k, bank_v, bank_r))


def _f32(like, shape):
    return like.new_empty(shape, dtype=torch.float32)


def _retrieval_attention_fake(q, k, v, w, r, mask, bank_k, bank_v, bank_r, beta, eps, num_ctas, bank_splits,
                              pipeline, norm_mma):
    lead = tuple(broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2]))
    return q.new_empty(lead + (q.shape[2], v.shape[3]), dtype=v.dtype), _f32(q, lead + (q.shape[2],))


def _retrieval_attention_cpu(q, k, v, w, r, mask, bank_k, bank_v, bank_r, beta, eps, num_ctas, bank_splits,
                             pipeline, norm_mma):
    bank = None if bank_k is None else (bank_k, bank_v, bank_r)
    out, lse = ref.retrieval_attention(q, k, v, r, Diag(w), beta, eps, mask, True, bank=bank)
    return out.contiguous(), lse.float().contiguous()


def _retrieval_attention_backward_fake(dout, q, k, v, w, r, mask, bank_k, bank_v, bank_r, out, lse, dlse, beta,
                                       eps, need_dr, chunk):
    seg, bank = _attention_grad_shapes(dout, q, k, v, r, bank_k, bank_v, bank_r)
    return (*(_f32(q, s) for s in seg), *(_f32(q, s) for s in (bank[1:] if bank else ((0,),) * 3)), _f32(q, w.shape))


def _retrieval_attention_backward_cpu(dout, q, k, v, w, r, mask, bank_k, bank_v, bank_r, out, lse, dlse, beta,
                                      eps, need_dr, chunk):
    shapes = _attention_grad_shapes(dout, q, k, v, r, bank_k, bank_v, bank_r)
    bank = None if bank_k is None else (bank_k, bank_v, bank_r)
    grads = ref.retrieval_attention_backward(dout, q, k, v, w, r, mask, out, lse, dlse, beta, eps, bank, shapes)
    return tuple(_f32(q, (0,)) if g is None else g.float().contiguous() for g in grads)


def _retrieval_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, r: torch.Tensor, mask: Optional[torch.Tensor],
    bank_k: Optional[torch.Tensor], bank_v: Optional[torch.Tensor], bank_r: Optional[torch.Tensor], beta: float,
    eps: float, num_ctas: int, bank_splits: int, pipeline: int, norm_mma: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return tk.retrieval_attention_fwd(q, k, v, w, r, mask, bank_k, bank_v, bank_r, beta, eps, pipeline, norm_mma)


def _retrieval_attention_backward_triton(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, r: torch.Tensor,
    mask: Optional[torch.Tensor], bank_k: Optional[torch.Tensor], bank_v: Optional[torch.Tensor],
    bank_r: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor], beta: float,
    eps: float, need_dr: bool, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    shapes = _attention_grad_shapes(dout, q, k, v, r, bank_k, bank_v, bank_r)
    return tk.retrieval_attention_bwd(dout, q, k, v, w, r, mask, bank_k, bank_v, bank_r, out, lse, dlse, beta, eps,
                                      need_dr, shapes)


def _cost_grad_shapes(grad, q, k, r):
    dq, dk, _, dr = _grad_shapes(tuple(grad.shape[:2]), q, k, None, r)
    return dq, dk, dr


def _retrieval_cost_fake(q, k, w, r, eps):
    lead = tuple(broadcast_shapes(q.shape[:2], k.shape[:2]))
    return _f32(q, lead + (q.shape[2], k.shape[2]))


def _retrieval_cost_cpu(q, k, w, r, eps):
    return ref.retrieval_cost(q, k, r, Diag(w), eps).float().contiguous()


def _retrieval_cost_backward_fake(grad, q, k, w, r, eps):
    return (*(_f32(q, s) for s in _cost_grad_shapes(grad, q, k, r)), _f32(q, w.shape))


def _retrieval_cost_backward_cpu(grad, q, k, w, r, eps):
    grads = ref.retrieval_cost_backward(grad.float(), q, k, w, r, eps, _cost_grad_shapes(grad, q, k, r))
    return tuple(g.float().contiguous() for g in grads)


def _retrieval_cost_triton(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, r: torch.Tensor,
                           eps: float) -> torch.Tensor:
    return tk.retrieval_cost_fwd(q, k, w, r, eps)


def _retrieval_cost_backward_triton(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                                    r: torch.Tensor, eps: float
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tk.retrieval_cost_bwd(grad, q, k, w, r, eps, _cost_grad_shapes(grad, q, k, r))


_ATTENTION = {
    "cuda": (cuda_op("retrieval_attention_cuda", _retrieval_attention_fake, _retrieval_attention_cpu),
             cuda_op("retrieval_attention_backward_cuda", _retrieval_attention_backward_fake,
                     _retrieval_attention_backward_cpu)),
    "triton": (triton_op("retrieval_attention_triton", _retrieval_attention_triton),
               triton_op("retrieval_attention_backward_triton", _retrieval_attention_backward_triton)),
}
_COST = {
    "cuda": (cuda_op("retrieval_cost_cuda", _retrieval_cost_fake, _retrieval_cost_cpu),
             cuda_op("retrieval_cost_backward_cuda", _retrieval_cost_backward_fake, _retrieval_cost_backward_cpu)),
    "triton": (triton_op("retrieval_cost_triton", _retrieval_cost_triton),
               triton_op("retrieval_cost_backward_triton", _retrieval_cost_backward_triton)),
}


# ---- autograd --------------------------------------------------------------------


@bound_once
class RetrievalAttentionFunction(torch.autograd.Function):
    """The attention's custom ops on 4-D inputs ([NB0, NB1, L, F], size-1 batch dims where shared);
    bk / bv / br the bank segment or None; knobs (num_ctas, bank_splits, pipeline, norm_mma,
    bwd_chunk). Gradients are reduced back to each input's shape and dtype."""

    @staticmethod
    def forward(q, k, v, w, r, mask, bk, bv, br, beta, eps, backend, knobs):
        return _ATTENTION[backend][0](q, k, v, w, r, mask, bk, bv, br, beta, eps, *knobs[:4])

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, w, r, mask, bk, bv, br, beta, eps, backend, knobs = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, w, r, mask, bk, bv, br, out, lse)
        ctx.beta, ctx.eps, ctx.backend, ctx.chunk = beta, eps, backend, knobs[4]

    @staticmethod
    def backward(ctx, dout, dlse):
        refuse_double_backward("retrieval_attention")
        if ctx.backend == "triton":  # float32 atomics add the query side, dw and shared dK / dV
            alert_nondeterministic("retrieval_attention backward (backend='triton')", "backend='cuda' (or 'torch')")
        q, k, v, w, r, mask, bk, bv, br, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        need = ctx.needs_input_grad
        # the lse is differentiable too (merging segments by their lse needs it):
        # d lse / d logit = p, which the kernels take as delta - dlse
        dq, dk, dv, dr, dbk, dbv, dbr, dw = _ATTENTION[ctx.backend][1](
            dout, q, k, v, w, r, mask, bk, bv, br, out, lse, dlse, ctx.beta, ctx.eps, bool(need[4] or need[8]),
            ctx.chunk)

        def red(g, x, i):
            return g.sum_to_size(x.shape).to(x.dtype) if need[i] else None

        return (red(dq, q, 0), red(dk, k, 1), red(dv, v, 2), dw if need[3] else None, red(dr, r, 4), None,
                red(dbk, bk, 6), red(dbv, bv, 7), red(dbr, br, 8), None, None, None, None)


@bound_once
class RetrievalCostFunction(torch.autograd.Function):
    """The cost's custom ops on 4-D inputs ([NB0, NB1, L, F], size-1 batch dims where shared)."""

    @staticmethod
    def forward(q, k, w, r, eps, backend):
        return _COST[backend][0](q, k, w, r, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, w, r, eps, backend = inputs
        ctx.save_for_backward(q, k, w, r)
        ctx.eps, ctx.backend = eps, backend

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("retrieval_cost")
        q, k, w, r = ctx.saved_tensors
        dq, dk, dr, dw = _COST[ctx.backend][1](grad.float().contiguous(), q, k, w, r, ctx.eps)
        need = ctx.needs_input_grad
        return (
            dq.sum_to_size(q.shape).to(q.dtype) if need[0] else None,
            dk.sum_to_size(k.shape).to(k.dtype) if need[1] else None,
            dw if need[2] else None,
            dr.sum_to_size(r.shape) if need[3] else None,
            None, None,
        )


# ---- input checks and shape plumbing ---------------------------------------------


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
    q, k, v, squeeze = ref.as_batched(query, keys, values)
    try:
        lead = broadcast_shapes(q.shape[:-2], k.shape[:-2], *([] if v is None else [v.shape[:-2]]))
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
    else:
        _check_r_number(op, "R", R)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{op}: mask must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.device != query.device:
            raise ValueError(f"{op}: mask is on {mask.device} but query is on {query.device}")
        _check_broadcast(op, "mask", mask.shape, user_shape, squeeze)
    return lead, squeeze


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


def _user_to4(x, lead, squeeze):
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
        # only "auto" may pick another backend; GEOKERN_BACKEND=triton is as explicit as backend="triton"
        if _backend.requested(backend) == "auto":
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
        return _user_to4(R.to(torch.float32), lead, squeeze)
    return constant(R, (1, 1, 1, 1), torch.float32, device)


# ---- public ops ------------------------------------------------------------------


def retrieval_cost(query: torch.Tensor, keys: torch.Tensor, R, metric: Metric, eps: float = 1e-8, *,
                   backend: str | None = None) -> torch.Tensor:
    """cost = R * sqrt(max(g(keys - query, keys - query), 0) + eps), in float32 (float64 for float64).

    query [B, n] or [..., Lq, n]; keys [M, n] (shared) or [..., M, n]; R a number or a tensor
    broadcasting to the cost shape [B, M] / [..., Lq, M] (per query: [B, 1] / [..., Lq, 1]).
    Differentiable in query, keys, R and the metric's parameters. "torch" runs the reference,
    "cuda" and "triton" their kernels (dv formed directly, float32 arithmetic; float16 / bfloat16 /
    float32; "triton" up to 128 metric features).

    Edges: NaN in a query row, a key, R or the metric gives NaN in exactly the costs that read it
    (row i for query i, column j for key j, every entry for the metric). eps = 0 is allowed; at a
    zero distance the gradient takes sqrt's subgradient 0. R as a number must be finite. Under
    torch.autocast the cost stays float32 (as torch.cdist). No keys or queries: an empty cost whose
    gradients are zeros of the inputs' shapes.
    """
    op = "retrieval_cost"
    lead, squeeze = _check_inputs(op, query, keys, None, R, metric, eps, None)
    be = _kernel_backend(op, backend, query.device, query.dtype, ("torch",))
    if be == "torch":
        return ref.retrieval_cost(query, keys, R, metric, eps)
    if not isinstance(metric, Diag):  # the cost is float32: map rotor / lowrank features in float32 too
        query, keys = query.float(), keys.float()
    fq, fk, w = _features(metric, query, keys)
    if be == "triton" and fq.shape[-1] > tk.MAX_F:
        raise ValueError(f"{op}: backend='triton' takes at most {tk.MAX_F} metric features, got {fq.shape[-1]} "
                         "(use backend='cuda' or 'torch')")
    q, k, _, _ = ref.as_batched(fq, fk)
    lead = tuple(lead)
    cost = RetrievalCostFunction.apply(_to4(q, lead, q.shape[-2:]), _to4(k, lead, k.shape[-2:]), w.contiguous(),
                                       _r4(R, lead, squeeze, query.device), float(eps), be)
    cost = cost.reshape(lead + (q.shape[-2], k.shape[-2]))
    return cost.squeeze(-2) if squeeze else cost


def retrieval_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, R, metric: Metric,
                        beta: float, eps: float = 1e-8, mask: torch.Tensor | None = None, *,
                        bank=None, return_lse: bool = False, backend: str | None = None, num_ctas: int = 0,
                        bank_splits: int = 0, pipeline: int = -1, norm_mma: int = -1, bwd_chunk: int = 0):
    """out = softmax_m(-beta * cost) @ values, flash-style, never materialising the cost.

    query [B, n] (one query per row) or [..., Lq, n]; keys [M, n] (shared) or [..., M, n];
    values [M, d_v] or [..., M, d_v]; R and mask (bool, True = keep) broadcast to the cost
    shape [B, M] / [..., Lq, M]. Returns out ([B, d_v] / [..., Lq, d_v], values' dtype)
    and, with return_lse=True, the log-sum-exp per query (float32; -inf for a fully
    masked row, whose output is zeros; no keys at all (M = 0) is such a row, with zero
    gradients). Under torch.autocast query, keys, values and the bank's run in the autocast
    dtype (as scaled_dot_product_attention). With torch.use_deterministic_algorithms(True)
    the "triton" backward raises (float32 atomics); "cuda" and "torch" are deterministic.

    Edges. NaN in the query, a key, R or the metric makes NaN exactly the outputs (and lse)
    whose formula reads it: a query's row, every row that sees the key, the rows using
    that R; a NaN value makes its column NaN in the rows that see it. A key removed by the
    mask contributes nothing whatever its key, value or R (a kept key's non-finite value
    gives NaN / +-inf in its column whatever its weight). eps = 0 is allowed: at a zero
    distance the gradient takes sqrt's subgradient 0. d_v = 0 still gives the lse.
    float16 queries past float16's range after the metric's scaling are rescaled in the
    Triton kernel. R as a number must be finite.

    bank: a second key segment, (bank_keys [C, n], bank_values [C, d_v]) or
    (bank_keys, bank_values, bank_R), usually one copy shared by the whole batch (leading
    dims, if any, broadcast to the batch shape). The softmax runs over the union of the
    row's keys and the bank: the same output and lse as concatenating the bank, expanded
    per row, to keys and values, but both kernels stream the two segments in one launch
    and read the bank through its own strides (never expanded or concatenated; its
    gradients are summed over the batch in place). bank_R (a number or a tensor
    broadcasting to [B, C] / [..., Lq, C]) defaults to R when R is a number or per query;
    `mask` applies to the row's keys only, the bank is never masked.

    Tuning knobs (0 / -1 = the measured heuristic; each is read by one kernel backend and
    ignored by the others; results do not depend on them beyond rounding):
      num_ctas     "cuda" forward: the target number of blocks when it splits the keys
                   (0 = 2 per SM).
      bank_splits  "cuda" forward: at most this many splits of a key set shared by several
                   rows, such as a bank (0 = one per 64 keys).
      pipeline     "triton" forward: issue the next key tile's distance GEMM before this
                   tile's softmax (-1 = from a head dim of 128 on, 0 = never, 1 = always).
      norm_mma     "triton" forward: add the norms and sum the rows on tensor cores for
                   16-bit inputs without a mask (-1 or 1 = there, 0 = never).
      bwd_chunk    "cuda" backward: at most this many elements of dP per chunk of queries
                   (0 = 2**26).
    """
    op = "retrieval_attention"
    if isinstance(query, torch.Tensor) and isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
        query, keys, values, bank = _autocast(query, keys, values, bank)
    lead, squeeze = _check_inputs(op, query, keys, values, R, metric, eps, mask)
    _check_number(op, "beta", beta)
    knobs = _check_knobs(op, num_ctas=num_ctas, bank_splits=bank_splits, pipeline=pipeline, norm_mma=norm_mma,
                         bwd_chunk=bwd_chunk)
    bk = bv = br = None
    if bank is not None:
        bk, bv, br = _check_bank(op, bank, query, values, R, lead, squeeze)
    be = _kernel_backend(op, backend, query.device, query.dtype,
                         _DECODE_PREFER if squeeze or query.shape[-2] == 1 else _PREFER)
    if be == "torch":
        out, lse = ref.retrieval_attention(query, keys, values, R, metric, beta, eps, mask, True,
                                           bank=None if bank is None else (bk, bv, br))
        return (out, lse) if return_lse else out

    # a general metric is a linear feature map plus diagonal weights: map, then run the diag kernel
    fq, fk, w = _features(metric, query, keys)
    q, k, v, _ = ref.as_batched(fq, fk, values)
    lead = tuple(lead)
    q4, k4, v4 = _to4(q, lead, q.shape[-2:]), _to4(k, lead, k.shape[-2:]), _to4(v, lead, v.shape[-2:])
    r4 = _r4(R, lead, squeeze, query.device)
    mask4 = None if mask is None else _user_to4(mask, lead, squeeze)
    b4 = (None, None, None)
    if bank is not None:
        _, bk3, bv3, _ = ref.as_batched(fq, _features(metric, query, bk)[1], bv)
        b4 = (_to4(bk3, lead, bk3.shape[-2:]), _to4(bv3, lead, bv3.shape[-2:]),
              r4.view(r4.shape) if br is R else _r4(br, lead, squeeze, query.device))  # a view: see _to4
    out, lse = RetrievalAttentionFunction.apply(q4, k4, v4, w.contiguous(), r4, mask4, *b4, float(beta), float(eps),
                                                be, knobs)
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
    asked = _backend.requested(backend)
    if asked in ("triton", "cuda"):
        raise RuntimeError(f"{op}: backend={asked!r} is unavailable: curvature_scalar has only the "
                           "PyTorch implementation, which backend='torch' and backend='auto' run (no kernel "
                           "backend implements it)")
    _backend.resolve(op, backend, R4.device, ("torch",))
    return ref.curvature_scalar(R4, g_inv, eps)
