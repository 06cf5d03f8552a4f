"""Top-1 bucket retrieval (reference.ultrametric.ultrametric_top1): per (head, query), the
lexicographic maximum over the visible keys of (lcp, cosine, -index).

One program: BM queries of one (batch, head), scanning the keys of its key head in tiles of BN
(causal: only up to the block's last query position). Per tile: lcp [BM, BN] from K digit
compares, the cosines from one dot q k^T (tensor cores for 16-bit inputs, "ieee" float32 for
float32) over the row norms, then the tile's best per query (max lcp, then max cosine among
those, then the lowest index), merged into the running best only on a strict improvement, so
an exact tie keeps the lower index. A NaN cosine ranks as +inf (above every number, as
torch.argmax) and is reported as NaN. Writes index (int64, -1: no visible key), lcp (int32, -1)
and the winning cosine (float32, -inf: no visible key); the op averages the picked values.
"""

import torch
import triton
import triton.language as tl

from geokern._backend import interpret_mode
from geokern.kernels._common import cdiv, launch, next_pow2
from geokern.kernels.ultrametric.signatures import dot_f32acc


@triton.jit
def ultrametric_top1_kernel(
    q_ptr, k_ptr, qd_ptr, kd_ptr, keep_ptr, idx_ptr, lcp_ptr, sim_ptr,
    H, R, Hkv, Tq, Tk, D, K, OFF,
    HAS_KEEP: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr,
):
    # q: [B, H, Tq, D], k: [B, Hkv, Tk, D], qd: [B, H, Tq, K], kd: [B, Hkv, Tk, K] (int), keep: [B, Tk]
    # bool; idx (int64), lcp (int32), sim (float32): [B, H, Tq]. Contiguous. Query i sits at
    # position OFF + i (OFF = Tk - Tq). grid (cdiv(Tq, BM), B * H): BM queries of head h of batch b.
    bh = tl.program_id(1)
    b = bh // H
    g = (b * Hkv + (bh % H) // R).to(tl.int64)
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    im = i < Tq
    qrow = bh.to(tl.int64) * Tq + i
    rd = tl.arange(0, BD)
    dm = rd < D
    q = tl.load(q_ptr + qrow[:, None] * D + rd[None, :], mask=im[:, None] & dm[None, :], other=0.0)
    qf = q.to(tl.float32)
    qn = tl.sqrt(tl.sum(qf * qf, axis=1)) + 1e-12
    best_l = tl.full([BM], -1, tl.int32)
    best_r = tl.full([BM], float("-inf"), tl.float32)
    best_j = tl.full([BM], -1, tl.int32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, OFF + tl.program_id(0) * BM + BM)
    for j0 in range(0, hi, BN):
        j = j0 + tl.arange(0, BN)
        jm = j < Tk
        krow = g * Tk + j
        kt = tl.load(k_ptr + krow[:, None] * D + rd[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
        kf = kt.to(tl.float32)
        kn = tl.sqrt(tl.sum(kf * kf, axis=1)) + 1e-12
        dot = dot_f32acc(q, tl.trans(kt), tl.zeros([BM, BN], tl.float32), PREC)
        sim = dot / (qn[:, None] * kn[None, :])
        alive = tl.full([BM, BN], 1, tl.int1)
        lcp = tl.zeros([BM, BN], tl.int32)
        for l in range(K):
            dq = tl.load(qd_ptr + qrow * K + l, mask=im, other=0).to(tl.int32)
            dk = tl.load(kd_ptr + krow * K + l, mask=jm, other=0).to(tl.int32)
            alive = alive & (dq[:, None] == dk[None, :])
            lcp += alive.to(tl.int32)
        vis = im[:, None] & jm[None, :]
        if HAS_KEEP:
            vis = vis & (tl.load(keep_ptr + b.to(tl.int64) * Tk + j, mask=jm, other=0) != 0)[None, :]
        if CAUSAL:
            vis = vis & (j[None, :] <= (i + OFF)[:, None])
        lm = tl.where(vis, lcp, -1)
        t_l = tl.max(lm, axis=1)
        cand = vis & (lm == t_l[:, None])
        r = tl.where(cand, tl.where(sim != sim, float("inf"), sim), float("-inf"))
        t_r = tl.max(r, axis=1)
        t_j = tl.min(tl.where(cand & (r == t_r[:, None]), j[None, :], 2147483647), axis=1)
        better = (t_l > best_l) | ((t_l == best_l) & (t_r > best_r))
        best_l = tl.where(better, t_l, best_l)
        best_r = tl.where(better, t_r, best_r)
        best_j = tl.where(better, t_j, best_j)
    tl.store(idx_ptr + qrow, best_j.to(tl.int64), mask=im)
    tl.store(lcp_ptr + qrow, best_l, mask=im)
    tl.store(sim_ptr + qrow, tl.where(best_r == float("inf"), float("nan"), best_r), mask=im)


def blocks(D, block_m=0, block_n=0):
    """(BM, BN, BD): queries per program, keys per tile (0: 16 / 16 under the interpreter, else
    64 / 64) and D padded to a power of two >= 16."""
    small = interpret_mode()
    return (block_m or (16 if small else 64)), (block_n or (16 if small else 64)), max(16, next_pow2(D))


def ultrametric_top1_fwd(q, k, qd, kd, keep, idx, lcp, sim, causal, block_m=0, block_n=0):
    """q [B, H, Tq, D], k [B, Hkv, Tk, D] (one dtype), qd / kd their digits, keep [B, Tk] bool or None:
    writes idx [B, H, Tq] int64, lcp int32, sim float32. Contiguous; Tk >= 1."""
    B, H, Tq, D = q.shape
    Hkv, Tk, K = k.shape[1], k.shape[2], qd.shape[3]
    BM, BN, BD = blocks(D, block_m, block_n)
    launch(ultrametric_top1_kernel)[(cdiv(Tq, BM), B * H)](
        q, k, qd, kd, qd if keep is None else keep, idx, lcp, sim, H, H // Hkv, Hkv, Tq, Tk, D, K, Tk - Tq,
        HAS_KEEP=keep is not None, CAUSAL=causal, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        BM=BM, BN=BN, BD=BD, num_warps=4 if BD <= 128 else 8)
