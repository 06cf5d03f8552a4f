"""Triton kernels of the ultrametric family and their launchers (what geokern.ops.ultrametric imports).

    ultrametric_attention_fwd / ultrametric_attention_bwd   hard-mode LCP-bucket attention and its
                                                            gradient to v (scan.py)
    ultrametric_cache_append / ultrametric_cache_query      the constant-cost decode state
    ultrametric_soft_attention_fwd / _bwd                   the soft LCP kernel, flash-style, and its
                                                            gradients to q, k (float digits) and v (soft.py)

Digits are integer tensors [B, heads, T, K] (any integer dtype, contiguous), v / dy
[B, heads, T, D] contiguous, keep a bool tensor [B, Tk]. README.md beside this file holds the
design, its bytes and flops, and what is measured.
"""

import math

import torch

from geokern._backend import interpret_mode
from geokern.kernels._common import cdiv, launch, next_pow2
from geokern.kernels.ultrametric.scan import (ultrametric_prefix_kernel, ultrametric_read_kernel,
                                              ultrametric_scan_kernel, ultrametric_summary_kernel)
from geokern.kernels.ultrametric.soft import (ultrametric_soft_attention_bwd_kernel,
                                              ultrametric_soft_attention_fwd_kernel)

__all__ = ["ultrametric_attention_fwd", "ultrametric_attention_bwd", "ultrametric_cache_append",
           "ultrametric_cache_query", "ultrametric_soft_attention_fwd", "ultrametric_soft_attention_bwd",
           "soft_blocks", "SOFT_MAX_D", "MAX_CODES", "default_chunk", "chunk_block", "plan"]

MAX_CODES = 1 << 16  # dense bucket tables (int32 codes, [N, D] float32 per group and segment)
SCRATCH_BYTES = 1 << 28  # segment tables beyond this many bytes: fewer segments
PREFIX_BLOCK = 1024


def default_chunk():
    """Positions per chunk: the dense C x C block of a chunk is one tensor-core dot."""
    return 16 if interpret_mode() else 64


def _bd(d):
    return max(16, next_pow2(d))


def chunk_block(C):
    """Rows of the block that holds a chunk of C positions in the scan and summary kernels: a
    power of two (tl.arange) and >= 16, the least K of tl.dot on sm_90 for the 16-bit count dots
    (8 for float32; 16 in triton 3.6): a smaller chunk (chunk=4) once failed to compile on the
    GPU, which the interpreter does not check. The rows past C are masked off."""
    return max(16, next_pow2(C))


def _weights(alpha):
    """(log2 alpha, alpha - 1) as the kernels take them: alpha^l = exp2(l log2 alpha) and
    w_l = alpha^(l-1) (alpha - 1), without the cancellation of alpha^l - alpha^(l-1) near 1.
    The kernels use w_l only for alpha > 1 (EXCL=False: every weight positive); alpha <= 1 reads
    disjoint sibling buckets with weights alpha^l (scan._read_rows)."""
    return math.log2(alpha), alpha - 1.0


