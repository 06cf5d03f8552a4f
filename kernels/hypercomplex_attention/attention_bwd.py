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
"""

import triton
import triton.language as tl

from geokern.kernels._common import narrow
from geokern.kernels.hypercomplex_attention.common import (dkv_tiles, dquery_tile, dvalue_tile, load_rows,
                                                           value_tile)
from geokern.kernels.retrieval.common import mm, mm_acc

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
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    DT = q_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mvalid = offs_m < Tq
    dvalid = offs_d < D
    row = bh.to(tl.int64) * Tq + offs_m
    io = row[:, None] * D + offs_d[None, :]
    iomask = mvalid[:, None] & dvalid[None, :]
    q = load_rows(q_ptr, b, h, offs_m, offs_d, sq0, sq1, sq2, sq3, mvalid, dvalid)
    qn = load_rows(qn_ptr, b, h, offs_m, offs_d, sa0, sa1, sa2, sa3, mvalid, dvalid).to(tl.float32)
    dy = tl.load(dy_ptr + io, mask=iomask, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + row, mask=mvalid, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + row, mask=mvalid, other=0.0)
    do = dvalue_tile(qn, dy, et_ptr, N, BLOCK_M, BLOCK_D).to(DT)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, VW), dtype=tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + off)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nvalid = offs_n < Tk
        k = load_rows(k_ptr, b, hk, offs_n, offs_d, sk0, sk1, sk2, sk3, nvalid, dvalid)
        keep = nvalid[None, :] & mvalid[:, None]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + off)
        p = tl.where(keep, tl.exp2(mm(q, tl.trans(k), PREC) * qk_scale - lse2[:, None]), 0.0)
        kn = load_rows(kn_ptr, b, hk, offs_n, offs_d, sb0, sb1, sb2, sb3, nvalid, dvalid).to(tl.float32)
        v = load_rows(v_ptr, b, hk, offs_n, offs_d, sv0, sv1, sv2, sv3, nvalid, dvalid).to(tl.float32)
        val = value_tile(kn, v, N, BLOCK_N, BLOCK_D).to(DT)
        dp = mm(do, tl.trans(val), PREC)
        ds = p * (dp - delta[:, None])
        dq = mm_acc(ds.to(DT), k, dq, PREC)
        acc = mm_acc(p.to(DT), val, acc, PREC)
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
    dkn, dv = dkv_tiles(dval, kn, v, N, BLOCK_N, BLOCK_D)
    io = (bhk.to(tl.int64) * Tk + offs_n)[:, None] * D + offs_d[None, :]
    iomask = nvalid[:, None] & dvalid[None, :]
    tl.store(dk_ptr + io, narrow(dk * scale, dk_ptr.dtype.element_ty), mask=iomask)
    tl.store(dkn_ptr + io, narrow(dkn, dkn_ptr.dtype.element_ty), mask=iomask)
    tl.store(dv_ptr + io, narrow(dv, dv_ptr.dtype.element_ty), mask=iomask)
