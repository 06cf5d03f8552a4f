"""Triton kernels for the fused retrieval attention softmax(-beta * R * sqrt(g(dv, dv) + eps)) @ V.

Flash-style. The forward runs an online softmax over tiles of keys and writes the output
and the log-sum-exp; keys may come in two segments (a per-row sequence and a bank shared
by the batch), both streamed by the same program and merged in its running max and sum,
so the bank is never expanded or concatenated. The backward is one kernel over key tiles
(flash-attention-2 structure): it recomputes each tile once from the lse and accumulates
dK, dV, per-key dR in registers, and adds the query side (sum_j ds_ij k_j, sum_j ds_ij,
per-query dR) and the metric gradient into float32 buffers with atomics; a small pass
turns those into dQ. The cost is never materialised.

The metric is diagonal with weights w (any sign; other metrics reach here as a
linear feature map, see geokern/metric.py). The squared distance is expanded so it
runs on tensor cores:
    s_ij = |q_i|^2_w + |k_j|^2_w - 2 (w q_i) . k_j,     spd_ij = sqrt(max(s_ij, 0) + eps)
with |x|^2_w precomputed in float32 and w q rounded to the input dtype (QW), the dot
accumulated in float32 (exact float32 for float32 inputs: input_precision="ieee").
This cancels when q_i is close to k_j: s carries an absolute error of about
u * (|q|^2_w + |k|^2_w) (u = 2^-8 in bf16, 2^-24 in fp32), so near-coincident pairs
get spd ~ sqrt(u) |q| instead of sqrt(eps); the clamp keeps it real. For 16-bit inputs
without a mask (attn_fwd says why) the two norms are added on the tensor cores too
(_norm_split: a 16-wide GEMM of three-part bfloat16 splits, as exact as float32 adds), and the softmax's row sums come from a GEMM
against a ones column: instructions per score the CUDA cores no longer issue. (The same
for the backward's distances and sums of ds cut its SASS from 46.6 to 37.2 instructions
per score, 10% off its time at D = 128, but Triton 3.6 miscompiled it on the H100 for
masked tiles: an illegal shared-memory access inside the dot; it was reverted.)

Throughput bound (forward, 16-bit, H100): per score element one MUFU.SQRT and one
MUFU.EX2; the MUFU unit does 16 / clk / SM (4 per SM sub-partition), so N^2 scores cost
N^2 / (16 * 132 * 1.98e9) s per head: 0.51 ms for B4 H16 N4096, i.e. 535 TFLOP/s at
D = 64 and 1070 TFLOP/s at D = 128 in the 4 B H N^2 D convention. Packed ex2.f16x2 does
not help (ptxas splits it into two MUFU.EX2.F16). At D = 64 the MUFU time is twice the
tensor-core time (0.26 ms at 1000 TFLOP/s). The forward's inner loop (128 x 128 tile,
triton 3.8 SASS) issues 9.3 instructions per score (12.3 before the norms and row sums
moved to the tensor cores): 2 MUFU, 2 FMNMX (clamp, row max), the R multiply, the
exponent's FFMA, half a convert, half a rescale, and loop overhead. Measured (H100,
B4 H16 N4096 bf16, one run): 1.02 ms at D = 64 (1.27 with the float adds) and 1.68 ms
at D = 128 (1.87), still twice the MUFU floor: moving half the exponentials to the FMA
pipe (a degree-3 polynomial, flash-attention 4's trick) measured slower (1.10 ms), so
the limit is latency, not a unit's throughput. In the SASS each warpgroup waits for its
QK^T GEMM before the softmax and the CTA's warps meet at a barrier every key tile, so the
GEMMs overlap the special functions only across CTAs (1-2 per SM at 174-255 registers).
At D = 128 the forward therefore issues the next tile's GEMM before this tile's softmax
(_pipelined): 1.46 ms instead of 1.58 in a later run.

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
from geokern._checks import broadcast_shapes

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
        # (query tile, key tile, warps, stages, max registers); the key tile is the M of the dK / dV
        # GEMMs (128-query tiles spill: dK, dV and five [key, query] tiles do not fit in registers)
        table = [(64, 128, 8, 2, None), (64, 128, 8, 1, None), (64, 64, 4, 2, None), (64, 128, 4, 2, None),
                 (64, 64, 8, 2, None)]
    else:
        # 8 warps on 128 rows: two warpgroups under one CTA barrier per key tile; 4 warps (one
        # warpgroup) on 64 rows: several CTAs per SM, out of phase, so one CTA's GEMMs overlap
        # another's square roots and exponentials. Unbounded, the 64-row kernels take 174-255
        # registers (2 CTAs per SM); 64 x 64 fits 168 without spilling (3 CTAs per SM). The three
        # 3-stage configs are the previous set (1.02 / 1.59 ms at D = 64 / 128 in an earlier run).
        table = [(128, 64, 8, 2, None), (128, 128, 8, 2, None), (64, 64, 4, 2, None), (64, 128, 4, 2, None),
                 (128, 64, 4, 2, None), (64, 64, 4, 2, 168), (128, 64, 4, 3, None), (128, 64, 8, 3, None),
                 (128, 128, 8, 3, None)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=reg)
            for bm, bn, w, s, reg in table]


def _fit_value_width(configs, nargs, **kwargs):
    """Configs whose [rows, BLOCK_DV] float32 accumulator fits in registers. Wide values (the
    trainer's d_v = 768 takes BLOCK_DV = 1024) would spill a 64 x 1024 tile to local memory
    and take minutes to compile and tune; they get 16-row tiles instead (the forward's rows are
    queries, the backward's keys)."""
    bdv = kwargs.get("BLOCK_DV", nargs.get("BLOCK_DV", 0))
    fit = [c for c in configs if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) * bdv <= 64 * 256]
    if fit or interpret_mode():
        return fit or configs
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=8, num_stages=2)]


