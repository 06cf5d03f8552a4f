"""Triton kernels for quaternion (n = 4) and octonion (n = 8) products and conjugates.

Memory-bound elementwise kernels. A program handles BLOCK rows as one [BLOCK, n]
tile, so each row's components are contiguous in a thread's registers (16-byte loads
for float32 quaternions); tl.split / tl.join move between the tile and its n
component vectors. Broadcast and strided operands index through a row layout
(kernels/_layout.py) instead of being copied. Arithmetic in float32 (float64 for
float64 inputs). Notes: csrc/hypercomplex/README.md, section Triton.
"""

import triton
import triton.language as tl

from geokern.kernels._common import cdiv, launch, narrow
from geokern.kernels._layout import layout_for, row_offset


@triton.jit
def _split4(x, BLOCK: tl.constexpr):
    # [BLOCK, 4] -> 4 x [BLOCK]; reshape gives [r, i, j] = x[r, 2i + j]
    e, o = tl.split(tl.reshape(x, (BLOCK, 2, 2)))
    c0, c2 = tl.split(e)
    c1, c3 = tl.split(o)
    return c0, c1, c2, c3


@triton.jit
def _join4(c0, c1, c2, c3, BLOCK: tl.constexpr):
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BLOCK, 4))


@triton.jit
def _split8(x, BLOCK: tl.constexpr):
    # [BLOCK, 8] -> [BLOCK, 2, 4]: first half (a) and second half (b) of each octonion
    x = tl.reshape(x, (BLOCK, 2, 4))
    x = tl.permute(x, (0, 2, 1))
    a, b = tl.split(x)
    a0, a1, a2, a3 = _split4(a, BLOCK)
    b0, b1, b2, b3 = _split4(b, BLOCK)
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK: tl.constexpr):
    a = _join4(c0, c1, c2, c3, BLOCK)
    b = _join4(c4, c5, c6, c7, BLOCK)
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (BLOCK, 8))


@triton.jit
def _qmul(aw, ax, ay, az, bw, bx, by, bz):
    return (
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    )


@triton.jit
def _omul(x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5, y6, y7):
    # Cayley-Dickson: (a, b)(c, d) = (a c - conj(d) b, d a + b conj(c))
    p0, p1, p2, p3 = _qmul(x0, x1, x2, x3, y0, y1, y2, y3)
    q0, q1, q2, q3 = _qmul(y4, -y5, -y6, -y7, x4, x5, x6, x7)
    r0, r1, r2, r3 = _qmul(y4, y5, y6, y7, x0, x1, x2, x3)
    s0, s1, s2, s3 = _qmul(x4, x5, x6, x7, y0, -y1, -y2, -y3)
    return p0 - q0, p1 - q1, p2 - q2, p3 - q3, r0 + s0, r1 + s1, r2 + s2, r3 + s3


@triton.jit
def _hmul(x, y, N: tl.constexpr, BLOCK: tl.constexpr):
    """Product of two [BLOCK, N] tiles."""
    if N == 4:
        a0, a1, a2, a3 = _split4(x, BLOCK)
        b0, b1, b2, b3 = _split4(y, BLOCK)
        c0, c1, c2, c3 = _qmul(a0, a1, a2, a3, b0, b1, b2, b3)
        return _join4(c0, c1, c2, c3, BLOCK)
    else:
        a0, a1, a2, a3, a4, a5, a6, a7 = _split8(x, BLOCK)
        b0, b1, b2, b3, b4, b5, b6, b7 = _split8(y, BLOCK)
        c0, c1, c2, c3, c4, c5, c6, c7 = _omul(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7)
        return _join8(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK)


@triton.jit
def _hconj(x, N: tl.constexpr):
    cols = tl.arange(0, N)[None, :]
    return tl.where(cols == 0, x, -x)


@triton.jit
def _offsets(rows, s1, s2, s3, xs0, xs1, xs2, xs3, x_comp, N: tl.constexpr, DENSE: tl.constexpr):
    """[BLOCK, N] element offsets of rows `rows` of one operand: contiguous (DENSE) or
    through its row layout (broadcast / strided, component stride x_comp)."""
    cols = tl.arange(0, N)
    if DENSE:
        return rows[:, None] * N + cols[None, :]
    return row_offset(rows, s1, s2, s3, xs0, xs1, xs2, xs3)[:, None] + cols[None, :] * x_comp


