"""Metric-weighted retrieval cost and retrieval attention: the definition (spec sections 1-2).

Shapes. A 2-D query is `[B, n]` (one query per row); a query of 3 or more dims is
`[..., Lq, n]`. A 2-D `keys` is a set `[M, n]` shared by every row; keys of 3 or more
dims are `[..., M, n]`, their leading dims broadcast against the query's. `values`
follow the keys' convention with their own last dim. The cost has shape `[B, M]`
(2-D query) or `[..., Lq, M]`.

    dv   = keys[..., m, :] - query[..., l, :]
    cost = R * sqrt(max(g(dv, dv), 0) + eps)          (eps inside the sqrt; eps = 0 allowed)
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

A bank is a second key segment, (bank_keys, bank_values[, bank_R]) with the keys' conventions
(usually [C, n] / [C, d_v], one copy shared by every row): the softmax runs over the union of
the row's keys and the bank, never masked, with bank_R defaulting to R. Each segment's output
and lse merge by log-sum-exp (merge_by_lse): the same result as concatenating the bank,
expanded per row, to the keys and values.

The backward formulas (spec section 2) are written out for the kernels' layout (4-D
[NB0, NB1, L, F] operands, size-1 batch dims where shared, a diagonal metric w [F]):
retrieval_cost_backward and retrieval_attention_backward. They are the CPU implementation of the
backward custom ops (autograd does not run inside an op's kernel) and what the kernels compute.
"""

import math

import torch

CHUNK_ELEMS = 1 << 24


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_batched(query, keys, values=None):
    """(q [..., Lq, n], k [..., M, n], v [..., M, d_v] or None, squeeze): a 2-D query seen as
    [B, 1, n] (squeeze: the caller drops that dim again), 2-D keys / values as [1, M, .]."""
    squeeze = query.dim() == 2
    q = query.unsqueeze(-2) if squeeze else query
    k = keys.unsqueeze(0) if keys.dim() == 2 else keys
    v = None if values is None else (values.unsqueeze(0) if values.dim() == 2 else values)
    return q, k, v, squeeze


def _r_batched(R, squeeze):
    # a per-pair / per-query R of a 2-D query ([B, M] / [B, 1]) gains the Lq dim
    if isinstance(R, torch.Tensor) and squeeze and R.dim() >= 2:
        return R.unsqueeze(-2)
    return R


def _cost_chunk(q, k, R, metric, eps, keep=None):
    """cost [..., lq, M] for q [..., lq, n], k [..., M, n] (both in the accumulation dtype).

    keep (a mask): masked pairs read dv = 0 and R = 0, so a NaN / inf in a masked key or R reaches
    neither the cost nor, as 0 * NaN, the gradients (the caller masks their logits)."""
    dv = k.unsqueeze(-3) - q.unsqueeze(-2)  # [..., lq, M, n]
    if keep is not None:
        dv = torch.where(keep.unsqueeze(-1), dv, torch.zeros_like(dv))
        R = torch.where(keep, R, torch.zeros_like(keep, dtype=dv.dtype))
    return quad_cost(dv, R, metric, eps)


def quad_cost(dv, R, metric, eps):
    """R * sqrt(max(g(dv, dv), 0) + eps) over dv's last dim: the quadratic form every cost in
    geokern uses (the retrieval cost's pairs, the LIoR action's velocities)."""
    t = torch.clamp(metric.quad(dv), min=0) + eps  # clamp keeps NaN
    if eps == 0:
        # sqrt has no derivative at 0 (dv = 0): take the subgradient 0, not 0 * inf = NaN
        pos = t > 0
        return R * torch.where(pos, torch.sqrt(torch.where(pos, t, torch.ones_like(t))), torch.zeros_like(t))
    return R * torch.sqrt(t)


