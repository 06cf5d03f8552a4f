"""Triton kernels for the max-plus / min-plus matrix product and its backward.

Forward (maxplus_fwd_kernel): a GEMM-shaped kernel. Each program owns a BM x BN
tile of C in registers and walks K one step at a time: it loads a BM-vector of A's
column k and a BN-vector of B's row k (cached in L1; the launcher makes A k-major on
the GPU so the column load is contiguous) and updates the tile with one add and one
max per element. A 3-D broadcast [BM, BK, BN] + tl.max would cross threads in the
reduction; this stays in each thread's registers. Programs are ordered in groups of
GROUP_M tile rows so neighbouring programs share A and B tiles in L2 (Triton's
matmul tutorial). The batch is folded into program axis 0 and indexed through a
4-dim layout with zero strides for broadcast operands (kernels/_layout.py).

Value-only, the update is max.NaN(acc, a + b) (NaN propagates). With ARGMAX a
strict comparison against the old accumulator records k (ties keep the smallest k);
with MARGIN a second accumulator keeps the runner-up: top2 = max(top2, min(top1, s)).
MIN flips every comparison (min-plus). Sums in float32 (float64 for float64 inputs).
Integer inputs (int16, int32) sum in int32: each loaded value is clamped to the stand-in
S_IN for the sentinel (-2**(bits-2) for max-plus, 2**(bits-2) - 1 for min-plus), so no
sum wraps for inputs in the documented range, and results beyond +-LIMIT (2 * INT_BOUND,
geokern.reference.maxplus) are stored as the sentinel SENT with argmax 0.

Value-only 16-bit inputs on the GPU take maxplus_fwd_packed_kernel instead: pairs of k
packed in 32-bit words, one inline-PTX add + max per pair (see there); the CPU
interpreter cannot run inline PTX, so there (CI) they take the kernel above.

Backward (maxplus_bwd_kernel): dC is scattered along the recorded route with atomic
adds into float32 buffers of A's and B's own shapes (broadcast batch dims alias one
slot, so the batch reduction happens in the same adds). The order of the adds is not
fixed, so dA / dB may differ from run to run in the last bits when several entries
share a route.
"""

import os

import torch
import triton
import triton.language as tl

from geokern.kernels._layout import MAX_DIMS, broadcast_strides, contiguous_strides, row_layout, row_offset
from geokern._backend import interpret_mode
from geokern.reference.maxplus import int_bound, int_sentinel


