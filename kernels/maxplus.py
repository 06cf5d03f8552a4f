"""Triton kernels for the max-plus / min-plus matrix product and its backward.

Forward (maxplus_fwd_kernel): a GEMM-shaped kernel with register blocking. The
launcher copies A and B once per call into k-major operands, At (.., Kp, Mp) and
Bt (.., Kp, Np): contiguous, in the accumulation dtype, k padded with the semiring
zero to a multiple of _K_PAD, rows to a multiple of 16, one tile of slack after the
last (_kmajor), so every load is unmasked, in bounds and 16-byte aligned (the CUDA path
packs its operands the same way; the copy is inside the timed call). Each program owns a BM x BN
tile of C held as a 4-D tensor (RM, RN, TM, TN): Triton's default layout spreads
(TM, TN) over the 32 * num_warps threads and keeps (RM, RN) in each thread's
registers, so every thread owns an RM x RN block of rows tm * RM + rm and columns
tn * RN + rn (contiguous in memory). Per k a thread loads its RM values of A's row k
and RN values of B's row k (vectorised 128-bit loads, cached in L1) and does RM * RN
(add, max) pairs from registers. BK values of k per loop iteration (a static unroll;
the k order, and so ties, is unchanged). A 3-D broadcast [BM, BK, BN] + tl.max would
cross threads in the reduction; this stays in each thread's registers (instruction
counts of the loop: csrc/maxplus/README.md, "Triton"). Programs
are ordered in groups of GROUP_M tile rows so neighbouring programs share A and B
tiles in L2 (Triton's matmul tutorial). The batch is folded into program axis 0 and
indexed through a 4-dim layout with zero strides for broadcast operands
(kernels/_layout.py).

Value-only, the update is max.NaN(acc, a + b) (NaN propagates). With ARGMAX a
strict comparison against the old accumulator records k (ties keep the smallest k);
with MARGIN a second accumulator keeps the runner-up: top2 = max(top2, min(top1, s)).
MIN flips every comparison (min-plus). Sums in float32 (float64 for float64 inputs;
16-bit inputs are widened by the copy). Integer inputs (int16, int32) sum in int32: the
copy clamps each value to the stand-in S_IN for the sentinel (-2**(bits-2) for
max-plus, 2**(bits-2) - 1 for min-plus), so no sum wraps for inputs in the documented
range, and results beyond +-LIMIT (2 * INT_BOUND, geokern.reference.maxplus) are stored
as the sentinel SENT with argmax 0. The pass that clamps (int_prepare_kernel) also flags
the rows of A and columns of B that hold an out-of-range input; the kernels write the
overflow marker MARK (argmax 0) into every entry that reads a flagged row or column.

Value-only 16-bit inputs on the GPU take maxplus_fwd_packed_kernel instead: the same
tiles over pairs of k packed in 32-bit words, one inline-PTX add + max per pair (see
there); the CPU interpreter cannot run inline PTX, so there (CI) they take the kernel
above.

Backward (maxplus_bwd_kernel): dC is scattered along the recorded route with atomic
adds into float32 buffers of A's and B's own shapes (broadcast batch dims alias one
slot, so the batch reduction happens in the same adds). The order of the adds is not
fixed, so dA / dB may differ from run to run in the last bits when several entries
share a route.
"""

import torch
import triton
import triton.language as tl

from geokern._backend import interpret_mode
from geokern.kernels._common import autotune_configs, cdiv, launch, narrow
from geokern.kernels._layout import MAX_DIMS, broadcast_strides, contiguous_strides, row_layout, row_offset
from geokern.reference.maxplus import int_bound, int_overflow, int_sentinel


def _cfg(rm, rn, tm, tn, bk, warps, stages=1, group=8, maxnreg=None):
    return triton.Config(
        {"RM": rm, "RN": rn, "TM": tm, "TN": tn, "BK": bk, "STAGES": stages, "GROUP_M": group},
        num_warps=warps, maxnreg=maxnreg,
    )


