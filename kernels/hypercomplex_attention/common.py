"""What the quaternion (N = 4) and octonion (N = 8) attention kernels share: the algebra of
the value prologue, the output epilogue and their adjoints, on register tiles.

A head row of D features is D / N channels of N consecutive components; tiles are [rows,
BLOCK_D] with BLOCK_D a power of two, so a tile reshapes to [rows * BLOCK_D / N, N] (one row
per channel) without moving data between threads' registers in the model's view. Padded
columns (d >= D) are zero on load, so padded channels contribute zero.

The "value" of key j is what the attention averages with the softmax weights:
    N = 4:  T_j = conj(k^_j) v_j                     width BLOCK_D
    N = 8:  W_j = conj(k^_j) (outer) v_j per channel  width 8 * BLOCK_D, index c * 64 + t * 8 + u
and the output of query i is, from the average A_i (M_i for octonions),
    N = 4:  y_i = q^_i A_i
    N = 8:  y_i[c, r] = sum_{s, t, u} G[r, s, t, u] q^_i[c, s] M_i[c, t, u]
with G the structure constants of (a b) c, applied as one [rows * C, 64] x [64, 64] GEMM with
E[t * 8 + u, s * 8 + r] = G[r, s, t, u] (reference.hypercomplex_attention.epilogue_matrix).
"""

import triton
import triton.language as tl

from geokern._backend import interpret_mode
from geokern.kernels._common import mm, mm_acc
from geokern.kernels.hypercomplex import _hconj, _hmul