def plan(Tk, groups, N, D, device, chunk=0, num_segments=0):
    """(C, S, chunks per segment, chunks): the scan's chunk size and segment count. Segments run
    in parallel (grid segments x groups); by default enough for two programs per SM, each at
    least one chunk, their tables within SCRATCH_BYTES."""
    C = chunk or default_chunk()
    nchunks = cdiv(Tk, C)
    if num_segments:
        S = num_segments
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        S = cdiv(2 * sms, max(1, groups))
        S = min(S, max(1, SCRATCH_BYTES // max(1, groups * N * (D + 1) * 4)))
    S = max(1, min(S, nchunks))
    cps = cdiv(max(nchunks, 1), S)
    return C, cdiv(max(nchunks, 1), cps), cps, nchunks


def _keep(keep, B, T, device):
    return torch.ones(B, T, dtype=torch.bool, device=device) if keep is None else keep


def _summary(tab, cnt, sdig, val, lse, keep, Hkv, NS, src_off, Tk, K, p, N, slots, S, cps, nchunks, C,
             scale_lse, keep_src, count, poison=False):
    B, HS, TS, D = val.shape
    launch(ultrametric_summary_kernel)[(S, B * Hkv)](
        sdig, val, lse, keep, tab, cnt, HS, NS, TS, src_off, Tk, Hkv, K, p, N, D, slots, cps, nchunks,
        SCALE_LSE=scale_lse, KEEP_SRC=keep_src, COUNT=count, C=C, CB=chunk_block(C), BD=_bd(D), POISON=poison,
        num_warps=4)


def _prefix(t, S, reverse):
    G, width = t.shape[0], t[0, 0].numel()
    launch(ultrametric_prefix_kernel)[(cdiv(width, PREFIX_BLOCK), G)](
        t, S, width, REVERSE=reverse, BLOCK=PREFIX_BLOCK, num_warps=4)


def _read(tab, cnt, tdig, out, lse, keep, Hkv, tgt_off, Tk, K, p, N, slots, slot, alpha, fwd, C, poison=False):
    B, HT, TT, _ = tdig.shape
    D = out.shape[-1]
    C = chunk_block(C)  # targets per program: any power of two (every target reads the same table)
    launch(ultrametric_read_kernel)[(cdiv(TT, C), B * HT)](
        tdig, tab, cnt, out, lse, keep, HT, HT // Hkv, TT, tgt_off, Tk, Hkv, K, p, N, D, slots, slot,
        *_weights(alpha), FWD=fwd, EXCL=alpha <= 1, C=C, BD=_bd(D), POISON=poison, num_warps=4)


def _run(fwd, qd, kd, src, lse, keep, out, out_lse, alpha, p, N, causal, chunk, num_segments):
    """The forward (fwd: sources keys, targets queries) or the backward (sources queries with
    dy / den, targets keys): tables, summaries, prefixes, then the causal scan or the read."""
    B, H, Tq, K = qd.shape
    Hkv, Tk = kd.shape[1], kd.shape[2]
    D = src.shape[-1]
    G, R = B * Hkv, H // Hkv
    # positions: the key axis, where queries sit at Tk - Tq + i; without causality a position is
    # only a row, so the backward's sources (queries) take positions 0..Tq-1 (Tq may exceed Tk)
    npos = Tk if fwd or causal else Tq
    C, S, cps, nchunks = plan(npos, G, N, D, src.device, chunk, num_segments)
    keep = _keep(keep, B, Tk, src.device)
    if causal and S == 1:
        slots = 1  # one segment: it starts from empty tables, no summary or prefix
    else:
        slots = S + 1
    tab = torch.zeros(G, slots, N, D, dtype=torch.float32, device=src.device)
    cnt = torch.zeros(G, slots, N, dtype=torch.int32, device=src.device) if fwd else tab
    sdig, off = (kd, 0) if fwd else (qd, Tk - Tq if causal else 0)
    if slots > 1:
        _summary(tab, cnt, sdig, src, lse, keep, Hkv, 1 if fwd else R, off, Tk, K, p, N, slots, S, cps, nchunks,
                 C, not fwd, fwd, fwd)
        _prefix(tab, S, not fwd)
        if fwd:
            _prefix(cnt, S, False)
    tdig, tgt_off = (qd, Tk - Tq) if fwd else (kd, 0)
    if not causal:
        _read(tab, cnt, tdig, out, out_lse, keep, Hkv, tgt_off, Tk, K, p, N, slots, S, alpha, fwd, C)
        return
    HT, TT = tdig.shape[1], tdig.shape[2]
    HS, TS = src.shape[1], src.shape[2]
    launch(ultrametric_scan_kernel)[(S, G)](
        tdig, sdig, src, lse, keep, tab, cnt, out, out_lse,
        HT, HT // Hkv, TT, tgt_off, HS, HS // Hkv, TS, off, Tk, Hkv, K, p, N, D, slots, cps, nchunks,
        *_weights(alpha), FWD=fwd, SCALE_LSE=not fwd, KEEP_SRC=fwd, EXCL=alpha <= 1, C=C, CB=chunk_block(C),
        BD=_bd(D), num_warps=4)


def ultrametric_attention_fwd(qd, kd, v, keep, y, lse, alpha, p, N, causal, chunk=0, num_segments=0):
    """qd [B, H, Tq, K], kd [B, Hkv, Tk, K] digits, v [B, Hkv, Tk, D], keep [B, Tk] bool or None:
    writes y [B, H, Tq, D] (v's dtype) and lse [B, H, Tq] float32. Tk >= 1."""
    _run(True, qd, kd, v, y, keep, y, lse, alpha, p, N, causal, chunk, num_segments)


def ultrametric_attention_bwd(qd, kd, dy, lse, keep, dv, alpha, p, N, causal, chunk=0, num_segments=0):
    """dy [B, H, Tq, D] and the forward's lse [B, H, Tq]: writes dv [B, Hkv, Tk, D] (zero for a padded
    key): dv_j = sum over the queries i that see j of alpha^lcp_ij dy_i / max(den_i, 1e-9)."""
    _run(False, qd, kd, dy, lse, keep, dv, dv, alpha, p, N, causal, chunk, num_segments)


def ultrametric_cache_append(tab, cnt, kd, v, keep, p):
    """Add T keys to the decode tables tab [B * Hkv, N, D] float32, cnt [B * Hkv, N] int32 in place:
    kd [B, Hkv, T, K], v [B, Hkv, T, D], keep [B, T] bool or None. One program per group. A kept key
    with a digit outside [0, p - 1] adds NaN values (to its clamped digits' buckets)."""
    B, Hkv, T, K = kd.shape
    C = default_chunk()
    # keep None: no keep tensor (KEEP_SRC off, v stands in for the unread pointer), not a torch.ones
    # fill launched every decode step
    _summary(tab, cnt, kd, v, v, v if keep is None else keep, Hkv, 1, 0, T, K, p, tab.shape[1], 1, 1,
             cdiv(T, C), cdiv(T, C), C, False, keep is not None, True, poison=True)


def ultrametric_cache_query(tab, cnt, qd, y, lse, alpha, p):
    """Every query qd [B, H, Tq, K] against every key in the decode tables: y [B, H, Tq, D], lse.
    A query with a digit outside [0, p - 1] gets y and lse NaN."""
    B, H, Tq, K = qd.shape
    Hkv = tab.shape[0] // B
    _read(tab, cnt, qd, y, lse, lse, Hkv, 0, Tq, K, p, tab.shape[1], 1, 0, alpha, True, default_chunk(),
          poison=True)


# ---- soft mode (soft.py) ---------------------------------------------------------------


SOFT_MAX_D = 512  # the soft kernels' widest head dim: soft_blocks' tiles fit the H100's shared memory to here


def soft_blocks(D, fwd, dtype):
    """(BM, BN, warps) of the soft kernels for head dim D <= SOFT_MAX_D and v's dtype: 16 x 16 under
    the interpreter (CI time). On the GPU the largest tiles that compile for sm_90 without register
    spills (ptxas, K = 8, D = 64, bf16; not yet timed): forward 64 queries on 8 warps (4 warps
    spill), backward 32 queries on 8 warps (it holds five pair tiles: lcp, c, the level sum, pc and
    dL/dlcp). The keys per step shrink as a value row widens (w = 2^ceil(log2 D) x element bytes):
    the pipeline's three stages of [BN, w] value tiles must fit the H100's 232448 bytes of shared
    memory. Read from the sm_90 compiles (K = 16): forward 64 keys to w = 512 (bf16 D 256: 106496
    bytes), 32 to 1024 (float32 D 256: 118784; 64 needed 237568 and failed to launch on the H100),
    16 to 2048 (float32 D 512: 131072; float32 D 1024 needs 262144 even at 16: SOFT_MAX_D);
    backward 64 keys to w = 1024 (bf16 D 512: 139264), 32 to 2048 (float32 D 512: 135168)."""
    if interpret_mode():
        return 16, 16, 4
    w = _bd(D) * dtype.itemsize
    if fwd:
        return 64, 64 if w <= 512 else 32 if w <= 1024 else 16, 8
    return 32, 64 if w <= 1024 else 32, 8


def _soft_prec(dtype):
    if interpret_mode():
        return "upcast"  # the interpreter's 16-bit dot is wrong (triton 3.8): float32 copies, exact
    return "ieee" if dtype == torch.float32 else "tf32"


def _soft_scalars(alpha, beta):
    """(-beta log2 e, log2 alpha): the exp2 constants of the partial products and the weight."""
    return -beta * math.log2(math.e), math.log2(alpha)


def ultrametric_soft_attention_fwd(q, k, v, keep, y, lse, alpha, beta, causal):
    """q [B, H, Tq, K], k [B, Hkv, Tk, K] float digits, v [B, Hkv, Tk, D], keep [B, Tk] bool or None
    (all contiguous): writes y [B, H, Tq, D] (v's dtype) and lse [B, H, Tq] float32. Tk >= 1."""
    B, H, Tq, K = q.shape
    Hkv, Tk, D = k.shape[1], k.shape[2], v.shape[3]
    BM, BN, warps = soft_blocks(D, True, v.dtype)
    nb, log2a = _soft_scalars(alpha, beta)
    launch(ultrametric_soft_attention_fwd_kernel)[(cdiv(Tq, BM), B * H)](
        q, k, v, keep if keep is not None else v, y, lse, H, H // Hkv, Tq, Tk, D, nb, log2a,
        K=K, CAUSAL=causal, HAS_KEEP=keep is not None, PREC=_soft_prec(v.dtype), BM=BM, BN=BN, BD=_bd(D),
        num_warps=warps)


def ultrametric_soft_attention_bwd(dy, q, k, v, keep, y, lse, dq, dk, dv, alpha, beta, causal):
    """dy [B, H, Tq, D], the forward's y and lse: writes dq (float32 [B, H, Tq, K], zeroed here and
    added to atomically), dk [B, Hkv, Tk, K] and dv [B, Hkv, Tk, D] (each written once)."""
    B, H, Tq, K = q.shape
    Hkv, Tk, D = k.shape[1], k.shape[2], v.shape[3]
    BM, BN, warps = soft_blocks(D, False, v.dtype)
    nb, log2a = _soft_scalars(alpha, beta)
    # per query: log2 max(den, 1e-9) and dy . y, zero where the clamp holds (y no longer depends on den)
    lse2 = lse * math.log2(math.e)
    lsc = torch.clamp_min(lse2, math.log2(1e-9)).contiguous()
    delta = torch.where(lse2 > math.log2(1e-9), (dy.float() * y.float()).sum(-1), 0.0).contiguous()
    dq.zero_()
    launch(ultrametric_soft_attention_bwd_kernel)[(cdiv(Tk, BN), B * Hkv)](
        q, k, v, keep if keep is not None else v, dy, lsc, delta, dq, dk, dv, H, H // Hkv, Tq, Tk, D, nb, log2a,
        math.log(alpha), 2.0 * beta,
        K=K, KP=max(2, next_pow2(K)), CAUSAL=causal, HAS_KEEP=keep is not None,
        PREC=_soft_prec(v.dtype), BM=BM, BN=BN, BD=_bd(D), num_warps=warps)
