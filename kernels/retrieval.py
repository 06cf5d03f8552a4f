"""Triton kernels for the fused retrieval attention softmax(-beta * R * sqrt(g(dv, dv) + eps)) @ V.

Flash-style (triton tutorial 06): the forward runs an online softmax over tiles of
keys and writes the output and the log-sum-exp; the backward recomputes the weights
from the lse, one kernel over key tiles (dK, dV, per-key dR) and one over query
tiles (dQ, per-query / per-pair dR, the metric's dW). The cost is never materialised.

The metric is diagonal with weights w (any sign; other metrics reach here as a
linear feature map, see geokern/metric.py). The squared distance is expanded so it
runs on tensor cores:
    s_ij = |q_i|^2_w + |k_j|^2_w - 2 (w q_i) . k_j,     spd_ij = sqrt(max(s_ij, 0) + eps)
with |x|^2_w precomputed in float32 and w q rounded to the input dtype (QW), the dot
accumulated in float32 (exact float32 for float32 inputs: input_precision="ieee").
This cancels when q_i is close to k_j: s carries an absolute error of about
u * (|q|^2_w + |k|^2_w) (u = 2^-8 in bf16, 2^-24 in fp32), so near-coincident pairs
get spd ~ sqrt(u) |q| instead of sqrt(eps); the clamp keeps it real.

Shapes: tensors are viewed with two batch dims [NB0, NB1, L, F] (broadcast dims have
stride 0: a shared key bank is not expanded). R and the boolean mask are read through
strides in the mode the wrapper picks (per batch, per query, per key, per pair).

Gradients (spec section 2), with P the weights, dP = dO V^T, Delta_i = dO_i . O_i:
    dlogit = P (dP - Delta),   dcost = -beta dlogit,   dR = dcost * spd
    ds     = dcost * R / (2 spd) * [s >= 0]                        (d cost / d s)
    dQ_i   = 2 w (q_i sum_j ds_ij - sum_j ds_ij k_j)
    dK_j   = 2 (w k_j sum_i ds_ij - sum_i ds_ij (w q_i))
    dw     = sum_i (q_i^2 sum_j ds_ij - 2 q_i (sum_j ds_ij k_j)) + sum_j k_j^2 sum_i ds_ij
"""

import math
import os

import triton
import triton.language as tl

from geokern._backend import interpret_mode

LOG2E = math.log2(math.e)

# R modes: one value per batch (or a scalar), per query, per key, per (query, key) pair
R_BATCH, R_QUERY, R_KEY, R_PAIR = 0, 1, 2, 3
# mask modes: none, per key (shared by the queries of a row), per pair
MASK_NONE, MASK_KEY, MASK_PAIR = 0, 1, 2


def _configs(bwd=False):
    if interpret_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    if os.environ.get("GEOKERN_AUTOTUNE", "1") == "0":  # tests: one config, no tuning time
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    if bwd:
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 1)]
        ]
    # Hopper: 128-row query tiles (two warpgroups at 8 warps), keys streamed 64 or 128 at a time
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2)]
    ]


def _even_block():
    """A multiple of every BLOCK_M / BLOCK_N the configs use: a length divisible by it needs no masks."""
    return 16 if interpret_mode() else 128


_KEY = ["LQ", "M", "BLOCK_D", "BLOCK_DV", "R_MODE", "MASK_MODE"]
_FWD_KEY = _KEY + ["EVEN_M", "EVEN_N", "EXP_MODE"]


@triton.jit
def _load_r(r_b, offs_m, offs_n, mvalid, nvalid, srm, srn, R_MODE: tl.constexpr):
    """R for a [BLOCK_M, BLOCK_N] tile, shaped to broadcast against it."""
    if R_MODE == 0:
        r = tl.load(r_b)
    elif R_MODE == 1:
        r = tl.load(r_b + offs_m * srm, mask=mvalid, other=0.0)[:, None]
    elif R_MODE == 2:
        r = tl.load(r_b + offs_n * srn, mask=nvalid, other=0.0)[None, :]
    else:
        r = tl.load(r_b + offs_m[:, None] * srm + offs_n[None, :] * srn, mask=mvalid[:, None] & nvalid[None, :], other=0.0)
    return r.to(tl.float32)


