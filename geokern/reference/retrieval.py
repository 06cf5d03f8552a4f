"""Metric-weighted retrieval cost and retrieval attention: the definition (spec sections 1-2).

Shapes. A 2-D query is `[B, n]` (one query per row); a query of 3 or more dims is
`[..., Lq, n]`. A 2-D `keys` is a set `[M, n]` shared by every row; keys of 3 or more
dims are `[..., M, n]`, their leading dims broadcast against the query's. `values`
follow the keys' convention with their own last dim. The cost has shape `[B, M]`
(2-D query) or `[..., Lq, M]`.

    dv   = keys[..., m, :] - query[..., l, :]
    cost = R * sqrt(max(g(dv, dv), 0) + eps)          (eps inside the sqrt)
    out  = softmax_m(-beta * cost) @ values,   lse = logsumexp_m(-beta * cost)

`R` is a number or a tensor that broadcasts against the cost shape: per key `[M]`,
per pair `[B, M]`, per query `[B, 1]` (2-D query) or `[..., Lq, 1]`. `mask` is boolean,
broadcasting against the cost shape, True = keep; masked keys get logit -inf, and a
row whose keys are all masked gives zeros (and lse = -inf).

Arithmetic in float32 (float64 for float64 inputs): the cost is returned in that
dtype, the attention output in the values' dtype, the lse in float32 / float64.
dv is formed directly (no |q|^2 + |k|^2 - 2 q.k expansion), so there is no
cancellation when q is close to k. Memory-bounded: queries are processed in chunks
so at most about CHUNK_ELEMS cost elements exist at once (without autograd).
"""

import math

import torch

CHUNK_ELEMS = 1 << 24


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_batched(query, keys):
    """(q [..., Lq, n], k [..., M, n], squeeze) with a 2-D query seen as [B, 1, n]."""
    squeeze = query.dim() == 2
    q = query.unsqueeze(-2) if squeeze else query
    k = keys.unsqueeze(0) if keys.dim() == 2 else keys
    return q, k, squeeze


def _values_batched(values):
    return values.unsqueeze(0) if values.dim() == 2 else values


def _r_batched(R, squeeze):
    # a per-pair / per-query R of a 2-D query ([B, M] / [B, 1]) gains the Lq dim
    if isinstance(R, torch.Tensor) and squeeze and R.dim() >= 2:
        return R.unsqueeze(-2)
    return R


def _cost_chunk(q, k, R, metric, eps):
    """cost [..., lq, M] for q [..., lq, n], k [..., M, n] (both in the accumulation dtype)."""
    dv = k.unsqueeze(-3) - q.unsqueeze(-2)  # [..., lq, M, n]
    g = metric.quad(dv)
    return R * torch.sqrt(torch.clamp(g, min=0) + eps)


def _chunks(lq, m, n):
    step = max(1, CHUNK_ELEMS // max(1, m * max(n, 1)))
    return [(s, min(lq, s + step)) for s in range(0, lq, step)]


def _r_slice(R, s, e, lq):
    if not isinstance(R, torch.Tensor) or R.dim() < 2 or R.shape[-2] == 1:
        return R
    return R[..., s:e, :]


def _mask_slice(mask, s, e):
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., s:e, :]


def retrieval_cost(query, keys, R, metric, eps=1e-8, compute_dtype=None):
    """cost = R * sqrt(max(g(keys - query), 0) + eps): [B, M] or [..., Lq, M].

    compute_dtype overrides the arithmetic dtype (tests use the inputs' own 16-bit
    dtype to measure the error plain PyTorch makes at that precision)."""
    acc = compute_dtype or acc_dtype(query.dtype)
    q, k, squeeze = as_batched(query, keys)
    q, k = q.to(acc), k.to(acc)
    R = _r_batched(R, squeeze)
    if isinstance(R, torch.Tensor):
        R = R.to(acc)
    lq, m, n = q.shape[-2], k.shape[-2], q.shape[-1]
    parts = [
        _cost_chunk(q[..., s:e, :], k, _r_slice(R, s, e, lq), metric, eps) for s, e in _chunks(lq, m, n)
    ]
    if parts:
        cost = torch.cat(parts, -2)
    else:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        cost = q.new_zeros(tuple(lead) + (0, m))
    return cost.squeeze(-2) if squeeze else cost


def retrieval_attention(query, keys, values, R, metric, beta, eps=1e-8, mask=None, return_lse=False,
                        compute_dtype=None):
    """out = softmax(-beta * cost) @ values ([B, dv] or [..., Lq, dv]); optionally the lse."""
    acc = compute_dtype or acc_dtype(query.dtype)
    q, k, squeeze = as_batched(query, keys)
    v = _values_batched(values)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    R = _r_batched(R, squeeze)
    if isinstance(R, torch.Tensor):
        R = R.to(acc)
    if mask is not None and squeeze and mask.dim() >= 2:
        mask = mask.unsqueeze(-2)
    lq, m, n = q.shape[-2], k.shape[-2], q.shape[-1]
    outs, lses = [], []
    for s, e in _chunks(lq, m, n):
        cost = _cost_chunk(q[..., s:e, :], k, _r_slice(R, s, e, lq), metric, eps)
        logit = -beta * cost
        mk = _mask_slice(mask, s, e)
        if mk is not None:
            logit = logit.masked_fill(~mk, -math.inf)
        lse = torch.logsumexp(logit, -1, keepdim=True)
        # a fully masked row has lse = -inf: subtract 0 instead, so its weights are exp(-inf) = 0
        w = torch.exp(logit - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
        outs.append(w @ v)
        lses.append(lse.squeeze(-1))
    if outs:
        out, lse = torch.cat(outs, -2), torch.cat(lses, -1)
    else:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        out = q.new_zeros(tuple(lead) + (0, v.shape[-1]))
        lse = q.new_zeros(tuple(lead) + (0,))
    if m == 0:  # no keys at all: every row is fully masked
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        out = q.new_zeros(tuple(lead) + (lq, v.shape[-1]))
        lse = torch.full(tuple(lead) + (lq,), -math.inf, dtype=acc, device=q.device)
    if squeeze:
        out, lse = out.squeeze(-2), lse.squeeze(-1)
    out = out.to(values.dtype)
    return (out, lse) if return_lse else out


def curvature_scalar(R4, g_inv, eps=1e-8):
    """R_sc = sqrt(|(1/n^2) sum R4[..., mu, nu, rho, sigma] g^{mu rho} g^{nu sigma}| + eps).

    R4 [..., n, n, n, n], g_inv [..., n, n] (the inverse metric); leading dims broadcast
    and give one scalar each. Contracted one index pair at a time (never n^4 * n^2
    products at once), in float32 for 16-bit inputs (float64 for float64).
    """
    acc = acc_dtype(R4.dtype)
    n = R4.shape[-1]
    r, g = R4.to(acc), g_inv.to(acc)
    half = torch.einsum("...mnrs,...mr->...ns", r, g)  # contract (mu, rho)
    trace = (half * g).sum(dim=(-2, -1)) / (n * n)  # then (nu, sigma)
    return torch.sqrt(trace.abs() + eps)