def _full_configs():
    # TM * TN = 32 * num_warps threads; each holds an RM x RN block (8 x 8: 64 accumulators;
    # value-only that fits 128 registers, two programs of 8 warps per SM: maxnreg where
    # ptxas would take 130). STAGES = 1: plain loads, latency hidden by the other warps;
    # STAGES > 1: Triton's pipeliner (cp.async to shared memory, then LDS), more instructions
    # per pair. Argmax needs about twice the registers (the 4 x 8 tiles fit it in 128).
    return [
        _cfg(8, 8, 16, 16, 4, 8), _cfg(8, 8, 16, 16, 4, 8, maxnreg=128), _cfg(8, 8, 16, 16, 2, 8),
        _cfg(8, 8, 16, 16, 4, 8, stages=3), _cfg(8, 8, 16, 16, 2, 8, stages=3),
        _cfg(4, 8, 16, 16, 4, 8), _cfg(8, 4, 16, 16, 4, 8), _cfg(4, 4, 16, 16, 4, 8),
    ]


# built once: the autotuners and the operand padding below must see the same list (and a
# forward call should not rebuild it). Under the CPU interpreter one small tile keeps CI fast;
# with GEOKERN_AUTOTUNE=0 (tests) one config, no tuning time.
_CONFIGS = autotune_configs(
    _full_configs, test=[_cfg(8, 8, 16, 16, 2, 8)], interp=[_cfg(2, 2, 4, 4, 2, 1, stages=2, group=2)]
)
# the largest tile side (BM or BN) of every config: the slack after At / Bt (_kmajor)
_ROW_PAD = max(max(c.kwargs["RM"] * c.kwargs["TM"], c.kwargs["RN"] * c.kwargs["TN"]) for c in _CONFIGS)
# k (in elements) is padded to a multiple of every config's BK, in words of two when packed
_K_PAD = 2 * max(c.kwargs["BK"] for c in _CONFIGS)


