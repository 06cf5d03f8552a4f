"""The soft LCP kernel of ultrametric attention, fused flash-style (README.md beside this file).

Definition (reference.ultrametric.soft_lcp_attention, spec section 3), per (query i, key j):

    match_l = exp(-beta (q_l - k_l)^2),  lcp = sum_{l<=K} prod_{m<=l} match_m,  w = alpha^lcp
    y_i = sum_j w_ij v_j / max(sum_j w_ij, 1e-9)  over the visible keys,  lse_i = log sum_j w_ij.

The partial products are one exponential each: prod_{m<=l} match_m = exp2(nb c_l) with
c_l = sum_{m<=l} (q_m - k_m)^2 and nb = -beta log2 e (both constants folded into one), so a level
costs FADD + FFMA + FMUL + MUFU.EX2 + FADD. The difference is formed before any scaling (exact
for near digits; scaling q and k first costs one FMUL less per level but loses the difference's
low bits: 6e-6 relative error in dq for digits 0.01 apart). The weight is
w = exp2(lcp log2 alpha), normalised online (running max m_i and sum l_i in log2 units, as
flash attention does), one FFMA + MUFU.EX2 more. Forward: K + 1 special-function evaluations
per pair. Backward: the partial products are recomputed twice (once for lcp, which the level
gradients need first, once for the level sums), 2K + 1 per pair.

Gradients. With G_ij = dL/dlcp_ij = pc_ij (dy_i . v_j - delta_i) ln alpha, pc_ij =
w_ij / max(den_i, 1e-9) and delta_i = dy_i . y_i (0 where the clamp holds, den_i <= 1e-9),
and R_ijm = sum_{l>=m} P_ijl = lcp_ij - sum_{l<m} P_ijl:

    dq_im = -2 beta sum_j G_ij R_ijm d_ijm,   dk_jm = -(the same summed over i),

d = q - k. One backward program owns a key tile: dk and dv are written once
(deterministic); dq is [.., K], 8x narrower than a flash dq, and added with float32 atomics per
(query tile, key tile) (its last bits may vary from run to run).
"""

import triton
import triton.language as tl

from geokern.kernels._common import mm, narrow
from geokern.kernels.ultrametric.scan import _f32, apply_nonfinite, count_nonfinite

LOG2_CLAMP = tl.constexpr(-29.897352853986263)  # log2(1e-9): the spec's clamp of the weight sum


@triton.jit
def _soft_lcp(q_ptr, qbase, rows, rvalid, k_ptr, kbase, cols, cvalid, nb, K: tl.constexpr):
    """lcp [BM, BN] float32: sum over levels of exp2(nb c_l), c_l the running sum of squared digit
    differences, nb = -beta log2 e. K exp2 per pair."""
    c = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    lcp = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    for l in range(K):
        qd = tl.load(q_ptr + (qbase + rows) * K + l, mask=rvalid, other=0.0).to(tl.float32)
        kd = tl.load(k_ptr + (kbase + cols) * K + l, mask=cvalid, other=0.0).to(tl.float32)
        d = qd[:, None] - kd[None, :]  # before any scaling: exact for near digits (Sterbenz)
        c += d * d
        lcp += tl.exp2(c * nb)
    return lcp


@triton.jit
def _visible(rows, rvalid, cols, cvalid, keep, off, CAUSAL: tl.constexpr):
    """[BM, BN] bool: query row i (at position off + i) sees key column j."""
    vis = rvalid[:, None] & cvalid[None, :] & keep[None, :]
    if CAUSAL:
        vis = vis & (cols[None, :] <= (rows + off)[:, None])
    return vis


@triton.jit
def _keep(keep_ptr, b, Tk, cols, cvalid, HAS_KEEP: tl.constexpr):
    if HAS_KEEP:
        return tl.load(keep_ptr + b * Tk + cols, mask=cvalid, other=0) != 0
    else:
        return cvalid


@triton.jit
def _load_v(v_ptr, kbase, cols, cvalid, rd, dvalid, D):
    return tl.load(v_ptr + (kbase + cols)[:, None] * D + rd[None, :], mask=cvalid[:, None] & dvalid[None, :], other=0.0)