def _even_block():
    """A multiple of every BLOCK_M / BLOCK_N the configs use: a length divisible by it needs no masks."""
    return 16 if interpret_mode() else 128


# NORM_MMA and PIPE too: a config tuned for one loop shape is not reused for the other (GEOKERN_RETRIEVAL_PIPE
# or GEOKERN_RETRIEVAL_NORM_MMA changed inside one process)
_FWD_KEY = ["LQ", "M", "M2", "BLOCK_D", "BLOCK_DV", "R_MODE", "MASK_MODE", "R2_MODE", "HAS_BANK", "EVEN_M", "EVEN_N",
            "EVEN_N2", "NORM_MMA", "PIPE"]
_BWD_KEY = ["LQ", "M", "M2", "BLOCK_D", "BLOCK_DV", "R_MODE", "MASK_MODE", "R2_MODE", "HAS_BANK", "EVEN_M",
            "EVEN_N", "EVEN_N2", "SHARED_K", "SHARED_V", "SHARED_K2", "SHARED_V2", "NEED_DR"]


@triton.jit
def _load_r(r_b, qi, kj, qvalid, kvalid, srm, srn, R_MODE: tl.constexpr):
    """R for a tile as float32. qi / kj (query and key indices) and their validity come
    shaped [BM, 1] / [1, BN] (forward) or [1, BM] / [BN, 1] (backward): the result has
    the shape that broadcasts against the tile in that orientation."""
    if R_MODE == 0:
        r = tl.load(r_b)
    elif R_MODE == 1:
        r = tl.load(r_b + qi * srm, mask=qvalid, other=0.0)
    elif R_MODE == 2:
        r = tl.load(r_b + kj * srn, mask=kvalid, other=0.0)
    else:
        r = tl.load(r_b + qi * srm + kj * srn, mask=qvalid & kvalid, other=0.0)
    return r.to(tl.float32)


@triton.jit
def _keep(mk_b, qi, kj, qvalid, kvalid, smm, smn, MASK_MODE: tl.constexpr):
    """Which entries of the tile are real, unmasked keys (indices shaped as in _load_r)."""
    keep = kvalid & (qi >= 0)
    if MASK_MODE == 1:
        keep = keep & (tl.load(mk_b + kj * smn, mask=kvalid, other=0) != 0)
    elif MASK_MODE == 2:
        keep = keep & (tl.load(mk_b + qi * smm + kj * smn, mask=qvalid & kvalid, other=0) != 0)
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
def _mm_acc(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in float32 (PREC as in _mm)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc, input_precision=PREC)


@triton.jit
def _first_column(dtype: tl.constexpr, ROWS: tl.constexpr):
    """[ROWS, 16] with ones in column 0, zeros elsewhere: x @ it puts x's row sums in column 0."""
    return tl.broadcast_to(tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, 0.0).to(dtype), [ROWS, 16])


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
def _load_vec(ptr, idx, stride, valid, other, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr + idx * stride)
    else:
        return tl.load(ptr + idx * stride, mask=valid, other=other)


# ---- forward ---------------------------------------------------------------------


