"""The retrieval attention backward: dQ, dK, dV, dR and dw from dO (and the lse's gradient).

One kernel over key tiles (flash-attention-2 structure): it recomputes each tile once from the
lse, accumulates dK, dV and per-key dR in registers, and adds the query side (sum_j ds_ij k_j,
sum_j ds_ij, per-query dR) and the metric gradient into float32 buffers with atomics; a small
second kernel turns those into dQ. The cost is never materialised. With P the weights,
dP = dO V^T and Delta_i = dO_i . O_i - dlse_i (spec section 2):
    dlogit = P (dP - Delta),   dcost = -beta dlogit,   dR = dcost * spd
    ds     = dcost * R / (2 spd) * [s >= 0]                        (d cost / d s)
    dQ_i   = 2 w (q_i sum_j ds_ij - sum_j ds_ij k_j)
    dK_j   = 2 (w k_j sum_i ds_ij - sum_i ds_ij (w q_i))
    dw     = sum_i (q_i^2 sum_j ds_ij - 2 q_i (sum_j ds_ij k_j)) + sum_j k_j^2 sum_i ds_ij
The distances are expanded as in the forward (attention_fwd.py), with float32 norms.
"""

import triton
import triton.language as tl

from geokern.kernels._common import autotune_configs, mm, narrow
from geokern.kernels.retrieval.common import (INTERP_CONFIGS, TEST_CONFIGS, fit_value_width, kept, load_r, load_tile,
                                              load_vec, table_configs)

# (query tile, key tile, warps, stages, max registers); the key tile is the M of the dK / dV GEMMs
# (128-query tiles spill: dK, dV and five [key, query] tiles do not fit in registers)
_FULL = [(64, 128, 8, 2, None), (64, 128, 8, 1, None), (64, 64, 4, 2, None), (64, 128, 4, 2, None),
         (64, 64, 8, 2, None)]
_KEY = ["LQ", "M", "M2", "BLOCK_D", "BLOCK_DV", "R_MODE", "MASK_MODE", "R2_MODE", "HAS_BANK", "EVEN_M",
        "EVEN_N", "EVEN_N2", "SHARED_K", "SHARED_V", "SHARED_K2", "SHARED_V2", "NEED_DR", "EPS_POS", "LONG_Q"]


