"""Triton kernels for fused tropical (max-plus) attention, forward and backward.

The op (geokern.reference.tropical) is two chained max-plus products,
S = Q (x) K^T over D and Y = S (x) V over keys, with a causal mask and the score
centring y -= max_j s[i, j]. Max-plus is shift-equivariant, so the centring is applied
once at the end: y[i, d] = max_j (s[i, j] + v[j, d]) - m[i], m[i] = max_j s[i, j].

Forward (tropical_attention_fwd_kernel): one program owns BQ queries of one (batch,
head) and walks the visible key blocks once (blocks the causal mask hides entirely are
never visited; on the diagonal ones hidden keys are masked out of both stages, so a
NaN or +inf value of a hidden key never reaches the query). Per key block of BJ keys:
  stage 1: S[BQ, BJ] in registers, max over d of an outer sum of a Q column and a K
           column (Q and K are staged d-major by the launcher so each column is one
           contiguous vector load: the maxplus_matmul pattern), then masked;
  stage 2: S goes through a per-program scratch tile (BQ x BJ, written transposed,
           read back column by column after a barrier) into Y[BQ, D] = max(Y, S[:, j]
           + V[j, :]), an outer sum per key.
Memory is O(T D): the output, the optional argmax, and the scratch (BJ floats per query).
The work is 4 D fp32-lane operations (an add and a max in each stage) per visible
(query, key) pair; no tensor cores exist for it.

With ARGMAX (whenever a gradient is needed) the winning key of every (i, d) and the key
of each row's score maximum are recorded (strict comparisons, so ties keep the smallest
index; the first NaN wins). With MARGIN the runner-up per (i, d) is carried:
top2 = max(top2, min(top1, x)).

Measured on an H100 (benchmarks/results, B4 H8 D64 causal fp32): 3.2 T ops/s at T = 4096,
3.8 at T = 32768 (9.5-11% of the fp32 lane ceiling; the CUDA kernel is 4.4-5x faster).
Unprofiled; the likely limits are the per-key loads of the scratch column and the V
row from L1/L2 inside a loop Triton does not software-pipeline (latency exposed on
every key), the scratch round trip with two barriers per key block, and a 64 x 64
tile (32 outputs per thread) too small to hide them. The CUDA kernel stages the same
data in shared memory instead.

Backward (tropical_attention_bwd_kernel): gradients follow the recorded routes. For
each (i, d), key j = argmax[i, d] gets dv[j, d] += g; the score s[i, j] it used is
q[i, e] + k[j, e] at the first maximising e, recomputed here (D sums), so dq[i, e] and
dk[j, e] get g. The centring sends -sum_d g[i, d] the same way through (i, jm[i]).
Accumulation is by atomic adds in float32 (float64 for float64), so the last bits of
dq / dk / dv may vary from run to run where routes share an entry.
"""

import os

import torch
import triton
import triton.language as tl

from geokern._backend import interpret_mode
from geokern.kernels.maxplus import _narrow


def _blocks():
    """(BQ, BJ): queries per program and keys per block."""
    return (16, 16) if interpret_mode() else (64, 64)


def _configs():
    if interpret_mode() or os.environ.get("GEOKERN_AUTOTUNE", "1") == "0":
        return [triton.Config({}, num_warps=1 if interpret_mode() else 4)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)]


