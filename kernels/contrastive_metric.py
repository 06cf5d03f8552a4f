"""Triton kernels of the metric / rotor update (spec section 5, last paragraph; the definition is
geokern.reference.contrastive.metric_delta).

The work is a mean over N rows of n features and then a few hundred scalar operations, so one
program does everything after the mean: the Givens rotations by the current angles, the lam and
angle increments, the finite gate, the clamp, the wrap and the stores. It decides the gate itself,
so nothing is read back to the host and a CUDA graph captures the launch. Past `rows_per_program`
rows, row_sums_kernel first sums blocks of rows in parallel into float32 partial sums, which the
update kernel then sums in a fixed order: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from geokern.kernels._common import atan2, cdiv, launch, narrow, next_pow2

F32_MAX = tl.constexpr(3.4028234663852886e38)
PI = tl.constexpr(3.1415926535897931)  # as float32: 3.14159274 (rounds up); the range is [-PI, PI)
TWO_PI = tl.constexpr(6.2831853071795862)
ANGLE_MAX = tl.constexpr(1e8)  # geokern.reference.contrastive.ANGLE_MAX
LAM_MIN = tl.constexpr(0.01)
LAM_MAX = tl.constexpr(100.0)
RADIUS_MIN = tl.constexpr(1e-6)
MAX_N = 4096  # v lives in one program's registers
TILE = 4096  # elements of x a program loads at a time


@triton.jit
def _block_sum(src_ptr, row0, row1, stride, cols, n, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum of rows [row0, row1) of src (rows `stride` apart, unit feature stride) in float32."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(row0, row1, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)  # 64-bit offsets: x may pass 2**31 elements
        m = (rows[:, None] < row1) & (cols[None, :] < n)
        acc += tl.sum(tl.load(src_ptr + rows[:, None] * stride + cols[None, :], mask=m, other=0.0).to(tl.float32), 0)
    return acc


@triton.jit
def row_sums_kernel(x_ptr, n_rows, stride, part_ptr, n, rows_per_program,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """x: [N, n] (rows `stride` apart); part: float32 [programs, n]. Program p sums rows
    [p * rows_per_program, (p + 1) * rows_per_program) into part[p]."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row0 = pid * rows_per_program
    row1 = tl.minimum(row0 + rows_per_program, n_rows)
    acc = _block_sum(x_ptr, row0, row1, stride, cols, n, BLOCK_R, BLOCK_N)
    tl.store(part_ptr + pid * n + cols, acc, mask=cols < n)


@triton.jit
def _wrap(t):
    """geokern.reference.contrastive.wrap_angle in float32: lands in [-PI, PI) for every t."""
    t = tl.minimum(tl.maximum(t, ANGLE_MAX * -1.0), ANGLE_MAX)
    t = t - TWO_PI * tl.floor((t + PI) / TWO_PI)
    t = tl.where(t >= PI, t - TWO_PI, t)
    return tl.where(t < PI * -1.0, t + TWO_PI, t)


@triton.jit
def _angles(v, cols, p0, pairs_ptr, theta_ptr, theta_stride, n_pairs, g, BLOCK_P: tl.constexpr):
    """Angles p0 .. p0 + BLOCK_P: (theta + dtheta before the wrap, their offsets, mask, and the
    count of non-finite increments and angles)."""
    offs = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
    pm = offs < n_pairs
    a = tl.load(pairs_ptr + 2 * offs, mask=pm, other=-1)
    b = tl.load(pairs_ptr + 2 * offs + 1, mask=pm, other=-1)
    # select, not multiply: a NaN elsewhere in v must not reach this plane
    vi = tl.sum(tl.where(a[:, None] == cols[None, :], v[None, :], 0.0), 1)
    vj = tl.sum(tl.where(b[:, None] == cols[None, :], v[None, :], 0.0), 1)
    r = tl.sqrt_rn(vi * vi + vj * vj)
    d = tl.where(r >= RADIUS_MIN, g * atan2(vj, vi) * r, 0.0)
    th = tl.load(theta_ptr + offs * theta_stride, mask=pm, other=0.0).to(tl.float32)
    bad = tl.sum(tl.where(pm & ~((tl.abs(d) <= F32_MAX) & (tl.abs(th) <= F32_MAX)), 1, 0), 0)
    return th + d, offs, pm, bad


