"""The retrieval attention forward: out = softmax(-beta * R * sqrt(g(k - q) + eps)) @ V and its lse.

Flash-style: an online softmax over tiles of keys, in log2 units; keys may come in two segments
(the row's keys and a bank shared by the batch), both streamed by the same program and merged in
its running max and sum, so the bank is never expanded or concatenated. The squared distance is
expanded so that it runs on tensor cores,
    s_ij = |q_i|^2_w + |k_j|^2_w - 2 (w q_i) . k_j,     spd_ij = sqrt(max(s_ij, 0) + eps),
with |x|^2_w in float32, w q rounded to the input dtype and the dot accumulated in float32 (exact
float32 for float32 inputs): s carries an absolute error of about u (|q|^2_w + |k|^2_w) (u = 2^-8
in bf16, 2^-24 in fp32), so near-coincident pairs get spd ~ sqrt(u) |q| instead of sqrt(eps); the
clamp keeps it real. NORM_MMA (16-bit, unmasked launches) adds the two norms and sums the rows on
the tensor cores too (common.norm_split); PIPE issues the next key tile's GEMM before this tile's
softmax. README.md holds the instruction counts and measurements behind both.
"""

import triton
import triton.language as tl

from geokern.kernels._common import autotune_configs, mm, mm_acc
from geokern.kernels.retrieval.common import (INTERP_CONFIGS, TEST_CONFIGS, fit_value_width, first_column, kept,
                                              load_r, load_tile, load_vec, norm_split, table_configs)

# (query tile, key tile, warps, stages, max registers). 8 warps on 128 rows: two warpgroups under
# one CTA barrier per key tile; 4 warps (one warpgroup) on 64 rows: several CTAs per SM, out of
# phase, so one CTA's GEMMs overlap another's square roots and exponentials. Unbounded, the 64-row
# kernels take 174-255 registers (2 CTAs per SM); 64 x 64 fits 168 without spilling (3 CTAs per SM).
_FULL = [(128, 64, 8, 2, None), (128, 128, 8, 2, None), (64, 64, 4, 2, None), (64, 128, 4, 2, None),
         (128, 64, 4, 2, None), (64, 64, 4, 2, 168), (128, 64, 4, 3, None), (128, 64, 8, 3, None),
         (128, 128, 8, 3, None)]
# NORM_MMA and PIPE too: a config tuned for one loop shape is not reused for the other
_KEY = ["LQ", "M", "M2", "BLOCK_D", "BLOCK_DV", "R_MODE", "MASK_MODE", "R2_MODE", "HAS_BANK", "EVEN_M", "EVEN_N",
        "EVEN_N2", "NORM_MMA", "PIPE", "HARD_PASS", "LONG_N", "LONG_N2"]


