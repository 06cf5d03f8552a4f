"""The backward of quaternion / octonion attention, recomputed from the forward's lse as
flash-attention does, in two kernels without atomics:

- dq: one program per query block walks its keys: P from lse, the values rebuilt on chip,
  dP = dO' values^T with dO' the averaged values' gradient (common.dvalue_tile of dy and q^),
  dS = P (dP - delta), dq += dS k; and the average itself (acc += P values) for
  d q^ = common.dquery_tile(dy, acc) in the epilogue.
- dkdv: one program per key block (of a kv head) walks the queries of every head of its
  group: dvalues += P^T dO', dk += dS^T q; epilogue d k^, dv = common.dkv_tiles.
delta_i = sum_j P_ij dP_ij = <dO'_i, avg_i> = <dy_i, y_i> (the epilogue is linear in the
average), computed by the launcher from dy and y.

Causal masking and non-finite inputs: a hidden (query, key) pair has P = dS = 0, but the GEMMs
still multiply them by the key's k and values (dq kernel) or the row's q and dO' (dkdv kernel), so
a NaN or inf there would reach rows (keys) it is hidden from. A causal program whose result comes
out non-finite (one reduction after its loop) recomputes its block noinline (nonfinite_dq,
nonfinite_dkdv): the non-finite keys (query rows) are left out of the GEMMs and their terms added
one by one for the pairs that are visible. The loops are unchanged.
"""

import triton
import triton.language as tl

from geokern.kernels._common import mm, mm_acc, narrow
from geokern.kernels.hypercomplex_attention.common import (dkv_tiles, dquery_tile, dvalue_tile, load_rows,
                                                           value_tile)

LOG2E = tl.constexpr(1.4426950408889634)  # a plain global is rejected by the compiler (not the interpreter)


@triton.jit
def hypercomplex_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, e_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, dq_ptr, dqn_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
    H, G, Tq, Tk, D, off, qk_scale, scale,
    CAUSAL: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VW: tl.constexpr,
):
    # as the forward; dy, dq, dqn: [B, H, Tq, D] contiguous, lse, delta: [B, H, Tq] float32.
    # One program: BLOCK_M queries of one (batch, head) -> dq (score path) and d q^ (rotor path).
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into P, dS and the
    # loop state (_bad_column_terms' accumulators), so cast once here (nonfinite_dq gets these)
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hk = bh % H // G
    DT = q_ptr.dtype.element_ty
    # the stores' offsets come from a helper that takes no pointer (_dq_offsets says why)
    offs_m, offs_d, mvalid, dvalid, row, io, iomask = _dq_offsets(pid_m, bh, Tq, D, BLOCK_M, BLOCK_D)
    q, qn, dy, lse2, delta, do = _dq_rows(q_ptr, qn_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, sq0, sq1, sq2, sq3,
                                          sa0, sa1, sa2, sa3, bh, H, D, offs_m, offs_d, mvalid, dvalid, row, io,
                                          iomask, N, BLOCK_M, BLOCK_D)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, VW), dtype=tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + off)
    for start in range(0, hi, BLOCK_N):
        offs_n, keep, k, p, kn, v = _dq_keys(k_ptr, kn_ptr, v_ptr, sk0, sk1, sk2, sk3, sb0, sb1, sb2, sb3,
                                             sv0, sv1, sv2, sv3, q, lse2, b, hk, start, offs_m, offs_d, mvalid,
                                             dvalid, Tk, off, qk_scale, CAUSAL, PREC, BLOCK_N)
        val = value_tile(kn, v, N, BLOCK_N, BLOCK_D).to(DT)
        dp = mm(do, tl.trans(val), PREC)
        ds = p * (dp - delta[:, None])
        dq = mm_acc(ds.to(DT), k, dq, PREC)
        acc = mm_acc(p.to(DT), val, acc, PREC)
    bad = 0
    if CAUSAL:  # one reduction per program (nonfinite_dq says why)
        bad = (tl.max(tl.where(mvalid[:, None] & ~_finite(dq), 1, 0))
               + tl.max(tl.where(mvalid[:, None] & ~_finite(acc), 1, 0)))
    if bad > 0:
        nonfinite_dq(q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, e_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, dq_ptr, dqn_ptr,
                     sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                     sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
                     pid_m, bh, H, G, Tq, Tk, D, off, qk_scale, scale,
                     CAUSAL, N, PREC, BLOCK_M, BLOCK_N, BLOCK_D, VW)
    else:
        dqn = dquery_tile(dy, acc, e_ptr, N, BLOCK_M, BLOCK_D)
        tl.store(dq_ptr + io, narrow(dq * scale, dq_ptr.dtype.element_ty), mask=iomask)
        tl.store(dqn_ptr + io, narrow(dqn, dqn_ptr.dtype.element_ty), mask=iomask)