@triton.jit
def _bwd_update(qw, do, qn, lse2, delta, k, ka, kn, v, nr, hr, keep, eps, psc, beta, dk_acc, dv_acc, cs, dr,
                dqa_b, rs_b, dr_b, offs_m, mvalid, offs_n, nvalid, offs_d, dvalid, M, D,
                R_MODE: tl.constexpr, NEED_DR: tl.constexpr, USE_KEEP: tl.constexpr, PREC: tl.constexpr,
                EPS_POS: tl.constexpr, PGUARD: tl.constexpr):
    """One (key tile, query tile) pair, transposed: rows are keys, columns queries.

    Accumulates dK / dV / sum_i ds / per-key dR in registers and adds the query side into
    float32 buffers with atomics. nr = -beta log2(e) R and hr = -beta R / 2 broadcast
    against the [BLOCK_N, BLOCK_M] tile. EPS_POS: eps is a positive normal float32, so t >= eps > 0
    (or NaN) and the zero-distance cases of eps = 0 cannot arise. PGUARD: hr * inv may be inf (the
    caller could not bound it), so d cost / d s is also 0 where p is not > 0."""
    # qn carries + eps: s = g + eps; qw = w q / psc (psc a power of two, 1 unless float16 overflows)
    if qw.dtype == tl.float16:
        s = kn[:, None] + qn[None, :] - 2.0 * psc * mm(k, tl.trans(qw), PREC)
    else:  # psc is 1 unless float16 overflows: no multiply per score
        s = kn[:, None] + qn[None, :] - 2.0 * mm(k, tl.trans(qw), PREC)
    t = tl.maximum(s, eps, propagate_nan=tl.PropagateNan.ALL)
    inv = tl.math.rsqrt(t)  # one MUFU.RSQ gives spd = t / sqrt(t) and the 1 / spd of d cost / d s
    if EPS_POS:
        spd = t * inv
        live = s >= eps  # 0 where the clamp is active
    else:
        # t = 0 (eps = 0 and k = q, or a padded row): spd = 0, and d cost / d s takes sqrt's
        # subgradient 0 there, never 0 * inf = NaN
        spd = tl.where(t == 0.0, 0.0, t * inv)
        live = (s >= eps) & (t != 0.0)
    x = spd * nr
    if USE_KEEP:
        x = tl.where(keep, x, float("-inf"))
    p = tl.math.exp2(x - lse2[None, :])
    if PGUARD:
        # d cost / d s; 0 also where p = 0 (a masked key; a hard-min row, lse = -inf, where beta R passed
        # float32 and hr * inv may be inf): the one select, so ds = pd * c is 0 there, not 0 * inf
        c = tl.where(live & (p > 0.0), hr * inv, 0.0)
    else:  # |hr * inv| is bounded (_bwd_segment): where p = 0, ds = pd * c is 0 already
        c = tl.where(live, hr * inv, 0.0)
    pl = p.to(do.dtype)
    pd = p * (mm(v, tl.trans(do), PREC) - delta[None, :])  # d loss / d logit
    if USE_KEEP:  # a masked key's value, key or R may be NaN / inf: its terms are 0, never 0 * NaN
        pd = tl.where(keep, pd, 0.0)
        spd = tl.where(keep, spd, 0.0)
    dv_acc += mm(pl, do, PREC)
    ds = pd * c
    if qw.dtype == tl.float16:
        # d loss / d s is ~ beta R / spd: far coordinates make it smaller than float16's subnormals.
        # Round it to float16 at a power-of-two scale that puts the tile's largest near 2^14, and
        # scale the two GEMMs back (exact): float16 launches only, one max and one multiply per score
        amax = tl.max(tl.max(tl.abs(ds), 1), 0)
        ok = (amax > 0.0) & (amax < float("inf"))
        sc = tl.where(ok, tl.math.exp2(14.0 - tl.ceil(tl.math.log2(tl.where(ok, amax, 1.0)))), 1.0)
        dsl = (ds * sc).to(qw.dtype)
        unsc = 1.0 / sc
        dk_acc += mm(dsl, qw, PREC) * (unsc * psc)
    else:
        dsl = ds.to(qw.dtype)  # d loss / d s
        unsc = 1.0
        dk_acc += mm(dsl, qw, PREC)  # no scale: the GEMM accumulates into dk_acc in place
    cs += tl.sum(ds, 1)
    tl.atomic_add(rs_b + offs_m, tl.sum(ds, 0), mask=mvalid, sem="relaxed")
    a = mm(tl.trans(dsl), ka, PREC) * unsc  # sum_j ds_ij k_j for these queries (ka: k, non-finite entries 0 if masked)
    tl.atomic_add(dqa_b + offs_m[:, None] * D + offs_d[None, :], a, mask=mvalid[:, None] & dvalid[None, :],
                  sem="relaxed")
    if NEED_DR:
        drt = -beta * (pd * spd)  # d loss / d R = d loss / d cost * spd
        if R_MODE == 2:
            dr += tl.sum(drt, 1)
        elif R_MODE == 3:
            tl.store(dr_b + offs_m[None, :] * M + offs_n[:, None], drt, mask=mvalid[None, :] & nvalid[:, None])
        else:
            tl.atomic_add(dr_b + offs_m, tl.sum(drt, 0), mask=mvalid, sem="relaxed")
    return dk_acc, dv_acc, cs, dr