@triton.jit
def _fwd_dist(qw2, pw, qne, k_b, kn_b, start, offs_d, dvalid, skn, skd, sknn, M, PREC: tl.constexpr,
              EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, NORM_MMA: tl.constexpr,
              LONG: tl.constexpr):
    """s = |q|^2 + eps + |k|^2 - 2 (w q).k for the key tile at `start`: one GEMM (two with
    NORM_MMA, where qne / kn are the bfloat16 norm splits of norm_split and their product
    adds the norms on the tensor cores; else qne / kn are float32 [BM] / [BN] and two adds).
    float16: qw2 is -2 w q / pw (pw a power of two, 1 unless |2 w q| would pass float16's range),
    so its GEMM is scaled back by pw: one multiply per score, float16 only.
    LONG (the segment's offsets pass 2^31): the tile's base in 64 bits, offsets within it in 32;
    else 32-bit offsets from the segment's start, which the loop's address arithmetic strength-reduces
    (the 64-bit base costs ~0.5 instruction per score in the SASS of the loop)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    nvalid = offs_n < M
    if LONG:
        local = tl.arange(0, BLOCK_N)
        base = tl.cast(start, tl.int64)
    else:
        local = offs_n
        base = 0
    k = load_tile(k_b + base * skn, local, offs_d, skn, skd, nvalid, dvalid, EVEN_N, EVEN_D)
    if NORM_MMA:
        offs_a = tl.arange(0, 16)
        kn = load_tile(kn_b + base * sknn, local, offs_a, sknn, 1, nvalid, offs_a < 16, EVEN_N, True)
        if qw2.dtype == tl.float16:
            return mm(qw2, tl.trans(k), PREC) * pw + mm(qne, tl.trans(kn), PREC)
        else:
            return mm_acc(qw2, tl.trans(k), mm(qne, tl.trans(kn), PREC), PREC)
    else:
        kn = load_vec(kn_b + base * sknn, local, sknn, nvalid, 0.0, EVEN_N)
        if qw2.dtype == tl.float16:
            return mm(qw2, tl.trans(k), PREC) * pw + qne[:, None] + kn[None, :]
        else:
            return mm(qw2, tl.trans(k), PREC) + qne[:, None] + kn[None, :]


@triton.jit
def _fwd_update(s, nr, m_i, l_i, acc, v, keep, eps, hs, PREC: tl.constexpr, USE_KEEP: tl.constexpr,
                GUARD: tl.constexpr, NORM_MMA: tl.constexpr, HARDMIN: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the online softmax (logits in log2 units) from its distances s
    (_fwd_dist): the updated (m_i, l_i, acc). With NORM_MMA, l_i is [BM, 16], the row sums
    in column 0, also from the tensor cores."""
    # max(s, 0) + eps (s carries the + eps); a NaN distance stays NaN (tl.maximum drops it by default)
    t = tl.maximum(s, eps, propagate_nan=tl.PropagateNan.ALL)
    x = tl.sqrt(t) * nr  # sqrt.approx.f32 (MUFU.SQRT, relative error ~2^-22); nr = -beta log2(e) R
    if USE_KEEP:
        x = tl.where(keep, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1))
    if GUARD:
        # rows with nothing kept so far: subtract 0 so exp2(-inf) = 0, not exp2(nan); m stays -inf
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    if HARDMIN:  # x = -cost (nr = -R): the logit differences are -beta log2(e) (cost - cost_min)
        p = tl.math.exp2((x - m_sub[:, None]) * hs)
        alpha = tl.math.exp2((m_i - m_sub) * hs)
    else:
        p = tl.math.exp2(x - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
    p = p.to(v.dtype)
    if NORM_MMA:  # p @ [1, 0, ..., 0]: the row sum as a 16-wide GEMM, not one add per score
        l_i = mm_acc(p, first_column(p.dtype, ROWS=v.shape[0]), l_i * alpha[:, None], PREC)
    else:
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    # a mask: a masked key's value must not reach acc, even as 0 * NaN. Unmasked, keep is false only on
    # padded keys, whose values load as 0: the plain GEMM (the hard-min pass too: its registers)
    if MASKED:
        acc = acc * alpha[:, None] + _masked_pv(p, v, keep, PREC)
    else:
        acc = acc * alpha[:, None] + mm(p, v, PREC)
    return m_new, l_i, acc


@triton.jit
def _masked_pv(p, v, keep, PREC: tl.constexpr):
    """p @ v where masked keys (p = 0) contribute nothing whatever their value: a tile with a masked
    entry compares its values once, and only one holding a non-finite value pays more. There the finite
    values go through the GEMM, and a kept key's NaN / +inf / -inf sets its column to NaN / +inf /
    -inf (both infinities: NaN), counted by three small GEMMs of the keep mask (the reference's rule)."""
    pv = mm(p, v, PREC)
    if tl.min(keep.to(tl.int32)) == 0:  # only a tile with a masked entry can leak: compare its values
        bad = (v != v) | (tl.abs(v.to(tl.float32)) == float("inf"))
        if tl.max(bad.to(tl.int32)) > 0:
            kf = keep.to(p.dtype)
            vf = v.to(tl.float32)
            nan = mm(kf, (vf != vf).to(p.dtype), PREC)
            pos = mm(kf, (vf == float("inf")).to(p.dtype), PREC)
            neg = mm(kf, (vf == float("-inf")).to(p.dtype), PREC)
            pv = mm(p, tl.where(bad, 0.0, vf).to(v.dtype), PREC)
            pv += tl.where(nan > 0, float("nan"), 0.0) + tl.where(pos > 0, float("inf"), 0.0)
            pv += tl.where(neg > 0, float("-inf"), 0.0)
    return pv


@triton.jit
def _fwd_segment(qw2, pw, qne, m_i, l_i, acc, offs_m, mvalid, offs_d, offs_e, dvalid, evalid,
                 k_b, kn_b, v_b, r_b, mk_b, skn, skd, sknn, svn, svd, srm, srn, smm, smn, M, scale, eps,
                 hs, HARDMIN: tl.constexpr, R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, PREC: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                 NORM_MMA: tl.constexpr, PIPE: tl.constexpr, LONG: tl.constexpr):
    """Stream one key segment (k_b, v_b, ... already offset to this row's batch) into (m_i, l_i, acc).

    PIPE (no mask): the distance GEMM of the next key tile is issued before this tile's softmax,
    so the tensor cores work while the special-function unit does the square roots and
    exponentials (flash-attention 3's intra-warpgroup overlap); the last tile's GEMM is issued
    once more, unused, instead of a branch."""
    qi = offs_m[:, None]
    qv = mvalid[:, None]
    nr_row = -scale * load_r(r_b, qi, qi, qv, qv, srm, srn, R_MODE if R_MODE < 2 else 0)  # hoisted for modes 0, 1
    last = ((M - 1) // BLOCK_N) * BLOCK_N
    if PIPE:
        s = _fwd_dist(qw2, pw, qne, k_b, kn_b, 0, offs_d, dvalid, skn, skd, sknn, M, PREC, EVEN_N, EVEN_D, BLOCK_N,
                      NORM_MMA, LONG)
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nvalid = offs_n < M
        kj = offs_n[None, :]
        kv = nvalid[None, :]
        if PIPE:
            s_cur = s
            s = _fwd_dist(qw2, pw, qne, k_b, kn_b, tl.minimum(start + BLOCK_N, last), offs_d, dvalid, skn, skd, sknn, M,
                          PREC, EVEN_N, EVEN_D, BLOCK_N, NORM_MMA, LONG)
        else:
            s_cur = _fwd_dist(qw2, pw, qne, k_b, kn_b, start, offs_d, dvalid, skn, skd, sknn, M, PREC, EVEN_N, EVEN_D,
                              BLOCK_N, NORM_MMA, LONG)
        if LONG:
            v = load_tile(v_b + tl.cast(start, tl.int64) * svn, tl.arange(0, BLOCK_N), offs_e, svn, svd, nvalid,
                          evalid, EVEN_N, EVEN_DV)
        else:
            v = load_tile(v_b, offs_n, offs_e, svn, svd, nvalid, evalid, EVEN_N, EVEN_DV)
        if R_MODE < 2:
            nr = nr_row
        else:
            nr = -scale * load_r(r_b, qi, kj, qv, kv, srm, srn, R_MODE)
        if MASK_MODE != 0:
            keep = kept(mk_b, qi, kj, qv, kv, smm, smn, MASK_MODE)
            if tl.max(keep.to(tl.int32)) > 0:  # a tile whose keys are all masked costs no math
                m_i, l_i, acc = _fwd_update(s_cur, nr, m_i, l_i, acc, v, keep, eps, hs, PREC, True, True, NORM_MMA,
                                            HARDMIN, True)
        else:
            m_i, l_i, acc = _fwd_update(s_cur, nr, m_i, l_i, acc, v, kv, eps, hs, PREC, not EVEN_N or HARDMIN,
                                        HARDMIN, NORM_MMA, HARDMIN, False)
    return m_i, l_i, acc


@triton.jit
def _fwd_rows(qw2, pw, qne, offs_m, mvalid, offs_d, offs_e, dvalid, evalid, b0, b1,
              k_ptr, kn_ptr, v_ptr, r_ptr, mk_ptr, k2_ptr, kn2_ptr, v2_ptr, r2_ptr,
              sk0, sk1, skn, skd, skn0, skn1, sknn, sv0, sv1, svn, svd, sr0, sr1, srm, srn, sm0, sm1, smm, smn,
              tk0, tk1, tkn, tkd, tkn0, tkn1, tknn, tv0, tv1, tvn, tvd, tr0, tr1, trm, trn,
              M, M2, xs, xs2, eps, hs,
              HARDMIN: tl.constexpr, R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, R2_MODE: tl.constexpr,
              HAS_BANK: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr, EVEN_N2: tl.constexpr,
              EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, NORM_MMA: tl.constexpr, PIPE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, LONG_N: tl.constexpr,
              LONG_N2: tl.constexpr):
    """(out [BLOCK_M, BLOCK_DV] float32, lse [BLOCK_M]) of these query rows over both key segments.
    HARDMIN: logits in cost units (xs = 1, hs = beta log2(e)), scaled only as differences from the
    row's best, and the lse scaled by xs2 = beta log2(e) at the end."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, 16] if NORM_MMA else [BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    m_i, l_i, acc = _fwd_segment(qw2, pw, qne, m_i, l_i, acc, offs_m, mvalid, offs_d, offs_e, dvalid, evalid,
                                 k_ptr + b0 * sk0 + b1 * sk1, kn_ptr + b0 * skn0 + b1 * skn1,
                                 v_ptr + b0 * sv0 + b1 * sv1, r_ptr + b0 * sr0 + b1 * sr1,
                                 mk_ptr + b0 * sm0 + b1 * sm1, skn, skd, sknn, svn, svd, srm, srn, smm, smn, M,
                                 xs, eps, hs, HARDMIN, R_MODE, MASK_MODE, PREC, EVEN_N, EVEN_D, EVEN_DV, BLOCK_N,
                                 NORM_MMA, PIPE and MASK_MODE == 0, LONG_N)
    if HAS_BANK:
        m_i, l_i, acc = _fwd_segment(qw2, pw, qne, m_i, l_i, acc, offs_m, mvalid, offs_d, offs_e, dvalid, evalid,
                                     k2_ptr + b0 * tk0 + b1 * tk1, kn2_ptr + b0 * tkn0 + b1 * tkn1,
                                     v2_ptr + b0 * tv0 + b1 * tv1, r2_ptr + b0 * tr0 + b1 * tr1,
                                     mk_ptr, tkn, tkd, tknn, tvn, tvd, trm, trn, smm, smn, M2,
                                     xs, eps, hs, HARDMIN, R2_MODE, 0, PREC, EVEN_N2, EVEN_D, EVEN_DV, BLOCK_N,
                                     NORM_MMA, PIPE, LONG_N2)
    if NORM_MMA:
        l_i = tl.sum(l_i, 1)
    if MASK_MODE != 0 or HARDMIN:
        empty = l_i == 0.0  # every key masked: zeros and lse = -inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        # HARDMIN: m_i = -cost_min; m_i * xs2 may pass the float range: lse = -inf, the true value rounded
        lse = tl.where(empty, float("-inf"),
                       (m_i * xs2 + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    else:
        out = acc / l_i[:, None]
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    return out, lse


@triton.autotune(configs=autotune_configs(table_configs(_FULL), test=TEST_CONFIGS, interp=INTERP_CONFIGS), key=_KEY,
                 prune_configs_by={"early_config_prune": fit_value_width})
@triton.jit
def retrieval_attention_fwd_kernel(
    q_ptr, w_ptr, k_ptr, kn_ptr, v_ptr, r_ptr, mk_ptr, k2_ptr, kn2_ptr, v2_ptr, r2_ptr, o_ptr, lse_ptr,
    sq0, sq1, sqm, sqd,
    sk0, sk1, skn, skd, skn0, skn1, sknn, sv0, sv1, svn, svd, sr0, sr1, srm, srn, sm0, sm1, smm, smn,
    tk0, tk1, tkn, tkd, tkn0, tkn1, tknn, tv0, tv1, tvn, tvd, tr0, tr1, trm, trn,
    NB1, LQ, M, M2, D, DV,
    scale, eps,
    R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, R2_MODE: tl.constexpr, HAS_BANK: tl.constexpr,
    PREC: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_N2: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, NORM_MMA: tl.constexpr, PIPE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HARD_PASS: tl.constexpr = False, LONG_N: tl.constexpr = True, LONG_N2: tl.constexpr = True,
):
    """q: [NB0, NB1, LQ, D], k: [NB0|1, NB1|1, M, D], v: [.., M, DV], bank k2 / v2: [.., M2, D | DV]
    -> o: [NB0 * NB1, LQ, DV], lse: [NB0 * NB1, LQ]. One program: BLOCK_M queries of one batch
    against the row's keys (s* strides, optional mask), then the bank (t* strides, unmasked; one
    copy in memory when shared by the batch). EVEN_*: a length is a multiple of every block.
    LONG_N / LONG_N2: a segment's offsets within one batch may pass 2^31 (_fwd_dist).

    HARD_PASS (beta > 0): rows whose pass found no finite logit (lse -inf or NaN), since
    beta * R * spd passed float32 (or nothing was kept, or a NaN came in: recomputed, unchanged),
    are recomputed by the same program in cost units (_fwd_rows' HARDMIN): the limit, equal
    weights on the nearest keys. A program without such rows pays one reduction of its lse; the
    first pass's state is stored and dead before the second loop, so it adds no registers."""
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    scale = tl.cast(scale, tl.float32)
    eps = tl.cast(eps, tl.float32)
    # one grid axis (x allows 2^31 - 1 programs; y stops at 65535 batches) and 64-bit query rows:
    # outputs past 2^31 elements
    nm = tl.cdiv(LQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_b = (pid // nm).to(tl.int64)
    pid_m = (pid % nm).to(tl.int64)
    b0, b1 = pid_b // NB1, pid_b % NB1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mvalid = offs_m < LQ
    dvalid = offs_d < D
    evalid = offs_e < DV
    # |q|^2_w and -2 w q from q itself: no pre-pass over the queries
    q = load_tile(q_ptr + b0 * sq0 + b1 * sq1, offs_m, offs_d, sqm, sqd, mvalid, dvalid, EVEN_M, EVEN_D)
    w = tl.load(w_ptr + offs_d, mask=dvalid, other=0.0)
    qf = q.to(tl.float32)
    qwf = qf * w[None, :]
    qne = tl.sum(qwf * qf, 1) + eps
    pw = 1.0
    if q.dtype == tl.float16:
        # -2 w q overflows float16 from |w q| = 32752 (coordinates past ~32.7k at w = 1): scale this
        # tile's queries by a power of two pw that keeps it in range (_fwd_dist scales back)
        aq = tl.abs(qwf)
        # over finite entries only: an inf coordinate must not rescale (and zero) its tile's other rows
        amax = tl.max(tl.max(tl.where(aq < float("inf"), aq, 0.0), 1), 0)
        pw = tl.where(amax > 16384.0, tl.math.exp2(tl.ceil(tl.math.log2(amax * (1.0 / 16384.0)))), 1.0)
    qw2 = (-2.0 * (qwf / pw)).to(q.dtype)  # exact: a power-of-2 scale of round(w q)
    if NORM_MMA:
        qne = norm_split(qne, 0, 3)

    out, lse = _fwd_rows(qw2, pw, qne, offs_m, mvalid, offs_d, offs_e, dvalid, evalid, b0, b1,
                         k_ptr, kn_ptr, v_ptr, r_ptr, mk_ptr, k2_ptr, kn2_ptr, v2_ptr, r2_ptr,
                         sk0, sk1, skn, skd, skn0, skn1, sknn, sv0, sv1, svn, svd, sr0, sr1, srm, srn, sm0, sm1, smm,
                         smn, tk0, tk1, tkn, tkd, tkn0, tkn1, tknn, tv0, tv1, tvn, tvd, tr0, tr1, trm, trn,
                         M, M2, scale, 1.0, eps, scale, False, R_MODE, MASK_MODE, R2_MODE, HAS_BANK, PREC, EVEN_N,
                         EVEN_N2, EVEN_D, EVEN_DV, NORM_MMA, PIPE, BLOCK_M, BLOCK_DV, BLOCK_N,
                         LONG_N, LONG_N2)
    o_p = o_ptr + pid_b * LQ * DV + offs_m[:, None] * DV + offs_e[None, :]
    l_p = lse_ptr + pid_b * LQ + offs_m
    if HARD_PASS:
        # each row is stored once, by one of the two passes: no ordering between them to rely on
        need = (lse != lse) | (lse == float("-inf"))
        tl.store(o_p, out.to(o_ptr.dtype.element_ty), mask=(mvalid & ~need)[:, None] & evalid[None, :])
        tl.store(l_p, lse, mask=mvalid & ~need)
        if tl.max((need & mvalid).to(tl.int32), 0) > 0:
            out, lse = _fwd_rows(qw2, pw, qne, offs_m, mvalid, offs_d, offs_e, dvalid, evalid, b0, b1,
                                 k_ptr, kn_ptr, v_ptr, r_ptr, mk_ptr, k2_ptr, kn2_ptr, v2_ptr, r2_ptr,
                                 sk0, sk1, skn, skd, skn0, skn1, sknn, sv0, sv1, svn, svd, sr0, sr1, srm, srn, sm0,
                                 sm1, smm, smn, tk0, tk1, tkn, tkd, tkn0, tkn1, tknn, tv0, tv1, tvn, tvd, tr0, tr1,
                                 trm, trn, M, M2, 1.0, scale, eps, scale, True, R_MODE, MASK_MODE, R2_MODE, HAS_BANK,
                                 PREC, EVEN_N, EVEN_N2, EVEN_D, EVEN_DV, NORM_MMA, PIPE, BLOCK_M, BLOCK_DV, BLOCK_N,
                         LONG_N, LONG_N2)
            tl.store(o_p, out.to(o_ptr.dtype.element_ty), mask=(need & mvalid)[:, None] & evalid[None, :])
            tl.store(l_p, lse, mask=need & mvalid)
    else:
        if EVEN_M and EVEN_DV:
            tl.store(o_p, out.to(o_ptr.dtype.element_ty))
        else:
            tl.store(o_p, out.to(o_ptr.dtype.element_ty), mask=mvalid[:, None] & evalid[None, :])
        if EVEN_M:
            tl.store(l_p, lse)
        else:
            tl.store(l_p, lse, mask=mvalid)