@triton.jit
def value_tile(kn, v, N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """[ROWS, VW] float32 values of ROWS keys from k^ and v tiles [ROWS, BLOCK_D] (float32)."""
    R: tl.constexpr = ROWS * BLOCK_D // N
    kb = _hconj(tl.reshape(kn, (R, N)), N)
    if N == 4:
        return tl.reshape(_hmul(kb, tl.reshape(v, (R, N)), N, R), (ROWS, BLOCK_D))
    else:
        w = kb[:, :, None] * tl.reshape(v, (R, N))[:, None, :]
        return tl.reshape(w, (ROWS, BLOCK_D * N))


@triton.jit
def _load_e(e_ptr, N: tl.constexpr):
    r = tl.arange(0, N * N)
    return tl.load(e_ptr + r[:, None] * (N * N) + r[None, :])


@triton.jit
def _bf16_trunc(x):
    """x float32 with the low 16 bits of its encoding cleared: its leading 8 significant bits,
    exactly a bfloat16 (toward zero, so it never overflows to inf as rounding near float32's
    largest values would)."""
    return (x.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _split3(a):
    """a float32 = hi + mid + lo, three bfloat16 (see _emm)."""
    hi = _bf16_trunc(a)
    r1 = a - hi  # exact: the low 16 bits of a's significand
    mid = _bf16_trunc(r1)
    return hi.to(tl.bfloat16), mid.to(tl.bfloat16), (r1 - mid).to(tl.bfloat16)


# the split's bfloat16 dots: tensor cores on the GPU, float32 copies under the interpreter (mm)
_SPLIT_PREC = tl.constexpr("upcast" if interpret_mode() else "tf32")


@triton.jit
def _emm(a, e_ptr, N: tl.constexpr):
    """a [rows, N * N] float32 @ E (E's entries +-1 / 0) as three bfloat16 tensor-core GEMMs with
    float32 accumulation. a = hi + mid + lo exactly: hi = a truncated to 8 significant bits, mid the
    remainder (at most 16 significant bits) truncated likewise, lo what is left (at most 8 bits).
    Exact for |a| >= 2^-110; below, pieces under float32's normal range can be lost (bfloat16's
    subnormal floor, flushing casts): an absolute error < 2^-126.
    E is exact in bfloat16, so every product is exact and only the float32 accumulation rounds, as
    in an FMA GEMM. Why not the float32 ("ieee") dot: it is an FMA GEMM holding both operands in
    registers, and for the octonion tiles (rows = BLOCK_M * BLOCK_D / 8, 64 columns) that demand is
    far above 255 registers, where ptxas gives up and allocates 32 registers with kilobytes of
    local-memory stack per thread (slow, and the stack is reserved for every resident thread of
    every SM in each CUDA context). The interpreter runs the same split (only its dot differs, mm's "upcast")."""
    e = _load_e(e_ptr, N).to(tl.bfloat16)
    hi, mid, lo = _split3(a)
    z = mm(lo, e, _SPLIT_PREC)  # smallest first
    z = mm_acc(mid, e, z, _SPLIT_PREC)
    return mm_acc(hi, e, z, _SPLIT_PREC)


@triton.jit
def output_tile(qn, acc, e_ptr, N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """y [ROWS, BLOCK_D] float32 from q^ [ROWS, BLOCK_D] and the averaged values acc [ROWS, VW]."""
    R: tl.constexpr = ROWS * BLOCK_D // N
    if N == 4:
        return tl.reshape(_hmul(tl.reshape(qn, (R, N)), tl.reshape(acc, (R, N)), N, R), (ROWS, BLOCK_D))
    else:
        z = _emm(tl.reshape(acc, (R, N * N)), e_ptr, N)  # [R, s * 8 + r]
        z = tl.reshape(z, (R, N, N))
        y = tl.sum(tl.reshape(qn, (R, N))[:, :, None] * z, axis=1)
        return tl.reshape(y, (ROWS, BLOCK_D))


@triton.jit
def dvalue_tile(qn, dy, et_ptr, N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradient of the averaged values [ROWS, VW] from dy [ROWS, BLOCK_D] (float32):
    N = 4: dA = conj(q^) dy; N = 8: dM[c, t, u] = sum_{r, s} G[r, s, t, u] q^[c, s] dy[c, r]
    (one GEMM with E^T, et_ptr)."""
    R: tl.constexpr = ROWS * BLOCK_D // N
    if N == 4:
        return tl.reshape(_hmul(_hconj(tl.reshape(qn, (R, N)), N), tl.reshape(dy, (R, N)), N, R), (ROWS, BLOCK_D))
    else:
        x = tl.reshape(qn, (R, N))[:, :, None] * tl.reshape(dy, (R, N))[:, None, :]  # [R, s, r]
        dm = _emm(tl.reshape(x, (R, N * N)), et_ptr, N)
        return tl.reshape(dm, (ROWS, BLOCK_D * N))


@triton.jit
def dquery_tile(dy, acc, e_ptr, N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """d q^ [ROWS, BLOCK_D] from dy and the averaged values acc: N = 4: dy conj(A);
    N = 8: sum_{r, t, u} G[r, s, t, u] dy[c, r] M[c, t, u]."""
    R: tl.constexpr = ROWS * BLOCK_D // N
    if N == 4:
        return tl.reshape(_hmul(tl.reshape(dy, (R, N)), _hconj(tl.reshape(acc, (R, N)), N), N, R), (ROWS, BLOCK_D))
    else:
        z = tl.reshape(_emm(tl.reshape(acc, (R, N * N)), e_ptr, N), (R, N, N))
        return tl.reshape(tl.sum(z * tl.reshape(dy, (R, N))[:, None, :], axis=2), (ROWS, BLOCK_D))


@triton.jit
def dkv_tiles(dval, kn, v, N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(d k^, dv) [ROWS, BLOCK_D] from the values' gradient dval [ROWS, VW] (the adjoint of
    value_tile): N = 4: T = conj(k^) v gives d k^ = v conj(dT), dv = k^ dT; N = 8: W = kb (outer) v
    gives dkb = dW v, dv = dW^T kb, d k^ = conj(dkb)."""
    R: tl.constexpr = ROWS * BLOCK_D // N
    k4 = tl.reshape(kn, (R, N))
    v4 = tl.reshape(v, (R, N))
    if N == 4:
        dt = tl.reshape(dval, (R, N))
        dk = _hmul(v4, _hconj(dt, N), N, R)
        dv = _hmul(k4, dt, N, R)
    else:
        dw = tl.reshape(dval, (R, N, N))
        dk = _hconj(tl.sum(dw * v4[:, None, :], axis=2), N)
        dv = tl.sum(dw * _hconj(k4, N)[:, :, None], axis=1)
    return tl.reshape(dk, (ROWS, BLOCK_D)), tl.reshape(dv, (ROWS, BLOCK_D))


@triton.jit
def load_rows(ptr, b, h, rows, cols, s0, s1, s2, s3, rvalid, cvalid):
    """[len(rows), len(cols)] tile of head (b, h) of a (B, H, T, D) tensor (any strides)."""
    p = ptr + b.to(tl.int64) * s0 + h.to(tl.int64) * s1 + rows[:, None].to(tl.int64) * s2 + cols[None, :] * s3
    return tl.load(p, mask=rvalid[:, None] & cvalid[None, :], other=0.0)
