"""Triton kernels for fused tropical (max-plus) attention, forward and backward.

The op (geokern.reference.tropical) is two chained max-plus products, S = Q (x) K^T over
D and Y = S (x) V over keys, with a causal mask and the score centring. Max-plus is
shift-equivariant, so the centring is applied once at the end:
y[i, d] = max_j (s[i, j] + v[j, d]) - m[i], m[i] = max_j s[i, j].

The forward walks each query block's visible keys once, building S in registers and
passing it to the value stage through a per-program scratch tile (BJ floats per query),
so memory stays O(T D). The backward follows the routes the forward recorded and adds
the gradients atomically in float32 (float64 for float64): the last bits of dq / dk / dv
may vary from run to run where routes share an entry. Layout and measurements:
csrc/tropical/README.md, section Triton.
"""

import triton
import triton.language as tl

from geokern._backend import interpret_mode
from geokern.kernels._common import autotune_configs, cdiv, launch, narrow, next_pow2


def _blocks():
    """(BQ, BJ): queries per program and keys per block."""
    return (16, 16) if interpret_mode() else (64, 64)


_CONFIGS = autotune_configs(
    lambda: [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)],
    test=[triton.Config({}, num_warps=4)],
    interp=[triton.Config({}, num_warps=1)],
)


@triton.autotune(configs=_CONFIGS, key=["Tq", "Tk", "D", "CAUSAL", "CENTER", "ARGMAX", "MARGIN"])
@triton.jit
def tropical_attention_fwd_kernel(
    qt_ptr, kt_ptr, v_ptr, y_ptr, idx_ptr, jm_ptr, mg_ptr, scr_ptr,
    H, G, Tq, Tk, D,
    svb, svh, svt, svd,
    CAUSAL: tl.constexpr, CENTER: tl.constexpr, ARGMAX: tl.constexpr, MARGIN: tl.constexpr,
    BQ: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr,
):
    # qt: [B, H, D, Tq] and kt: [B, Hkv, D, Tk] contiguous (d-major); v: [B, Hkv, Tk, D] strided;
    # y, idx: [B, H, Tq, D] and jm, mg: [B, H, Tq] contiguous; scr: [B*H, nqb, BJ, BQ] scratch.
    # One program: BQ queries of one (batch, head), grid (ceil(Tq / BQ), B * H), over all
    # its visible keys in blocks of BJ; writes y (and idx, jm, mg) of those queries.
    nqb = tl.num_programs(0)
    qb = nqb - 1 - tl.program_id(0)  # the longest causal rows first
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hk = (bh % H) // G
    ACC = tl.float64 if v_ptr.dtype.element_ty == tl.float64 else tl.float32
    NEG = float("-inf")

    rq = qb * BQ + tl.arange(0, BQ)
    rqc = tl.minimum(rq, Tq - 1)
    rd = tl.arange(0, BD)
    dmask = rd < D
    qt = qt_ptr + bh * D * Tq
    kt = kt_ptr + (b * (H // G) + hk) * D * Tk
    # strided views can reach past 2**31 elements within one head: 64-bit offsets there
    vcol = v_ptr + b * svb + hk * svh + rd.to(tl.int64) * _i64(svd)
    svt = _i64(svt)
    scr = scr_ptr + (bh * nqb + qb) * BQ * BJ
    ql = tl.arange(0, BQ)
    jl = tl.arange(0, BJ)

    off = Tk - Tq
    kend = Tk
    if CAUSAL:
        kend = tl.minimum(Tk, qb * BQ + BQ + off)

    top1 = tl.full((BQ, BD), NEG, ACC)
    top2 = tl.full((BQ, BD), NEG, ACC)
    idx = tl.zeros((BQ, BD), tl.int32)
    m = tl.full((BQ,), NEG, ACC)
    jm = tl.zeros((BQ,), tl.int32)
    for j0 in range(0, kend, BJ):
        rj = j0 + jl
        rjc = tl.minimum(rj, Tk - 1)
        # stage 1: s[i, j] = max_d q[i, d] + k[j, d]
        s = tl.full((BQ, BJ), NEG, ACC)
        for d in range(0, D):
            qc = tl.load(qt + d * Tq + rqc).to(ACC)
            kc = tl.load(kt + d * Tk + rjc).to(ACC)
            s = tl.maximum(s, qc[:, None] + kc[None, :], propagate_nan=tl.PropagateNan.ALL)
        vis = (rj < Tk)[None, :]
        if CAUSAL:
            vis = vis & (rj[None, :] <= rq[:, None] + off)
        s = tl.where(vis, s, NEG)
        if CENTER:
            bm = tl.max(s, axis=1)
            if ARGMAX:
                ba = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32)
                jm = tl.where(bm > m, j0 + ba, jm)
            m = tl.maximum(m, bm)
        # stage 2: y[i, d] = max_j s[i, j] + v[j, d], S read back by columns
        tl.store(scr + jl[None, :] * BQ + ql[:, None], s)
        tl.debug_barrier()
        # on the diagonal blocks a hidden key must not enter even with a NaN / +inf value
        if CAUSAL:
            diag = j0 + BJ - 1 > qb * BQ + off
        else:
            diag = False
        for jj in range(0, tl.minimum(BJ, kend - j0)):
            sc = tl.load(scr + jj * BQ + ql)
            vr = tl.load(vcol + (j0 + jj) * svt, mask=dmask, other=NEG).to(ACC)
            x = sc[:, None] + vr[None, :]
            if diag:
                x = tl.where((j0 + jj <= rq + off)[:, None], x, NEG)
            if MARGIN:
                top2 = tl.maximum(top2, tl.minimum(top1, x))
            if ARGMAX:
                take = (x > top1) | ((x != x) & (top1 == top1))
                top1 = tl.where(take, x, top1)
                idx = tl.where(take, j0 + jj, idx)
            else:
                top1 = tl.maximum(top1, x, propagate_nan=tl.PropagateNan.ALL)
        tl.debug_barrier()  # every read of the scratch is done before the next block writes it

    y = top1
    if CENTER:
        y = top1 - m[:, None]
    qmask = rq < Tq
    out = bh * Tq * D + rq[:, None] * D + rd[None, :]
    omask = qmask[:, None] & dmask[None, :]
    tl.store(y_ptr + out, narrow(y, y_ptr.dtype.element_ty), mask=omask)
    if ARGMAX:
        tl.store(idx_ptr + out, idx, mask=omask)
        tl.store(jm_ptr + bh * Tq + rq, jm, mask=qmask)
    if MARGIN:
        gap = tl.where(dmask[None, :], top1 - top2, float("inf"))
        gmin = tl.min(gap, axis=1)
        has_nan = tl.max(tl.where(gap != gap, 1, 0), axis=1) > 0
        gmin = tl.where(has_nan, float("nan"), gmin)
        tl.store(mg_ptr + bh * Tq + rq, narrow(gmin, mg_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _i64(x):
    """x (an int argument, possibly specialised to the constant 1) as an int64 scalar, so
    that the offsets it scales are 64-bit."""
    return tl.full((), 0, tl.int64) + x


@triton.jit
def _beats(val, best):
    """Whether val replaces the running maximum best: larger, or NaN over a number (NaN
    counts as largest; the first maximiser wins ties)."""
    return (val > best) | ((val != val) & (best == best))


@triton.jit
def tropical_attention_bwd_kernel(
    g_ptr, q_ptr, k_ptr, idx_ptr, jm_ptr, dq_ptr, dk_ptr, dv_ptr,
    H, G, Tq, Tk, D,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd,
    CENTER: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr,
):
    # g, idx: [B, H, Tq, D] and jm: [B, H, Tq] contiguous; q: [B, H, Tq, D], k: [B, Hkv, Tk, D]
    # strided; dq: [B, H, Tq, D], dk, dv: [B, Hkv, Tk, D] contiguous accumulators.
    # One program: BQ queries of one (batch, head), grid (ceil(Tq / BQ), B * H); sends each
    # g[i, d] along its recorded route into dv, dq, dk with atomic adds.
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hk = (bh % H) // G
    ACC = dq_ptr.dtype.element_ty
    # q and k are strided views that can reach past 2**31 elements within one head
    sqt, sqd, skt, skd = _i64(sqt), _i64(sqd), _i64(skt), _i64(skd)
    rq = qb * BQ + tl.arange(0, BQ)
    rd = tl.arange(0, BD)
    qmask = rq < Tq
    mask = qmask[:, None] & (rd < D)[None, :]
    rqc = tl.minimum(rq, Tq - 1)
    off = bh * Tq * D + rqc[:, None] * D + rd[None, :]
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
    j = tl.load(idx_ptr + off, mask=mask, other=0)
    kvo = (b * (H // G) + hk) * Tk * D
    tl.atomic_add(dv_ptr + kvo + j * D + rd[None, :], g, mask=mask)

    q_row = q_ptr + b * sqb + (bh % H) * sqh + rqc * sqt
    k_base = k_ptr + b * skb + hk * skh
    k_rows = k_base + j * skt
    # The score argmaxes over e, recomputed in one pass over e: e[i, d] of s[i, j[i, d]] and, with
    # CENTER, e1[i] of the row maximum s[i, jm[i]]. Written here, not in a helper that takes the q / k
    # pointers: torch.compile's analysis of what a kernel writes counts every argument of a call
    # whose result reaches a stored-to address as written, and cloned q and k for it (with dynamic
    # shapes that clone failed in Inductor, torch 2.11).
    best = tl.full((BQ, BD), float("-inf"), ACC)
    e = tl.zeros((BQ, BD), tl.int32)
    if CENTER:  # m[i] = s[i, jm[i]] entered every y[i, :] with a minus sign
        jr = tl.load(jm_ptr + bh * Tq + rqc, mask=qmask, other=0)
        k_row1 = k_base + jr * skt
        best1 = tl.full((BQ,), float("-inf"), ACC)
        e1 = tl.zeros((BQ,), tl.int32)
    for f in range(0, D):
        qf = tl.load(q_row + f * sqd).to(ACC)
        val = qf[:, None] + tl.load(k_rows + f * skd).to(ACC)
        take = _beats(val, best)
        best = tl.where(take, val, best)
        e = tl.where(take, f, e)
        if CENTER:
            val1 = qf + tl.load(k_row1 + f * skd).to(ACC)
            take1 = _beats(val1, best1)
            best1 = tl.where(take1, val1, best1)
            e1 = tl.where(take1, f, e1)
    dq_row = dq_ptr + bh * Tq * D + rqc * D
    tl.atomic_add(dq_row[:, None] + e, g, mask=mask)
    tl.atomic_add(dk_ptr + kvo + j * D + e, g, mask=mask)
    if CENTER:
        dm = -tl.sum(g, axis=1)
        tl.atomic_add(dq_row + e1, dm, mask=qmask)
        tl.atomic_add(dk_ptr + kvo + jr * D + e1, dm, mask=qmask)


def scratch_numel(B, H, Tq):
    BQ, BJ = _blocks()
    return B * H * cdiv(Tq, BQ) * BQ * BJ


def tropical_attention_fwd(q, k, v, y, idx, jm, mg, scratch, causal, center):
    """Writes y (and idx, jm / mg where given, else None) for q (B, H, Tq, D) and
    k, v (B, Hkv, Tk, D). y, idx contiguous (B, H, Tq, D); jm, mg contiguous (B, H, Tq);
    scratch has scratch_numel(B, H, Tq) elements of the accumulation dtype."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if y.numel() == 0:
        return
    BQ, BJ = _blocks()
    qt = q.transpose(-1, -2).contiguous()  # d-major: a Q / K column is one contiguous vector
    kt = k.transpose(-1, -2).contiguous()
    grid = (cdiv(Tq, BQ), B * H)
    launch(tropical_attention_fwd_kernel)[grid](
        qt, kt, v, y, idx if idx is not None else y, jm if jm is not None else y,
        mg if mg is not None else y, scratch,
        H, H // Hkv, Tq, Tk, D, *v.stride(),
        CAUSAL=causal, CENTER=center, ARGMAX=idx is not None, MARGIN=mg is not None,
        BQ=BQ, BJ=BJ, BD=next_pow2(D),
    )


def tropical_attention_bwd(g, q, k, idx, jm, dq, dk, dv, center):
    """Accumulates the routed gradient into dq (B, H, Tq, D), dk, dv (B, Hkv, Tk, D):
    zeroed, contiguous float32 (float64) buffers. g, idx contiguous; q, k any strides."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if g.numel() == 0:
        return
    BQ = 16 if interpret_mode() else 32
    grid = (cdiv(Tq, BQ), B * H)
    launch(tropical_attention_bwd_kernel)[grid](
        g, q, k, idx, jm if jm is not None else idx, dq, dk, dv,
        H, H // Hkv, Tq, Tk, D, *q.stride(), *k.stride(),
        CENTER=center, BQ=BQ, BD=next_pow2(D), num_warps=4,
    )