@triton.jit
def ultrametric_soft_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, keep_ptr, y_ptr, lse_ptr,
    H, R, Tq, Tk, D, nb, log2a,
    K: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    # q: [B, H, Tq, K] float digits, k: [B, Hkv, Tk, K], v: [B, Hkv, Tk, D], keep: [B, Tk] bool,
    # y: [B, H, Tq, D], lse: [B, H, Tq] float32 (natural log); all contiguous, Hkv = H // R.
    # One program: BM queries of one (batch, head) against every visible key, BN keys a step,
    # online normaliser in log2 units. grid (cdiv(Tq, BM), B * H).
    nb, log2a = _f32(nb), _f32(log2a)
    bh = tl.program_id(1)
    b = bh // H
    g = b * (H // R) + (bh % H) // R
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rvalid = rows < Tq
    qbase = bh.to(tl.int64) * Tq
    kbase = g.to(tl.int64) * Tk
    off = Tk - Tq
    rd = tl.arange(0, BD)
    dvalid = rd < D
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    bad = tl.zeros([], tl.int32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, off + tl.program_id(0) * BM + BM)
    for start in range(0, hi, BN):
        cols = start + tl.arange(0, BN)
        cvalid = cols < Tk
        lcp = _soft_lcp(q_ptr, qbase, rows, rvalid, k_ptr, kbase, cols, cvalid, nb, K)
        vis = _visible(rows, rvalid, cols, cvalid, _keep(keep_ptr, b, Tk, cols, cvalid, HAS_KEEP), off, CAUSAL)
        s = tl.where(vis, lcp * log2a, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp2(-inf) = 0, not NaN
        p = tl.exp2(s - m_sub[:, None])
        scale = tl.exp2(m_i - m_sub)
        l_i = l_i * scale + tl.sum(p, 1)
        v = _load_v(v_ptr, kbase, cols, cvalid, rd, dvalid, D)
        # non-finite values are zeroed here (a hidden key's 0 * NaN must not reach a row) and put back
        # after the loop, for the rows that see them: the rare path stays out of the hot loop's registers
        finite = (v == v) & (tl.abs(v.to(tl.float32)) != float("inf"))
        bad = tl.maximum(bad, tl.max(tl.where(finite, 0, 1)))
        acc = acc * scale[:, None] + mm(p.to(v.dtype), tl.where(finite, v, 0.0).to(v.dtype), PREC)
        m_i = m_new
    if bad > 0:
        nan = tl.zeros([BM, BD], tl.float32)
        pinf = tl.zeros([BM, BD], tl.float32)
        ninf = tl.zeros([BM, BD], tl.float32)
        for start in range(0, hi, BN):
            cols = start + tl.arange(0, BN)
            cvalid = cols < Tk
            vis = _visible(rows, rvalid, cols, cvalid, _keep(keep_ptr, b, Tk, cols, cvalid, HAS_KEEP), off, CAUSAL)
            a, bp, bn = count_nonfinite(vis, _load_v(v_ptr, kbase, cols, cvalid, rd, dvalid, D))
            nan += a
            pinf += bp
            ninf += bn
        acc = apply_nonfinite(acc, nan, pinf, ninf)
    # lse2 = log2 of the weight sum; y = acc / l times min(1, den / 1e-9) (the clamp, in log space)
    lse2 = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(l_i)
    f = tl.exp2(tl.minimum(lse2 - LOG2_CLAMP, 0.0)) / tl.where(l_i > 0, l_i, 1.0)
    y = acc * f[:, None]
    tl.store(lse_ptr + qbase + rows, lse2 * 0.6931471805599453, mask=rvalid)
    tl.store(y_ptr + (qbase + rows)[:, None] * D + rd[None, :], narrow(y, y_ptr.dtype.element_ty),
             mask=rvalid[:, None] & dvalid[None, :])


@triton.jit
def ultrametric_soft_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, keep_ptr, dy_ptr, lsc_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    H, R, Tq, Tk, D, nb, log2a, lna, c0,
    K: tl.constexpr, KP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    # q, k, v, keep as the forward; dy: [B, H, Tq, D]; lsc: [B, H, Tq] float32, log2 max(den, 1e-9);
    # delta: [B, H, Tq] float32, dy . y (0 where the clamp holds); dq: [B, H, Tq, K] float32,
    # zeroed, added to atomically; dk: [B, Hkv, Tk, K], dv: [B, Hkv, Tk, D] written once.
    # One program: BN keys of one (batch, key head) against the R query heads that read them,
    # BM queries a step. grid (cdiv(Tk, BN), B * Hkv). c0 = 2 beta.
    nb, log2a, lna, c0 = _f32(nb), _f32(log2a), _f32(lna), _f32(c0)
    g = tl.program_id(1)
    Hkv = H // R
    b = g // Hkv
    hk = g % Hkv
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cvalid = cols < Tk
    kbase = g.to(tl.int64) * Tk
    off = Tk - Tq
    rd = tl.arange(0, BD)
    dvalid = rd < D
    kl = tl.arange(0, KP)
    keep = _keep(keep_ptr, b, Tk, cols, cvalid, HAS_KEEP)
    v = _load_v(v_ptr, kbase, cols, cvalid, rd, dvalid, D)
    dv = tl.zeros([BN, BD], tl.float32)
    dk = tl.zeros([BN, KP], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (tl.maximum(tl.program_id(0) * BN - off, 0) // BM) * BM
    for r in range(R):
        bh = b * H + hk * R + r
        qbase = bh.to(tl.int64) * Tq
        for i0 in range(lo, Tq, BM):
            rows = i0 + tl.arange(0, BM)
            rvalid = rows < Tq
            lcp = _soft_lcp(q_ptr, qbase, rows, rvalid, k_ptr, kbase, cols, cvalid, nb, K)
            vis = _visible(rows, rvalid, cols, cvalid, keep, off, CAUSAL)
            lsc = tl.load(lsc_ptr + qbase + rows, mask=rvalid, other=0.0)
            delta = tl.load(delta_ptr + qbase + rows, mask=rvalid, other=0.0)
            pc = tl.where(vis, tl.exp2(lcp * log2a - lsc[:, None]), 0.0)
            dy = tl.load(dy_ptr + (qbase + rows)[:, None] * D + rd[None, :], mask=rvalid[:, None] & dvalid[None, :],
                         other=0.0)
            dv += mm(tl.trans(pc).to(dy.dtype), dy, PREC)
            dp = mm(dy, tl.trans(v), PREC)
            gl = tl.where(vis, pc * (dp - delta[:, None]) * lna, 0.0)  # dL/dlcp
            # the level sums again: R_m = lcp - sum_{l<m} P_l, d(c_l)/d(sq_m) = 2 d_m for m <= l
            c = tl.zeros([BM, BN], tl.float32)
            below = tl.zeros([BM, BN], tl.float32)
            dq = tl.zeros([BM, KP], tl.float32)
            for l in range(K):
                qd = tl.load(q_ptr + (qbase + rows) * K + l, mask=rvalid, other=0.0).to(tl.float32)
                kd = tl.load(k_ptr + (kbase + cols) * K + l, mask=cvalid, other=0.0).to(tl.float32)
                d = qd[:, None] - kd[None, :]
                c += d * d
                hm = gl * (lcp - below) * d
                below += tl.exp2(c * nb)
                dq += tl.where(kl[None, :] == l, tl.sum(hm, 1)[:, None], 0.0)
                dk += tl.where(kl[None, :] == l, tl.sum(hm, 0)[:, None], 0.0)
            tl.atomic_add(dq_ptr + (qbase + rows)[:, None] * K + kl[None, :], dq * (-c0),
                          mask=rvalid[:, None] & (kl < K)[None, :], sem="relaxed")
    tl.store(dk_ptr + (kbase + cols)[:, None] * K + kl[None, :], narrow(dk * c0, dk_ptr.dtype.element_ty),
             mask=cvalid[:, None] & (kl < K)[None, :])
    tl.store(dv_ptr + (kbase + cols)[:, None] * D + rd[None, :], narrow(dv, dv_ptr.dtype.element_ty),
             mask=cvalid[:, None] & dvalid[None, :])