@triton.jit
def hypercomplex_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, dk_ptr, dkn_ptr, dv_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
    H, G, Tq, Tk, D, off, qk_scale, scale,
    CAUSAL: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VW: tl.constexpr,
):
    # as the forward; dk, dkn, dv: [B, H / G, Tk, D] contiguous. One program: BLOCK_N keys of one
    # (batch, kv head), summed over the G query heads that read them (no atomics).
    # inductor passes Python floats as fp64 (eager Triton: fp32): cast once, as the dq kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    Hk = H // G
    b = bhk // Hk
    hk = bhk % Hk
    DT = q_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nvalid = offs_n < Tk
    dvalid = offs_d < D
    k = load_rows(k_ptr, b, hk, offs_n, offs_d, sk0, sk1, sk2, sk3, nvalid, dvalid)
    kn = load_rows(kn_ptr, b, hk, offs_n, offs_d, sb0, sb1, sb2, sb3, nvalid, dvalid).to(tl.float32)
    v = load_rows(v_ptr, b, hk, offs_n, offs_d, sv0, sv1, sv2, sv3, nvalid, dvalid).to(tl.float32)
    val = value_tile(kn, v, N, BLOCK_N, BLOCK_D).to(DT)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dval = tl.zeros((BLOCK_N, VW), dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries before the block's first key minus off see none of it
        lo = tl.maximum(pid_n * BLOCK_N - off, 0) // BLOCK_M * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        for start in range(lo, Tq, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            mvalid = offs_m < Tq
            row = (b * H + h).to(tl.int64) * Tq + offs_m
            q = load_rows(q_ptr, b, h, offs_m, offs_d, sq0, sq1, sq2, sq3, mvalid, dvalid)
            qn = load_rows(qn_ptr, b, h, offs_m, offs_d, sa0, sa1, sa2, sa3, mvalid, dvalid).to(tl.float32)
            dy = tl.load(dy_ptr + row[:, None] * D + offs_d[None, :], mask=mvalid[:, None] & dvalid[None, :],
                         other=0.0).to(tl.float32)
            lse2 = tl.load(lse_ptr + row, mask=mvalid, other=0.0) * LOG2E
            delta = tl.load(delta_ptr + row, mask=mvalid, other=0.0)
            do = dvalue_tile(qn, dy, et_ptr, N, BLOCK_M, BLOCK_D).to(DT)
            keep = nvalid[:, None] & mvalid[None, :]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + off)
            pt = tl.where(keep, tl.exp2(mm(k, tl.trans(q), PREC) * qk_scale - lse2[None, :]), 0.0)
            dval = mm_acc(pt.to(DT), do, dval, PREC)
            dpt = mm(val, tl.trans(do), PREC)
            dst = pt * (dpt - delta[None, :])
            dk = mm_acc(dst.to(DT), q, dk, PREC)
    bad = 0
    if CAUSAL:  # one reduction per program (nonfinite_dkdv says why)
        bad = (tl.max(tl.where(nvalid[:, None] & ~_finite(dk), 1, 0))
               + tl.max(tl.where(nvalid[:, None] & ~_finite(dval), 1, 0)))
    if bad > 0:
        nonfinite_dkdv(q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, dk_ptr, dkn_ptr,
                       dv_ptr, sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                       sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
                       pid_n, bhk, H, G, Tq, Tk, D, off, qk_scale, scale,
                       CAUSAL, N, PREC, BLOCK_M, BLOCK_N, BLOCK_D, VW)
    else:
        _store_dkdv(dk, dval, kn, v, dk_ptr, dkn_ptr, dv_ptr, bhk, offs_n, offs_d, nvalid, dvalid, Tk, D, scale,
                    N, BLOCK_N, BLOCK_D)