@triton.jit
def _keep(mk_b, offs_m, offs_n, mvalid, nvalid, smm, smn, MASK_MODE: tl.constexpr):
    """Which entries of the tile are real, unmasked keys."""
    keep = nvalid[None, :] & (offs_m >= 0)[:, None]
    if MASK_MODE == 1:
        mk = tl.load(mk_b + offs_n * smn, mask=nvalid, other=0)
        keep = keep & (mk != 0)[None, :]
    elif MASK_MODE == 2:
        mk = tl.load(mk_b + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=mvalid[:, None] & nvalid[None, :], other=0)
        keep = keep & (mk != 0)
    return keep


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b accumulated in float32. PREC = "upcast" (the interpreter, whose 16-bit dot is
    wrong in triton 3.8) multiplies float32 copies instead: the same products, exact."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _spd(qw, k, qn, kn, eps, PREC: tl.constexpr):
    """(spd, 1 / spd, s >= 0) for a tile: spd = sqrt(max(|q|^2 + |k|^2 - 2 qw.k, 0) + eps).
    One rsqrt.approx (MUFU.RSQ) gives both: the backward needs 1 / spd for d cost / d s."""
    dot = _mm(qw, tl.trans(k), PREC)
    s = qn[:, None] + kn[None, :] - 2.0 * dot
    t = tl.maximum(s, 0.0) + eps
    inv = tl.math.rsqrt(t)
    return t * inv, inv, s >= 0.0