@triton.jit
def _tile_of(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(batch, tile row, tile col) of program `pid`, tile rows grouped by GROUP_M."""
    tm = tl.cdiv(M, BM)
    tn = tl.cdiv(N, BN)
    bat = pid // (tm * tn)
    t = pid % (tm * tn)
    per_group = GROUP_M * tn
    first_m = (t // per_group) * GROUP_M
    gm = tl.minimum(tm - first_m, GROUP_M)
    pm = first_m + (t % per_group) % gm
    pn = (t % per_group) // gm
    return bat, pm, pn


@triton.jit
def _tile_ptrs(a_ptr, b_ptr, M, N, s1, s2, s3, ab0, ab1, ab2, ab3, bb0, bb1, bb2, bb3,
               RM: tl.constexpr, RN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's batch, rows om (RM, TM), cols on (RN, TN) and pointers to At / Bt
    at k = 0 (padded k-major operands: every load is in bounds and unmasked)."""
    pid = tl.program_id(0).to(tl.int64)
    bat, pm, pn = _tile_of(pid, M, N, RM * TM, RN * TN, GROUP_M)
    om = (pm * (RM * TM)).to(tl.int32) + tl.arange(0, TM)[None, :] * RM + tl.arange(0, RM)[:, None]
    on = (pn * (RN * TN)).to(tl.int32) + tl.arange(0, TN)[None, :] * RN + tl.arange(0, RN)[:, None]
    a_ptrs = a_ptr + row_offset(bat, s1, s2, s3, ab0, ab1, ab2, ab3) + om
    b_ptrs = b_ptr + row_offset(bat, s1, s2, s3, bb0, bb1, bb2, bb3) + on
    return bat, om, on, a_ptrs, b_ptrs


@triton.jit
def _out_tile(bat, om, on, M, N):
    """Offsets into a contiguous (batch, M, N) output and the in-bounds mask, as (RM, RN, TM, TN)."""
    out = bat * M * N + om[:, None, :, None] * N + on[None, :, None, :]
    mask = (om < M)[:, None, :, None] & (on < N)[None, :, None, :]
    return out, mask


@triton.jit
def _read_flags(fa_ptr, fb_ptr, bat, om, on, M, N):
    """Whether entry (om, on) of C reads an out-of-range row of A or column of B, (RM, RN, TM, TN)."""
    fa = tl.load(fa_ptr + bat * M + om, mask=om < M, other=0)
    fb = tl.load(fb_ptr + bat * N + on, mask=on < N, other=0)
    return (fa[:, None, :, None] != 0) | (fb[None, :, None, :] != 0)


@triton.jit
def _step(s, k, top1, idx, top2, MIN: tl.constexpr, ARGMAX: tl.constexpr, MARGIN: tl.constexpr):
    if MARGIN:
        if MIN:
            top2 = tl.minimum(top2, tl.maximum(top1, s))
        else:
            top2 = tl.maximum(top2, tl.minimum(top1, s))
    if ARGMAX:
        if MIN:
            take = s < top1
        else:
            take = s > top1
        idx = tl.where(take, k, idx)
    if MIN:
        top1 = tl.minimum(top1, s, propagate_nan=tl.PropagateNan.ALL)
    else:
        top1 = tl.maximum(top1, s, propagate_nan=tl.PropagateNan.ALL)
    return top1, idx, top2




@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "MIN", "ARGMAX", "MARGIN"])
@triton.jit
def maxplus_fwd_kernel(
    a_ptr, b_ptr, c_ptr, idx_ptr, mg_ptr, fa_ptr, fb_ptr,
    M, N, K,
    s1, s2, s3,
    ab0, ab1, ab2, ab3, sak,
    bb0, bb1, bb2, bb3, sbk,
    MIN: tl.constexpr, ARGMAX: tl.constexpr, MARGIN: tl.constexpr,
    IS_INT: tl.constexpr, S_IN: tl.constexpr, LIMIT: tl.constexpr, SENT: tl.constexpr, MARK: tl.constexpr,
    RM: tl.constexpr, RN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr, BK: tl.constexpr,
    STAGES: tl.constexpr, GROUP_M: tl.constexpr,
):
    # a: At [.., K, Mp], b: Bt [.., K, Np] (k-major padded copies, K a multiple of BK) -> C, argmax,
    # margin: [batch, M, N] contiguous; integers: fa [batch, M], fb [batch, N] int32 out-of-range flags
    # (_int_prepare). One program: one (RM * TM) x (RN * TN) tile of C of one batch index (axis 0 =
    # batch x tiles, tile rows grouped by GROUP_M); one thread: RM x RN entries.
    bat, om, on, a_ptrs, b_ptrs = _tile_ptrs(
        a_ptr, b_ptr, M, N, s1, s2, s3, ab0, ab1, ab2, ab3, bb0, bb1, bb2, bb3, RM, RN, TM, TN, GROUP_M
    )
    ACC = a_ptr.dtype.element_ty
    # the semiring zero, formed here: an infinite constexpr argument breaks torch.compile, whose
    # generated code spells it `inf`
    ZERO = S_IN if IS_INT else (float("inf") if MIN else float("-inf"))
    top1 = tl.full((RM, RN, TM, TN), ZERO, ACC)
    top2 = tl.full((RM, RN, TM, TN), ZERO, ACC)
    idx = tl.zeros((RM, RN, TM, TN), tl.int32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        for kk in tl.static_range(BK):
            a = tl.load(a_ptrs + kk * sak)
            b = tl.load(b_ptrs + kk * sbk)
            s = a[:, None, :, None] + b[None, :, None, :]
            top1, idx, top2 = _step(s, k0 + kk, top1, idx, top2, MIN, ARGMAX, MARGIN)
        a_ptrs += BK * sak
        b_ptrs += BK * sbk
    if IS_INT:  # sums with the stand-in lie beyond +-LIMIT: the sentinel, route k = 0
        if MIN:
            dead = top1 > LIMIT
        else:
            dead = top1 < -LIMIT
        top1 = tl.where(dead, SENT, top1)
        bad = _read_flags(fa_ptr, fb_ptr, bat, om, on, M, N)
        top1 = tl.where(bad, MARK, top1)
        idx = tl.where(dead | bad, 0, idx)
    out, mask = _out_tile(bat, om, on, M, N)
    tl.store(c_ptr + out, narrow(top1, c_ptr.dtype.element_ty), mask=mask)
    if ARGMAX:
        tl.store(idx_ptr + out, idx.to(tl.int64), mask=mask)
    if MARGIN:
        if MIN:
            gap = top2 - top1
        else:
            gap = top1 - top2
        gap = tl.where(top1 == top2, 0.0, gap)  # a tie: 0, at the winning infinity too (inf - inf)
        gap = tl.where((top2 == ZERO) & (top1 == top1), float("inf"), gap)
        tl.store(mg_ptr + out, narrow(gap, mg_ptr.dtype.element_ty), mask=mask)


# Packed 16-bit value-only path (GPU): one 32-bit word holds a pair (k, k + 1) of A's row
# (or B's column), low half k, and one instruction pair adds and maxes both lanes:
# add.rn.bf16x2 / .f16x2 + max.NaN (HADD2 + HMNMX2), or add.s16x2 + max.s16x2, which
# ptxas fuses into one VIADDMNMX (DPX). The lanes are collapsed once at the end. 16-bit
# sums round at every step, which loses nothing (rounding is monotone: the max of the
# rounded sums is the rounded max), so the result equals the float32 path's. KIND: 0
# bfloat16, 1 float16, 2 int16 (inputs clamped to the stand-in by the copy); STEP: the
# PTX of one step, acc = acc (+) (a + b) ($0 = $1 (+) ($2 + $3)), from _packed_step.
# Tiles, operands (words, k-major, padded) and program order as maxplus_fwd_kernel.
@triton.autotune(configs=_CONFIGS, key=["M", "N", "KP", "MIN", "KIND"])
@triton.jit
def maxplus_fwd_packed_kernel(
    a_ptr, b_ptr, c_ptr, fa_ptr, fb_ptr,
    M, N, KP,
    s1, s2, s3,
    ab0, ab1, ab2, ab3, sak,
    bb0, bb1, bb2, bb3, sbk,
    MIN: tl.constexpr, KIND: tl.constexpr, STEP: tl.constexpr, ZERO2: tl.constexpr, LIMIT: tl.constexpr,
    SENT: tl.constexpr, MARK: tl.constexpr, RM: tl.constexpr, RN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
    BK: tl.constexpr, STAGES: tl.constexpr, GROUP_M: tl.constexpr,
):
    # a: [.., KP, Mp], b: [.., KP, Np] int32 words of 16-bit k pairs (KP a multiple of BK) -> C:
    # [batch, M, N] contiguous, value only; int16: fa, fb as maxplus_fwd_kernel's. One program: one (RM * TM) x (RN * TN) tile of C of one
    # batch index, as maxplus_fwd_kernel; one thread: RM x RN entries of two lanes.
    bat, om, on, a_ptrs, b_ptrs = _tile_ptrs(
        a_ptr, b_ptr, M, N, s1, s2, s3, ab0, ab1, ab2, ab3, bb0, bb1, bb2, bb3, RM, RN, TM, TN, GROUP_M
    )
    acc = tl.full((RM, RN, TM, TN), ZERO2, tl.int32)
    for k0 in tl.range(0, KP, BK, num_stages=STAGES):
        for kk in tl.static_range(BK):
            a = tl.load(a_ptrs + kk * sak)
            b = tl.load(b_ptrs + kk * sbk)
            acc = tl.inline_asm_elementwise(STEP, "=r,r,r,r", [acc, a[:, None, :, None], b[None, :, None, :]],
                                            dtype=tl.int32, is_pure=True, pack=1)
        a_ptrs += BK * sak
        b_ptrs += BK * sbk
    lo = acc.to(tl.int16)  # truncation: the low lane's bits
    hi = (acc >> 16).to(tl.int16)
    if KIND == 2:
        if MIN:
            v = tl.minimum(lo.to(tl.int32), hi.to(tl.int32))
            v = tl.where(v > LIMIT, SENT, v)
        else:
            v = tl.maximum(lo.to(tl.int32), hi.to(tl.int32))
            v = tl.where(v < -LIMIT, SENT, v)
        v = tl.where(_read_flags(fa_ptr, fb_ptr, bat, om, on, M, N), MARK, v)
    else:
        if KIND == 0:
            x = lo.to(tl.bfloat16, bitcast=True).to(tl.float32)
            y = hi.to(tl.bfloat16, bitcast=True).to(tl.float32)
        else:
            x = lo.to(tl.float16, bitcast=True).to(tl.float32)
            y = hi.to(tl.float16, bitcast=True).to(tl.float32)
        if MIN:
            v = tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)
        else:
            v = tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)
    out, mask = _out_tile(bat, om, on, M, N)
    tl.store(c_ptr + out, v.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def maxplus_bwd_kernel(
    g_ptr, idx_ptr, da_ptr, db_ptr,
    M, N, K,
    s1, s2, s3,
    ab0, ab1, ab2, ab3, sam, sak,
    bb0, bb1, bb2, bb3, sbk, sbn,
    BM: tl.constexpr, BN: tl.constexpr,
):
    # g, idx: [batch, M, N] contiguous -> dA [.., M, K], dB [.., K, N] (float32 / float64 buffers,
    # zero batch strides where broadcast): dA[i, idx[i, j]] += g[i, j], dB[idx[i, j], j] += g[i, j].
    # One program: one BM x BN tile of (i, j) of one batch index, atomic adds.
    pid = tl.program_id(0).to(tl.int64)
    tm = tl.cdiv(M, BM)
    tn = tl.cdiv(N, BN)
    bat = pid // (tm * tn)
    t = pid % (tm * tn)
    rm = (t // tn) * BM + tl.arange(0, BM)
    rn = (t % tn) * BN + tl.arange(0, BN)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    off = bat * M * N + rm[:, None] * N + rn[None, :]
    g = tl.load(g_ptr + off, mask=mask, other=0.0)
    k = tl.load(idx_ptr + off, mask=mask, other=0)
    pa = da_ptr + row_offset(bat, s1, s2, s3, ab0, ab1, ab2, ab3) + rm[:, None] * sam + k * sak
    tl.atomic_add(pa, g.to(da_ptr.dtype.element_ty), mask=mask)
    pb = db_ptr + row_offset(bat, s1, s2, s3, bb0, bb1, bb2, bb3) + k * sbk + rn[None, :] * sbn
    tl.atomic_add(pb, g.to(db_ptr.dtype.element_ty), mask=mask)


def _batch_layout(lead, a, b):
    """(sizes, a batch strides, b batch strides) over the broadcast batch `lead`, or None.

    Strides are zero where an operand is broadcast; None when more than MAX_DIMS
    non-mergeable batch dims remain (the caller then copies)."""
    return row_layout(lead, [broadcast_strides(a, lead, 2), broadcast_strides(b, lead, 2), contiguous_strides(lead, 1)])


def _ceil(x, m):
    return -(-x // m) * m


def _kmajor(x, k_dim, zero, dtype, pair=1):
    """x's matrices k-major in `dtype`: (buf, view). view is (.., Kp / pair, Rp, pair), A
    (.., M, K) with k_dim=-1, B (.., K, N) with k_dim=-2; k padded with `zero` to a
    multiple of _K_PAD, rows to a multiple of 16 (16-byte aligned rows for every
    dtype). buf is view's storage, flat, with a tail of one tile: a tile overhanging the
    last rows of a k row reads the next k row (or the tail) instead, in bounds, for output
    rows that are never stored. Every element is written (zero where not x's). pair=2
    puts k pairs side by side (low half k) for the packed kernel."""
    xk = x.transpose(-1, -2) if k_dim == -1 else x  # (.., K, R)
    K, R = xk.shape[-2], xk.shape[-1]
    shape = (*xk.shape[:-2], _ceil(K, _K_PAD) // pair, _ceil(R, 16), pair)
    n = 1
    for d in shape:
        n *= d
    buf = xk.new_full((n + _ROW_PAD * pair,), zero, dtype=dtype)
    out = buf[:n].view(shape)
    v = out.transpose(-1, -2)  # (.., Kp / pair, pair, Rp): [j, i, r] holds k = j * pair + i
    whole = K // pair
    v[..., :whole, :, :R].copy_(xk[..., : whole * pair, :].unflatten(-2, (whole, pair)))
    if K % pair:  # odd K (pair = 2): the last k alone in its word
        v[..., whole, 0, :R].copy_(xk[..., K - 1, :])
    return buf, out


def _operands(a, b, lead, zero, dtype, pair=1):
    """(At storage, Bt storage, the kernels' batch sizes and strides and k strides) for
    a (.., M, K), b (.., K, N): see _kmajor; as int32 words when pair=2."""
    for _ in range(2):
        (abuf, at), (bbuf, bt) = _kmajor(a, -1, zero, dtype, pair), _kmajor(b, -2, zero, dtype, pair)
        if pair == 2:
            abuf, at, bbuf, bt = abuf.view(torch.int32), _words(at), bbuf.view(torch.int32), _words(bt)
        else:
            at, bt = at.squeeze(-1), bt.squeeze(-1)
        lay = _batch_layout(lead, at, bt)
        if lay is not None:
            break
        # rare: more than MAX_DIMS batch dims that cannot be merged: copy the expanded operands
        a, b = a.expand(*lead, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:])
    sizes, (sa, sb, _) = lay
    assert len(sizes) == MAX_DIMS == 4
    return abuf, bbuf, sizes[1:] + sa + [at.stride(-2)] + sb + [bt.stride(-2)]


_MAX_PROGRAMS = 2**31 - 1  # grid axis 0 (x) limit
_MIN_BM = min(c.kwargs["RM"] * c.kwargs["TM"] for c in _CONFIGS)
_MIN_BN = min(c.kwargs["RN"] * c.kwargs["TN"] for c in _CONFIGS)


def _check_programs(n, what):
    """Refuse a launch whose one grid axis would pass its limit (before any kernel runs)."""
    if n > _MAX_PROGRAMS:
        raise ValueError(f"maxplus_matmul: the Triton {what} would launch {n} programs, more than the grid's "
                         f"{_MAX_PROGRAMS}: split the batch, or use backend='cuda'")


def _grid(batch, M, N):
    def grid(meta):
        return (batch * cdiv(M, meta["RM"] * meta["TM"]) * cdiv(N, meta["RN"] * meta["TN"]),)

    return grid


def maxplus_fwd(a, b, c, idx, margin, lead, minplus):
    """Writes C (and argmax / margin where given, else None) for a (.., M, K), b (.., K, N).

    c, idx, margin are contiguous (*lead, M, N)."""
    M, N = a.shape[-2], b.shape[-1]
    batch = c.numel() // max(1, M * N)
    if c.numel() == 0:
        return
    # before the operand copies: a refused launch allocates nothing
    _check_programs(batch * cdiv(M, _MIN_BM) * cdiv(N, _MIN_BN), "forward")
    if a.is_cuda and not interpret_mode() and idx is None and margin is None and a.dtype in _PACKED_KIND:
        return _fwd_packed(a, b, c, lead, minplus)
    a, b, zero, consts, (fa, fb) = _inputs(a, b, lead, minplus)
    acc = torch.int32 if consts["IS_INT"] else (torch.float64 if a.dtype == torch.float64 else torch.float32)
    at, bt, args = _operands(a, b, lead, zero, acc)
    launch(maxplus_fwd_kernel)[_grid(batch, M, N)](
        at, bt, c, idx if idx is not None else c, margin if margin is not None else c,
        fa if fa is not None else c, fb if fb is not None else c,
        M, N, _ceil(a.shape[-1], _K_PAD), *args,
        MIN=minplus, ARGMAX=idx is not None, MARGIN=margin is not None,
        IS_INT=consts["IS_INT"], S_IN=consts["S_IN"], LIMIT=consts["LIMIT"], SENT=consts["SENT"],
        MARK=consts["MARK"],
    )


_PACKED_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.int16: 2}


def _packed_step(kind, minplus):
    """The PTX of one packed step for maxplus_fwd_packed_kernel."""
    add = ("add.rn.bf16x2", "add.rn.f16x2", "add.s16x2")[kind]
    best = ("min" if minplus else "max") + (".NaN.bf16x2", ".NaN.f16x2", ".s16x2")[kind]
    return "{ .reg .b32 t; %s t, $2, $3; %s $0, $1, t; }" % (add, best)


def _words(x):
    """16-bit pairs (.., 2) as int32 words (..)."""
    # through 1-D: a "contiguous" tensor may keep odd strides on its size-1 dims, which view(int32) refuses
    return x.reshape(-1).view(torch.int32).view(x.shape[:-1])


def _fwd_packed(a, b, c, lead, minplus):
    """Value-only 16-bit forward through maxplus_fwd_packed_kernel (see there)."""
    M, N = a.shape[-2], b.shape[-1]
    kind = _PACKED_KIND[a.dtype]
    a, b, zero, consts, (fa, fb) = _inputs(a, b, lead, minplus)
    # the zero pair's bits (pure Python: this runs under torch.compile's tracing too)
    half = (zero & 0xFFFF) if kind == 2 else ((0x7F80, 0x7C00)[kind] | (0 if minplus else 0x8000))
    zbits = (half << 16 | half) - (1 << 32 if half & 0x8000 else 0)
    at, bt, args = _operands(a, b, lead, zero, a.dtype, pair=2)
    batch = c.numel() // max(1, M * N)
    launch(maxplus_fwd_packed_kernel)[_grid(batch, M, N)](
        at, bt, c, fa if fa is not None else c, fb if fb is not None else c,
        M, N, _ceil(a.shape[-1], _K_PAD) // 2, *args,
        MIN=minplus, KIND=kind, STEP=_packed_step(kind, minplus), ZERO2=zbits,
        LIMIT=consts["LIMIT"], SENT=consts["SENT"], MARK=consts["MARK"],
    )


def _inputs(a, b, lead, minplus):
    """(a, b, the semiring zero for padding, _int_constants, flags): integer inputs clamped to
    the stand-in S_IN (the sentinel, and anything beyond, becomes the stand-in: their zero),
    flags the out-of-range rows of A and columns of B for the kernels, int32 (*lead, M) and
    (*lead, N) (found by the same pass that clamps; None for floats)."""
    consts = _int_constants(a.dtype, minplus)
    if not consts["IS_INT"]:
        return a, b, consts["ZERO"], consts, (None, None)
    a, fa = _int_prepare(a, -1, consts, minplus)
    b, fb = _int_prepare(b, -2, consts, minplus)
    # the flags of broadcast batch dims repeated: batch x M int32s, where C has batch x M x N entries
    fa = fa.expand(*lead, fa.shape[-1]).contiguous()
    fb = fb.expand(*lead, fb.shape[-1]).contiguous()
    return a, b, consts["S_IN"], consts, (fa, fb)


@triton.jit
def int_prepare_kernel(
    x_ptr, y_ptr, f_ptr,
    R, L, RB, CL,
    sxb, sxr, sxl, syb, syr, syl,
    Q: tl.constexpr, S_IN: tl.constexpr, SENT: tl.constexpr, MIN: tl.constexpr,
    BR: tl.constexpr, BL: tl.constexpr,
):
    # x: [batch, R, L] integers (any strides) -> y: x clamped to S_IN (y's strides), f: [batch, R] int32
    # contiguous and zeroed, set to 1 where the row holds a value neither in [-Q, Q] nor the sentinel
    # SENT. One program: BR rows of one batch index over CL of L (axis 0 = batch x RB row blocks,
    # axis 1 = L's chunks), so a short wide operand (B's columns reduce along K) still fills the GPU:
    # whole rows per program gave B's column pass 32 programs at 4096 x 4096 (csrc/maxplus/README.md).
    pid = tl.program_id(0).to(tl.int64)
    bat = pid // RB
    r = (pid % RB) * BR + tl.arange(0, BR)
    l_lo = tl.program_id(1).to(tl.int64) * CL
    bad = tl.zeros((BR,), tl.int32)
    for l0 in range(0, CL, BL):
        l = l_lo + l0 + tl.arange(0, BL)
        m = (r < R)[:, None] & (l < L)[None, :]
        x = tl.load(x_ptr + bat * sxb + r[:, None] * sxr + l[None, :] * sxl, mask=m, other=0)
        xi = x.to(tl.int32)
        if MIN:  # the sentinel is the maximum
            out = (xi < -Q) | ((xi > Q) & (xi != SENT))
            y = tl.minimum(xi, S_IN)
        else:
            out = (xi > Q) | ((xi < -Q) & (xi != SENT))
            y = tl.maximum(xi, S_IN)
        tl.store(y_ptr + bat * syb + r[:, None] * syr + l[None, :] * syl, y.to(x.dtype), mask=m)
        bad = tl.maximum(bad, tl.max(out.to(tl.int32), axis=1))
    # only a flagged row writes (the order of the chunks' writes cannot matter: max)
    tl.atomic_max(f_ptr + bat * R + r, bad, mask=(r < R) & (bad != 0))


_PREPARE_CHUNKS = 16  # L's chunks per row block, for 16 x the programs of whole-row blocks
_MAX_AXIS1 = 65535  # grid axis 1 (y) limit


def _int_prepare(x, k_dim, consts, minplus):
    """(x clamped to the stand-in, int32 flags of x's out-of-range rows (k_dim=-1: A's rows) or
    columns (k_dim=-2: B's columns), shaped (*x's batch, M or N)): one pass over x."""
    x3 = x.reshape(-1, *x.shape[-2:])
    y = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    sx, sy = x3.stride(), y.stride()
    if k_dim == -1:  # rows of A: reduce along its last (contiguous) dim
        R, L, strides, (br, bl) = x3.shape[1], x3.shape[2], (sx[0], sx[1], sx[2], sy[0], sy[1], sy[2]), (8, 128)
    else:  # columns of B: reduce along its rows (64 int16 columns: a 128-byte row segment a load)
        R, L, strides, (br, bl) = x3.shape[2], x3.shape[1], (sx[0], sx[2], sx[1], sy[0], sy[2], sy[1]), (64, 16)
    if interpret_mode():
        br, bl = min(br, 16), min(bl, 16)
    f = torch.zeros((x3.shape[0], R), dtype=torch.int32, device=x.device)
    rb = cdiv(R, br)
    # chunks of L: a multiple of bl, at least bl, no more than axis 1's limit of them
    cl = bl * max(cdiv(L, bl * _PREPARE_CHUNKS), cdiv(L, bl * _MAX_AXIS1), 1)
    _check_programs(x3.shape[0] * rb, "range check")
    if f.numel() and L:
        launch(int_prepare_kernel)[(x3.shape[0] * rb, cdiv(L, cl))](
            x3, y, f, R, L, rb, cl, *strides,
            Q=int_bound(x.dtype), S_IN=consts["S_IN"], SENT=int_sentinel(x.dtype, "minplus" if minplus else "maxplus"),
            MIN=minplus, BR=br, BL=bl, num_warps=4,
        )
    return y.view(x.shape), f.view(*x.shape[:-2], R)


def _int_constants(dtype, minplus):
    """IS_INT, S_IN (the sentinel's stand-in), LIMIT, SENT, MARK (the overflow marker) for the
    kernel (see the module doc); ZERO, the float semiring zero."""
    zero = float("inf") if minplus else float("-inf")
    if dtype.is_floating_point:
        return dict(IS_INT=False, S_IN=0, LIMIT=0, SENT=0, MARK=0, ZERO=zero)
    quarter = 2 ** (torch.iinfo(dtype).bits - 2)
    semiring = "minplus" if minplus else "maxplus"
    return dict(IS_INT=True, S_IN=quarter - 1 if minplus else -quarter, LIMIT=2 * int_bound(dtype),
                SENT=int_sentinel(dtype, semiring), MARK=int_overflow(dtype, semiring), ZERO=zero)


def batch_layout_ok(lead, a, b):
    """Whether a and b (or buffers of their shapes) index through one batch layout."""
    return _batch_layout(lead, a, b) is not None


def maxplus_bwd(g, idx, da, db, lead):
    """Accumulates the route-scattered dC into da and db: zeroed, contiguous float32 or
    float64 buffers (each its own) of A's and B's shapes, whose batch dims broadcast to `lead`
    through one layout (batch_layout_ok)."""
    M, N, K = g.shape[-2], g.shape[-1], da.shape[-1]
    batch = g.numel() // max(1, M * N)
    if g.numel() == 0 or K == 0:
        return
    lay = _batch_layout(lead, da, db)
    assert lay is not None, "maxplus_bwd: buffers need one batch layout (see batch_layout_ok)"
    sizes, (sa, sb, _) = lay
    args = sizes[1:] + sa + [da.stride(-2), da.stride(-1)] + sb + [db.stride(-2), db.stride(-1)]
    bm, bn = (16, 16) if interpret_mode() else (32, 128)
    grid = (batch * cdiv(M, bm) * cdiv(N, bn),)
    _check_programs(grid[0], "backward")
    launch(maxplus_bwd_kernel)[grid](g, idx, da, db, M, N, K, *args, BM=bm, BN=bn, num_warps=4)