@triton.jit
def _dq_offsets(pid_m, bh, Tq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A dq program's query rows: offsets, masks, the rows of lse / delta and the offsets io (mask
    iomask) of dy, dq and d q^. Apart from _dq_rows, which takes pointers: torch.compile's analysis
    of a user kernel's TTIR counts every argument of a call whose result reaches a stored-to address
    as written, so offsets returned by a helper that took q_ptr made q (and q^, dy, lse, delta, E^T)
    look written: functionalization then copied the results back into q, a leaf requiring grad
    under torch.compile ("a leaf Variable that requires grad is being used in an in-place
    operation"; test_hypercomplex_attention.py checks the analysis on CPU)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mvalid = offs_m < Tq
    dvalid = offs_d < D
    row = bh.to(tl.int64) * Tq + offs_m
    io = row[:, None] * D + offs_d[None, :]
    iomask = mvalid[:, None] & dvalid[None, :]
    return offs_m, offs_d, mvalid, dvalid, row, io, iomask


@triton.jit
def _dq_rows(q_ptr, qn_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, sq0, sq1, sq2, sq3, sa0, sa1, sa2, sa3, bh, H, D,
             offs_m, offs_d, mvalid, dvalid, row, io, iomask, N: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """A dq program's query rows (_dq_offsets): q, q^, dy, lse (log2 units), delta and dO'."""
    b = bh // H
    h = bh % H
    q = load_rows(q_ptr, b, h, offs_m, offs_d, sq0, sq1, sq2, sq3, mvalid, dvalid)
    qn = load_rows(qn_ptr, b, h, offs_m, offs_d, sa0, sa1, sa2, sa3, mvalid, dvalid).to(tl.float32)
    dy = tl.load(dy_ptr + io, mask=iomask, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + row, mask=mvalid, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + row, mask=mvalid, other=0.0)
    do = dvalue_tile(qn, dy, et_ptr, N, BLOCK_M, BLOCK_D).to(q_ptr.dtype.element_ty)
    return q, qn, dy, lse2, delta, do


@triton.jit
def _dq_keys(k_ptr, kn_ptr, v_ptr, sk0, sk1, sk2, sk3, sb0, sb1, sb2, sb3, sv0, sv1, sv2, sv3, q, lse2, b, hk, start,
             offs_m, offs_d, mvalid, dvalid, Tk, off, qk_scale, CAUSAL: tl.constexpr, PREC: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """The key block at start of a dq program: offsets, the visible pairs, k, P (0 where hidden),
    k^ and v (float32)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    nvalid = offs_n < Tk
    k = load_rows(k_ptr, b, hk, offs_n, offs_d, sk0, sk1, sk2, sk3, nvalid, dvalid)
    keep = nvalid[None, :] & mvalid[:, None]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + off)
    p = tl.where(keep, tl.exp2(mm(q, tl.trans(k), PREC) * qk_scale - lse2[:, None]), 0.0)
    kn = load_rows(kn_ptr, b, hk, offs_n, offs_d, sb0, sb1, sb2, sb3, nvalid, dvalid).to(tl.float32)
    v = load_rows(v_ptr, b, hk, offs_n, offs_d, sv0, sv1, sv2, sv3, nvalid, dvalid).to(tl.float32)
    return offs_n, keep, k, p, kn, v


@triton.jit
def _finite(x):
    x = x.to(tl.float32)  # the interpreter compares 16-bit floats by their bits (NaN == NaN there)
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _gemm_operand(x):
    """x with its NaN and inf entries zeroed, in x's own layout (abs(x) < inf, not _finite: the
    compiler would share _finite's mask, which badq has in dO's layout). Selecting q's bad rows by
    badq instead put q into dO's wider [rows, 8 BLOCK_D] layout before the dk GEMM's store into
    swizzled shared memory, the probable cause of a wrong 16-bit dk on the H100 (README.md beside
    this file; test_kernels_compile.py checks no such operand is back)."""
    return tl.where(tl.abs(x.to(tl.float32)) < float("inf"), x, 0.0).to(x.dtype)


@triton.jit
def _bad_column_terms(a, b, wa, wb, xa, xb, offs, start, bad, keep, COLS: tl.constexpr):
    """a += wa[:, c] (outer) xa[c, :] and b += wb[:, c] (outer) xb[c, :] for each column c of the
    block (index offs, from start) with bad[c], in the rows where keep[:, c] only: the terms the
    GEMMs left out, one column at a time, so that a NaN or inf in xa / xb never meets a weight
    of a pair that keep hides. dq: columns are keys (wa, wb = dS, P; xa, xb = k, values); dkdv:
    columns are query rows (wa, wb = P^T, dS^T; xa, xb = dO', q)."""
    for c in range(0, COLS):
        sel = offs == start + c
        use = tl.max(tl.where(sel[None, :] & bad[None, :] & keep, 1, 0), axis=1) > 0
        wac = tl.sum(tl.where(sel[None, :], wa, 0.0), axis=1)
        wbc = tl.sum(tl.where(sel[None, :], wb, 0.0), axis=1)
        xac = tl.sum(tl.where(sel[:, None], xa, 0.0), axis=0)
        xbc = tl.sum(tl.where(sel[:, None], xb, 0.0), axis=0)
        a += tl.where(use[:, None], wac[:, None] * xac[None, :], 0.0)
        b += tl.where(use[:, None], wbc[:, None] * xbc[None, :], 0.0)
    return a, b


@triton.jit
def _store_dkdv(dk, dval, kn, v, dk_ptr, dkn_ptr, dv_ptr, bhk, offs_n, offs_d, nvalid, dvalid, Tk, D, scale,
                N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    dkn, dv = dkv_tiles(dval, kn, v, N, BLOCK_N, BLOCK_D)
    io = (bhk.to(tl.int64) * Tk + offs_n)[:, None] * D + offs_d[None, :]
    iomask = nvalid[:, None] & dvalid[None, :]
    tl.store(dk_ptr + io, narrow(dk * scale, dk_ptr.dtype.element_ty), mask=iomask)
    tl.store(dkn_ptr + io, narrow(dkn, dkn_ptr.dtype.element_ty), mask=iomask)
    tl.store(dv_ptr + io, narrow(dv, dv_ptr.dtype.element_ty), mask=iomask)


@triton.jit(noinline=True)
def nonfinite_dq(
    q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, e_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, dq_ptr, dqn_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
    pid_m, bh, H, G, Tq, Tk, D, off, qk_scale, scale,
    CAUSAL: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VW: tl.constexpr,
):
    # The dq kernel's query block again when its dq or average came out non-finite (causal only):
    # a key whose k or value (in the tensor cores' dtype) holds NaN or inf is left out of the GEMMs
    # and its terms ds_ij k_j, p_ij value_j are added key by key for the rows that see it only, so a
    # hidden key's NaN or inf never meets p = 0 or ds = 0 (which the GEMMs would make NaN); dS is
    # selected to 0 where a key is hidden. Visible keys: as the fast path. Writes dq and d q^.
    b = bh // H
    hk = bh % H // G
    DT = q_ptr.dtype.element_ty
    # the stores' offsets come from a helper that takes no pointer (_dq_offsets says why)
    offs_m, offs_d, mvalid, dvalid, row, io, iomask = _dq_offsets(pid_m, bh, Tq, D, BLOCK_M, BLOCK_D)
    q, qn, dy, lse2, delta, do = _dq_rows(q_ptr, qn_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, sq0, sq1, sq2, sq3,
                                          sa0, sa1, sa2, sa3, bh, H, D, offs_m, offs_d, mvalid, dvalid, row, io,
                                          iomask, N, BLOCK_M, BLOCK_D)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, VW), dtype=tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + off)
    for start in range(0, hi, BLOCK_N):
        offs_n, keep, k, p, kn, v = _dq_keys(k_ptr, kn_ptr, v_ptr, sk0, sk1, sk2, sk3, sb0, sb1, sb2, sb3,
                                             sv0, sv1, sv2, sv3, q, lse2, b, hk, start, offs_m, offs_d, mvalid,
                                             dvalid, Tk, off, qk_scale, CAUSAL, PREC, BLOCK_N)
        valf = value_tile(kn, v, N, BLOCK_N, BLOCK_D)
        val = valf.to(DT)
        badk = (tl.max(tl.where(_finite(val), 0, 1), axis=1) + tl.max(tl.where(_finite(k), 0, 1), axis=1)) > 0
        dp = mm(do, tl.trans(val), PREC)
        ds = tl.where(keep, p * (dp - delta[:, None]), 0.0)
        dq = mm_acc(ds.to(DT), tl.where(badk[:, None], 0.0, k).to(DT), dq, PREC)
        acc = mm_acc(p.to(DT), tl.where(badk[:, None], 0.0, val).to(DT), acc, PREC)
        if tl.max(tl.where(badk, 1, 0)) > 0:
            dq, acc = _bad_column_terms(dq, acc, ds, p, k.to(tl.float32), valf, offs_n, start, badk, keep, BLOCK_N)
    dqn = dquery_tile(dy, acc, e_ptr, N, BLOCK_M, BLOCK_D)
    tl.store(dq_ptr + io, narrow(dq * scale, dq_ptr.dtype.element_ty), mask=iomask)
    tl.store(dqn_ptr + io, narrow(dqn, dqn_ptr.dtype.element_ty), mask=iomask)


@triton.jit(noinline=True)
def nonfinite_dkdv(
    q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, et_ptr, dy_ptr, lse_ptr, delta_ptr, dk_ptr, dkn_ptr, dv_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
    pid_n, bhk, H, G, Tq, Tk, D, off, qk_scale, scale,
    CAUSAL: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VW: tl.constexpr,
):
    # The dkdv kernel's key block again when its dk or values' gradient came out non-finite (causal
    # only), the mirror of nonfinite_dq: a query row whose q or averaged values' gradient dO' holds
    # NaN or inf is left out of the GEMMs and its terms dS_ji q_i, P_ji dO'_i are added row by row for
    # the keys it sees only; dS and P are selected to 0 where a key is hidden (a row's NaN lse or
    # delta never meets them). Writes dk, d k^, dv.
    Hk = H // G
    b = bhk // Hk
    hk = bhk % Hk
    DT = q_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nvalid = offs_n < Tk
    dvalid = offs_d < D
    k = load_rows(k_ptr, b, hk, offs_n, offs_d, sk0, sk1, sk2, sk3, nvalid, dvalid)
    kn = load_rows(kn_ptr, b, hk, offs_n, offs_d, sb0, sb1, sb2, sb3, nvalid, dvalid).to(tl.float32)
    v = load_rows(v_ptr, b, hk, offs_n, offs_d, sv0, sv1, sv2, sv3, nvalid, dvalid).to(tl.float32)
    val = value_tile(kn, v, N, BLOCK_N, BLOCK_D).to(DT)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dval = tl.zeros((BLOCK_N, VW), dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - off, 0) // BLOCK_M * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        for start in range(lo, Tq, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            mvalid = offs_m < Tq
            row = (b * H + h).to(tl.int64) * Tq + offs_m
            q = load_rows(q_ptr, b, h, offs_m, offs_d, sq0, sq1, sq2, sq3, mvalid, dvalid)
            qn = load_rows(qn_ptr, b, h, offs_m, offs_d, sa0, sa1, sa2, sa3, mvalid, dvalid).to(tl.float32)
            dy = tl.load(dy_ptr + row[:, None] * D + offs_d[None, :], mask=mvalid[:, None] & dvalid[None, :],
                         other=0.0).to(tl.float32)
            lse2 = tl.load(lse_ptr + row, mask=mvalid, other=0.0) * LOG2E
            delta = tl.load(delta_ptr + row, mask=mvalid, other=0.0)
            dof = dvalue_tile(qn, dy, et_ptr, N, BLOCK_M, BLOCK_D)
            do = dof.to(DT)
            keep = nvalid[:, None] & mvalid[None, :]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + off)
            pt = tl.where(keep, tl.exp2(mm(k, tl.trans(q), PREC) * qk_scale - lse2[None, :]), 0.0)
            badq = (tl.max(tl.where(_finite(do), 0, 1), axis=1) + tl.max(tl.where(_finite(q), 0, 1), axis=1)) > 0
            # the bad rows leave the GEMMs through their weights' columns (P^T, dS^T zeroed there) and
            # operands whose non-finite entries are zeroed elementwise, never through a select of q's
            # rows by badq (_gemm_operand says why)
            good = keep & ~badq[None, :]
            dval = mm_acc(tl.where(good, pt, 0.0).to(DT), _gemm_operand(do), dval, PREC)
            dpt = mm(val, tl.trans(do), PREC)
            dst = tl.where(keep, pt * (dpt - delta[None, :]), 0.0)
            dk = mm_acc(tl.where(good, dst, 0.0).to(DT), _gemm_operand(q), dk, PREC)
            if tl.max(tl.where(badq, 1, 0)) > 0:
                dval, dk = _bad_column_terms(dval, dk, pt, dst, dof, q.to(tl.float32), offs_m, start, badq, keep,
                                             BLOCK_M)
    _store_dkdv(dk, dval, kn, v, dk_ptr, dkn_ptr, dv_ptr, bhk, offs_n, offs_d, nvalid, dvalid, Tk, D, scale,
                N, BLOCK_N, BLOCK_D)