@triton.jit
def _exp2_fma(x):
    """2^x on the FMA pipe (FlashAttention-4's trick), for finite x <= 0: the MUFU unit
    (16 ops / clk / SM) is the forward's bottleneck, the FMA pipe (128 / clk) has room.
    x = j + f with j = round(x), f in [-0.5, 0.5]; 2^f by a degree-3 polynomial (relative
    error 7.7e-5, below the bf16 rounding of P), 2^j added into the exponent bits."""
    xc = tl.maximum(x, -125.0)
    t = xc + 12582912.0  # 1.5 * 2^23: the nearest integer lands in the low mantissa bits
    f = xc - (t - 12582912.0)
    poly = 0.055088821798563004 * f + 0.24260465800762177
    poly = poly * f + 0.6932762861251831
    poly = poly * f + 0.999928891658783
    bits = poly.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(ptr, rows, cols, s_r, s_c, rvalid, cvalid, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """A [rows, cols] tile; masks only where a dim is not a multiple of its block."""
    p = ptr + rows[:, None] * s_r + cols[None, :] * s_c
    if EVEN_R and EVEN_C:
        return tl.load(p)
    elif EVEN_R:
        return tl.load(p, mask=cvalid[None, :], other=0.0)
    elif EVEN_C:
        return tl.load(p, mask=rvalid[:, None], other=0.0)
    else:
        return tl.load(p, mask=rvalid[:, None] & cvalid[None, :], other=0.0)


@triton.jit
def _fwd_tile(qw2, qne, nr_row, m_i, l_i, acc, start, offs_m, mvalid, offs_d, offs_e, dvalid, evalid,
              k_b, kn_b, v_b, r_b, mk_b, skn, skd, sknn, svn, svd, srm, srn, smm, smn, M, scale, eps,
              R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, PREC: tl.constexpr,
              EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, FMA_EXP: tl.constexpr):
    """One key tile of the online softmax: returns the updated (m_i, l_i, acc)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    nvalid = offs_n < M
    k = _load_tile(k_b, offs_n, offs_d, skn, skd, nvalid, dvalid, EVEN_N, EVEN_D)
    if EVEN_N:
        kn = tl.load(kn_b + offs_n * sknn)
    else:
        kn = tl.load(kn_b + offs_n * sknn, mask=nvalid, other=0.0)
    # t = max(|q|^2 + eps + |k|^2 - 2 (w q).k, eps) = max(s, 0) + eps: one GEMM, two adds, one max
    t = tl.maximum(_mm(qw2, tl.trans(k), PREC) + qne[:, None] + kn[None, :], eps)
    spd = tl.sqrt(t)  # sqrt.approx.f32: MUFU.SQRT, relative error ~2^-22
    if R_MODE == 2:
        if EVEN_N:
            nr = -scale * tl.load(r_b + offs_n * srn)
        else:
            nr = -scale * tl.load(r_b + offs_n * srn, mask=nvalid, other=0.0)
        x = spd * nr[None, :]  # logit in log2 units
    elif R_MODE == 3:
        x = spd * (-scale * _load_r(r_b, offs_m, offs_n, mvalid, nvalid, srm, srn, R_MODE))
    else:
        x = spd * nr_row[:, None]
    if MASK_MODE != 0:
        keep = _keep(mk_b, offs_m, offs_n, mvalid, nvalid, smm, smn, MASK_MODE)
        x = tl.where(keep, x, float("-inf"))
    elif not EVEN_N:
        x = tl.where(nvalid[None, :], x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1))
    if MASK_MODE != 0:
        # rows with nothing kept so far: subtract 0 so exp2(-inf) = 0, not exp2(nan)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    if FMA_EXP:
        p = _exp2_fma(x - m_new[:, None])
    else:
        p = tl.math.exp2(x - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_b, offs_n, offs_e, svn, svd, nvalid, evalid, EVEN_N, EVEN_DV)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.autotune(configs=_configs(), key=_FWD_KEY)
@triton.jit
def retrieval_attn_fwd_kernel(
    q_ptr, w_ptr, k_ptr, kn_ptr, v_ptr, r_ptr, mk_ptr, o_ptr, lse_ptr,
    sq0, sq1, sqm, sqd,
    sk0, sk1, skn, skd,
    skn0, skn1, sknn,
    sv0, sv1, svn, svd,
    sr0, sr1, srm, srn,
    sm0, sm1, smm, smn,
    NB1, LQ, M, D, DV,
    scale, eps,
    R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, PREC: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    EXP_MODE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # EVEN_M / EVEN_N: LQ / M are multiples of every BLOCK_M / BLOCK_N (128): no row or key masks.
    # EXP_MODE 1: every second key tile takes 2^x on the FMA pipe (needs M % (2 BLOCK_N) == 0,
    # no mask), offloading the MUFU unit that sqrt and exp2 share.
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    b0, b1 = pid_b // NB1, pid_b % NB1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mvalid = offs_m < LQ
    dvalid = offs_d < D
    evalid = offs_e < DV
    # |q|^2_w and -2 w q from q itself: no pre-pass over the queries
    q = _load_tile(q_ptr + b0 * sq0 + b1 * sq1, offs_m, offs_d, sqm, sqd, mvalid, dvalid, EVEN_M, EVEN_D)
    w = tl.load(w_ptr + offs_d, mask=dvalid, other=0.0)
    qf = q.to(tl.float32)
    qwf = qf * w[None, :]
    qne = tl.sum(qwf * qf, 1) + eps
    qw2 = (-2.0 * qwf).to(q.dtype)  # exact: a power-of-2 scale of round(w q)
    k_b = k_ptr + b0 * sk0 + b1 * sk1
    kn_b = kn_ptr + b0 * skn0 + b1 * skn1
    v_b = v_ptr + b0 * sv0 + b1 * sv1
    r_b = r_ptr + b0 * sr0 + b1 * sr1
    mk_b = mk_ptr + b0 * sm0 + b1 * sm1
    if R_MODE == 0:
        nr_row = tl.zeros([BLOCK_M], tl.float32) - scale * tl.load(r_b).to(tl.float32)
    elif R_MODE == 1:
        nr_row = -scale * tl.load(r_b + offs_m * srm, mask=mvalid, other=0.0).to(tl.float32)
    else:
        nr_row = tl.zeros([BLOCK_M], tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    STEP: tl.constexpr = 2 * BLOCK_N if EXP_MODE == 1 else BLOCK_N
    for start in range(0, M, STEP):
        m_i, l_i, acc = _fwd_tile(qw2, qne, nr_row, m_i, l_i, acc, start, offs_m, mvalid, offs_d, offs_e, dvalid,
                                  evalid, k_b, kn_b, v_b, r_b, mk_b, skn, skd, sknn, svn, svd, srm, srn, smm, smn,
                                  M, scale, eps, R_MODE, MASK_MODE, PREC, EVEN_N, EVEN_D, EVEN_DV, BLOCK_N, False)
        if EXP_MODE == 1:
            m_i, l_i, acc = _fwd_tile(qw2, qne, nr_row, m_i, l_i, acc, start + BLOCK_N, offs_m, mvalid, offs_d,
                                      offs_e, dvalid, evalid, k_b, kn_b, v_b, r_b, mk_b, skn, skd, sknn, svn, svd,
                                      srm, srn, smm, smn, M, scale, eps, R_MODE, MASK_MODE, PREC, EVEN_N, EVEN_D,
                                      EVEN_DV, BLOCK_N, True)

    if MASK_MODE != 0:
        empty = l_i == 0.0  # every key masked: zeros and lse = -inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    else:
        out = acc / l_i[:, None]
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    o_p = o_ptr + pid_b * LQ * DV + offs_m[:, None] * DV + offs_e[None, :]
    if EVEN_M and EVEN_DV:
        tl.store(o_p, out.to(o_ptr.dtype.element_ty))
    else:
        tl.store(o_p, out.to(o_ptr.dtype.element_ty), mask=mvalid[:, None] & evalid[None, :])
    if EVEN_M:
        tl.store(lse_ptr + pid_b * LQ + offs_m, lse)
    else:
        tl.store(lse_ptr + pid_b * LQ + offs_m, lse, mask=mvalid)


@triton.jit
def sqnorm_kernel(x_ptr, w_ptr, out_ptr, xw_ptr, sx0, sx1, sxl, sxd, NB1, L, D,
                  WRITE_XW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, l] = sum_d w_d x[b, l, d]^2 in float32: |k|^2_w once per key, not per score."""
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    b0, b1 = pid_b // NB1, pid_b % NB1
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    lvalid = offs_l < L
    dvalid = offs_d < D
    x = tl.load(x_ptr + b0 * sx0 + b1 * sx1 + offs_l[:, None] * sxl + offs_d[None, :] * sxd,
                mask=lvalid[:, None] & dvalid[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs_d, mask=dvalid, other=0.0)
    tl.store(out_ptr + pid_b * L + offs_l, tl.sum(x * x * w[None, :], 1), mask=lvalid)
    if WRITE_XW:
        tl.store(xw_ptr + (pid_b * L + offs_l)[:, None] * D + offs_d[None, :],
                 (x * w[None, :]).to(xw_ptr.dtype.element_ty), mask=lvalid[:, None] & dvalid[None, :])


@triton.jit
def _bwd_tile(qw, k, qn, kn, r, keep, lse2, dp, delta, scale, beta, eps, PREC: tl.constexpr):
    """(P, ds, dR) of one tile; lse2 is the lse in log2 units with +inf for empty rows."""
    spd, inv, pos = _spd(qw, k, qn, kn, eps, PREC)
    x = tl.where(keep, -scale * r * spd, float("-inf"))
    p = tl.math.exp2(x - lse2[:, None])
    dcost = -beta * (p * (dp - delta[:, None]))
    ds = tl.where(pos, dcost * (0.5 * r) * inv, 0.0)
    return p, ds, dcost * spd


@triton.jit
def _store_partial(ptr, part, pid_b, pid, L, offs_d, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write a program's [BLOCK_D] partial of dw into slots of 16 rows each.

    The buffer has cdiv(L, 16) slots per batch whatever BLOCK the autotuner picks: a
    program owns BLOCK // 16 slots, writes its partial in the first and zeros in the
    others, so no slot is left stale (from another config's run) and the sum is exact.
    """
    NS: tl.constexpr = BLOCK // 16
    slots_total = (L + 15) // 16
    slot = pid * NS + tl.arange(0, NS)
    vals = tl.where((tl.arange(0, NS) == 0)[:, None], part[None, :], 0.0)
    tl.store(ptr + (pid_b * slots_total + slot)[:, None] * BLOCK_D + offs_d[None, :], vals,
             mask=(slot < slots_total)[:, None])


@triton.autotune(configs=_configs(bwd=True), key=_KEY + ["EVEN_M", "EVEN_N"])
@triton.jit
def retrieval_attn_bwd_dkv_kernel(
    q_ptr, qw_ptr, qn_ptr, k_ptr, kn_ptr, v_ptr, r_ptr, mk_ptr, do_ptr, lse_ptr, delta_ptr, w_ptr,
    dk_ptr, dv_ptr, drk_ptr, dwk_ptr,
    sq0, sq1, sqm, sqd,
    sk0, sk1, skn, skd,
    skn0, skn1, sknn,
    sv0, sv1, svn, svd,
    sr0, sr1, srm, srn,
    sm0, sm1, smm, smn,
    NB1, LQ, M, D, DV,
    scale, beta, eps,
    R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, PREC: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program per (key tile, batch): loops over every query tile.
    # q, qw, do are [NB, LQ, *] contiguous; dk, dv, drk are [NB, M, *] contiguous.
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    b0, b1 = pid_b // NB1, pid_b % NB1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    nvalid = offs_n < M
    dmask = offs_d < D
    emask = offs_e < DV
    k = tl.load(k_ptr + b0 * sk0 + b1 * sk1 + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=nvalid[:, None] & dmask[None, :], other=0.0)
    kn = tl.load(kn_ptr + b0 * skn0 + b1 * skn1 + offs_n * sknn, mask=nvalid, other=0.0)
    v = tl.load(v_ptr + b0 * sv0 + b1 * sv1 + offs_n[:, None] * svn + offs_e[None, :] * svd,
                mask=nvalid[:, None] & emask[None, :], other=0.0)
    w = tl.load(w_ptr + offs_d, mask=dmask, other=0.0)
    r_b = r_ptr + b0 * sr0 + b1 * sr1
    mk_b = mk_ptr + b0 * sm0 + b1 * sm1
    row_b = pid_b * LQ

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # sum_i ds_ij (w q_i)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    cs = tl.zeros([BLOCK_N], tl.float32)  # sum_i ds_ij
    dr = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, LQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mvalid = offs_m < LQ
        qw = _load_tile(qw_ptr + row_b * D, offs_m, offs_d, D, 1, mvalid, dmask, EVEN_M, EVEN_D)
        do = _load_tile(do_ptr + row_b * DV, offs_m, offs_e, DV, 1, mvalid, emask, EVEN_M, EVEN_DV)
        if EVEN_M:
            qn = tl.load(qn_ptr + row_b + offs_m)
            lse = tl.load(lse_ptr + row_b + offs_m)
        else:
            qn = tl.load(qn_ptr + row_b + offs_m, mask=mvalid, other=0.0)
            lse = tl.load(lse_ptr + row_b + offs_m, mask=mvalid, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(delta_ptr + row_b + offs_m, mask=mvalid, other=0.0)
        r = _load_r(r_b, offs_m, offs_n, mvalid, nvalid, srm, srn, R_MODE)
        keep = _keep(mk_b, offs_m, offs_n, mvalid, nvalid, smm, smn, MASK_MODE)
        dp = _mm(do, tl.trans(v), PREC)
        p, ds, dr_t = _bwd_tile(qw, k, qn, kn, r, keep, lse2, dp, delta, scale, beta, eps, PREC)
        dv_acc += _mm(tl.trans(p).to(do.dtype), do, PREC)
        dk_acc += _mm(tl.trans(ds).to(qw.dtype), qw, PREC)
        cs += tl.sum(ds, 0)
        dr += tl.sum(dr_t, 0)

    kf = k.to(tl.float32)
    dk = 2.0 * (w[None, :] * kf * cs[:, None] - dk_acc)
    out_n = pid_b * M + offs_n
    tl.store(dk_ptr + out_n[:, None] * D + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=nvalid[:, None] & dmask[None, :])
    tl.store(dv_ptr + out_n[:, None] * DV + offs_e[None, :], dv_acc.to(dv_ptr.dtype.element_ty),
             mask=nvalid[:, None] & emask[None, :])
    if R_MODE == 2:
        tl.store(drk_ptr + out_n, dr, mask=nvalid)
    # this tile's share of dw: sum_j k_j^2 cs_j
    _store_partial(dwk_ptr, tl.sum(kf * kf * cs[:, None], 0), pid_b, pid_n, M, offs_d, BLOCK_N, BLOCK_D)


@triton.autotune(configs=_configs(bwd=True), key=_KEY + ["EVEN_M", "EVEN_N"])
@triton.jit
def retrieval_attn_bwd_dq_kernel(
    q_ptr, qw_ptr, qn_ptr, k_ptr, kn_ptr, v_ptr, r_ptr, mk_ptr, do_ptr, lse_ptr, delta_ptr, w_ptr,
    dq_ptr, drq_ptr, drp_ptr, dwq_ptr,
    sq0, sq1, sqm, sqd,
    sk0, sk1, skn, skd,
    skn0, skn1, sknn,
    sv0, sv1, svn, svd,
    sr0, sr1, srm, srn,
    sm0, sm1, smm, smn,
    NB1, LQ, M, D, DV,
    scale, beta, eps,
    R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, PREC: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program per (query tile, batch): loops over every key tile.
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    b0, b1 = pid_b // NB1, pid_b % NB1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mvalid = offs_m < LQ
    dmask = offs_d < D
    emask = offs_e < DV
    row = pid_b * LQ + offs_m
    qmask = mvalid[:, None] & dmask[None, :]
    q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
    qw = tl.load(qw_ptr + row[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
    qn = tl.load(qn_ptr + row, mask=mvalid, other=0.0)
    do = tl.load(do_ptr + row[:, None] * DV + offs_e[None, :], mask=mvalid[:, None] & emask[None, :], other=0.0)
    lse = tl.load(lse_ptr + row, mask=mvalid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + row, mask=mvalid, other=0.0)
    w = tl.load(w_ptr + offs_d, mask=dmask, other=0.0)
    k_b = k_ptr + b0 * sk0 + b1 * sk1
    kn_b = kn_ptr + b0 * skn0 + b1 * skn1
    v_b = v_ptr + b0 * sv0 + b1 * sv1
    r_b = r_ptr + b0 * sr0 + b1 * sr1
    mk_b = mk_ptr + b0 * sm0 + b1 * sm1

    a_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_j ds_ij k_j
    rs = tl.zeros([BLOCK_M], tl.float32)  # sum_j ds_ij
    dr = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nvalid = offs_n < M
        k = _load_tile(k_b, offs_n, offs_d, skn, skd, nvalid, dmask, EVEN_N, EVEN_D)
        v = _load_tile(v_b, offs_n, offs_e, svn, svd, nvalid, emask, EVEN_N, EVEN_DV)
        if EVEN_N:
            kn = tl.load(kn_b + offs_n * sknn)
        else:
            kn = tl.load(kn_b + offs_n * sknn, mask=nvalid, other=0.0)
        r = _load_r(r_b, offs_m, offs_n, mvalid, nvalid, srm, srn, R_MODE)
        keep = _keep(mk_b, offs_m, offs_n, mvalid, nvalid, smm, smn, MASK_MODE)
        dp = _mm(do, tl.trans(v), PREC)
        p, ds, dr_t = _bwd_tile(qw, k, qn, kn, r, keep, lse2, dp, delta, scale, beta, eps, PREC)
        a_acc += _mm(ds.to(k.dtype), k, PREC)
        rs += tl.sum(ds, 1)
        if R_MODE == 3:
            tl.store(drp_ptr + row[:, None] * M + offs_n[None, :], dr_t, mask=mvalid[:, None] & nvalid[None, :])
        else:
            dr += tl.sum(dr_t, 1)

    qf = q.to(tl.float32)
    dq = 2.0 * w[None, :] * (qf * rs[:, None] - a_acc)
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qmask)
    if R_MODE < 2:
        tl.store(drq_ptr + row, dr, mask=mvalid)
    # this tile's share of dw: sum_i (q_i^2 rs_i - 2 q_i a_i)
    _store_partial(dwq_ptr, tl.sum(qf * (qf * rs[:, None] - 2.0 * a_acc), 0), pid_b, pid_m, LQ, offs_d, BLOCK_M,
                   BLOCK_D)


# ---- launchers -------------------------------------------------------------------
# Inputs are 4-D: [NB0, NB1, L, F] with size-1 batch dims where an operand is shared;
# r is [NB0|1, NB1|1, LQ|1, M|1] float32, mask likewise (bool) or None.

def _launch(kernel, launch):
    return (launch or (lambda k: k))(kernel)


def modes(r, mask):
    r_mode = int(r.shape[-2] != 1) + 2 * int(r.shape[-1] != 1)
    mask_mode = MASK_NONE if mask is None else (MASK_KEY if mask.shape[-2] == 1 else MASK_PAIR)
    return r_mode, mask_mode


def _pow2(n):
    return max(16, triton.next_power_of_2(n))


def _prec(dtype):
    # float32 inputs: exact float32 dots (tf32 would cancel badly in |q|^2 + |k|^2 - 2 q.k)
    import torch

    if interpret_mode():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _common(q, k, v, w, r, mask, launch=None):
    """Expanded views and the strides the kernels take."""
    import torch

    lead = tuple(torch.broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2]))
    lq, m, d, dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    qe = q.expand(lead + (lq, d)).contiguous()
    qw = torch.empty_like(qe)
    qn = sqnorm(qe, w, qw, launch)
    ke = k.expand(lead + (m, d))
    kn = sqnorm(k, w, launch=launch).expand(lead + (m,))
    ve = v.expand(lead + (m, dv))
    re = r.expand(lead + (lq, m))
    if mask is None:
        me = r.new_zeros((1, 1, 1, 1), dtype=torch.uint8)
    else:
        me = mask.view(torch.uint8).expand(lead + (lq, m))
    strides = [
        *qw.stride(), *ke.stride(), *kn.stride(), *ve.stride(), *re.stride(), *me.stride(),
    ]
    return lead, (lq, m, d, dv), qe, qw, qn, ke, kn, ve, re, me, strides


def sqnorm(x, w, xw=None, launch=None):
    """|x|^2_w per row of x [NB0, NB1, L, F] (any strides) as float32 [NB0, NB1, L]; with xw
    (contiguous, x's shape and dtype) also writes w x rounded to x's dtype there."""
    import torch

    nb0, nb1, l, d = x.shape
    out = torch.empty((nb0, nb1, l), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    bl = 64
    _launch(sqnorm_kernel, launch)[(triton.cdiv(l, bl), nb0 * nb1)](x, w, out, out if xw is None else xw, *x.stride(), nb1, l, d,
                                                 WRITE_XW=xw is not None, BLOCK_L=bl, BLOCK_D=_pow2(d))
    return out


def exp_mode(m, mask, dtype):
    """1 (half the exponentials on the FMA pipe) for 16-bit inputs (P is rounded to 16 bits,
    far coarser than the polynomial's 7.7e-5) where the key loop can take key tiles in pairs
    without masks. Off unless GEOKERN_RETRIEVAL_FMA_EXP=1: measured on the H100 (B4 H16 N4096
    bf16) it is slower, 1.26 vs 1.02 ms at D=64 and 1.84 vs 1.59 ms at D=128 (the extra
    instructions cost more issue slots than the MUFU time they save in Triton's schedule)."""
    import torch

    if os.environ.get("GEOKERN_RETRIEVAL_FMA_EXP", "0") != "1" or dtype == torch.float32:
        return 0
    return int(mask is None and m % (2 * _even_block()) == 0)


def attn_fwd(q, k, v, w, r, mask, beta, eps, launch=None):
    """(out [NB0, NB1, LQ, DV] in v's dtype, lse [NB0, NB1, LQ] float32)."""
    import torch

    lead = tuple(torch.broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2]))
    lq, m, d, dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    out = torch.empty(lead + (lq, dv), dtype=v.dtype, device=v.device)
    lse = torch.empty(lead + (lq,), dtype=torch.float32, device=v.device)
    nb = lead[0] * lead[1]
    if out.numel() == 0 or nb * lq == 0:
        return out, lse
    if m == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    kn = sqnorm(k, w, launch=launch).expand(lead + (m,))  # per key, once; a shared bank stays unexpanded
    qe = q.expand(lead + (lq, d))
    ke = k.expand(lead + (m, d))
    ve = v.expand(lead + (m, dv))
    re = r.expand(lead + (lq, m))
    me = r.new_zeros((1, 1, 1, 1), dtype=torch.uint8) if mask is None else mask.view(torch.uint8).expand(lead + (lq, m))
    strides = [*qe.stride(), *ke.stride(), *kn.stride(), *ve.stride(), *re.stride(), *me.stride()]
    r_mode, mask_mode = modes(r, mask)
    eb = _even_block()
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), nb)  # noqa: E731
    _launch(retrieval_attn_fwd_kernel, launch)[grid](
        qe, w, ke, kn, ve, re, me, out, lse, *strides, lead[1], lq, m, d, dv,
        float(beta) * LOG2E, float(eps),
        R_MODE=r_mode, MASK_MODE=mask_mode, PREC=_prec(q.dtype),
        EVEN_M=lq % eb == 0, EVEN_N=m % eb == 0, EVEN_D=_pow2(d) == d, EVEN_DV=_pow2(dv) == dv,
        EXP_MODE=exp_mode(m, mask, q.dtype),
        BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
    )
    return out, lse


def attn_bwd(do, q, k, v, w, r, mask, out, lse, dlse, beta, eps, launch=None):
    """(dq, dk, dv at the broadcast batch shape; dr [.., LQ|1, M|1] float32; dw [F] float32).

    dlse (optional, lse's shape) is the gradient of the log-sum-exp output: with
    d lse / d logit_j = p_j it enters as delta_i = rowsum(dO * O)_i - dlse_i."""
    import torch

    lead, (lq, m, d, dv), qe, qw, qn, ke, kn, ve, re, me, strides = _common(q, k, v, w, r, mask, launch)
    r_mode, mask_mode = modes(r, mask)
    nb = lead[0] * lead[1]
    dq = torch.empty(lead + (lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty(lead + (m, d), dtype=k.dtype, device=k.device)
    dvv = torch.empty(lead + (m, dv), dtype=v.dtype, device=v.device)
    dr_shape = {0: (lq, 1), 1: (lq, 1), 2: (1, m), 3: (lq, m)}[r_mode]
    dr = torch.empty(lead + dr_shape, dtype=torch.float32, device=q.device)
    bd = _pow2(d)
    dwk = torch.empty((nb * triton.cdiv(m, 16), bd), dtype=torch.float32, device=q.device)
    dwq = torch.empty((nb * triton.cdiv(lq, 16), bd), dtype=torch.float32, device=q.device)
    if nb * lq == 0 or m == 0:
        dq.zero_(), dk.zero_(), dvv.zero_(), dr.zero_()
        return dq, dk, dvv, dr, w.new_zeros(w.shape)
    do = do.expand(lead + (lq, dv)).contiguous()
    delta = (do.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float().expand(delta.shape)
    delta = delta.contiguous()
    lse = lse.contiguous()
    eb = _even_block()
    common = dict(R_MODE=r_mode, MASK_MODE=mask_mode, PREC=_prec(q.dtype), EVEN_M=lq % eb == 0, EVEN_N=m % eb == 0,
                  EVEN_D=bd == d, EVEN_DV=_pow2(dv) == dv, BLOCK_D=bd, BLOCK_DV=_pow2(dv))
    scalars = (lead[1], lq, m, d, dv, float(beta) * LOG2E, float(beta), float(eps))
    drk = dr if r_mode == R_KEY else dwk  # unused pointers get any valid buffer
    grid_n = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), nb)  # noqa: E731
    _launch(retrieval_attn_bwd_dkv_kernel, launch)[grid_n](
        qe, qw, qn, ke, kn, ve, re, me, do, lse, delta, w, dk, dvv, drk, dwk, *strides, *scalars, **common
    )
    drq = dr if r_mode in (R_BATCH, R_QUERY) else dwq
    drp = dr if r_mode == R_PAIR else dwq
    grid_m = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), nb)  # noqa: E731
    _launch(retrieval_attn_bwd_dq_kernel, launch)[grid_m](
        qe, qw, qn, ke, kn, ve, re, me, do, lse, delta, w, dq, drq, drp, dwq, *strides, *scalars, **common
    )
    dw = (dwk.sum(0) + dwq.sum(0))[:d]
    return dq, dk, dvv, dr, dw