def _configs():
    if interpret_mode():  # the CPU interpreter: one small tile keeps CI fast
        return [triton.Config({"BM": 16, "BN": 16, "GROUP_M": 2}, num_warps=1)]
    if os.environ.get("GEOKERN_AUTOTUNE", "1") == "0":  # tests: one config, no tuning time
        return [triton.Config({"BM": 128, "BN": 128, "GROUP_M": 8}, num_warps=8)]
    out = []
    for bm, bn, w in ((128, 128, 8), (128, 128, 4), (64, 128, 4), (128, 64, 4), (64, 64, 4), (64, 64, 2)):
        out.append(triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8}, num_warps=w))
    return out


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
def _tile_ptrs(a_ptr, b_ptr, M, N, s1, s2, s3, ab0, ab1, ab2, ab3, sam, bb0, bb1, bb2, bb3, sbn,
               BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's batch, rows, cols, and pointers to its A rows / B cols at k = 0.
    Rows and cols are clamped: every load is in bounds and unmasked; stores are masked."""
    pid = tl.program_id(0).to(tl.int64)
    bat, pm, pn = _tile_of(pid, M, N, BM, BN, GROUP_M)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    a_ptrs = a_ptr + row_offset(bat, s1, s2, s3, ab0, ab1, ab2, ab3) + tl.minimum(rm, M - 1) * sam
    b_ptrs = b_ptr + row_offset(bat, s1, s2, s3, bb0, bb1, bb2, bb3) + tl.minimum(rn, N - 1) * sbn
    return bat, rm, rn, a_ptrs, b_ptrs


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


@triton.jit
def _narrow(x, dt: tl.constexpr):
    # round to nearest even, as torch does (the interpreter truncates bf16 by default)
    if dt == tl.float16 or dt == tl.bfloat16:
        return x.to(dt, fp_downcast_rounding="rtne")
    return x.to(dt)


@triton.autotune(configs=_configs(), key=["M", "N", "K", "MIN", "ARGMAX", "MARGIN"])
@triton.jit
def maxplus_fwd_kernel(
    a_ptr, b_ptr, c_ptr, idx_ptr, mg_ptr,
    M, N, K,
    s1, s2, s3,
    ab0, ab1, ab2, ab3, sam, sak,
    bb0, bb1, bb2, bb3, sbk, sbn,
    MIN: tl.constexpr, ARGMAX: tl.constexpr, MARGIN: tl.constexpr,
    IS_INT: tl.constexpr, S_IN: tl.constexpr, LIMIT: tl.constexpr, SENT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
):
    # C, argmax and margin are contiguous (batch, M, N)
    bat, rm, rn, a_ptrs, b_ptrs = _tile_ptrs(
        a_ptr, b_ptr, M, N, s1, s2, s3, ab0, ab1, ab2, ab3, sam, bb0, bb1, bb2, bb3, sbn, BM, BN, GROUP_M
    )
    ACC = tl.int32 if IS_INT else (tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32)
    ZERO = S_IN if IS_INT else (float("inf") if MIN else float("-inf"))
    top1 = tl.full((BM, BN), ZERO, ACC)
    top2 = tl.full((BM, BN), ZERO, ACC)
    idx = tl.zeros((BM, BN), tl.int32)
    for k in range(0, K):
        a = tl.load(a_ptrs).to(ACC)
        b = tl.load(b_ptrs).to(ACC)
        if IS_INT:  # the sentinel (and anything beyond the stand-in) becomes the stand-in
            if MIN:
                a = tl.minimum(a, S_IN)
                b = tl.minimum(b, S_IN)
            else:
                a = tl.maximum(a, S_IN)
                b = tl.maximum(b, S_IN)
        top1, idx, top2 = _step(a[:, None] + b[None, :], k, top1, idx, top2, MIN, ARGMAX, MARGIN)
        a_ptrs += sak
        b_ptrs += sbk
    if IS_INT:  # sums with the stand-in lie beyond +-LIMIT: the sentinel, route k = 0
        if MIN:
            dead = top1 > LIMIT
        else:
            dead = top1 < -LIMIT
        top1 = tl.where(dead, SENT, top1)
        idx = tl.where(dead, 0, idx)
    out = bat * M * N + rm[:, None] * N + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + out, _narrow(top1, c_ptr.dtype.element_ty), mask=mask)
    if ARGMAX:
        tl.store(idx_ptr + out, idx.to(tl.int64), mask=mask)
    if MARGIN:
        if MIN:
            gap = top2 - top1
        else:
            gap = top1 - top2
        gap = tl.where((top2 == ZERO) & (top1 == top1), float("inf"), gap)
        tl.store(mg_ptr + out, _narrow(gap, mg_ptr.dtype.element_ty), mask=mask)


# Packed 16-bit value-only path (GPU): one 32-bit word holds a pair (k, k + 1) of A's row
# (or B's column), low half k, and one instruction pair adds and maxes both lanes:
# add.rn.bf16x2 / .f16x2 + max.NaN (HADD2 + HMNMX2), or add.s16x2 + max.s16x2, which
# ptxas fuses into one VIADDMNMX (DPX). The lanes are collapsed once at the end. 16-bit
# sums round at every step, which loses nothing (rounding is monotone: the max of the
# rounded sums is the rounded max), so the result equals the float32 path's. KIND: 0
# bfloat16, 1 float16, 2 int16 (inputs clamped to the stand-in S_IN beforehand); STEP:
# the PTX of one step, acc = acc (+) (a + b) ($0 = $1 (+) ($2 + $3)), from _packed_step.
@triton.autotune(configs=_configs(), key=["M", "N", "KP", "MIN", "KIND"])
@triton.jit
def maxplus_fwd_packed_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, KP,
    s1, s2, s3,
    ab0, ab1, ab2, ab3, sam, sak,
    bb0, bb1, bb2, bb3, sbk, sbn,
    MIN: tl.constexpr, KIND: tl.constexpr, STEP: tl.constexpr, ZERO2: tl.constexpr, LIMIT: tl.constexpr,
    SENT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
):
    # a: int32 pairs (.., M, KP), b: (.., KP, N); C contiguous (batch, M, N)
    bat, rm, rn, a_ptrs, b_ptrs = _tile_ptrs(
        a_ptr, b_ptr, M, N, s1, s2, s3, ab0, ab1, ab2, ab3, sam, bb0, bb1, bb2, bb3, sbn, BM, BN, GROUP_M
    )
    acc = tl.full((BM, BN), ZERO2, tl.int32)
    for kp in range(0, KP):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = tl.inline_asm_elementwise(STEP, "=r,r,r,r", [acc, a[:, None], b[None, :]], dtype=tl.int32,
                                        is_pure=True, pack=1)
        a_ptrs += sak
        b_ptrs += sbk
    lo = acc.to(tl.int16)  # truncation: the low lane's bits
    hi = (acc >> 16).to(tl.int16)
    if KIND == 2:
        if MIN:
            v = tl.minimum(lo.to(tl.int32), hi.to(tl.int32))
            v = tl.where(v > LIMIT, SENT, v)
        else:
            v = tl.maximum(lo.to(tl.int32), hi.to(tl.int32))
            v = tl.where(v < -LIMIT, SENT, v)
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
    out = bat * M * N + rm[:, None] * N + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + out, v.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def maxplus_bwd_kernel(
    g_ptr, idx_ptr, da_ptr, db_ptr,
    M, N, K,
    s1, s2, s3,
    ab0, ab1, ab2, ab3, sam, sak,
    bb0, bb1, bb2, bb3, sbk, sbn,
    WANT_A: tl.constexpr, WANT_B: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    # dA[i, argmax[i, j]] += g[i, j]; dB[argmax[i, j], j] += g[i, j]; g, argmax contiguous
    pid = tl.program_id(0).to(tl.int64)
    tm = tl.cdiv(M, BM)
    tn = tl.cdiv(N, BN)
    bat = pid // (tm * tn)
    t = pid % (tm * tn)
    rm = (t // tn) * BM + tl.arange(0, BM)
    rn = (t % tn) * BN + tl.arange(0, BN)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    off = bat * M * N + rm[:, None] * N + rn[None, :]
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(da_ptr.dtype.element_ty)
    k = tl.load(idx_ptr + off, mask=mask, other=0)
    if WANT_A:
        pa = da_ptr + row_offset(bat, s1, s2, s3, ab0, ab1, ab2, ab3) + rm[:, None] * sam + k * sak
        tl.atomic_add(pa, g, mask=mask)
    if WANT_B:
        pb = db_ptr + row_offset(bat, s1, s2, s3, bb0, bb1, bb2, bb3) + k * sbk + rn[None, :] * sbn
        tl.atomic_add(pb, g, mask=mask)


def _batch_layout(lead, a, b):
    """(sizes, a batch strides, b batch strides) over the broadcast batch `lead`, or None.

    Strides are zero where an operand is broadcast; None when more than MAX_DIMS
    non-mergeable batch dims remain (the caller then copies)."""
    return row_layout(lead, [broadcast_strides(a, lead, 2), broadcast_strides(b, lead, 2), contiguous_strides(lead, 1)])


def _flat_args(lead, a, b):
    lay = _batch_layout(lead, a, b)
    if lay is None:  # rare: more than MAX_DIMS batch dims that cannot be merged
        a = a.expand(*lead, *a.shape[-2:]).contiguous()
        b = b.expand(*lead, *b.shape[-2:]).contiguous()
        lay = _batch_layout(lead, a, b)
    sizes, (sa, sb, _) = lay
    assert len(sizes) == MAX_DIMS == 4
    return a, b, sizes[1:] + sa + [a.stride(-2), a.stride(-1)] + sb + [b.stride(-2), b.stride(-1)]


def maxplus_fwd(a, b, c, idx, margin, lead, minplus, launch=None):
    """Writes C (and argmax / margin where given, else None) for a (.., M, K), b (.., K, N).

    c, idx, margin are contiguous (*lead, M, N). `launch` wraps the kernel
    (torch.library.wrap_triton inside a triton_op)."""
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = c.numel() // max(1, M * N)
    if c.numel() == 0:
        return
    if a.is_cuda and not interpret_mode() and idx is None and margin is None and a.dtype in _PACKED_KIND:
        return _fwd_packed(a, b, c, lead, minplus, launch)
    if a.is_cuda and a.stride(-2) != 1 and M > 1:
        # k-major A: the per-k column load becomes one contiguous vector (costs M*K copy)
        a = a.transpose(-1, -2).contiguous().transpose(-1, -2)
    a, b, args = _flat_args(lead, a, b)
    kernel = (launch or (lambda k: k))(maxplus_fwd_kernel)

    def grid(meta):
        return (batch * triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    kernel[grid](
        a, b, c, idx if idx is not None else c, margin if margin is not None else c,
        M, N, K, *args,
        MIN=minplus, ARGMAX=idx is not None, MARGIN=margin is not None, **int_constants(a.dtype, minplus),
    )


_PACKED_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.int16: 2}


def _packed_step(kind, minplus):
    """The PTX of one packed step for maxplus_fwd_packed_kernel."""
    add = ("add.rn.bf16x2", "add.rn.f16x2", "add.s16x2")[kind]
    best = ("min" if minplus else "max") + (".NaN.bf16x2", ".NaN.f16x2", ".s16x2")[kind]
    return "{ .reg .b32 t; %s t, $2, $3; %s $0, $1, t; }" % (add, best)


def _pairs(x, k_dim, zero):
    """x with its k dim (-1 for A, -2 for B) padded to even length with `zero`, as int32
    words of k pairs (low half k), k-major: (.., K/2, M) for A, (.., K/2, N) for B."""
    K = x.shape[k_dim]
    if K % 2:
        pad = list(x.shape)
        pad[k_dim] = 1
        x = torch.cat([x, x.new_full(pad, zero)], dim=k_dim)
    if k_dim == -1:  # (.., M, K) -> (.., K/2, M, 2)
        x = x.unflatten(-1, (-1, 2)).transpose(-3, -2)
    else:  # (.., K, N) -> (.., K/2, N, 2)
        x = x.unflatten(-2, (-1, 2)).transpose(-2, -1)
    # through 1-D: a "contiguous" tensor may keep odd strides on its size-1 dims, which view(int32) refuses
    return x.contiguous().reshape(-1).view(torch.int32).view(x.shape[:-1])


def _fwd_packed(a, b, c, lead, minplus, launch):
    """Value-only 16-bit forward through maxplus_fwd_packed_kernel (see there)."""
    M, N = a.shape[-2], b.shape[-1]
    kind = _PACKED_KIND[a.dtype]
    consts = int_constants(a.dtype, minplus)
    if kind == 2:  # the sentinel (and anything beyond the stand-in) becomes the stand-in
        s = consts["S_IN"]
        a, b = (a.clamp(max=s), b.clamp(max=s)) if minplus else (a.clamp(min=s), b.clamp(min=s))
        zero = s
    else:
        zero = float("inf") if minplus else float("-inf")
    ap = _pairs(a, -1, zero).transpose(-1, -2)  # (.., M, KP), m-contiguous
    bp = _pairs(b, -2, zero)
    # the zero pair's bits (pure Python: this runs under torch.compile's tracing too)
    half = (zero & 0xFFFF) if kind == 2 else ((0x7F80, 0x7C00)[kind] | (0 if minplus else 0x8000))
    zbits = (half << 16 | half) - (1 << 32 if half & 0x8000 else 0)
    ap, bp, args = _flat_args(lead, ap, bp)
    kernel = (launch or (lambda k: k))(maxplus_fwd_packed_kernel)
    batch = c.numel() // max(1, M * N)

    def grid(meta):
        return (batch * triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    kernel[grid](
        ap, bp, c, M, N, ap.shape[-1], *args,
        MIN=minplus, KIND=kind, STEP=_packed_step(kind, minplus), ZERO2=zbits,
        LIMIT=consts["LIMIT"], SENT=consts["SENT"],
    )


def int_constants(dtype, minplus):
    """IS_INT, S_IN (the sentinel's stand-in), LIMIT, SENT for the kernel (see the module doc)."""
    if dtype.is_floating_point:
        return dict(IS_INT=False, S_IN=0, LIMIT=0, SENT=0)
    quarter = 2 ** (torch.iinfo(dtype).bits - 2)
    sent = int_sentinel(dtype, "minplus" if minplus else "maxplus")
    return dict(IS_INT=True, S_IN=quarter - 1 if minplus else -quarter, LIMIT=2 * int_bound(dtype), SENT=sent)


def batch_layout_ok(lead, a, b):
    """Whether a and b (or buffers of their shapes) index through one batch layout."""
    return _batch_layout(lead, a, b) is not None


def maxplus_bwd(g, idx, da, db, lead, want_a=True, want_b=True, launch=None):
    """Accumulates the route-scattered dC into da and db: zeroed, contiguous float32
    (float64) buffers of A's and B's shapes, whose batch dims broadcast to `lead`
    through one layout (batch_layout_ok)."""
    M, N, K = g.shape[-2], g.shape[-1], da.shape[-1]
    batch = g.numel() // max(1, M * N)
    if g.numel() == 0 or K == 0:
        return
    lay = _batch_layout(lead, da, db)
    assert lay is not None, "maxplus_bwd: buffers need one batch layout (see batch_layout_ok)"
    _, _, args = _flat_args(lead, da, db)
    kernel = (launch or (lambda k: k))(maxplus_bwd_kernel)
    bm, bn = (16, 16) if interpret_mode() else (32, 128)
    grid = (batch * triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    kernel[grid](g, idx, da, db, M, N, K, *args, WANT_A=want_a, WANT_B=want_b, BM=bm, BN=bn, num_warps=4)
