"""The forward of quaternion (N = 4) and octonion (N = 8) attention: one flash-style kernel.

Per key tile: the scores q k^T (raw q, k; log2 units), the online softmax, the values built
on chip from k^ and v (common.value_tile: conj(k^) v, or the 8 x 8 outer product per channel
for octonions, never stored), and acc += P @ values on the tensor cores. Epilogue: the
normalised average contracted with q^ (common.output_tile). Writes y and the natural-log lse.

Non-finite values. Octonions: one inf in v puts eight infinite entries into a channel's averaged
outer product, and the epilogue's GEMM and trilinear regrouping meet 0 * inf and inf - inf (NaN)
where the definition reads one infinite term per output component. Both algebras, causal: a key
hidden from some rows of a diagonal key block still enters the GEMM with p = 0, so its NaN or inf
(in v, or in k through k^) would make those rows NaN, although a hidden key contributes nothing.
Either way the block's average comes out non-finite, so a query block whose average is non-finite
anywhere (one reduction, after the key loop) is computed again by nonfinite_fwd: keys whose values
are finite through the GEMM as above, each other key's terms formed key by key for the rows that
see it only. That function is noinline so that its registers leave the key loop's allocation
alone; the key loop itself is the same as without it.
"""

import triton
import triton.language as tl

from geokern.kernels._common import mm, mm_acc, narrow
from geokern.kernels.hypercomplex import _hmul
from geokern.kernels.hypercomplex_attention.common import load_rows, output_tile, value_tile

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)  # a plain global is rejected by the compiler (not the interpreter)


