"""Triton kernels for the quaternion (n = 4) and octonion (n = 8) linear layers.

The layer is a real GEMM with the n x n block matrix whose block (p, b) is
sign(p, b) * W_{p ^ b} (geokern.reference.hypercomplex.left_mul_blocks: the component
index of a basis product is the XOR of the factors' indices in the Cayley-Dickson basis).
No kernel builds that matrix: a weight tile is read straight from the component matrix
it lies in (a pointer chosen per K step among the n component pointers) and the block's
sign is applied to the other operand's tile in registers, so one K loop runs over all n
blocks with one accumulator and one software pipeline.

Tiles never straddle blocks: the output columns are tiled per block (grid over n blocks x
cdiv(block, BN)) and the K loop steps through each block separately (cdiv(block, BK)
steps, masked at the block's end), so any block size works; when BN and BK divide the
blocks the masks are all true and the work is that of the dense GEMM.

Programs that read the same weight rows (the n output blocks of one column tile) are
adjacent in launch order, so for skinny inputs (decode) the weights come from DRAM about
once and the other n - 1 reads hit L2.

hypercomplex_linear_fwd_blocked_kernel (gemm_variant="blocked", not yet timed) is the same
product with the K loop split per component block: the weight pointer and the sign chosen once
per block, the sign applied to the float32 accumulator between blocks (an exact negation), so
neither dot operand passes through registers on its way from shared memory (wgmma's A operand
is then a shared-memory descriptor; the stepwise kernel's sign-flipped x tile is in registers).

For few rows (decode) hypercomplex_linear_decode_kernel computes the same product with one
program per column tile of all n output blocks, so each weight element is read once.

Signs are one integer NEG: bit (p * n + b) set when block (p, b) is negated (at most
63 bits: the diagonal blocks, W_0, are never negated).
"""

import functools

import torch

import triton
import triton.language as tl

from geokern._backend import interpret_mode
from geokern.kernels._common import autotune_configs, cdiv, launch, mm_acc, narrow, next_pow2


def _gemm_configs():
    cfg = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4),
        (32, 64, 128, 4, 4), (16, 32, 256, 4, 3),
    ]:
        cfg.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return cfg


_GEMM_CONFIGS = autotune_configs(
    _gemm_configs,
    test=[triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)],
    interp=[triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2})],
)


@triton.jit
def _pick(c, w0, w1, w2, w3, w4, w5, w6, w7, N: tl.constexpr):
    """Component c's pointer: scalar selects, no branch in the K loop."""
    w = tl.where(c == 1, w1, w0)
    w = tl.where(c == 2, w2, w)
    w = tl.where(c == 3, w3, w)
    if N == 8:
        w = tl.where(c == 4, w4, w)
        w = tl.where(c == 5, w5, w)
        w = tl.where(c == 6, w6, w)
        w = tl.where(c == 7, w7, w)
    return w


@triton.jit
def _negate_if(x, neg):
    """-x where the scalar neg is nonzero, by flipping the sign bit: exact in every dtype, and
    right under the interpreter too (its bfloat16 negation is not)."""
    if x.dtype.primitive_bitwidth == 16:
        bits = x.to(tl.int16, bitcast=True)
        flip = tl.where(neg != 0, tl.full((), -32768, tl.int16), tl.full((), 0, tl.int16))
    else:
        bits = x.to(tl.int32, bitcast=True)
        flip = tl.where(neg != 0, tl.full((), -2147483648, tl.int32), tl.full((), 0, tl.int32))
    return (bits ^ flip).to(x.dtype, bitcast=True)