@triton.jit
def _bwd_keys(qw_b, qn_b, do_b, lse_b, delta_b, dqa_b, rs_b, k, ka, kn, v, r_b, mk_b, dr_b, psc,
              offs_n, nvalid, offs_d, dvalid, offs_e, evalid, kj, kv, srm, srn, smm, smn, LQ, M, D, DV, scale, beta, eps,
              R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, NEED_DR: tl.constexpr, PREC: tl.constexpr,
              EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              EPS_POS: tl.constexpr, LONG_Q: tl.constexpr, PGUARD: tl.constexpr):
    """(dk_acc, dv_acc, cs, dr) of one key tile over every query tile of its batch (_bwd_update)."""
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # sum_i ds_ij (w q_i)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    cs = tl.zeros([BLOCK_N], tl.float32)  # sum_i ds_ij
    dr = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, LQ, BLOCK_M):
        if LONG_Q:  # query rows * D (or * M, a mask's or R's query stride) may pass 2^31
            offs_m = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_M)
        else:  # 32-bit: ~0.8 instruction per score less address arithmetic in the loop
            offs_m = start + tl.arange(0, BLOCK_M)
        mvalid = offs_m < LQ
        qi = offs_m[None, :]
        qv = mvalid[None, :]
        qw = load_tile(qw_b, offs_m, offs_d, D, 1, mvalid, dvalid, EVEN_M, EVEN_D)
        do = load_tile(do_b, offs_m, offs_e, DV, 1, mvalid, evalid, EVEN_M, EVEN_DV)
        qn = load_vec(qn_b, offs_m, 1, mvalid, 0.0, EVEN_M) + eps
        lse = load_vec(lse_b, offs_m, 1, mvalid, float("inf"), EVEN_M)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: p = 0
        delta = load_vec(delta_b, offs_m, 1, mvalid, 0.0, EVEN_M)
        r = load_r(r_b, qi, kj, qv, kv, srm, srn, R_MODE)
        nr = -scale * r
        hr = (-0.5 * beta) * r
        if MASK_MODE != 0:
            keep = kept(mk_b, qi, kj, qv, kv, smm, smn, MASK_MODE)
            if tl.max(keep.to(tl.int32)) > 0:  # a tile whose keys are all masked has zero gradient
                dk_acc, dv_acc, cs, dr = _bwd_update(qw, do, qn, lse2, delta, k, ka, kn, v, nr, hr, keep, eps, psc,
                                                     beta, dk_acc, dv_acc, cs, dr, dqa_b, rs_b, dr_b, offs_m, mvalid,
                                                     offs_n, nvalid, offs_d, dvalid, M, D, R_MODE, NEED_DR, True,
                                                     PREC, EPS_POS, PGUARD)
        else:
            dk_acc, dv_acc, cs, dr = _bwd_update(qw, do, qn, lse2, delta, k, ka, kn, v, nr, hr, kv, eps, psc, beta,
                                                 dk_acc, dv_acc, cs, dr, dqa_b, rs_b, dr_b, offs_m, mvalid,
                                                 offs_n, nvalid, offs_d, dvalid, M, D, R_MODE, NEED_DR, not EVEN_N,
                                                 PREC, EPS_POS, PGUARD)
    return dk_acc, dv_acc, cs, dr