@triton.autotune(configs=_configs(), key=["Tq", "Tk", "D", "CAUSAL", "CENTER", "ARGMAX", "MARGIN"])
@triton.jit
def tropical_attention_fwd_kernel(
    qt_ptr, kt_ptr, v_ptr, y_ptr, idx_ptr, jm_ptr, mg_ptr, scr_ptr,
    H, G, Tq, Tk, D,
    svb, svh, svt, svd,
    CAUSAL: tl.constexpr, CENTER: tl.constexpr, ARGMAX: tl.constexpr, MARGIN: tl.constexpr,
    BQ: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr,
):
    # qt: (B, H, D, Tq) and kt: (B, Hkv, D, Tk) contiguous; v strided (B, Hkv, Tk, D);
    # y / idx contiguous (B, H, Tq, D); jm / mg contiguous (B, H, Tq)
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
    vb = v_ptr + b * svb + hk * svh
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
            vr = tl.load(vb + (j0 + jj) * svt + rd * svd, mask=dmask, other=NEG).to(ACC)
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
    tl.store(y_ptr + out, _narrow(y, y_ptr.dtype.element_ty), mask=omask)
    if ARGMAX:
        tl.store(idx_ptr + out, idx, mask=omask)
        tl.store(jm_ptr + bh * Tq + rq, jm, mask=qmask)
    if MARGIN:
        gap = tl.where(dmask[None, :], top1 - top2, float("inf"))
        gmin = tl.min(gap, axis=1)
        has_nan = tl.max(tl.where(gap != gap, 1, 0), axis=1) > 0
        gmin = tl.where(has_nan, float("nan"), gmin)
        tl.store(mg_ptr + bh * Tq + rq, _narrow(gmin, mg_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _route_d(q_row, k_ptrs, D, sqd, skd, BQ: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """First e maximising q[i, e] + k[j, e] (NaN counts as largest), for a [BQ, BD]
    grid of (i, j): q_row are the BQ row pointers of q, k_ptrs the [BQ, BD] row
    pointers of k."""
    best = tl.full((BQ, BD), float("-inf"), ACC)
    arg = tl.zeros((BQ, BD), tl.int32)
    for e in range(0, D):
        val = tl.load(q_row + e * sqd).to(ACC)[:, None] + tl.load(k_ptrs + e * skd).to(ACC)
        take = (val > best) | ((val != val) & (best == best))
        best = tl.where(take, val, best)
        arg = tl.where(take, e, arg)
    return arg


@triton.jit
def tropical_attention_bwd_kernel(
    g_ptr, q_ptr, k_ptr, idx_ptr, jm_ptr, dq_ptr, dk_ptr, dv_ptr,
    H, G, Tq, Tk, D,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd,
    CENTER: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr,
):
    # g, idx, dq contiguous (B, H, Tq, D); jm (B, H, Tq); dk, dv contiguous (B, Hkv, Tk, D)
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hk = (bh % H) // G
    ACC = dq_ptr.dtype.element_ty
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
    e = _route_d(q_row, k_base + j * skt, D, sqd, skd, BQ, BD, ACC)
    dq_row = dq_ptr + bh * Tq * D + rqc * D
    tl.atomic_add(dq_row[:, None] + e, g, mask=mask)
    tl.atomic_add(dk_ptr + kvo + j * D + e, g, mask=mask)
    if CENTER:  # m[i] = s[i, jm[i]] entered every y[i, :] with a minus sign
        dm = -tl.sum(g, axis=1)
        jr = tl.load(jm_ptr + bh * Tq + rqc, mask=qmask, other=0)
        e1 = _route_d(q_row, (k_base + jr * skt)[:, None] + tl.zeros((BQ, BD), tl.int32), D, sqd, skd, BQ, BD, ACC)
        e1 = tl.max(tl.where(rd[None, :] == 0, e1, -1), axis=1)  # every column holds the same e
        tl.atomic_add(dq_row + e1, dm, mask=qmask)
        tl.atomic_add(dk_ptr + kvo + jr * D + e1, dm, mask=qmask)


def scratch_numel(B, H, Tq):
    BQ, BJ = _blocks()
    return B * H * triton.cdiv(Tq, BQ) * BQ * BJ


def tropical_attention_fwd(q, k, v, y, idx, jm, mg, scratch, causal, center, launch=None):
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
    kernel = (launch or (lambda f: f))(tropical_attention_fwd_kernel)
    grid = (triton.cdiv(Tq, BQ), B * H)
    kernel[grid](
        qt, kt, v, y, idx if idx is not None else y, jm if jm is not None else y,
        mg if mg is not None else y, scratch,
        H, H // Hkv, Tq, Tk, D, *v.stride(),
        CAUSAL=causal, CENTER=center, ARGMAX=idx is not None, MARGIN=mg is not None,
        BQ=BQ, BJ=BJ, BD=triton.next_power_of_2(D),
    )


def tropical_attention_bwd(g, q, k, idx, jm, dq, dk, dv, center, launch=None):
    """Accumulates the routed gradient into dq (B, H, Tq, D), dk, dv (B, Hkv, Tk, D):
    zeroed, contiguous float32 (float64) buffers. g, idx contiguous; q, k any strides."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if g.numel() == 0:
        return
    BQ = 16 if interpret_mode() else 32
    kernel = (launch or (lambda f: f))(tropical_attention_bwd_kernel)
    grid = (triton.cdiv(Tq, BQ), B * H)
    kernel[grid](
        g, q, k, idx, jm if jm is not None else idx, dq, dk, dv,
        H, H // Hkv, Tq, Tk, D, *q.stride(), *k.stride(),
        CENTER=center, BQ=BQ, BD=triton.next_power_of_2(D), num_warps=4,
    )