@triton.jit
def _grouped(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(tile row, tile col) of program pid, tile rows grouped by GROUP_M for L2 reuse."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    gm = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % gm, (pid % per_group) // gm


@triton.jit
def _block_tile(M, NB, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(p, rows, cols) of this program: BM rows (int64) x BN columns of output block p. The n output
    blocks of one column tile are neighbours in launch order: they share weight rows."""
    pm, pn = _grouped(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(NB, BN) * N, GROUP_M)
    rows = pm.to(tl.int64) * BM + tl.arange(0, BM)
    return pn % N, rows, (pn // N) * BN + tl.arange(0, BN)


@triton.jit
def _store_block(acc, bias_ptr, c_ptr, p, rows, cols, M, NB, N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """c[rows, p * NB + cols] = acc (+ bias), the rows and columns past the ends left alone."""
    col_ok = cols < NB
    if HAS_BIAS:
        acc += tl.load(bias_ptr + p * NB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = c_ptr + rows[:, None] * (N * NB) + (p * NB + cols)[None, :]
    tl.store(out, narrow(acc, c_ptr.dtype.element_ty), mask=(rows < M)[:, None] & col_ok[None, :])


@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "KB", "NB", "N", "HAS_BIAS"])
@triton.jit
def hypercomplex_linear_fwd_kernel(
    a_ptr, w0, w1, w2, w3, w4, w5, w6, w7, bias_ptr, c_ptr,
    M, KB, NB,
    sam, sak, swk, swn,
    NEG: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # a: [M, N * KB] (strides sam, sak); component c: [.., ..], its tile element (k, j) at
    # w_c + k * swk + j * swn; c: [M, N * NB] contiguous; bias: [N * NB].
    # c[:, p * NB + j] = sum_b sign(p, b) sum_k a[:, b * KB + k] W_{p ^ b}(k, j) (+ bias).
    # The forward (a = x, KB = in / n, W(k, j) = W[j, k]) and dx (a = dy, KB = out / n,
    # W(k, j) = W[k, j], NEG transposed). One program: BM rows x BN columns of one block p.
    p, rows, cols = _block_tile(M, NB, N, BM, BN, GROUP_M)
    row_ok = rows < M
    col_ok = cols < NB
    a_rows = a_ptr + rows[:, None] * sam
    w_cols = cols[None, :].to(tl.int64) * swn
    tiles_k = tl.cdiv(KB, BK)
    neg_row = tl.full((), NEG, tl.int64) >> (p * N).to(tl.int64)  # bit b: block (p, b) negated
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, N * tiles_k):
        b = it // tiles_k
        k = (it - b * tiles_k) * BK + tl.arange(0, BK)
        k_ok = k < KB
        w_base = _pick(p ^ b, w0, w1, w2, w3, w4, w5, w6, w7, N)
        neg = (neg_row >> b) & 1
        x = tl.load(a_rows + (b * KB + k)[None, :].to(tl.int64) * sak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + k[:, None].to(tl.int64) * swk + w_cols, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mm_acc(_negate_if(x, neg), w, acc, PRECISION)
    _store_block(acc, bias_ptr, c_ptr, p, rows, cols, M, NB, N, HAS_BIAS)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "KB", "NB", "N", "HAS_BIAS"])
@triton.jit
def hypercomplex_linear_fwd_blocked_kernel(
    a_ptr, w0, w1, w2, w3, w4, w5, w6, w7, bias_ptr, c_ptr,
    M, KB, NB,
    sam, sak, swk, swn,
    NEG: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The product of hypercomplex_linear_fwd_kernel (same arguments, same tiles and launch
    order), with the K loop split per component block: `for b in static_range(N)` around a
    plain K loop. Per block, once: the weight's base pointer (component p ^ b; p is per
    program, so chosen at run time, but once per block instead of once per K step) and the
    block's sign. The sign goes on the float32 ACCUMULATOR, not on an operand: acc holds the
    signed sum so far times the current block's sign, negated (exactly) where the sign changes
    between blocks and once at the end if the last block's is negative. So both dot operands
    go from the loads (shared memory, when pipelined) straight to the dot, with nothing applied
    to them in registers. The inner loop advances the x and W pointers by a constant per step
    (no offset recomputation) and has no mask: its full BK tiles run unmasked, the block's
    remainder (KB % BK) is one masked step after it. Rows and columns past the ends are read
    wrapped (index modulo M, NB: real elements, results not stored) instead of masked.

    Cost of the split: N inner loops per tile, each a pipeline of its own (its prologue's copies
    are not overlapped with the previous block's last dots), and N - 1 (+1) passes over the
    accumulator for the signs; whether that beats the stepwise kernel is the H100's to say."""
    p, rows, cols = _block_tile(M, NB, N, BM, BN, GROUP_M)
    kk = tl.arange(0, BK)
    a_rows = a_ptr + (rows % M)[:, None] * sam + kk[None, :].to(tl.int64) * sak
    w_off = kk[:, None].to(tl.int64) * swk + (cols % NB)[None, :].to(tl.int64) * swn
    full = KB // BK
    rem = KB - full * BK
    neg_row = tl.full((), NEG, tl.int64) >> (p * N).to(tl.int64)  # bit b: block (p, b) negated
    cur = (neg_row & 1).to(tl.int32)  # acc = (-1)^cur * (the signed sum so far)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for b in tl.static_range(N):
        if b > 0:
            nb = ((neg_row >> b) & 1).to(tl.int32)
            acc = acc * (1 - 2 * (nb ^ cur)).to(tl.float32)  # exact: * 1 or * -1
            cur = nb
        xp = a_rows + (b * KB).to(tl.int64) * sak
        wp = _pick(p ^ b, w0, w1, w2, w3, w4, w5, w6, w7, N) + w_off
        for kt in range(0, full):
            acc = mm_acc(tl.load(xp), tl.load(wp), acc, PRECISION)
            xp += BK * sak
            wp += BK * swk
        if rem > 0:
            x = tl.load(xp, mask=kk[None, :] < rem, other=0.0)
            w = tl.load(wp, mask=kk[:, None] < rem, other=0.0)
            acc = mm_acc(x, w, acc, PRECISION)
    acc = acc * (1 - 2 * cur).to(tl.float32)
    _store_block(acc, bias_ptr, c_ptr, p, rows, cols, M, NB, N, HAS_BIAS)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "O", "I", "N"])