@triton.jit
def hypercomplex_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, e_ptr, y_ptr, lse_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
    H, G, Tq, Tk, D, off, qk_scale,
    CAUSAL: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VW: tl.constexpr,
):
    # q, qn: [B, H, Tq, D]; k, v, kn: [B, H / G, Tk, D] (any strides); y: [B, H, Tq, D] and
    # lse: [B, H, Tq] contiguous. One program: BLOCK_M queries of one (batch, head).
    # off = Tk - Tq: query i sees keys j <= i + off when CAUSAL. qk_scale = scale * log2(e).
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 scores would change m_i's
    # type in the loop, so cast once here (nonfinite_fwd gets the cast value)
    qk_scale = tl.cast(qk_scale, tl.float32)
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
    q = load_rows(q_ptr, b, h, offs_m, offs_d, sq0, sq1, sq2, sq3, mvalid, dvalid)
    acc = tl.zeros((BLOCK_M, VW), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, _last_key(pid_m, Tk, off, CAUSAL, BLOCK_M), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nvalid = offs_n < Tk
        s = _scores(q, k_ptr, b, hk, offs_m, offs_n, offs_d, nvalid, dvalid, sk0, sk1, sk2, sk3, off, qk_scale,
                    CAUSAL, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        kn = load_rows(kn_ptr, b, hk, offs_n, offs_d, sb0, sb1, sb2, sb3, nvalid, dvalid).to(tl.float32)
        v = load_rows(v_ptr, b, hk, offs_n, offs_d, sv0, sv1, sv2, sv3, nvalid, dvalid).to(tl.float32)
        val = value_tile(kn, v, N, BLOCK_N, BLOCK_D)
        acc = mm_acc(p.to(DT), val.to(DT), acc * alpha[:, None], PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    row = bh.to(tl.int64) * Tq + offs_m
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(lse_ptr + row, lse, mask=mvalid)
    bad = tl.max(tl.where(mvalid[:, None] & ~_finite(acc), 1, 0))  # one reduction (nonfinite_fwd says why)
    if bad > 0:
        tl.debug_barrier()  # the lse stored above is read back by other threads
        nonfinite_fwd(q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, e_ptr, y_ptr, lse_ptr,
                               sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                               sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
                               pid_m, bh, H, G, Tq, Tk, D, off, qk_scale,
                               CAUSAL, N, PREC, BLOCK_M, BLOCK_N, BLOCK_D, VW)
    else:
        qn = load_rows(qn_ptr, b, h, offs_m, offs_d, sa0, sa1, sa2, sa3, mvalid, dvalid).to(tl.float32)
        y = output_tile(qn, acc, e_ptr, N, BLOCK_M, BLOCK_D)
        tl.store(y_ptr + row[:, None] * D + offs_d[None, :], narrow(y, y_ptr.dtype.element_ty),
                 mask=mvalid[:, None] & dvalid[None, :])


@triton.jit
def _last_key(pid_m, Tk, off, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """The end of the keys query block pid_m visits: keys past its last query are never read."""
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + off)
    return hi


@triton.jit
def _scores(q, k_ptr, b, hk, offs_m, offs_n, offs_d, nvalid, dvalid, sk0, sk1, sk2, sk3, off, qk_scale,
            CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """[rows, keys] scores in log2 units, -inf where a key is padded or causally hidden."""
    k = load_rows(k_ptr, b, hk, offs_n, offs_d, sk0, sk1, sk2, sk3, nvalid, dvalid)
    s = mm(q, tl.trans(k), PREC) * qk_scale
    keep = nvalid[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + off)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _finite(x):
    x = x.to(tl.float32)  # the interpreter compares 16-bit floats by their bits (NaN == NaN there)
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit(noinline=True)
def nonfinite_fwd(
    q_ptr, k_ptr, v_ptr, qn_ptr, kn_ptr, e_ptr, y_ptr, lse_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,
    pid_m, bh, H, G, Tq, Tk, D, off, qk_scale,
    CAUSAL: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VW: tl.constexpr,
):
    # The forward's query block pid_m of (batch, head) bh again, when its fast result is non-finite
    # somewhere; writes y. P from the stored lse (as the backward), exactly 0 where a key is hidden.
    # Keys whose value (conj(k^) v, or the outer products; in the dtype the tensor cores take) is
    # all finite go through the fast path's GEMM; each other key's terms are formed key by key, for
    # the rows that see it only (a hidden key's NaN or inf is never multiplied by p = 0):
    # quaternions p_ij T_j added to the average before the epilogue q^_i A_i, octonions
    # p_ij ((q^_i conj(k^_j)) v_j) with the definition's parenthesisation added to y; IEEE sums, so
    # +inf + -inf and a visible p = 0 times inf are NaN, as in the reference. The same keys as the
    # main loop. This key loop is not software-pipelined (num_stages=1): pipelined, it holds k, k^, v
    # in two shared buffers and issues the copy for key block i + 2 into block i's buffer before the
    # per-key branch, and the compiler (triton 3.6 and 3.8, float32 octonions: sm_90 TTGIR) re-reads
    # k^ and v from that buffer inside the per-key loop (a local_load there), getting the next
    # blocks' keys or zeros: the inf key's terms were lost on the GPU (test_inf_in_v_matches_reference
    # [full-f32-+inf-8]). The main kernel's loop is untouched (its PTX is the same).
    b = bh // H
    h = bh % H
    hk = h // G
    DT = q_ptr.dtype.element_ty
    R: tl.constexpr = BLOCK_M * BLOCK_D // N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mvalid = offs_m < Tq
    dvalid = offs_d < D
    row = bh.to(tl.int64) * Tq + offs_m
    q = load_rows(q_ptr, b, h, offs_m, offs_d, sq0, sq1, sq2, sq3, mvalid, dvalid)
    qn = load_rows(qn_ptr, b, h, offs_m, offs_d, sa0, sa1, sa2, sa3, mvalid, dvalid).to(tl.float32)
    lse2 = tl.load(lse_ptr + row, mask=mvalid, other=0.0) * LOG2E
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    qn8 = tl.reshape(qn, (R, N))
    conj = tl.where(offs_d % N == 0, 1.0, -1.0)
    acc = tl.zeros((BLOCK_M, VW), dtype=tl.float32)
    # the key-by-key terms' sum: quaternions in the average's space, octonions in y's
    extra = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    pinf = tl.zeros((BLOCK_M,), dtype=tl.int32)  # rows with a +inf visible score
    nan = tl.zeros((BLOCK_M,), dtype=tl.int32)  # rows with a NaN visible score
    # num_stages=1: not software-pipelined (see above)
    for start in tl.range(0, _last_key(pid_m, Tk, off, CAUSAL, BLOCK_M), BLOCK_N, num_stages=1):
        offs_n = start + tl.arange(0, BLOCK_N)
        nvalid = offs_n < Tk
        keep = nvalid[None, :] & mvalid[:, None]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + off)
        s = _scores(q, k_ptr, b, hk, offs_m, offs_n, offs_d, nvalid, dvalid, sk0, sk1, sk2, sk3, off, qk_scale,
                    CAUSAL, PREC)
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        pinf = tl.maximum(pinf, tl.max(tl.where(s == float("inf"), 1, 0), axis=1))
        nan = tl.maximum(nan, tl.max(tl.where(s != s, 1, 0), axis=1))
        kn = load_rows(kn_ptr, b, hk, offs_n, offs_d, sb0, sb1, sb2, sb3, nvalid, dvalid).to(tl.float32)
        v = load_rows(v_ptr, b, hk, offs_n, offs_d, sv0, sv1, sv2, sv3, nvalid, dvalid).to(tl.float32)
        val = value_tile(kn, v, N, BLOCK_N, BLOCK_D)
        vt = val.to(DT)
        badk = tl.max(tl.where(_finite(vt), 0, 1), axis=1) > 0  # [BLOCK_N] keys with a non-finite value
        acc = mm_acc(p.to(DT), tl.where(badk[:, None], 0.0, vt).to(DT), acc, PREC)
        if tl.max(tl.where(badk, 1, 0)) > 0:
            for jj in range(0, BLOCK_N):
                sel = offs_n == start + jj
                use = tl.max(tl.where(sel[None, :] & badk[None, :] & keep, 1, 0), axis=1) > 0  # [BLOCK_M]
                pj = tl.sum(tl.where(sel[None, :], p, 0.0), axis=1)  # column j of p
                if N == 4:
                    tj = tl.sum(tl.where(sel[:, None], val, 0.0), axis=0)  # T_j
                    term = pj[:, None] * tj[None, :]
                else:
                    kbj = tl.sum(tl.where(sel[:, None], kn, 0.0), axis=0) * conj
                    vj = tl.sum(tl.where(sel[:, None], v, 0.0), axis=0)
                    left = _hmul(qn8, tl.reshape(tl.broadcast_to(kbj[None, :], (BLOCK_M, BLOCK_D)), (R, N)), N, R)
                    prod = _hmul(left, tl.reshape(tl.broadcast_to(vj[None, :], (BLOCK_M, BLOCK_D)), (R, N)), N, R)
                    term = pj[:, None] * tl.reshape(prod, (BLOCK_M, BLOCK_D))
                extra += tl.where(use[:, None], term, 0.0)
    # logsumexp's lse where a +inf score made l_i NaN: +inf, NaN with a NaN score too (y is NaN there
    # either way: P holds a NaN); the backward reads it
    tl.debug_barrier()
    tl.store(lse_ptr + row, tl.full((BLOCK_M,), float("inf"), tl.float32), mask=mvalid & (pinf > 0) & (nan == 0))
    if N == 4:
        y = output_tile(qn, acc + extra, e_ptr, N, BLOCK_M, BLOCK_D)
    else:
        y = output_tile(qn, acc, e_ptr, N, BLOCK_M, BLOCK_D) + extra
    tl.store(y_ptr + row[:, None] * D + offs_d[None, :], narrow(y, y_ptr.dtype.element_ty),
             mask=mvalid[:, None] & dvalid[None, :])
