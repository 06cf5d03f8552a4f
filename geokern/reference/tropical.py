"""Tropical (max-plus) attention: the definition (spec section 2).

This is model_guided_research's `tropical_max_plus_attention` at its exact endpoint
(beta = None). Shapes are (B, H, T, D): q is (B, H, Tq, D), k and v are (B, Hkv, Tk, D)
with Hkv dividing H (grouped-query attention: query head h reads key head
h // (H // Hkv), as their repeat_interleave does).

    if gauge_fix:     q, k, v = each minus its max over D
    s[i, j]  = max_d (q[i, d] + k[j, d])                  (max-plus of Q and K^T)
    s[i, j]  = -inf where the causal mask hides key j from query i
    s        = s - evt_shift                               (if evt_shift is given)
    if score_center:  s[i, :] -= max_j s[i, j]
    y[i, d]  = max_j (s[i, j] + v[j, d])                   (max-plus of S and V, visible j)
    gamma[i] = min_d (top1_j - top2_j of s[i, j] + v[j, d])   (return_margins; +inf if Tk < 2)
    if gauge_fix:     y = y - max over D of y

The causal mask is their `causal_attn_mask(Tq, Tk)`: query i sees key j iff
j <= i + (Tk - Tq) (Tq == Tk: lower triangle; Tq == 1: every key; Tk > Tq: the whole
prefix plus causal within the last Tq keys); Tk < Tq is an error, as in theirs. A key
hidden from a query never enters its value stage: theirs adds the -inf score to the
value first, so a NaN or +inf value of a hidden key turns the output NaN there (and,
through the output gauge fix, in every channel); here it does not. For finite values
the two are the same.

NaN and non-finite values (every backend follows this reference): a max over a set that
holds a NaN is NaN (NaN propagates through max-plus as through +), and an output element
is NaN exactly when its formula reads a NaN or forms inf - inf. So a NaN in q[i] makes
row i's scores NaN, and (with score_center, through m[i], or through the value stage)
all of y[i, :]; a NaN in k[j] does the same to every query that sees key j; a NaN in
v[j, d] makes y[i, d] NaN for the queries i that see key j (with gauge_fix, the whole
row: the gauge fixes of v and y read every channel). A query whose every score is -inf
gives y = -inf - (-inf) = NaN with score_center. -inf is the semiring zero. A key that
the causal mask hides from query i contributes nothing to y[i] or gamma[i] whatever
its values (NaN, +inf, -inf): those equal the outputs with that key deleted.

Empty inputs (B, H, Tq or D zero, or Tk zero with no query) give empty y, gamma of
+inf where rows exist (D = 0: a min over no channel), and gradients of zeros of the
inputs' shapes (the result stays on the autograd graph). Tk = 0 with queries left is
an error (y would be -inf - (-inf)).

Gradients: every max routes its gradient to one winner, the smallest index among ties
(smallest d in the score, smallest key j in the value stage and in the centring max).
The gauge fixes use amax, as theirs does (its gradient is split among tied maxima).
Where nothing ties, this is their module's autograd exactly; the maxima are built by
gathering at the first argmax so that autograd of this function is that rule.

Memory-bounded: queries are processed in chunks so that at most about _CHUNK_ELEMS
sums exist at a time (theirs materialises (B, H, Tq, Tk, D)). Any float dtype, any
device; sums in the input dtype.
"""

import torch

_CHUNK_ELEMS = 1 << 24


def causal_visible(Tq, Tk, device=None):
    """(Tq, Tk) bool: True where query i sees key j (their causal_attn_mask)."""
    if Tk < Tq and Tq > 1:
        raise ValueError(f"causal tropical attention needs Tk >= Tq (or Tq == 1), got Tq={Tq}, Tk={Tk}")
    i = torch.arange(Tq, device=device).unsqueeze(1)
    j = torch.arange(Tk, device=device).unsqueeze(0)
    return j <= i + (Tk - Tq) if Tq > 1 else torch.ones(Tq, Tk, dtype=torch.bool, device=device)


def gauge(x):
    """x minus its max over the last dim (their _tropical_center)."""
    return x - x.amax(dim=-1, keepdim=True)


def max_first(x, dim):
    """(max over dim, its first argmax): the max built by gathering, so its gradient
    goes to the smallest index among ties; NaN counts as the largest value."""
    idx = x.argmax(dim=dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim), idx.squeeze(dim)