@triton.jit
def _fwd_dist(qw2, qne, k_b, kn_b, start, offs_d, dvalid, skn, skd, sknn, M, PREC: tl.constexpr,
              EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, NORM_MMA: tl.constexpr):
    """s = |q|^2 + eps + |k|^2 - 2 (w q).k for the key tile at `start`: one GEMM (two with
    NORM_MMA, where qne / kn are the bfloat16 norm splits of _norm_split and their product
    adds the norms on the tensor cores; else qne / kn are float32 [BM] / [BN] and two adds)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    nvalid = offs_n < M
    k = _load_tile(k_b, offs_n, offs_d, skn, skd, nvalid, dvalid, EVEN_N, EVEN_D)
    if NORM_MMA:
        offs_a = tl.arange(0, 16)
        kn = _load_tile(kn_b, offs_n, offs_a, sknn, 1, nvalid, offs_a < 16, EVEN_N, True)
        return _mm_acc(qw2, tl.trans(k), _mm(qne, tl.trans(kn), PREC), PREC)
    else:
        kn = _load_vec(kn_b, offs_n, sknn, nvalid, 0.0, EVEN_N)
        return _mm(qw2, tl.trans(k), PREC) + qne[:, None] + kn[None, :]


@triton.jit
def _fwd_update(s, nr, m_i, l_i, acc, v, keep, eps, PREC: tl.constexpr, USE_KEEP: tl.constexpr,
                GUARD: tl.constexpr, NORM_MMA: tl.constexpr):
    """One key tile of the online softmax (logits in log2 units) from its distances s
    (_fwd_dist): the updated (m_i, l_i, acc). With NORM_MMA, l_i is [BM, 16], the row sums
    in column 0, also from the tensor cores."""
    t = tl.maximum(s, eps)  # max(s, 0) + eps: s carries the + eps
    x = tl.sqrt(t) * nr  # sqrt.approx.f32 (MUFU.SQRT, relative error ~2^-22); nr = -beta log2(e) R
    if USE_KEEP:
        x = tl.where(keep, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1))
    if GUARD:
        # rows with nothing kept so far: subtract 0 so exp2(-inf) = 0, not exp2(nan); m stays -inf
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(x - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    p = p.to(v.dtype)
    if NORM_MMA:  # p @ [1, 0, ..., 0]: the row sum as a 16-wide GEMM, not one add per score
        l_i = _mm_acc(p, _first_column(p.dtype, ROWS=v.shape[0]), l_i * alpha[:, None], PREC)
    else:
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    acc = acc * alpha[:, None] + _mm(p, v, PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_segment(qw2, qne, m_i, l_i, acc, offs_m, mvalid, offs_d, offs_e, dvalid, evalid,
                 k_b, kn_b, v_b, r_b, mk_b, skn, skd, sknn, svn, svd, srm, srn, smm, smn, M, scale, eps,
                 R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr, NORM_MMA: tl.constexpr,
                 PIPE: tl.constexpr):
    """Stream one key segment (k_b, v_b, ... already offset to this row's batch) into (m_i, l_i, acc).

    PIPE (no mask): the distance GEMM of the next key tile is issued before this tile's softmax,
    so the tensor cores work while the special-function unit does the square roots and
    exponentials (flash-attention 3's intra-warpgroup overlap); the last tile's GEMM is issued
    once more, unused, instead of a branch."""
    qi = offs_m[:, None]
    qv = mvalid[:, None]
    nr_row = -scale * _load_r(r_b, qi, qi, qv, qv, srm, srn, R_MODE if R_MODE < 2 else 0)  # hoisted for modes 0, 1
    last = ((M - 1) // BLOCK_N) * BLOCK_N
    if PIPE:
        s = _fwd_dist(qw2, qne, k_b, kn_b, 0, offs_d, dvalid, skn, skd, sknn, M, PREC, EVEN_N, EVEN_D, BLOCK_N,
                      NORM_MMA)
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nvalid = offs_n < M
        kj = offs_n[None, :]
        kv = nvalid[None, :]
        if PIPE:
            s_cur = s
            s = _fwd_dist(qw2, qne, k_b, kn_b, tl.minimum(start + BLOCK_N, last), offs_d, dvalid, skn, skd, sknn, M,
                          PREC, EVEN_N, EVEN_D, BLOCK_N, NORM_MMA)
        else:
            s_cur = _fwd_dist(qw2, qne, k_b, kn_b, start, offs_d, dvalid, skn, skd, sknn, M, PREC, EVEN_N, EVEN_D,
                              BLOCK_N, NORM_MMA)
        v = _load_tile(v_b, offs_n, offs_e, svn, svd, nvalid, evalid, EVEN_N, EVEN_DV)
        if R_MODE < 2:
            nr = nr_row
        else:
            nr = -scale * _load_r(r_b, qi, kj, qv, kv, srm, srn, R_MODE)
        if MASK_MODE != 0:
            keep = _keep(mk_b, qi, kj, qv, kv, smm, smn, MASK_MODE)
            if tl.max(keep.to(tl.int32)) > 0:  # a tile whose keys are all masked costs no math
                m_i, l_i, acc = _fwd_update(s_cur, nr, m_i, l_i, acc, v, keep, eps, PREC, True, True, NORM_MMA)
        else:
            m_i, l_i, acc = _fwd_update(s_cur, nr, m_i, l_i, acc, v, kv, eps, PREC, not EVEN_N, False, NORM_MMA)
    return m_i, l_i, acc


@triton.autotune(configs=_configs(), key=_FWD_KEY, prune_configs_by={"early_config_prune": _fit_value_width})
@triton.jit
def retrieval_attn_fwd_kernel(
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
):
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    scale = tl.cast(scale, tl.float32)
    eps = tl.cast(eps, tl.float32)
    # one program per (query tile, batch). Segment 1: the row's keys (s* strides, optional mask);
    # segment 2 (HAS_BANK): the bank (t* strides, unmasked), read through its own strides, so a
    # bank shared by the batch is one copy in memory. EVEN_*: a length is a multiple of every block.
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
    if NORM_MMA:
        qne = _norm_split(qne, 0, 3)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, 16] if NORM_MMA else [BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    m_i, l_i, acc = _fwd_segment(qw2, qne, m_i, l_i, acc, offs_m, mvalid, offs_d, offs_e, dvalid, evalid,
                                 k_ptr + b0 * sk0 + b1 * sk1, kn_ptr + b0 * skn0 + b1 * skn1,
                                 v_ptr + b0 * sv0 + b1 * sv1, r_ptr + b0 * sr0 + b1 * sr1,
                                 mk_ptr + b0 * sm0 + b1 * sm1, skn, skd, sknn, svn, svd, srm, srn, smm, smn, M,
                                 scale, eps, R_MODE, MASK_MODE, PREC, EVEN_N, EVEN_D, EVEN_DV, BLOCK_N, NORM_MMA,
                                 PIPE and MASK_MODE == 0)
    if HAS_BANK:
        m_i, l_i, acc = _fwd_segment(qw2, qne, m_i, l_i, acc, offs_m, mvalid, offs_d, offs_e, dvalid, evalid,
                                     k2_ptr + b0 * tk0 + b1 * tk1, kn2_ptr + b0 * tkn0 + b1 * tkn1,
                                     v2_ptr + b0 * tv0 + b1 * tv1, r2_ptr + b0 * tr0 + b1 * tr1,
                                     mk_ptr, tkn, tkd, tknn, tvn, tvd, trm, trn, smm, smn, M2,
                                     scale, eps, R2_MODE, 0, PREC, EVEN_N2, EVEN_D, EVEN_DV, BLOCK_N,
                                     NORM_MMA, PIPE)

    if NORM_MMA:
        l_i = tl.sum(l_i, 1)
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
def _norm_split(n, AT: tl.constexpr, ONES: tl.constexpr):
    """[len(n), 16] bfloat16: n as three bfloat16 parts (high, middle, low) in columns AT to
    AT + 2, ones in columns ONES to ONES + 2, zeros elsewhere. The product of a query's split
    (AT 0, ONES 3) with a key's (AT 3, ONES 0) is |q|^2 + |k|^2: three 8-bit parts carry
    float32's 24 bits, so the sum is as exact as the float32 adds it replaces (two parts, 2^-17
    relative, measured 4x the error of the float32 path for an identity metric and keys and
    queries far from the origin, where w q is exact in 16 bits). bfloat16, not float16: a
    float16 norm overflows at 65504."""
    hi = n.to(tl.bfloat16).to(tl.float32)
    mid = (n - hi).to(tl.bfloat16).to(tl.float32)
    lo = n - hi - mid
    c = tl.arange(0, 16)[None, :]
    one = tl.where((c >= ONES) & (c < ONES + 3), 1.0, 0.0)
    part = tl.where(c == AT, hi[:, None], tl.where(c == AT + 1, mid[:, None], lo[:, None]))
    return tl.where((c >= AT) & (c < AT + 3), part, one).to(tl.bfloat16)


@triton.jit
def sqnorm_kernel(x_ptr, w_ptr, out_ptr, xw_ptr, sx0, sx1, sxl, sxd, NB1, L, D,
                  WRITE_XW: tl.constexpr, SPLIT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, l] = sum_d w_d x[b, l, d]^2 in float32: |k|^2_w once per key, not per score.
    With SPLIT, out is [.., L, 16] bfloat16: the key side of _norm_split."""
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
    n = tl.sum(x * x * w[None, :], 1)
    if SPLIT:
        offs_a = tl.arange(0, 16)
        tl.store(out_ptr + (pid_b * L + offs_l)[:, None] * 16 + offs_a[None, :], _norm_split(n, 3, 0),
                 mask=lvalid[:, None])
    else:
        tl.store(out_ptr + pid_b * L + offs_l, n, mask=lvalid)
    if WRITE_XW:
        tl.store(xw_ptr + (pid_b * L + offs_l)[:, None] * D + offs_d[None, :],
                 (x * w[None, :]).to(xw_ptr.dtype.element_ty), mask=lvalid[:, None] & dvalid[None, :])


# ---- backward --------------------------------------------------------------------


@triton.jit
def _bwd_update(qw, do, qn, lse2, delta, k, kn, v, nr, hr, keep, eps, beta, dk_acc, dv_acc, cs, dr,
                dqa_b, rs_b, dr_b, offs_m, mvalid, offs_n, nvalid, offs_d, dvalid, M, D,
                R_MODE: tl.constexpr, NEED_DR: tl.constexpr, USE_KEEP: tl.constexpr, PREC: tl.constexpr):
    """One (key tile, query tile) pair, transposed: rows are keys, columns queries.

    Accumulates dK / dV / sum_i ds / per-key dR in registers and adds the query side into
    float32 buffers with atomics. nr = -beta log2(e) R and hr = -beta R / 2 broadcast
    against the [BLOCK_N, BLOCK_M] tile."""
    s = kn[:, None] + qn[None, :] - 2.0 * _mm(k, tl.trans(qw), PREC)  # qn carries + eps: s = g + eps
    t = tl.maximum(s, eps)
    inv = tl.math.rsqrt(t)  # one MUFU.RSQ gives spd = t / sqrt(t) and the 1 / spd of d cost / d s
    spd = t * inv
    c = tl.where(s >= eps, hr * inv, 0.0)  # d cost / d s (0 where the clamp is active); s dies here
    x = spd * nr
    if USE_KEEP:
        x = tl.where(keep, x, float("-inf"))
    p = tl.math.exp2(x - lse2[None, :])
    pl = p.to(do.dtype)
    pd = p * (_mm(v, tl.trans(do), PREC) - delta[None, :])  # d loss / d logit
    dv_acc += _mm(pl, do, PREC)
    dsl = (pd * c).to(qw.dtype)  # d loss / d s
    dk_acc += _mm(dsl, qw, PREC)
    ds = pd * c
    cs += tl.sum(ds, 1)
    tl.atomic_add(rs_b + offs_m, tl.sum(ds, 0), mask=mvalid, sem="relaxed")
    a = _mm(tl.trans(dsl), k, PREC)  # sum_j ds_ij k_j for these queries
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
def _bwd_segment(pid_n, pid_b, qw_b, qn_b, do_b, lse_b, delta_b, dqa_b, rs_b, w_ptr, dw_ptr,
                 k_b, kn_b, v_b, r_b, mk_b, dk_ptr, dv_ptr, dr_ptr,
                 skn, skd, sknn, svn, svd, srm, srn, smm, smn,
                 LQ, M, D, DV, scale, beta, eps,
                 R_MODE: tl.constexpr, MASK_MODE: tl.constexpr, SHARED_K: tl.constexpr, SHARED_V: tl.constexpr,
                 NEED_DR: tl.constexpr, PREC: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile pid_n of one segment against every query tile of batch pid_b.

    SHARED_K / SHARED_V: the segment's keys / values are one copy for the whole batch (a
    bank): dK / dV are added into float32 [M, F] buffers with atomics, never expanded."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    nvalid = offs_n < M
    dvalid = offs_d < D
    evalid = offs_e < DV
    k = _load_tile(k_b, offs_n, offs_d, skn, skd, nvalid, dvalid, EVEN_N, EVEN_D)
    kn = _load_vec(kn_b, offs_n, sknn, nvalid, 0.0, EVEN_N)
    v = _load_tile(v_b, offs_n, offs_e, svn, svd, nvalid, evalid, EVEN_N, EVEN_DV)
    w = tl.load(w_ptr + offs_d, mask=dvalid, other=0.0)
    kj = offs_n[:, None]
    kv = nvalid[:, None]
    # dR layout by mode: [NB, LQ] (atomics), [NB, M] (per key), [NB, LQ, M] (per pair)
    dr_b = dr_ptr + pid_b * (LQ * M if R_MODE == 3 else (M if R_MODE == 2 else LQ))

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # sum_i ds_ij (w q_i)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    cs = tl.zeros([BLOCK_N], tl.float32)  # sum_i ds_ij
    dr = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, LQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mvalid = offs_m < LQ
        qi = offs_m[None, :]
        qv = mvalid[None, :]
        qw = _load_tile(qw_b, offs_m, offs_d, D, 1, mvalid, dvalid, EVEN_M, EVEN_D)
        do = _load_tile(do_b, offs_m, offs_e, DV, 1, mvalid, evalid, EVEN_M, EVEN_DV)
        qn = _load_vec(qn_b, offs_m, 1, mvalid, 0.0, EVEN_M) + eps
        lse = _load_vec(lse_b, offs_m, 1, mvalid, float("inf"), EVEN_M)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: p = 0
        delta = _load_vec(delta_b, offs_m, 1, mvalid, 0.0, EVEN_M)
        r = _load_r(r_b, qi, kj, qv, kv, srm, srn, R_MODE)
        nr = -scale * r
        hr = (-0.5 * beta) * r
        if MASK_MODE != 0:
            keep = _keep(mk_b, qi, kj, qv, kv, smm, smn, MASK_MODE)
            if tl.max(keep.to(tl.int32)) > 0:  # a tile whose keys are all masked has zero gradient
                dk_acc, dv_acc, cs, dr = _bwd_update(qw, do, qn, lse2, delta, k, kn, v, nr, hr, keep, eps, beta,
                                                     dk_acc, dv_acc, cs, dr, dqa_b, rs_b, dr_b, offs_m, mvalid,
                                                     offs_n, nvalid, offs_d, dvalid, M, D, R_MODE, NEED_DR, True,
                                                     PREC)
        else:
            dk_acc, dv_acc, cs, dr = _bwd_update(qw, do, qn, lse2, delta, k, kn, v, nr, hr, kv, eps, beta,
                                                 dk_acc, dv_acc, cs, dr, dqa_b, rs_b, dr_b, offs_m, mvalid,
                                                 offs_n, nvalid, offs_d, dvalid, M, D, R_MODE, NEED_DR, not EVEN_N,
                                                 PREC)

    kf = k.to(tl.float32)
    dk = 2.0 * (w[None, :] * kf * cs[:, None] - dk_acc)
    kmask = nvalid[:, None] & dvalid[None, :]
    vmask = nvalid[:, None] & evalid[None, :]
    if SHARED_K:
        tl.atomic_add(dk_ptr + offs_n[:, None] * D + offs_d[None, :], dk, mask=kmask, sem="relaxed")
    else:
        tl.store(dk_ptr + (pid_b * M + offs_n)[:, None] * D + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=kmask)
    if SHARED_V:
        tl.atomic_add(dv_ptr + offs_n[:, None] * DV + offs_e[None, :], dv_acc, mask=vmask, sem="relaxed")
    else:
        tl.store(dv_ptr + (pid_b * M + offs_n)[:, None] * DV + offs_e[None, :],
                 dv_acc.to(dv_ptr.dtype.element_ty), mask=vmask)
    if NEED_DR and R_MODE == 2:
        tl.store(dr_b + offs_n, dr, mask=nvalid)
    # this tile's share of dw: sum_j k_j^2 cs_j
    tl.atomic_add(dw_ptr + offs_d, tl.sum(kf * kf * cs[:, None], 0), mask=dvalid, sem="relaxed")


@triton.autotune(configs=_configs(bwd=True), key=_BWD_KEY, prune_configs_by={"early_config_prune": _fit_value_width},
                 reset_to_zero=["dqa_ptr", "rs_ptr", "dw_ptr", "dk_ptr", "dv_ptr", "dr_ptr", "dk2_ptr", "dv2_ptr",
                                "dr2_ptr"])
@triton.jit
def retrieval_attn_bwd_kernel(
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
):
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    scale = tl.cast(scale, tl.float32)
    beta = tl.cast(beta, tl.float32)
    eps = tl.cast(eps, tl.float32)
    # one program per (key tile, batch); key tiles of segment 1 first, then those of the bank.
    # qw, qn, do, lse, delta, dqa, rs are [NB, LQ, *] contiguous.
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
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
                     BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N)
    elif HAS_BANK:
        _bwd_segment(pid_n - nblk, pid_b, qw_ptr + row_b * D, qn_ptr + row_b, do_ptr + row_b * DV,
                     lse_ptr + row_b, delta_ptr + row_b, dqa_ptr + row_b * D, rs_ptr + row_b, w_ptr, dw_ptr,
                     k2_ptr + b0 * tk0 + b1 * tk1, kn2_ptr + b0 * tkn0 + b1 * tkn1, v2_ptr + b0 * tv0 + b1 * tv1,
                     r2_ptr + b0 * tr0 + b1 * tr1, mk_ptr, dk2_ptr, dv2_ptr, dr2_ptr,
                     tkn, tkd, tknn, tvn, tvd, trm, trn, smm, smn, LQ, M2, D, DV, scale, beta, eps,
                     R2_MODE, 0, SHARED_K2, SHARED_V2, NEED_DR, PREC, EVEN_M, EVEN_N2, EVEN_D, EVEN_DV,
                     BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N)