@triton.jit
def metric_update_kernel(src_ptr, n_src, src_stride, n_rows, lam_ptr, lam_stride, theta_ptr, theta_stride,
                         pairs_ptr, n_pairs, dl_ptr, dl_value, s, n, DL_PTR: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program. src: [n_src, n] rows `src_stride` apart: x_free itself or row_sums_kernel's
    float32 partial sums; n_rows: N, the mean's divisor. lam: [n], theta: [n_pairs] (strided, any
    float dtype), pairs: int32 [n_pairs, 2]. dL: dl_ptr's 0-dim value (DL_PTR) or dl_value; s =
    lr / beta. Updates lam and theta in place, or stores nothing where the gate fails."""
    cols = tl.arange(0, BLOCK_N).to(tl.int64)  # 64-bit: lam / theta may be views with large strides
    cm = cols < n
    v = _block_sum(src_ptr, 0, n_src, src_stride, cols, n, BLOCK_R, BLOCK_N) / tl.full([], n_rows, tl.float32)
    for p in range(0, n_pairs):  # the metric's Givens rotations, in order
        a = tl.load(pairs_ptr + 2 * p)
        b = tl.load(pairs_ptr + 2 * p + 1)
        th = tl.load(theta_ptr + tl.full([], p, tl.int64) * theta_stride).to(tl.float32)
        c = tl.cos(th)
        sn = tl.sin(th)
        va = tl.sum(tl.where(cols == a, v, 0.0), 0)
        vb = tl.sum(tl.where(cols == b, v, 0.0), 0)
        v = tl.where(cols == a, c * va - sn * vb, tl.where(cols == b, sn * va + c * vb, v))
    if DL_PTR:
        dl = tl.load(dl_ptr).to(tl.float32)
    else:
        dl = tl.full([], dl_value, tl.float32)
    c = tl.full([], s, tl.float32) * dl  # float32 scalars whatever the launch passed (fp64 under compile)
    g = c * -0.01
    v2 = tl.where(cm, v * v, 0.0)
    dlam = c * v2 / (tl.sum(v2, 0) + 1e-8)
    lam = tl.load(lam_ptr + cols * lam_stride, mask=cm, other=1.0).to(tl.float32)
    finite = (tl.abs(v) <= F32_MAX) & (tl.abs(dlam) <= F32_MAX) & (tl.abs(lam) <= F32_MAX)  # NaN fails too
    bad = tl.sum(tl.where(cm & ~finite, 1, 0), 0)
    for p0 in range(0, n_pairs, BLOCK_P):
        _, _, _, bad_p = _angles(v, cols, p0, pairs_ptr, theta_ptr, theta_stride, n_pairs, g, BLOCK_P)
        bad += bad_p
    ok = bad == 0
    # a skipped update masks every store off: lam and theta keep their bits (-0.0, NaN payloads)
    lim = tl.where(ok, n, 0)
    new_lam = tl.minimum(tl.maximum(lam + dlam, LAM_MIN), LAM_MAX)
    tl.store(lam_ptr + cols * lam_stride, narrow(new_lam, lam_ptr.dtype.element_ty), mask=cols < lim)
    for p0 in range(0, n_pairs, BLOCK_P):  # recomputed: the gate needed every angle first
        t, offs, pm, _ = _angles(v, cols, p0, pairs_ptr, theta_ptr, theta_stride, n_pairs, g, BLOCK_P)
        tl.store(theta_ptr + offs * theta_stride, narrow(_wrap(t), theta_ptr.dtype.element_ty), mask=pm & ok)


def default_rows_per_program(n_rows):
    """0 (one program reads every row) up to 4096 rows, else 1024 rows a program. Not measured:
    a guess that one program streams a few thousand short rows in about a launch's time."""
    return 0 if n_rows <= 4096 else 1024


def metric_update(x, lam, theta, pairs, dl, dl_value, s, rows_per_program):
    """Launch the update: x [N, n] (unit feature stride), lam [n], theta [P], pairs int32 [P, 2]
    contiguous, dl a 0-dim tensor or None (then dl_value), s = lr / beta; rows_per_program > 0
    sums blocks of that many rows in parallel first (0: one program reads every row)."""
    n_rows, n = x.shape
    n_pairs = theta.numel()
    block_n = max(2, next_pow2(n))
    block_r = max(1, min(64, TILE // block_n))
    block_p = max(1, min(next_pow2(max(n_pairs, 1)), TILE // block_n))
    src, n_src, stride = x, n_rows, x.stride(0)
    if 0 < rows_per_program < n_rows:
        programs = cdiv(n_rows, rows_per_program)
        src = torch.empty(programs, n, device=x.device, dtype=torch.float32)
        launch(row_sums_kernel)[(programs,)](x, n_rows, x.stride(0), src, n, rows_per_program,
                                             BLOCK_R=block_r, BLOCK_N=block_n)
        n_src, stride = programs, n
    launch(metric_update_kernel)[(1,)](
        src, n_src, stride, n_rows, lam, lam.stride(0), theta, theta.stride(0) if n_pairs else 1, pairs, n_pairs,
        dl if dl is not None else lam, float(dl_value), float(s), n,
        DL_PTR=dl is not None, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_P=block_p,
    )