def repeat_kv(k, H):
    """Repeat the Hkv key / value heads to H (their repeat_kv_heads)."""
    Hkv = k.shape[1]
    return k if Hkv == H else k.repeat_interleave(H // Hkv, dim=1)


def scores(q, k, causal):
    """(s, visible): s[b, h, i, j] = max_d (q[b, h, i, d] + k[b, h, j, d]), -inf where
    the causal mask hides key j (visible: that mask, or None when not causal)."""
    Tq, Tk, D = q.shape[2], k.shape[2], q.shape[3]
    step = max(1, _CHUNK_ELEMS // max(1, q.shape[0] * q.shape[1] * Tk * D))
    rows = []
    for i0 in range(0, Tq, step):
        qc = q[:, :, i0 : i0 + step]
        rows.append(max_first(qc.unsqueeze(3) + k.unsqueeze(2), -1)[0])
    s = torch.cat(rows, dim=2) if rows else q.new_empty(q.shape[:3] + (Tk,))
    visible = causal_visible(Tq, Tk, q.device) if causal else None
    if causal:
        s = s.masked_fill(~visible, float("-inf"))
    return s, visible


def aggregate(s, v, want_margins, visible=None):
    """(y, argmax, gamma): y[i, d] = max_j (s[i, j] + v[j, d]) over the keys j that
    `visible` (Tq, Tk) lets query i see (all if None), the winning j, and the margin
    gamma[i] = min_d (top1 - top2) over those j (or None), in query chunks."""
    Tq, Tk, D = s.shape[2], v.shape[2], v.shape[3]
    step = max(1, _CHUNK_ELEMS // max(1, s.shape[0] * s.shape[1] * Tk * D))
    ys, js, gs = [], [], []
    for i0 in range(0, Tq, step):
        z = s[:, :, i0 : i0 + step].unsqueeze(-1) + v.unsqueeze(2)  # (B, H, c, Tk, D)
        if visible is not None:  # a hidden key never enters, even with a NaN or +inf value
            z = z.masked_fill(~visible[i0 : i0 + step, :, None], float("-inf"))
        y, j = max_first(z, 3)
        ys.append(y)
        js.append(j)
        if want_margins:
            if Tk >= 2:
                top2 = torch.topk(z.detach(), k=2, dim=3).values
                gs.append((top2[..., 0, :] - top2[..., 1, :]).amin(dim=-1))
            else:
                gs.append(torch.full(y.shape[:3], float("inf"), dtype=y.dtype, device=y.device))
    y = torch.cat(ys, dim=2) if ys else s.new_empty(s.shape[:3] + (D,))
    j = torch.cat(js, dim=2) if js else torch.zeros(y.shape, dtype=torch.int64, device=y.device)
    gamma = (torch.cat(gs, dim=2) if gs else s.new_empty(s.shape[:3])) if want_margins else None
    return y, j, gamma


def empty_result(q, k, v, return_margins):
    """(y, gamma) for q with no element (B, H, Tq or D zero): y empty but on the autograd
    graph of q, k and v (so that backward gives zeros of their shapes), gamma +inf."""
    zero = k.reshape(-1)[:0].sum() + v.reshape(-1)[:0].sum()  # 0, reads nothing
    y = q + zero.to(q.dtype)
    gamma = torch.full(q.shape[:3], float("inf"), dtype=q.dtype, device=q.device) if return_margins else None
    return y, gamma


def tropical_attention(q, k, v, causal=True, gauge_fix=True, score_center=True, return_margins=False,
                       evt_shift=None):
    """(y, gamma) of the definition above; gamma is None unless return_margins."""
    if q.numel() == 0:
        return empty_result(q, k, v, return_margins)
    if k.shape[2] == 0:
        raise ValueError(f"tropical attention needs at least one key for its queries, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if gauge_fix:
        q, k, v = gauge(q), gauge(k), gauge(v)
    H = q.shape[1]
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    s, visible = scores(q, k, causal)
    if evt_shift is not None:
        s = s - evt_shift
    if score_center:
        s = s - max_first(s, -1)[0].unsqueeze(-1)
    y, _, gamma = aggregate(s, v, return_margins, visible)
    if gauge_fix:
        y = gauge(y)
    return y, gamma


# ---- the core that the kernels compute, and its backward -----------------------------
# The kernels run the gauge fixes and evt_shift outside (they are elementwise), and
# compute the centred value stage with its routes.


def core(q, k, v, causal=True, score_center=True, want_margins=False):
    """(y, argmax, rowarg, gamma) of the attention without gauge fixes: y as above,
    argmax[b, h, i, d] the key that wins y[i, d], rowarg[b, h, i] the key of the score
    maximum (zeros without score_center), gamma the margins (empty unless asked).
    Indices are int32."""
    if q.numel() == 0 or k.shape[2] == 0:
        idx = torch.zeros(q.shape, dtype=torch.int32, device=q.device)
        rowarg = torch.zeros(q.shape[:3], dtype=torch.int32, device=q.device)
        return q.new_empty(q.shape), idx, rowarg, q.new_empty(q.shape[:3] if want_margins else (0,))
    H = q.shape[1]
    kr, vr = repeat_kv(k, H), repeat_kv(v, H)
    s, visible = scores(q, kr, causal)
    rowarg = torch.zeros(s.shape[:3], dtype=torch.int64, device=q.device)
    if score_center:
        m, rowarg = max_first(s, -1)
        s = s - m.unsqueeze(-1)
    y, argmax, gamma = aggregate(s, vr, want_margins, visible)
    if gamma is None:
        gamma = q.new_empty((0,))
    return y, argmax.to(torch.int32), rowarg.to(torch.int32), gamma


def _route_e(q, k_rows):
    """First e maximising q[..., e] + k_rows[..., e] (k_rows gathered to q's shape)."""
    return (q + k_rows).argmax(dim=-1)


def core_backward_adjoint(gdq, gdk, gdv, q, k, argmax, rowarg, score_center=True):
    """The adjoint of core_backward in its (linear) grad argument: the double backward of
    core's y. gg[i, d] = gdv[j, d] + gdq[i, e] + gdk[j, e] along each route (j = argmax[i, d],
    e its first maximising channel), minus gdq[i, e1] + gdk[rowarg[i], e1] in every channel
    with score_center. (core_backward does not depend on q and k but through its routes:
    its derivative in them is zero almost everywhere.) Differentiable in gdq, gdk, gdv."""
    acc = torch.float64 if gdq.dtype == torch.float64 else torch.float32
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    qf, kf = q.to(acc), repeat_kv(k, H).to(acc)
    j = argmax.long()
    base = (torch.arange(B * H, device=q.device).view(B, H, 1) * Tk)
    k_flat = kf.reshape(B * H * Tk, D)
    gq, gk = gdq.to(acc), repeat_kv(gdk.to(acc), H).reshape(B * H * Tk, D)
    gv = repeat_kv(gdv.to(acc), H)
    rows = base.unsqueeze(-1) + j
    e = _route_e(qf.unsqueeze(-2), k_flat[rows])
    gg = gv.gather(2, j) + gq.gather(-1, e) + gk[rows, e]
    if score_center:
        r1 = base + rowarg.long()
        e1 = _route_e(qf, k_flat[r1])
        gg = gg - (gq.gather(-1, e1.unsqueeze(-1)).squeeze(-1) + gk[r1, e1]).unsqueeze(-1)
    return gg.to(gdq.dtype)


def core_backward(grad, q, k, argmax, rowarg, score_center=True):
    """(dq, dk, dv) of core's y along its routes (module docstring), explicitly: dv[j, d]
    gets g[i, d] for j = argmax[i, d]; the score s[i, j] = q[i, e] + k[j, e] (first
    maximising e) passes it on to dq[i, e] and dk[j, e]; the centring sends -sum_d g[i, d]
    through (i, rowarg[i]). Sums in float32 (float64 for float64), returned in grad's dtype."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = grad.to(acc)
    qf, kf = q.to(acc), repeat_kv(k, H).to(acc)
    j = argmax.long()
    base = (torch.arange(B * H, device=q.device).view(B, H, 1) * Tk)  # row of (b, h, 0) in k flat
    k_flat = kf.reshape(B * H * Tk, D)
    dq = torch.zeros(B, H, Tq, D, dtype=acc, device=q.device)
    dk = torch.zeros(B * H * Tk, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, H, Tk, D, dtype=acc, device=q.device)
    dv.scatter_add_(2, j, g)
    rows = base.unsqueeze(-1) + j  # (B, H, Tq, D): flat k row of each route
    e = _route_e(qf.unsqueeze(-2), k_flat[rows])  # (B, H, Tq, D)
    dq.scatter_add_(-1, e, g)
    dk.index_put_((rows.reshape(-1), e.reshape(-1)), g.reshape(-1), accumulate=True)
    if score_center:
        dm = -g.sum(-1)
        r1 = base + rowarg.long()  # (B, H, Tq)
        e1 = _route_e(qf, k_flat[r1])
        dq.scatter_add_(-1, e1.unsqueeze(-1), dm.unsqueeze(-1))
        dk.index_put_((r1.reshape(-1), e1.reshape(-1)), dm.reshape(-1), accumulate=True)
    dk = dk.view(B, Hkv, H // Hkv, Tk, D).sum(2)
    dv = dv.view(B, Hkv, H // Hkv, Tk, D).sum(2)
    return dq.to(grad.dtype), dk.to(grad.dtype), dv.to(grad.dtype)