@triton.jit
def hypercomplex_linear_bwd_weight_kernel(
    g_ptr, x_ptr, dw_ptr,
    M, O, I,
    sgm, sgk, sxm, sxk,
    NEG: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # g (dy): [M, N * O]; x: [M, N * I]; dw: [N, O, I] contiguous, dw[c] the gradient of W_c:
    # dW_c = sum over the N blocks (p, b) with p ^ b = c of sign(p, b) dy_p^T x_b, reduced here
    # (the expanded [N*O, N*I] gradient never exists). One program: a BM x BN tile (rows of O,
    # columns of I) of one component c; the K loop runs over the N blocks x the M rows (BK).
    pid = tl.program_id(0)
    tiles_i = tl.cdiv(I, BN)
    po, pn = _grouped(pid, tl.cdiv(O, BM), tiles_i * N, GROUP_M)
    c = pn % N  # the N components of one tile read the same dy and x columns: neighbours
    it_ = pn // N
    o = po.to(tl.int64) * BM + tl.arange(0, BM)
    i = it_ * BN + tl.arange(0, BN)
    o_ok = o < O
    i_ok = i < I
    tiles_m = tl.cdiv(M, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, N * tiles_m):
        b = it // tiles_m
        p = c ^ b
        m = ((it - b * tiles_m) * BK + tl.arange(0, BK)).to(tl.int64)
        m_ok = m < M
        neg = (tl.full((), NEG, tl.int64) >> (p * N + b).to(tl.int64)) & 1
        g = tl.load(g_ptr + m[None, :] * sgm + (p * O + o)[:, None] * sgk, mask=o_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(x_ptr + m[:, None] * sxm + (b * I + i)[None, :] * sxk, mask=m_ok[:, None] & i_ok[None, :], other=0.0)
        acc = mm_acc(_negate_if(g, neg), x, acc, PRECISION)
    out = dw_ptr + c.to(tl.int64) * O * I + o[:, None] * I + i[None, :]
    tl.store(out, narrow(acc, dw_ptr.dtype.element_ty), mask=o_ok[:, None] & i_ok[None, :])


def _decode_configs():
    # BM, BN and the split count are the launcher's (decode_plan): the workspace's size depends
    # on them; only the K step and the pipeline are tuned here.
    return [triton.Config({"BK": bk}, num_warps=w, num_stages=s)
            for bk, w, s in [(64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3), (64, 8, 5), (32, 4, 6)]]


_DECODE_CONFIGS = autotune_configs(
    _decode_configs,
    test=[triton.Config({"BK": 64}, num_warps=8, num_stages=3)],
    interp=[triton.Config({"BK": 16})],
)


@triton.autotune(configs=_DECODE_CONFIGS, key=["M", "KB", "NB", "N", "HAS_BIAS", "SPLIT", "BM", "BN"])
@triton.jit
def hypercomplex_linear_decode_kernel(
    a_ptr, w0, w1, w2, w3, w4, w5, w6, w7, bias_ptr, c_ptr,
    M, KB, NB, splits,
    sam, sak, swk, swn,
    NEG: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """a: [M, N * KB]; components as in hypercomplex_linear_fwd_kernel (same NEG); c: [M, N * NB],
    or with SPLIT float32 partials [splits, M, N * NB]. One program: BM rows x BN columns of all
    N output blocks over one K slice. The same product as the GEMM kernel, for few rows.

    One program owns BM rows x BN columns of ALL n output blocks (and one of `splits` slices of
    the K tiles), so each weight tile it loads serves every output block that uses it: W_c's
    tile (k, j) enters output block p through input block b = p ^ c, for every p. The n
    accumulators are one [N * BM, BN] tile whose row block p is output block p; per step
    (K tile t, component c) the A operand is the n x-tiles stacked in the order b = p ^ c,
    row block p negated where NEG says (p, b) is. That makes one dot of N * BM = 64 to 256
    rows per W_c tile (a Hopper wgmma needs 64 rows per warp group: n separate [BM, BN]
    accumulators with BM = 16 or 32 would each be a small mma.sync dot, n times the
    instructions for the same work), one loop and one software pipeline as in the GEMM kernel.
    c is the inner index (it % N), so consecutive steps read the same x columns (permuted)
    while they are hot, and the n component tiles of one K tile one after another.

    Bytes (n components [O, I], x [M, n I], 16-bit, one row tile): the minimum is the weights
    once, 2 n O I, plus x and y (2 n M (I + O)): at 32 x 8192 x 8192, 32 MB (quaternion) /
    16 MB (octonion) of weights against 1 MB of x and y. This kernel reads every weight element
    from DRAM exactly once (the column tiles and K slices partition each W_c; no other program
    reads the tile). x is re-read: every program reads the n x-tiles of its K slice once per
    component, N * BM * BK elements per step against BK * BN of weight, so the x traffic
    (from L2: x is 0.5 MB; the pipelined copies are cp.async.cg, which skip L1) is n * BM / BN
    times the weight bytes (quaternion, BM = 32, BN = 64: 2x; octonion: 4x); a larger BN
    (decode_block_n) trades that for fewer programs. With SPLIT (splits > 1) each program writes a float32
    partial [BM, n BN] to the workspace c_ptr [splits, M, N * NB] (4 splits n M O bytes,
    written and read back once by hypercomplex_linear_split_sum_kernel: 4 MB / 8 MB at the
    decode size with the default plan, L2-resident), summed in split order: deterministic,
    no atomics. The old kernel reads each weight element n times (once per output block's
    program; L2 absorbs some of it) and launches n times fewer programs per column tile."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(NB, BN)
    jt = pid % tiles_n
    s = (pid // tiles_n) % splits
    pm = pid // (tiles_n * splits)
    R = tl.arange(0, N * BM)
    p = R // BM  # row block of the stacked tile = output block
    rows = pm.to(tl.int64) * BM + R % BM
    cols = jt * BN + tl.arange(0, BN)
    row_ok = rows < M
    col_ok = cols < NB
    a_rows = a_ptr + rows[:, None] * sam
    w_cols = cols[None, :].to(tl.int64) * swn
    negs = tl.full((N * BM,), NEG, tl.int64) >> (p * N).to(tl.int64)  # bit b: block (p, b) negated
    tiles_k = tl.cdiv(KB, BK)
    per = tl.cdiv(tiles_k, splits)
    t0 = s * per
    steps = tl.maximum(tl.minimum(tiles_k - t0, per), 0)  # a trailing slice may be empty: zeros
    acc = tl.zeros((N * BM, BN), dtype=tl.float32)
    for it in range(0, N * steps):
        c = it % N
        k = (t0 + it // N) * BK + tl.arange(0, BK)
        k_ok = k < KB
        b = p ^ c
        neg = (negs >> b.to(tl.int64)) & 1
        x = tl.load(a_rows + (b * KB)[:, None].to(tl.int64) * sak + k[None, :].to(tl.int64) * sak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(_pick(c, w0, w1, w2, w3, w4, w5, w6, w7, N) + k[:, None].to(tl.int64) * swk + w_cols,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mm_acc(_negate_if(x, neg[:, None]), w, acc, PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    ycols = (p * NB)[:, None] + cols[None, :]
    if SPLIT:
        out = c_ptr + (s.to(tl.int64) * M + rows[:, None]) * (N * NB) + ycols
        tl.store(out, acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ycols, mask=ok, other=0.0).to(tl.float32)
        tl.store(c_ptr + rows[:, None] * (N * NB) + ycols, narrow(acc, c_ptr.dtype.element_ty), mask=ok)


@triton.jit
def hypercomplex_linear_split_sum_kernel(ws_ptr, bias_ptr, c_ptr, total, cols, splits,
                                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """c = sum over the splits of the float32 partials ws [splits, total], in split order (the
    same sum on every run), plus bias [cols] (c is [total / cols, cols]), narrowed once."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(ws_ptr + s * total + i, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i % cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(c_ptr + i, narrow(acc, c_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(None)
def neg_mask(sign, transpose=False):
    """NEG of a sign table (sign[p][b] = +-1, tuples: left_mul_blocks's): bit p * n + b set where
    the block is negated; transpose=True for the transposed block matrix (dx), bit b * n + p.
    Cached: every forward and backward call asks for it (an n^2 Python loop otherwise)."""
    n = len(sign)
    bits = 0
    for p in range(n):
        for b in range(n):
            if sign[p][b] < 0:
                bits |= 1 << ((b * n + p) if transpose else (p * n + b))
    return bits


def _precision(precision):
    """tl.dot's input precision, or "upcast" under the interpreter (see mm_acc)."""
    return "upcast" if interpret_mode() else precision


def _ptrs(weights):
    return list(weights) + [weights[0]] * (8 - len(weights))


def _gemm_grid(n, M, NB):
    return lambda meta: (cdiv(M, meta["BM"]) * n * cdiv(NB, meta["BN"]),)


GEMM_VARIANTS = ("stepwise", "blocked")
GEMM_VARIANT = "stepwise"  # until the H100 times "blocked" beside it (geokern.bench.hypercomplex_linear)


def _gemm(a, weights, bias, out, KB, NB, swk, swn, neg, precision, variant="stepwise"):
    """The GEMM kernel: variant "stepwise" (hypercomplex_linear_fwd_kernel: one K loop over all
    blocks, the sign on the x tile) or "blocked" (hypercomplex_linear_fwd_blocked_kernel: a K
    loop per block, the sign on the accumulator). The same product up to float32 rounding."""
    if variant not in GEMM_VARIANTS:
        raise ValueError(f"gemm variant must be one of {GEMM_VARIANTS}, got {variant!r}")
    M = a.shape[0]
    if M == 0 or NB == 0:
        return out
    kernel = hypercomplex_linear_fwd_blocked_kernel if variant == "blocked" else hypercomplex_linear_fwd_kernel
    launch(kernel)[_gemm_grid(len(weights), M, NB)](
        a, *_ptrs(weights), bias if bias is not None else a, out, M, KB, NB, a.stride(0), a.stride(1), swk, swn,
        NEG=neg, N=len(weights), HAS_BIAS=bias is not None, PRECISION=_precision(precision))
    return out


DECODE_MAX_ROWS = 64  # a guess until timed on the H100 (geokern.bench.hypercomplex_linear)


def decode_plan(M, n, NB, KB, sms, block_n=0, num_splits=0):
    """(BM, BN, splits) of the decode kernel. BM: the rows padded to a power of two, at least 16
    (tl.dot's least size) and at most 256 / n, so the stacked accumulator N * BM x BN stays at
    most 256 x BN. BN = 64 by default: smaller BN means more x re-reads (n BM / BN times the
    weight bytes), larger BN fewer column tiles to spread over the SMs. Splits: enough K slices
    that the programs fill the SMs once (4 for the quaternion decode size on 132 SMs, 8 for
    the octonion), capped at 16 and at the K tiles of 64 there are."""
    BM = max(16, min(next_pow2(max(M, 1)), 256 // n))
    BN = block_n or 64
    tiles = cdiv(M, BM) * cdiv(NB, BN)
    S = num_splits or max(1, min(16, sms // tiles, cdiv(KB, 64)))
    return BM, BN, S


def _sm_count(device):
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    # once per device: get_device_properties on every call is host time a decode loop pays
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_gemm(a, weights, bias, out, KB, NB, swk, swn, neg, precision, block_n=0, num_splits=0):
    M, n = a.shape[0], len(weights)
    if M == 0 or NB == 0:
        return out
    BM, BN, S = decode_plan(M, n, NB, KB, _sm_count(a.device), block_n, num_splits)
    grid = (cdiv(M, BM) * cdiv(NB, BN) * S,)
    dst = out if S == 1 else a.new_empty((S, M, n * NB), dtype=torch.float32)
    launch(hypercomplex_linear_decode_kernel)[grid](
        a, *_ptrs(weights), bias if bias is not None else a, dst, M, KB, NB, S, a.stride(0), a.stride(1), swk, swn,
        NEG=neg, N=n, HAS_BIAS=bias is not None, SPLIT=S > 1, PRECISION=_precision(precision), BM=BM, BN=BN)
    if S > 1:
        total, block = M * n * NB, 1024
        launch(hypercomplex_linear_split_sum_kernel)[(cdiv(total, block),)](
            dst, bias if bias is not None else dst, out, total, n * NB, S, HAS_BIAS=bias is not None, BLOCK=block)
    return out


def hypercomplex_linear_fwd(x, weights, bias, out, sign, precision, decode_max_rows=DECODE_MAX_ROWS, block_n=0,
                            num_splits=0, gemm_variant=GEMM_VARIANT):
    """out = x @ W_expanded^T + bias. x: [M, n * I]; weights: n x [O, I] sharing strides;
    out: [M, n * O] contiguous. M <= decode_max_rows runs the decode kernel (block_n, num_splits:
    its column tile and K slices, 0 = decode_plan's choice), more rows the GEMM kernel
    (gemm_variant: "stepwise" or "blocked", see _gemm)."""
    w = weights[0]
    O, I = w.shape
    if x.shape[0] <= decode_max_rows:
        return _decode_gemm(x, weights, bias, out, I, O, w.stride(1), w.stride(0), neg_mask(sign), precision,
                            block_n, num_splits)
    return _gemm(x, weights, bias, out, I, O, w.stride(1), w.stride(0), neg_mask(sign), precision, gemm_variant)


def hypercomplex_linear_bwd_input(grad, weights, dx, sign, precision):
    """dx = dy @ W_expanded: the transposed block structure. grad: [M, n * O]; dx: [M, n * I]."""
    w = weights[0]
    O, I = w.shape
    return _gemm(grad, weights, None, dx, O, I, w.stride(0), w.stride(1), neg_mask(sign, transpose=True), precision)


def hypercomplex_linear_bwd_weight(grad, x, dw, sign, precision):
    """dw[c] = sum_{p ^ b = c} sign(p, b) dy_p^T x_b. grad: [M, n * O]; x: [M, n * I];
    dw: [n, O, I] contiguous (zeros when M == 0)."""
    n, O, I = dw.shape
    M = grad.shape[0]
    if O == 0 or I == 0:
        return dw
    if M == 0:
        return dw.zero_()
    launch(hypercomplex_linear_bwd_weight_kernel)[_gemm_grid(n, O, I)](
        grad, x, dw, M, O, I, grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        NEG=neg_mask(sign), N=n, PRECISION=_precision(precision))
    return dw