@triton.jit
def _bwd_segment(pid_n, pid_b, qw_b, qn_b, do_b, lse_b, delta_b, dqa_b, rs_b, w_ptr, dw_ptr,
                 k_b, kn_b, v_b, r_b, mk_b, dk_ptr, dv_ptr, dr_ptr,
                 skn, skd, sknn, svn, svd, srm, srn, smm, smn,
                 LQ, M, D, DV, scale, beta, eps,
                 R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, SHARED_K: tl.constexpr, SHARED_V: tl.constexpr,
                 NEED_DR: tl.constexpr, PREC: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 EPS_POS: tl.constexpr, LONG_Q: tl.constexpr):
    """Key tile pid_n of one segment against every query tile of batch pid_b.

    SHARED_K / SHARED_V: the segment's keys / values are one copy for the whole batch (a
    bank): dK / dV are added into float32 [M, F] buffers with atomics, never expanded."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    nvalid = offs_n < M
    dvalid = offs_d < D
    evalid = offs_e < DV
    k = load_tile(k_b, offs_n, offs_d, skn, skd, nvalid, dvalid, EVEN_N, EVEN_D)
    kn = load_vec(kn_b, offs_n, sknn, nvalid, 0.0, EVEN_N)
    v = load_tile(v_b, offs_n, offs_e, svn, svd, nvalid, evalid, EVEN_N, EVEN_DV)
    w = tl.load(w_ptr + offs_d, mask=dvalid, other=0.0)
    if qw_b.dtype.element_ty == tl.float16:
        psc = tl.load(w_ptr + D)  # the launcher appends qw's scale to w (float16 launches only)
    else:
        psc = 1.0
    if MASK_MODE != 0:
        # a masked key may hold NaN / inf: where it meets a zero weight (dq's sum_j ds_ij k_j, dK, dw) it
        # is read as 0. A kept non-finite key has ds = 0 already (its s is NaN), so nothing else changes.
        ka = tl.where(tl.abs(k.to(tl.float32)) < float("inf"), k, 0.0).to(k.dtype)
    else:
        ka = k
    kj = offs_n[:, None]
    kv = nvalid[:, None]
    # dR layout by mode: [NB, LQ] (atomics), [NB, M] (per key), [NB, LQ, M] (per pair)
    dr_b = dr_ptr + pid_b * (LQ * M if R_MODE == 3 else (M if R_MODE == 2 else LQ))

    # Where |hr| * max(inv) = beta |R| / (2 sqrt(eps)) is finite for this tile's keys (R per batch or per
    # key, eps > 0: both known here), d cost / d s is finite and the loop needs no p > 0 guard (2
    # instructions per score); otherwise (inf / NaN R, huge beta R, R per query or pair) it keeps it
    bounded = False  # (constexpr: one loop, guarded, for R per query or pair and for eps not > 0)
    if EPS_POS and (R_MODE == 0 or R_MODE == 2):
        rk = load_r(r_b, kj, kj, kv, kv, srm, srn, R_MODE) + tl.zeros([BLOCK_N, 1], tl.float32)
        # FLT_MAX / 4: room for rsqrt's rounding; NaN (or inf) R: guarded
        bounded = (0.5 * beta) * tl.max(tl.abs(rk)) * tl.math.rsqrt(eps) < 8.5e37
    if bounded:
        dk_acc, dv_acc, cs, dr = _bwd_keys(qw_b, qn_b, do_b, lse_b, delta_b, dqa_b, rs_b, k, ka, kn, v, r_b,
                                           mk_b, dr_b, psc, offs_n, nvalid, offs_d, dvalid, offs_e, evalid, kj, kv,
                                           srm, srn, smm, smn, LQ, M, D, DV, scale, beta, eps, R_MODE, MASK_MODE,
                                           NEED_DR, PREC, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, BLOCK_D, BLOCK_DV,
                                           BLOCK_M, BLOCK_N, EPS_POS, LONG_Q, False)
    else:
        dk_acc, dv_acc, cs, dr = _bwd_keys(qw_b, qn_b, do_b, lse_b, delta_b, dqa_b, rs_b, k, ka, kn, v, r_b,
                                           mk_b, dr_b, psc, offs_n, nvalid, offs_d, dvalid, offs_e, evalid, kj, kv,
                                           srm, srn, smm, smn, LQ, M, D, DV, scale, beta, eps, R_MODE, MASK_MODE,
                                           NEED_DR, PREC, EVEN_M, EVEN_N, EVEN_D, EVEN_DV, BLOCK_D, BLOCK_DV,
                                           BLOCK_M, BLOCK_N, EPS_POS, LONG_Q, True)

    kf = ka.to(tl.float32)
    dk = 2.0 * (w[None, :] * kf * cs[:, None] - dk_acc)
    kmask = nvalid[:, None] & dvalid[None, :]
    vmask = nvalid[:, None] & evalid[None, :]
    if SHARED_K:
        tl.atomic_add(dk_ptr + offs_n[:, None] * D + offs_d[None, :], dk, mask=kmask, sem="relaxed")
    else:
        tl.store(dk_ptr + (pid_b * M + offs_n)[:, None] * D + offs_d[None, :], narrow(dk, dk_ptr.dtype.element_ty),
                 mask=kmask)
    if SHARED_V:
        tl.atomic_add(dv_ptr + offs_n[:, None] * DV + offs_e[None, :], dv_acc, mask=vmask, sem="relaxed")
    else:
        tl.store(dv_ptr + (pid_b * M + offs_n)[:, None] * DV + offs_e[None, :],
                 narrow(dv_acc, dv_ptr.dtype.element_ty), mask=vmask)
    if NEED_DR and R_MODE == 2:
        tl.store(dr_b + offs_n, dr, mask=nvalid)
    # this tile's share of dw: sum_j k_j^2 cs_j
    tl.atomic_add(dw_ptr + offs_d, tl.sum(kf * kf * cs[:, None], 0), mask=dvalid, sem="relaxed")


@triton.autotune(configs=autotune_configs(table_configs(_FULL), test=TEST_CONFIGS, interp=INTERP_CONFIGS), key=_KEY,
                 prune_configs_by={"early_config_prune": fit_value_width},
                 reset_to_zero=["dqa_ptr", "rs_ptr", "dw_ptr", "dk_ptr", "dv_ptr", "dr_ptr", "dk2_ptr", "dv2_ptr",
                                "dr2_ptr"])
@triton.jit
def retrieval_attention_bwd_kernel(
    qw_ptr, qn_ptr, do_ptr, lse_ptr, delta_ptr, w_ptr, dqa_ptr, rs_ptr, dw_ptr,
    k_ptr, kn_ptr, v_ptr, r_ptr, mk_ptr, dk_ptr, dv_ptr, dr_ptr,
    k2_ptr, kn2_ptr, v2_ptr, r2_ptr, dk2_ptr, dv2_ptr, dr2_ptr,
    sk0, sk1, skn, skd, skn0, skn1, sknn, sv0, sv1, svn, svd, sr0, sr1, srm, srn, sm0, sm1, smm, smn,
    tk0, tk1, tkn, tkd, tkn0, tkn1, tknn, tv0, tv1, tvn, tvd, tr0, tr1, trm, trn,
    NB1, LQ, M, M2, D, DV,
    scale, beta, eps,
    R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, R2_MODE: tl.constexpr, HAS_BANK: tl.constexpr,
    SHARED_K: tl.constexpr, SHARED_V: tl.constexpr, SHARED_K2: tl.constexpr, SHARED_V2: tl.constexpr,
    NEED_DR: tl.constexpr, PREC: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_N2: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EPS_POS: tl.constexpr, LONG_Q: tl.constexpr = True,
):
    """k: [NB0|1, NB1|1, M, D], bank k2: [.., M2, D]; qw, do, dqa: [NB0 * NB1, LQ, D | DV] contiguous.
    One program: BLOCK_N keys of one batch (the row's key tiles first, then the bank's) against
    every query of that batch: writes (or, SHARED_*, atomically adds) their dK, dV, per-key dR
    and adds the query side into dqa, rs, dR and dw."""
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    scale = tl.cast(scale, tl.float32)
    beta = tl.cast(beta, tl.float32)
    eps = tl.cast(eps, tl.float32)
    # one grid axis (y stops at 65535 batches); key tiles in 64 bits (keys past 2^31 elements)
    nt = tl.cdiv(M, BLOCK_N) + (tl.cdiv(M2, BLOCK_N) if HAS_BANK else 0)
    pid = tl.program_id(0)
    pid_b = (pid // nt).to(tl.int64)
    pid_n = (pid % nt).to(tl.int64)
    b0, b1 = pid_b // NB1, pid_b % NB1
    row_b = pid_b * LQ
    nblk = tl.cdiv(M, BLOCK_N)
    if pid_n < nblk:
        _bwd_segment(pid_n, pid_b, qw_ptr + row_b * D, qn_ptr + row_b, do_ptr + row_b * DV, lse_ptr + row_b,
                     delta_ptr + row_b, dqa_ptr + row_b * D, rs_ptr + row_b, w_ptr, dw_ptr,
                     k_ptr + b0 * sk0 + b1 * sk1, kn_ptr + b0 * skn0 + b1 * skn1, v_ptr + b0 * sv0 + b1 * sv1,
                     r_ptr + b0 * sr0 + b1 * sr1, mk_ptr + b0 * sm0 + b1 * sm1, dk_ptr, dv_ptr, dr_ptr,
                     skn, skd, sknn, svn, svd, srm, srn, smm, smn, LQ, M, D, DV, scale, beta, eps,
                     R_MODE, MASK_MODE, SHARED_K, SHARED_V, NEED_DR, PREC, EVEN_M, EVEN_N, EVEN_D, EVEN_DV,
                     BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, EPS_POS, LONG_Q)
    elif HAS_BANK:
        _bwd_segment(pid_n - nblk, pid_b, qw_ptr + row_b * D, qn_ptr + row_b, do_ptr + row_b * DV,
                     lse_ptr + row_b, delta_ptr + row_b, dqa_ptr + row_b * D, rs_ptr + row_b, w_ptr, dw_ptr,
                     k2_ptr + b0 * tk0 + b1 * tk1, kn2_ptr + b0 * tkn0 + b1 * tkn1, v2_ptr + b0 * tv0 + b1 * tv1,
                     r2_ptr + b0 * tr0 + b1 * tr1, mk_ptr, dk2_ptr, dv2_ptr, dr2_ptr,
                     tkn, tkd, tknn, tvn, tvd, trm, trn, smm, smn, LQ, M2, D, DV, scale, beta, eps,
                     R2_MODE, 0, SHARED_K2, SHARED_V2, NEED_DR, PREC, EVEN_M, EVEN_N2, EVEN_D, EVEN_DV,
                     BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, EPS_POS, LONG_Q)


@triton.jit
def retrieval_attention_bwd_dq_kernel(q_ptr, dqa_ptr, rs_ptr, w_ptr, dq_ptr, dw_ptr, ROWS, D,
                                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """q, dqa, dq: [ROWS, D] contiguous, rs: [ROWS]. One program: BLOCK_R query rows,
    dQ = 2 w (q sum_j ds - sum_j ds k) from the atomically summed buffers, and the query side
    of dw: sum_i q_i (q_i sum_j ds_ij - 2 sum_j ds_ij k_j)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rvalid = rows < ROWS
    dvalid = offs_d < D
    msk = rvalid[:, None] & dvalid[None, :]
    idx = rows[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + idx, mask=msk, other=0.0).to(tl.float32)
    a = tl.load(dqa_ptr + idx, mask=msk, other=0.0)
    qr = q * tl.load(rs_ptr + rows, mask=rvalid, other=0.0)[:, None]
    w = tl.load(w_ptr + offs_d, mask=dvalid, other=0.0)
    tl.store(dq_ptr + idx, narrow(2.0 * w[None, :] * (qr - a), dq_ptr.dtype.element_ty), mask=msk)
    tl.atomic_add(dw_ptr + offs_d, tl.sum(q * (qr - 2.0 * a), 0), mask=dvalid, sem="relaxed")
