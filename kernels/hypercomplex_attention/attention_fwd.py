"""The forward of quaternion (N = 4) and octonion (N = 8) attention: one flash-style kernel.

Per key tile: the scores q k^T (raw q, k; log2 units), the online softmax, the values built
on chip from k^ and v (common.value_tile: conj(k^) v, or the 8 x 8 outer product per channel
for octonions, never stored), and acc += P @ values on the tensor cores. Epilogue: the
normalised average contracted with q^ (common.output_tile). Writes y and the natural-log lse.
"""

import triton
import triton.language as tl

from geokern.kernels._common import narrow
from geokern.kernels.hypercomplex_attention.common import load_rows, output_tile, value_tile
from geokern.kernels.retrieval.common import mm, mm_acc

LN2 = tl.constexpr(0.6931471805599453)  # a plain global is rejected by the compiler (not the interpreter)


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
    hi = Tk
    if CAUSAL:  # keys past the block's last query are never visited
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + off)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nvalid = offs_n < Tk
        k = load_rows(k_ptr, b, hk, offs_n, offs_d, sk0, sk1, sk2, sk3, nvalid, dvalid)
        s = mm(q, tl.trans(k), PREC) * qk_scale
        keep = nvalid[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + off)
        s = tl.where(keep, s, float("-inf"))
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
    qn = load_rows(qn_ptr, b, h, offs_m, offs_d, sa0, sa1, sa2, sa3, mvalid, dvalid).to(tl.float32)
    y = output_tile(qn, acc, e_ptr, N, BLOCK_M, BLOCK_D)
    row = bh.to(tl.int64) * Tq + offs_m
    tl.store(y_ptr + row[:, None] * D + offs_d[None, :], narrow(y, y_ptr.dtype.element_ty),
             mask=mvalid[:, None] & dvalid[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(lse_ptr + row, lse, mask=mvalid)