def _chunks(lq, m, n):
    # no queries: one empty chunk all the same, so the (empty) result keeps its autograd graph
    step = max(1, CHUNK_ELEMS // max(1, m * max(n, 1)))
    return [(s, min(lq, s + step)) for s in range(0, lq, step)] or [(0, 0)]


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
    q, k, _, squeeze = as_batched(query, keys)
    q, k = q.to(acc), k.to(acc)
    R = _r_batched(R, squeeze)
    if isinstance(R, torch.Tensor):
        R = R.to(acc)
    lq, m, n = q.shape[-2], k.shape[-2], q.shape[-1]
    parts = [
        _cost_chunk(q[..., s:e, :], k, _r_slice(R, s, e, lq), metric, eps) for s, e in _chunks(lq, m, n)
    ]
    cost = torch.cat(parts, -2)
    return cost.squeeze(-2) if squeeze else cost


def retrieval_attention(query, keys, values, R, metric, beta, eps=1e-8, mask=None, return_lse=False,
                        compute_dtype=None, *, bank=None):
    """out = softmax(-beta * cost) @ values ([B, d_v] or [..., Lq, d_v]); optionally the lse.

    bank: (bank_keys, bank_values) or (bank_keys, bank_values, bank_R), a second key segment
    (unmasked; bank_R defaults to R) merged with the first by log-sum-exp."""
    acc = compute_dtype or acc_dtype(query.dtype)
    out, lse, cmin = _attend(query, keys, values, R, metric, beta, eps, mask, acc)
    if bank is not None:
        o2, l2, c2 = _attend(query, bank[0], bank[1], bank[2] if len(bank) == 3 else R, metric, beta, eps, None, acc)
        # merged relative to the smaller shift: a segment whose nearest key is farther by a margin
        # that beta * margin overflows gets weight exp(-inf) = 0 (the hard-min limit across segments)
        c1, c2 = torch.broadcast_tensors(cmin, c2)
        both = torch.minimum(c1, c2)
        out, lse = merge_by_lse(out, lse - beta * (c1 - both), o2, l2 - beta * (c2 - both))
        cmin = both
    lse = lse - beta * cmin  # -inf where beta * cmin passes the float range (the true lse, rounded)
    out = out.to(values.dtype)
    return (out, lse) if return_lse else out


def merge_by_lse(out1, lse1, out2, lse2):
    """The outputs of two key segments merged by their log-sum-exp: one softmax over the union
    (in the lse's dtype; leading dims broadcast). A row that sees no key in either (lse -inf
    twice) gives zeros and lse -inf."""
    lse1, lse2 = torch.broadcast_tensors(lse1, lse2)
    total = torch.logsumexp(torch.stack([lse1, lse2]), 0)
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    w1, w2 = torch.exp(lse1 - safe).unsqueeze(-1), torch.exp(lse2 - safe).unsqueeze(-1)
    return w1 * out1.to(w1.dtype) + w2 * out2.to(w1.dtype), total


def _weighted_values(w, v, keep):
    """w @ v where a key removed by `keep` contributes nothing whatever its value.

    Without a mask this is the plain product (a NaN value reaches every row; an inf value
    whose weight underflows to 0 gives NaN, 0 * inf). With a mask, masked keys are skipped,
    not multiplied by 0 (0 * NaN is NaN): the finite values go through the product and a
    non-finite value of a kept key makes its column NaN (NaN), +inf / -inf (inf of one sign;
    NaN when both meet), whatever its weight. The kernels do the same."""
    if keep is None:
        return w @ v
    bad = ~torch.isfinite(v)
    out = w @ torch.where(bad, torch.zeros_like(v), v)
    kinds = torch.cat([torch.isnan(v), v == math.inf, v == -math.inf], -1).to(w.dtype)
    nan, pos, neg = (keep.to(w.dtype).expand(w.shape) @ kinds).split(v.shape[-1], -1)
    zero = torch.zeros_like(out)
    return (out + torch.where(nan > 0, math.nan, zero) + torch.where(pos > 0, math.inf, zero)
            + torch.where(neg > 0, -math.inf, zero))


def _attend(query, keys, values, R, metric, beta, eps, mask, acc):
    """(out, lse relative to the shift, cmin) of one key segment in the accumulation dtype acc: the
    lse is lse_rel - beta * cmin, cmin the row's smallest kept cost (0 where nothing is kept)."""
    q, k, v, squeeze = as_batched(query, keys, values)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    R = _r_batched(R, squeeze)
    if isinstance(R, torch.Tensor):
        R = R.to(acc)
    if mask is not None and squeeze and mask.dim() >= 2:
        mask = mask.unsqueeze(-2)
    lq, m, n = q.shape[-2], k.shape[-2], q.shape[-1]
    outs, lses, cmins = [], [], []
    for s, e in _chunks(lq, m, n):
        mk = _mask_slice(mask, s, e)
        cost = _cost_chunk(q[..., s:e, :], k, _r_slice(R, s, e, lq), metric, eps, mk)
        logit = -beta * cost
        if mk is not None:
            logit = logit.masked_fill(~mk, -math.inf)
        # a row whose kept logits all passed the float range (beta * cost overflowed): logits relative
        # to its nearest kept key, -beta * (cost - cmin) <= 0, give the softmax's limit (equal weights on
        # the nearest keys, ties in the computed cost; 0 elsewhere), not all-zero weights. cmin is the
        # shift of the returned lse (0 in every other row, whose arithmetic is unchanged).
        cmin = cost.new_zeros(cost.shape[:-1] + (1,))
        if m > 0:
            kept_cost = (cost if mk is None else cost.masked_fill(~mk, math.inf)).detach().amin(-1, keepdim=True)
            over = (logit.detach().amax(-1, keepdim=True) == -math.inf) & torch.isfinite(kept_cost)
            cmin = torch.where(over, kept_cost, cmin)
            shifted = -beta * (cost - cmin)
            if mk is not None:
                shifted = shifted.masked_fill(~mk, -math.inf)
            logit = torch.where(over, shifted, logit)
        # no keys (m = 0): logsumexp over nothing is -inf and w @ v is zeros, with their graph
        lse = torch.logsumexp(logit, -1, keepdim=True)
        # a fully masked row has lse = -inf: subtract 0 instead, so its weights are exp(-inf) = 0
        w = torch.exp(logit - torch.where(lse == -math.inf, torch.zeros_like(lse), lse))
        outs.append(_weighted_values(w, v, mk))
        lses.append(lse.squeeze(-1))
        cmins.append(cmin.squeeze(-1))
    out, lse, cmin = torch.cat(outs, -2), torch.cat(lses, -1), torch.cat(cmins, -1)
    if squeeze:
        out, lse, cmin = out.squeeze(-2), lse.squeeze(-1), cmin.squeeze(-1)
    return out, lse, cmin


# ---- the backward, on the kernels' layout ----------------------------------------


def retrieval_cost_backward(grad, q, k, w, r, eps, shapes=None):
    """(dq, dk, dr, dw) of cost = r * sqrt(max(g(k - q), 0) + eps) from the cost's gradient grad.

    q [..., LQ, F], k [..., M, F], r and grad broadcasting to the cost [..., LQ, M], a diagonal
    metric w [F]; float32 arithmetic (float64 for float64 q). With g = sum_f w_f dv_f^2 and
    spd = sqrt(max(g, 0) + eps), per pair:
        c = grad r / spd [g >= 0],  ddv = c w dv,  dq = -sum_keys ddv,  dk = sum_queries ddv,
        dw = sum c dv^2 / 2,        dr = grad spd.
    dq, dk, dr are summed to `shapes` (dq, dk, dr) (default: the inputs' own shapes); dw is [F].
    Not chunked: it holds [..., LQ, M, F] (the ops' CPU implementation, at test sizes)."""
    acc = acc_dtype(q.dtype)
    g = grad.to(acc)
    dv = k.to(acc).unsqueeze(-3) - q.to(acc).unsqueeze(-2)  # [.., LQ, M, F]
    sq = (dv * dv * w).sum(-1)
    spd = torch.sqrt(sq.clamp(min=0) + eps)
    # spd = 0 (eps = 0 and k = q): sqrt has no derivative there; take the subgradient 0
    c = torch.where((sq >= 0) & (spd > 0), g * r / spd, torch.zeros_like(spd))
    ddv = c.unsqueeze(-1) * dv * w
    dw = (0.5 * c.unsqueeze(-1) * dv * dv).reshape(-1, w.shape[0]).sum(0)
    dq_s, dk_s, dr_s = shapes or (q.shape, k.shape, r.shape)
    return (-ddv.sum(-2)).sum_to_size(dq_s), ddv.sum(-3).sum_to_size(dk_s), (g * spd).sum_to_size(dr_s), dw


def retrieval_attention_backward(dout, q, k, v, w, r, mask, out, lse, dlse, beta, eps, bank=None, shapes=None):
    """(dq, dk, dv, dr, dbank_k, dbank_v, dbank_r, dw) of (out, lse) = retrieval_attention.

    The kernels' layout: q [NB0, NB1, LQ, F], k [.., M, F], v [.., M, DV], r and the bool mask
    broadcasting to [NB0, NB1, LQ, M], a diagonal metric w [F]; bank (bk, bv, br) or None; out,
    lse the forward's results; dlse (or None) the lse's gradient. With P the weights recomputed
    from the lse, dP = dout v^T and delta = rowsum(dout * out) - dlse:
        dcost = -beta P (dP - delta),   dv = P^T dout,
    then dcost through retrieval_cost_backward per segment. Float32 (float64 for float64 q);
    summed to shapes ((dq, dk, dv, dr), (_, dbank_k, dbank_v, dbank_r)) (default: the inputs'
    own); the bank's three are None without a bank."""
    acc = acc_dtype(q.dtype)
    do = dout.to(acc)
    delta = (do * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    finite = torch.isfinite(lse).unsqueeze(-1)
    segs = [(k, v, r, mask)] + ([] if bank is None else [(bank[0], bank[1], bank[2], None)])
    dq_s = q.shape if shapes is None else shapes[0][0]
    dq, dw, grads = 0, 0, []
    for i, (ks, vs, rs, ms) in enumerate(segs):
        dv_ = ks.to(acc).unsqueeze(-3) - q.to(acc).unsqueeze(-2)
        spd = torch.sqrt((dv_ * dv_ * w).sum(-1).clamp(min=0) + eps)
        logit = -beta * rs * spd
        if ms is not None:
            logit = logit.masked_fill(~ms, -math.inf)
        p = torch.where(finite, torch.exp(logit - lse.to(acc).unsqueeze(-1)), torch.zeros_like(logit))
        dcost = -beta * p * (do @ vs.to(acc).transpose(-1, -2) - delta.unsqueeze(-1))
        _, dk_s, dv_s, dr_s = (None, ks.shape, vs.shape, rs.shape) if shapes is None else shapes[i]
        gq, gk, gr, gw = retrieval_cost_backward(dcost, q, ks, w, rs, eps, (dq_s, dk_s, dr_s))
        dq, dw = dq + gq, dw + gw
        grads.append((gk, (p.transpose(-1, -2) @ do).sum_to_size(dv_s), gr))
    (dk, dv, dr), bgrads = grads[0], grads[1] if bank is not None else (None, None, None)
    return (dq, dk, dv, dr, *bgrads, dw)


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