@triton.jit
def retrieval_bwd_dq_kernel(q_ptr, dqa_ptr, rs_ptr, w_ptr, dq_ptr, dw_ptr, ROWS, D,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ = 2 w (q sum_j ds - sum_j ds k) from the atomically summed buffers, and the
    query side of dw: sum_i q_i (q_i sum_j ds_ij - 2 sum_j ds_ij k_j)."""
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
    tl.store(dq_ptr + idx, (2.0 * w[None, :] * (qr - a)).to(dq_ptr.dtype.element_ty), mask=msk)
    tl.atomic_add(dw_ptr + offs_d, tl.sum(q * (qr - 2.0 * a), 0), mask=dvalid, sem="relaxed")


# ---- launchers -------------------------------------------------------------------
# Inputs are 4-D: [NB0, NB1, L, F] with size-1 batch dims where an operand is shared;
# r is [NB0|1, NB1|1, LQ|1, M|1] float32, mask likewise (bool) or None. A bank (bk, bv, br)
# has the same layout with its own length C in place of M, and no mask.

def _launch(kernel, launch):
    return (launch or (lambda k: k))(kernel)


def r_mode(r):
    return int(r.shape[-2] != 1) + 2 * int(r.shape[-1] != 1)


def modes(r, mask):
    mask_mode = MASK_NONE if mask is None else (MASK_KEY if mask.shape[-2] == 1 else MASK_PAIR)
    return r_mode(r), mask_mode


def _pow2(n):
    return max(16, triton.next_power_of_2(n))


def _prec(dtype):
    # float32 inputs: exact float32 dots (tf32 would cancel badly in |q|^2 + |k|^2 - 2 q.k)
    import torch

    if interpret_mode():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


class _Segment:
    """One key segment expanded (as strided views) to the batch shape `lead`, with its norms."""

    def __init__(self, k, v, r, mask, w, lead, lq, launch, split=False):
        import torch

        self.k, self.v, self.r, self.mask = k, v, r, mask
        self.m = k.shape[2]
        self.ke = k.expand(lead + tuple(k.shape[2:]))
        # per key, once (a bank stays unexpanded); split: the forward's norms on tensor cores
        kn = sqnorm(k, w, launch=launch, split=split)
        self.kn = kn.expand(lead + tuple(kn.shape[2:]))
        self.ve = v.expand(lead + tuple(v.shape[2:]))
        self.re = r.expand(lead + (lq, self.m))  # for its strides; kernels get r (never empty) itself
        self.me = None if mask is None else mask.view(torch.uint8).expand(lead + (lq, self.m))
        self.r_mode = r_mode(r)
        nb = lead[0] * lead[1]
        # one copy of the keys / values for the whole batch: the backward adds into [M, F]
        self.shared_k = nb > 1 and k.shape[0] == 1 and k.shape[1] == 1
        self.shared_v = nb > 1 and v.shape[0] == 1 and v.shape[1] == 1

    def strides(self, with_mask):
        s = [*self.ke.stride(), *self.kn.stride()[:3], *self.ve.stride(), *self.re.stride()]
        if with_mask:
            s += [0, 0, 0, 0] if self.me is None else [*self.me.stride()]
        return s

    def even(self):
        # an empty segment is not "even": the pipelined forward loads its first tile before the
        # loop, and without masks that would read an empty tensor
        return self.m > 0 and self.m % _even_block() == 0


def _norm_mma(dtype):
    """The forward adds the norms and sums the rows on tensor cores (see _norm_split) for 16-bit
    inputs; float32 inputs keep exact float32 adds. GEOKERN_RETRIEVAL_NORM_MMA=0 turns it off
    (to time the two side by side)."""
    import torch

    return dtype in (torch.float16, torch.bfloat16) and os.environ.get("GEOKERN_RETRIEVAL_NORM_MMA", "1") != "0"


def _pipelined(d):
    """Whether the forward issues the next tile's distance GEMM before this tile's softmax.
    Measured on the H100 (bf16, B4 H16 N4096 / B1 H4 N16384, one run): at D = 128 1.46 / 1.37 ms
    against 1.58 / 1.58 without; at D = 64 1.03 / 1.03 against 1.02 / 0.98 (the extra live
    tile costs more than the overlap gains when the GEMM is short). GEOKERN_RETRIEVAL_PIPE=0 / 1
    forces it."""
    env = os.environ.get("GEOKERN_RETRIEVAL_PIPE")
    return env != "0" if env is not None else _pow2(d) >= 128


def _segments(q, k, v, w, r, mask, bk, bv, br, launch, split=False):
    lead = tuple(broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2]))
    lq = q.shape[2]
    seg = _Segment(k, v, r, mask, w, lead, lq, launch, split)
    bank = None
    if bk is not None and bk.shape[2] > 0:
        bank = _Segment(bk, bv, br, None, w, lead, lq, launch, split)
    return lead, seg, bank


def sqnorm(x, w, xw=None, launch=None, split=False):
    """|x|^2_w per row of x [NB0, NB1, L, F] (any strides) as float32 [NB0, NB1, L]; with xw
    (contiguous, x's shape and dtype) also writes w x rounded to x's dtype there. With split,
    [NB0, NB1, L, 16] bfloat16: the key side of _norm_split."""
    import torch

    nb0, nb1, l, d = x.shape
    shape, dtype = ((nb0, nb1, l, 16), torch.bfloat16) if split else ((nb0, nb1, l), torch.float32)
    out = torch.empty(shape, dtype=dtype, device=x.device)
    if out.numel() == 0:
        return out
    bl = 64
    _launch(sqnorm_kernel, launch)[(triton.cdiv(l, bl), nb0 * nb1)](
        x, w, out, out if xw is None else xw, *x.stride(), nb1, l, d, WRITE_XW=xw is not None, SPLIT=split, BLOCK_L=bl,
        BLOCK_D=_pow2(d))
    return out


def attn_fwd(q, k, v, w, r, mask, bk, bv, br, beta, eps, launch=None):
    """(out [NB0, NB1, LQ, DV] in v's dtype, lse [NB0, NB1, LQ] float32); bk / bv / br: an
    optional second key segment (a bank, usually shared by the batch) or None."""
    import torch

    # masked launches keep the float32 adds: with a key mask, Triton 3.6's software pipeliner
    # crashed compiling the tensor-core norm path for some shapes on the H100 ("PassManager::run
    # failed" in TritonGPUPipeline; headshared keys and bank tests); unmasked launches ran clean
    split = _norm_mma(q.dtype) and mask is None
    lead, seg, bank = _segments(q, k, v, w, r, mask, bk, bv, br, launch, split)
    lq, d, dv = q.shape[2], q.shape[3], v.shape[3]
    out = torch.empty(lead + (lq, dv), dtype=v.dtype, device=v.device)
    lse = torch.empty(lead + (lq,), dtype=torch.float32, device=v.device)
    nb = lead[0] * lead[1]
    if out.numel() == 0 or nb * lq == 0:
        return out, lse
    if seg.m == 0 and bank is None:
        return out.zero_(), lse.fill_(float("-inf"))
    qe = q.expand(lead + (lq, d))
    two = bank or seg  # the kernel ignores segment 2 without HAS_BANK: any valid tensors do
    me = seg.me if seg.me is not None else r.new_zeros((1,), dtype=torch.uint8)
    mask_mode = MASK_NONE if mask is None else modes(r, mask)[1]
    eb = _even_block()
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), nb)  # noqa: E731
    _launch(retrieval_attn_fwd_kernel, launch)[grid](
        qe, w, seg.ke, seg.kn, seg.ve, seg.r, me, two.ke, two.kn, two.ve, two.r, out, lse,
        *qe.stride(), *seg.strides(True), *two.strides(False), lead[1], lq, seg.m, two.m, d, dv,
        float(beta) * LOG2E, float(eps),
        R_MODE=seg.r_mode, MASK_MODE=mask_mode, R2_MODE=two.r_mode, HAS_BANK=bank is not None, PREC=_prec(q.dtype),
        EVEN_M=lq % eb == 0, EVEN_N=seg.even(), EVEN_N2=two.even(), EVEN_D=_pow2(d) == d, EVEN_DV=_pow2(dv) == dv,
        NORM_MMA=split, PIPE=_pipelined(d), BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
    )
    return out, lse


def _grad_buffers(s, lead, lq, d, dv, dtype):
    """(dk, dv, dr) buffers of one segment: float32 zeros where added into atomically."""
    import torch

    dev = s.k.device
    if s.shared_k:
        dk = torch.zeros((1, 1, s.m, d), dtype=torch.float32, device=dev)
    else:
        dk = torch.empty(lead + (s.m, d), dtype=dtype, device=dev)
    if s.shared_v:
        dvv = torch.zeros((1, 1, s.m, dv), dtype=torch.float32, device=dev)
    else:
        dvv = torch.empty(lead + (s.m, dv), dtype=dtype, device=dev)
    dr_shape = {R_BATCH: (lq, 1), R_QUERY: (lq, 1), R_KEY: (1, s.m), R_PAIR: (lq, s.m)}[s.r_mode]
    dr = torch.zeros(lead + dr_shape, dtype=torch.float32, device=dev)  # zeros: also where not written
    return dk, dvv, dr


def attn_bwd(do, q, k, v, w, r, mask, bk, bv, br, out, lse, dlse, beta, eps, need_dr, launch=None):
    """(dq, dk, dv at the broadcast batch shape (dk / dv at [1, 1, M, F] for keys / values
    shared by the batch); dr [.., LQ|1, M|1] float32; the same three for the bank (empty
    tensors without one); dw [F] float32).

    dlse (optional, lse's shape) is the gradient of the log-sum-exp output: with
    d lse / d logit_j = p_j it enters as delta_i = rowsum(dO * O)_i - dlse_i."""
    import torch

    lead, seg, bank = _segments(q, k, v, w, r, mask, bk, bv, br, launch)
    lq, d, dv = q.shape[2], q.shape[3], v.shape[3]
    nb = lead[0] * lead[1]
    bd = _pow2(d)
    dev = q.device
    dq = torch.empty(lead + (lq, d), dtype=q.dtype, device=dev)
    dw = torch.zeros((bd,), dtype=torch.float32, device=dev)
    dk, dvv, dr = _grad_buffers(seg, lead, lq, d, dv, k.dtype)
    if bank is not None:
        dk2, dv2, dr2 = _grad_buffers(bank, lead, lq, d, dv, bk.dtype)
    elif bk is not None:  # an empty bank: zero gradients of its (empty) shapes
        dk2, dv2, dr2 = bk.new_zeros(bk.shape), bv.new_zeros(bv.shape), torch.zeros_like(br, dtype=torch.float32)
    else:
        dk2, dv2, dr2 = (dw.new_zeros((0,)) for _ in range(3))

    def finish():
        return (dq, dk.to(k.dtype), dvv.to(v.dtype), dr, dk2.to(bk.dtype) if bk is not None else dk2,
                dv2.to(bv.dtype) if bv is not None else dv2, dr2, dw[:d])

    if nb * lq == 0 or (seg.m == 0 and bank is None):
        dq.zero_(), dk.zero_(), dvv.zero_()
        return finish()
    qe = q.expand(lead + (lq, d)).contiguous()
    qw = torch.empty_like(qe)
    qn = sqnorm(qe, w, qw, launch)
    do = do.expand(lead + (lq, dv)).contiguous()
    delta = (do.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float().expand(delta.shape)
    delta = delta.contiguous()
    lse = lse.contiguous()
    dqa = torch.zeros(lead + (lq, d), dtype=torch.float32, device=dev)
    rs = torch.zeros(lead + (lq,), dtype=torch.float32, device=dev)
    two = bank or seg
    b_dk, b_dv, b_dr = (dk2, dv2, dr2) if bank is not None else (dw.new_zeros(1), dw.new_zeros(1), dw.new_zeros(1))
    me = seg.me if seg.me is not None else r.new_zeros((1,), dtype=torch.uint8)
    mask_mode = MASK_NONE if mask is None else modes(r, mask)[1]
    eb = _even_block()
    nblk = lambda bn: triton.cdiv(seg.m, bn) + (triton.cdiv(bank.m, bn) if bank is not None else 0)  # noqa: E731
    grid = lambda meta: (nblk(meta["BLOCK_N"]), nb)  # noqa: E731
    _launch(retrieval_attn_bwd_kernel, launch)[grid](
        qw, qn, do, lse, delta, w, dqa, rs, dw,
        seg.ke, seg.kn, seg.ve, seg.r, me, dk, dvv, dr,
        two.ke, two.kn, two.ve, two.r, b_dk, b_dv, b_dr,
        *seg.strides(True), *two.strides(False), lead[1], lq, seg.m, two.m, d, dv,
        float(beta) * LOG2E, float(beta), float(eps),
        R_MODE=seg.r_mode, MASK_MODE=mask_mode, R2_MODE=two.r_mode, HAS_BANK=bank is not None,
        SHARED_K=seg.shared_k, SHARED_V=seg.shared_v, SHARED_K2=two.shared_k, SHARED_V2=two.shared_v,
        NEED_DR=bool(need_dr), PREC=_prec(q.dtype), EVEN_M=lq % eb == 0, EVEN_N=seg.even(), EVEN_N2=two.even(),
        EVEN_D=bd == d, EVEN_DV=_pow2(dv) == dv, BLOCK_D=bd, BLOCK_DV=_pow2(dv),
    )
    rows = nb * lq
    br_ = 64
    _launch(retrieval_bwd_dq_kernel, launch)[(triton.cdiv(rows, br_),)](qe, dqa, rs, w, dq, dw, rows, d,
                                                                         BLOCK_R=br_, BLOCK_D=bd)
    return finish()