@triton.jit
def hypercomplex_mul_fwd_kernel(
    a_ptr, b_ptr, c_ptr, rows_total,
    s1, s2, s3,
    as0, as1, as2, as3, a_comp,
    bs0, bs1, bs2, bs3, b_comp,
    N: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr,
):
    # a, b: [..., N] broadcasting to rows_total rows (any strides); c: [rows_total, N] contiguous.
    # One program: rows [pid * BLOCK, +BLOCK) as [BLOCK, N] tiles, c = a b.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < rows_total)[:, None]
    ACC = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(a_ptr + _offsets(rows, s1, s2, s3, as0, as1, as2, as3, a_comp, N, DENSE), mask=mask).to(ACC)
    y = tl.load(b_ptr + _offsets(rows, s1, s2, s3, bs0, bs1, bs2, bs3, b_comp, N, DENSE), mask=mask).to(ACC)
    z = _hmul(x, y, N, BLOCK)
    out = rows[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(c_ptr + out, narrow(z, c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def hypercomplex_conj_fwd_kernel(
    a_ptr, c_ptr, rows_total,
    s1, s2, s3,
    as0, as1, as2, as3, a_comp,
    N: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr,
):
    # a: [rows_total, N] (any strides); c: [rows_total, N] contiguous.
    # One program: rows [pid * BLOCK, +BLOCK) as [BLOCK, N] tiles, c = conj(a).
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < rows_total)[:, None]
    ACC = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(a_ptr + _offsets(rows, s1, s2, s3, as0, as1, as2, as3, a_comp, N, DENSE), mask=mask).to(ACC)
    z = _hconj(x, N)
    out = rows[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(c_ptr + out, narrow(z, c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def hypercomplex_mul_bwd_kernel(
    g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, rows_total,
    s1, s2, s3,
    as0, as1, as2, as3, a_comp,
    bs0, bs1, bs2, bs3, b_comp,
    N: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr,
):
    # g, da, db: [rows_total, N] contiguous; a, b: [..., N] broadcasting to rows_total rows.
    # One program: rows [pid * BLOCK, +BLOCK) as [BLOCK, N] tiles, dA = dC conj(B), dB = conj(A) dC.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < rows_total)[:, None]
    out_off = rows[:, None] * N + tl.arange(0, N)[None, :]
    ACC = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = tl.load(g_ptr + out_off, mask=mask).to(ACC)
    x = tl.load(a_ptr + _offsets(rows, s1, s2, s3, as0, as1, as2, as3, a_comp, N, DENSE), mask=mask).to(ACC)
    y = tl.load(b_ptr + _offsets(rows, s1, s2, s3, bs0, bs1, bs2, bs3, b_comp, N, DENSE), mask=mask).to(ACC)
    da = _hmul(g, _hconj(y, N), N, BLOCK)
    db = _hmul(_hconj(x, N), g, N, BLOCK)
    tl.store(da_ptr + out_off, narrow(da, da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + out_off, narrow(db, db_ptr.dtype.element_ty), mask=mask)


def _block(n):
    return 1024 if n == 4 else 512


def _layout_args(a, b, lead, n):
    """(a, b, dense, flat layout args) for the kernels above."""
    dense = all(t.is_contiguous() and tuple(t.shape[:-1]) == tuple(lead) for t in (a, b))
    if dense:
        return a, b, True, [1, 1, 1] + [0, 0, 0, 0, 1] * 2
    a, b, sizes, strides = layout_for(a, b, lead, n)
    return a, b, False, list(sizes[1:]) + strides[0] + [a.stride(-1)] + strides[1] + [b.stride(-1)]


def hypercomplex_mul_fwd(a, b, c, lead, n):
    """c = a b; c is contiguous with shape lead + (n,), a and b broadcast to it."""
    rows = c.numel() // n
    if rows == 0:
        return c
    a, b, dense, args = _layout_args(a, b, lead, n)
    block = _block(n)
    launch(hypercomplex_mul_fwd_kernel)[(cdiv(rows, block),)](
        a, b, c, rows, *args, N=n, DENSE=dense, BLOCK=block, num_warps=4)
    return c


def hypercomplex_conj_fwd(a, c, n):
    """c = conj(a); c is contiguous with a's shape."""
    rows = c.numel() // n
    if rows == 0:
        return c
    a, _, dense, args = _layout_args(a, a, a.shape[:-1], n)
    block = _block(n)
    launch(hypercomplex_conj_fwd_kernel)[(cdiv(rows, block),)](
        a, c, rows, *args[:8], N=n, DENSE=dense, BLOCK=block, num_warps=4)
    return c


def hypercomplex_mul_bwd(g, a, b, da, db, lead, n):
    """Writes dA, dB at the broadcast shape lead + (n,) into da, db (contiguous)."""
    rows = g.numel() // n
    if rows == 0:
        return da, db
    a, b, dense, args = _layout_args(a, b, lead, n)
    block = _block(n)
    launch(hypercomplex_mul_bwd_kernel)[(cdiv(rows, block),)](
        g, a, b, da, db, rows, *args, N=n, DENSE=dense, BLOCK=block, num_warps=4)
    return da, db
