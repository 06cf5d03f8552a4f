"""What the retrieval attention's forward and backward kernels share: the operand layout, the
R and mask modes, tile loads, the float32-accumulating dots, the norm splits and the key norms.

Layout: tensors are viewed with two batch dims [NB0, NB1, L, F] (broadcast dims have stride 0:
a shared key bank is not expanded); R (float32) and the boolean mask are read through strides in
the mode the launcher picks (per batch, per query, per key, per pair). The metric is diagonal
with weights w [F] float32 (any sign; other metrics reach here as a linear feature map).
"""

import triton
import triton.language as tl

from geokern._backend import interpret_mode

# R modes: one value per batch (or a scalar), per query, per key, per (query, key) pair
R_BATCH, R_QUERY, R_KEY, R_PAIR = 0, 1, 2, 3
# mask modes: none, per key (shared by the queries of a row), per pair
MASK_NONE, MASK_KEY, MASK_PAIR = 0, 1, 2


def fit_value_width(configs, nargs, **kwargs):
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


def table_configs(table):
    """triton.Config per (BLOCK_M, BLOCK_N, warps, stages, max registers) row."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=reg)
            for bm, bn, w, s, reg in table]


# the interpreter's tiles (small: CI time) and the one GEOKERN_AUTOTUNE=0 config (tests)
INTERP_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
TEST_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]


def even_block():
    """A multiple of every BLOCK_M / BLOCK_N the configs use: a length divisible by it needs no masks."""
    return 16 if interpret_mode() else 128


@triton.jit
def load_r(r_b, qi, kj, qvalid, kvalid, srm, srn, R_MODE: tl.constexpr):
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
def kept(mk_b, qi, kj, qvalid, kvalid, smm, smn, MASK_MODE: tl.constexpr):
    """Which entries of the tile are real, unmasked keys (indices shaped as in load_r)."""
    keep = kvalid & (qi >= 0)
    if MASK_MODE == 1:
        keep = keep & (tl.load(mk_b + kj * smn, mask=kvalid, other=0) != 0)
    elif MASK_MODE == 2:
        keep = keep & (tl.load(mk_b + qi * smm + kj * smn, mask=qvalid & kvalid, other=0) != 0)
    return keep


@triton.jit
def first_column(dtype: tl.constexpr, ROWS: tl.constexpr):
    """[ROWS, 16] with ones in column 0, zeros elsewhere: x @ it puts x's row sums in column 0."""
    return tl.broadcast_to(tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, 0.0).to(dtype), [ROWS, 16])


@triton.jit
def load_tile(ptr, rows, cols, s_r, s_c, rvalid, cvalid, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
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
def load_vec(ptr, idx, stride, valid, other, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr + idx * stride)
    else:
        return tl.load(ptr + idx * stride, mask=valid, other=other)


@triton.jit
def norm_split(n, AT: tl.constexpr, ONES: tl.constexpr):
    """[len(n), 16] bfloat16: n as three bfloat16 parts (high, middle, low) in columns AT to
    AT + 2, ones in columns ONES to ONES + 2, zeros elsewhere. The product of a query's split
    (AT 0, ONES 3) with a key's (AT 3, ONES 0) is |q|^2 + |k|^2: three 8-bit parts carry
    float32's 24 bits, so the sum is as exact as the float32 adds it replaces (two parts, 2^-17
    relative, is not: see README.md). bfloat16, not float16: a float16 norm overflows at 65504."""
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
    """x: [NB0, NB1, L, D] (any strides) -> out [NB0 * NB1, L] float32, xw [NB0 * NB1, L, D];
    one program: BLOCK_L rows of one batch, out = sum_d w_d x^2 (|k|^2_w once per key, not per
    score) and, WRITE_XW, w x in xw's dtype. SPLIT: out is [.., L, 16] bfloat16, the key side of
    norm_split."""
    nl = tl.cdiv(L, BLOCK_L)  # one grid axis (y stops at 65535 batches); rows in 64 bits
    pid_l = (tl.program_id(0) % nl).to(tl.int64)
    pid_b = (tl.program_id(0) // nl).to(tl.int64)
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
        tl.store(out_ptr + (pid_b * L + offs_l)[:, None] * 16 + offs_a[None, :], norm_split(n, 3, 0),
                 mask=lvalid[:, None])
    else:
        tl.store(out_ptr + pid_b * L + offs_l, n, mask=lvalid)
    if WRITE_XW:
        xw = x * w[None, :]
        if xw_ptr.dtype.element_ty == tl.float16:  # divided by w_ptr[D], a power of two that keeps it in range
            xw = xw / tl.load(w_ptr + D)
        tl.store(xw_ptr + (pid_b * L + offs_l)[:, None] * D + offs_d[None, :], xw.to(xw_ptr.dtype.element_ty),
                 mask=lvalid[:, None] & dvalid[None, :])
