"""Triton kernels of the LIoR family and their launchers (what geokern.ops.lior imports).

    lior_step              one recurrence step in place over [B, D] (the ring slot of x_{t-p} too)
    lior_recurrence_fwd    the sequence [T, B, D] in one launch: a program per (b, D-block) walks T
    lior_recurrence_bwd    its adjoint in one launch, walking T backwards
    lior_action            the action integrand per step, the running integral and mean, in place

The memory convolution has no kernel: its direct path is one cuBLAS GEMM with a Toeplitz matrix and
its long path cuFFT (kernels/lior.md says why, and what the benchmark measures). Arithmetic is
float32 for float16 / bfloat16 / float32 tensors (float64 runs on the reference: Triton passes
float scalars as float32; under torch.compile inductor passes them as float64, so every kernel
casts its float arguments to float32 on entry). Tensors reach the launchers contiguous.
"""

import torch
import triton
import triton.language as tl

from geokern.kernels._common import autotune_configs, cdiv, launch, narrow, next_pow2

__all__ = ["lior_step", "lior_recurrence_fwd", "lior_recurrence_bwd", "lior_action"]

STEP_BLOCK = 1024


@triton.jit
def _gate(j, rho, eta, xi):
    """(a, b, c) = (rho sigmoid j, eta g, xi g), g = 1 + 0.1 tanh j, and their derivatives in j."""
    s = 1.0 / (1.0 + tl.exp(-j))
    e2 = tl.exp(-2.0 * tl.abs(j))  # tanh without overflow: sign(j) (1 - e^-2|j|) / (1 + e^-2|j|)
    th = (1.0 - e2) / (1.0 + e2)
    th = tl.where(j < 0, -th, th)
    g = 1.0 + 0.1 * th
    dg = 0.1 * (1.0 - th * th)
    return rho * s, eta * g, xi * g, rho * s * (1.0 - s), eta * dg, xi * dg


@triton.jit
def lior_step_kernel(m_ptr, ring_ptr, x_ptr, j_ptr, pos_ptr, N, D, rho, eta, xi,
                     P: tl.constexpr, HAS_J: tl.constexpr, BLOCK: tl.constexpr):
    """m, x [B, D] (N = B D elements), ring [P, B, D]; a program updates BLOCK elements of m and of
    ring slot pos % P (x_{t-P} read, x_t written), j [B] the per-row gate."""
    acc: tl.constexpr = tl.float32
    # inductor passes Python floats as fp64 (eager Triton: fp32); the update would run in fp64
    rho, eta, xi = tl.cast(rho, acc), tl.cast(eta, acc), tl.cast(xi, acc)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    slot = tl.load(pos_ptr) % P
    r_ptr = ring_ptr + slot * N + offs
    old = tl.load(r_ptr, mask=ok, other=0.0).to(acc)
    xv = tl.load(x_ptr + offs, mask=ok, other=0.0)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(acc)
    if HAS_J:
        jv = tl.load(j_ptr + offs // D, mask=ok, other=0.0).to(acc)
        a, b, c, _, _, _ = _gate(jv, rho, eta, xi)
        m = a * m + b * xv.to(acc) - c * old
    else:
        m = rho * m + eta * xv.to(acc) - xi * old
    tl.store(m_ptr + offs, narrow(m, m_ptr.dtype.element_ty), mask=ok)
    tl.store(r_ptr, narrow(xv, ring_ptr.dtype.element_ty), mask=ok)


def lior_step(m, ring, x, j, pos, rho, eta, xi):
    """In place: m [B, D], ring [P, B, D] (slot pos % P); pos itself is advanced by the caller."""
    N = m.numel()
    if N == 0:
        return
    grid = (cdiv(N, STEP_BLOCK),)
    launch(lior_step_kernel)[grid](m, ring, x, x if j is None else j, pos, N, m.shape[1], rho, eta, xi,
                                   P=ring.shape[0], HAS_J=j is not None, BLOCK=STEP_BLOCK)


def _seq_configs():
    # TC = 0: the step loop (one [BD] load per step, issued when the step runs). TC > 0: the chunked
    # loop, [CH, BD] tiles of x (CH ~ TC steps) loaded one chunk ahead, BD = 32 x warps x VEC
    # columns so that each thread holds VEC columns' CH rows (a column's rows in one thread: the
    # row pick folds). Bytes in flight per SM ~ (B D / 132) x CH x e whatever BD (kernels/lior.md)
    step = [triton.Config({"BD": bd, "TC": 0, "VEC": 4}, num_warps=w) for bd in (32, 64, 128, 256, 512)
            for w in (1, 2, 4) if bd >= 32 * w]
    chunk = [triton.Config({"BD": 32 * w * vec, "TC": tc, "VEC": vec}, num_warps=w)
             for w in (1, 2, 4) for vec in (1, 2, 4) for tc in (8, 16, 32) if vec * tc <= 64]
    return step + chunk


# test (GEOKERN_AUTOTUNE=0) and interp: one config each, the chunked loop (tests of the step loop
# and of other chunks pass their config to the launcher)
_SEQ_CONFIGS = autotune_configs(_seq_configs, test=[triton.Config({"BD": 128, "TC": 32, "VEC": 1}, num_warps=4)],
                                interp=[triton.Config({"BD": 16, "TC": 8, "VEC": 1}, num_warps=1)])


@triton.jit
def _row(tile, sel):
    """The row of a register tile [R, N] where sel ([R, 1], a compile-time row) holds: a select and
    a sum that fold to a register pick when a column's rows sit in one thread."""
    return tl.sum(tl.where(sel, tile, 0.0), 0)


@triton.autotune(configs=_SEQ_CONFIGS, key=["T", "B", "D", "HAS_J"])
@triton.jit
def lior_recurrence_fwd_kernel(x_ptr, j_ptr, m0_ptr, h_ptr, out_ptr, T, B, D, rho, eta, xi,
                               P: tl.constexpr, PP: tl.constexpr, HAS_J: tl.constexpr, HAS_M0: tl.constexpr,
                               HAS_H: tl.constexpr, BD: tl.constexpr, TC: tl.constexpr,
                               VEC: tl.constexpr):
    """x, out [T, B, D], j [T, B], m0 [B, D], h [P, B, D] (x_{-P} .. x_{-1}). A program owns row b and
    BD columns; it walks t in chunks of a multiple of P so that ring slot t % P is a compile-time
    row of the register ring [PP, BD] (PP = P rounded up to a power of two). TC = 0: chunks of P,
    each step's x loaded as the step runs; TC > 0: chunks of about TC steps loaded one chunk ahead."""
    acc: tl.constexpr = tl.float32
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    rho, eta, xi = tl.cast(rho, acc), tl.cast(eta, acc), tl.cast(xi, acc)
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dok = d < D
    rows = tl.arange(0, PP)[:, None]
    if HAS_M0:
        m = tl.load(m0_ptr + b * D + d, mask=dok, other=0.0).to(acc)
    else:
        m = tl.zeros([BD], acc)
    if HAS_H:
        ring = tl.load(h_ptr + rows * (B * D) + b * D + d[None, :], mask=(rows < P) & dok[None, :],
                       other=0.0).to(acc)
    else:
        ring = tl.zeros([PP, BD], acc)
    row_stride = B * D
    if TC == 0:
        # the step loop: each step's load is issued when the step runs (P steps unrolled per trip)
        for t0 in range(0, T, P):
            for i in tl.static_range(P):
                t = t0 + i
                ok = dok & (t < T)
                off = tl.cast(t, tl.int64) * row_stride + b * D + d
                xv = tl.load(x_ptr + off, mask=ok, other=0.0).to(acc)
                old = tl.sum(tl.where(rows == i, ring, 0.0), 0)
                ring = tl.where(rows == i, xv[None, :], ring)
                if HAS_J:
                    jv = tl.load(j_ptr + tl.cast(t, tl.int64) * B + b, mask=t < T, other=0.0).to(acc)
                    a, bb, c, _, _, _ = _gate(jv, rho, eta, xi)
                    m = a * m + bb * xv - c * old
                else:
                    m = rho * m + eta * xv - xi * old
                tl.store(out_ptr + off, narrow(m, out_ptr.dtype.element_ty), mask=ok)
    else:
        # the chunked loop: CH steps (a multiple of P, so that ring slot t % P stays a compile-time
        # row) per trip; the next chunk's x [CH, BD] and j [CH] are loaded before this chunk's steps
        # run, so a chunk's loads are in flight while the previous chunk computes (kernels/lior.md)
        CH: tl.constexpr = P * (TC // P) if TC >= P else P
        CP: tl.constexpr = TC if TC >= PP else PP  # the tile's rows: a power of two >= CH
        tt = tl.arange(0, CP)[:, None]
        tr = tl.arange(0, CP)
        # VEC consecutive columns per thread at most (the contiguity the compiler may assume): a
        # thread holds VEC x CH values of x per tile, so a small VEC buys a long chunk in registers
        dv = tl.max_contiguous(d, VEC)
        col = b * D + dv[None, :]
        cok = (tt < CH) & dok[None, :]
        # j [CH] rides in the x tile's layout, loaded by the tile's first column only (the others
        # read nothing): summed over the columns it becomes a [CH] vector that every thread holds
        # whole, so a step's j is a register pick, not a shuffle (a [CH, 1] load's own layout spreads
        # rows over threads)
        c0 = (tl.arange(0, BD) == 0)[None, :] & (tt < CH)
        xn = tl.load(x_ptr + tt.to(tl.int64) * row_stride + col, mask=cok & (tt < T), other=0.0)
        if HAS_J:
            jn = tl.load(j_ptr + tt.to(tl.int64) * B + b + 0 * col, mask=c0 & (tt < T), other=0.0)
        for t0 in range(0, T, CH):
            xc = xn.to(acc)
            tn = t0 + CH + tt
            xn = tl.load(x_ptr + tn.to(tl.int64) * row_stride + col, mask=cok & (tn < T), other=0.0)
            if HAS_J:
                jc = tl.sum(jn.to(acc), 1)  # one nonzero term per row: exact, NaN kept
                jn = tl.load(j_ptr + tn.to(tl.int64) * B + b + 0 * col, mask=c0 & (tn < T), other=0.0)
            for i in tl.static_range(CH):
                t = t0 + i
                ok = dok & (t < T)
                xv = _row(xc, tt == i)
                old = tl.sum(tl.where(rows == i % P, ring, 0.0), 0)
                ring = tl.where(rows == i % P, xv[None, :], ring)
                if HAS_J:
                    a, bb, c, _, _, _ = _gate(_row(jc, tr == i), rho, eta, xi)
                    m = a * m + bb * xv - c * old
                else:
                    m = rho * m + eta * xv - xi * old
                tl.store(out_ptr + tl.cast(t, tl.int64) * row_stride + b * D + d,
                         narrow(m, out_ptr.dtype.element_ty), mask=ok)


# the forward restricted to the step loop, autotuned over its old configs: the benchmark's
# "triton step loop" row, the baseline the chunked loop is measured against in the same run
lior_recurrence_fwd_step_kernel = triton.autotune(
    configs=autotune_configs(lambda: [c for c in _seq_configs() if c.kwargs["TC"] == 0],
                             test=[triton.Config({"BD": 128, "TC": 0, "VEC": 4}, num_warps=1)],
                             interp=[triton.Config({"BD": 16, "TC": 0, "VEC": 4}, num_warps=1)]),
    key=["T", "B", "D", "HAS_J"])(lior_recurrence_fwd_kernel.fn)


# the backward: the step loop (TC 0, the old one) and the chunked loop walked backwards in time
# (TC > 0). With a gate a chunk holds four tiles (g, x, m_{t-1}, x_{t-P}) and their next ones, so
# VEC x TC <= 32 (the forward's one tile pair allows 64), and TC <= 16: Triton 3.6 (torch
# 2.11's) took 154 s to compile a 32-step chunk (VEC 1) for sm_90 on the 2-core CPU machine (TC 16:
# 7 s; the forward's TC 32: 13 s; all with other work running), which an autotuned first backward
# would pay once per warp count (Triton 3.8 not measured)
def _bwd_configs():
    step = [triton.Config({"BD": c.kwargs["BD"], "TC": 0, "VEC": 4}, num_warps=c.num_warps)
            for c in _seq_configs() if c.kwargs["TC"] == 0]
    chunk = [triton.Config({"BD": 32 * w * vec, "TC": tc, "VEC": vec}, num_warps=w)
             for w in (1, 2, 4) for vec in (1, 2, 4) for tc in (8, 16) if vec * tc <= 32]
    return step + chunk


_BWD_CONFIGS = autotune_configs(_bwd_configs, test=[triton.Config({"BD": 128, "TC": 16, "VEC": 1}, num_warps=4)],
                                interp=[triton.Config({"BD": 16, "TC": 8, "VEC": 1}, num_warps=1)])


@triton.autotune(configs=_BWD_CONFIGS, key=["T", "B", "D", "HAS_J"], reset_to_zero=["dj_ptr"])
@triton.jit
def lior_recurrence_bwd_kernel(g_ptr, x_ptr, j_ptr, m0_ptr, h_ptr, out_ptr, dx_ptr, dm0_ptr, dh_ptr, dj_ptr,
                               T, B, D, rho, eta, xi, P: tl.constexpr, PP: tl.constexpr, HAS_J: tl.constexpr,
                               HAS_M0: tl.constexpr, HAS_H: tl.constexpr, BD: tl.constexpr, TC: tl.constexpr,
                               VEC: tl.constexpr):
    """Adjoint lam_t = g_t + a_{t+1} lam_{t+1}, walked from T - 1 down: dx_t = b_t lam_t - c_{t+P}
    lam_{t+P} (the ring holds c lam of the last P steps), dm0 = a_0 lam_0, dh_i = -c_i lam_i, and
    dj [T, B] += sum over this program's columns of lam_t (a'_t m_{t-1} + b'_t x_t - c'_t x_{t-P})
    (float32 atomics across D-blocks). Shapes as in the forward; dj float32 zeroed by the caller.
    TC = 0: chunks of P, each step's loads issued as the step runs, one dj atomic per step; TC > 0:
    chunks of about TC steps (a multiple of P) whose tiles are loaded one chunk ahead (the chunk
    before in time), dj's CH sums added with CH atomics per chunk (the same sums, one atomic per
    (t, b) per D-block either way)."""
    acc: tl.constexpr = tl.float32
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    rho, eta, xi = tl.cast(rho, acc), tl.cast(eta, acc), tl.cast(xi, acc)
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dok = d < D
    rows = tl.arange(0, PP)[:, None]
    row_stride = B * D
    lam = tl.zeros([BD], acc)
    ring = tl.zeros([PP, BD], acc)
    a_next = rho  # a_{t+1}; multiplies lam = 0 until the first real step
    if TC == 0:
        nc = tl.cdiv(T, P)
        for cc in range(0, nc):
            t0 = (nc - 1 - cc) * P
            for k in tl.static_range(P):
                i = P - 1 - k
                t = t0 + i
                tok = t < T
                ok = dok & tok
                off = tl.cast(t, tl.int64) * row_stride + b * D + d
                lam = tl.load(g_ptr + off, mask=ok, other=0.0).to(acc) + a_next * lam
                if HAS_J:
                    jv = tl.load(j_ptr + tl.cast(t, tl.int64) * B + b, mask=tok, other=0.0).to(acc)
                    a, bb, c, da, db, dc = _gate(jv, rho, eta, xi)
                else:
                    a, bb, c = rho, eta, xi
                old = tl.sum(tl.where(rows == i, ring, 0.0), 0)
                tl.store(dx_ptr + off, narrow(bb * lam - old, dx_ptr.dtype.element_ty), mask=ok)
                ring = tl.where(rows == i, (c * lam)[None, :], ring)
                if HAS_J:
                    xv = tl.load(x_ptr + off, mask=ok, other=0.0).to(acc)
                    mp = tl.load(out_ptr + off - row_stride, mask=ok & (t >= 1), other=0.0).to(acc)
                    if HAS_M0:
                        mp += tl.load(m0_ptr + b * D + d, mask=ok & (t == 0), other=0.0).to(acc)
                    xo = tl.load(x_ptr + off - P * row_stride, mask=ok & (t >= P), other=0.0).to(acc)
                    if HAS_H:
                        xo += tl.load(h_ptr + t * row_stride + b * D + d, mask=ok & (t < P), other=0.0).to(acc)
                    part = tl.sum(tl.where(ok, lam * (da * mp + db * xv - dc * xo), 0.0), 0)
                    tl.atomic_add(dj_ptr + tl.cast(t, tl.int64) * B + b, part.to(tl.float32), mask=tok)
                a_next = a
    else:
        # the chunked loop, as the forward's (kernels/lior.md): chunk [t0, t0 + CH) runs while the
        # chunk before it in time, [t0 - CH, t0), is loading. A tile is kept as loaded (x's dtype)
        # and widened when its chunk runs, so no instruction waits on a load a chunk early
        CH: tl.constexpr = P * (TC // P) if TC >= P else P
        CP: tl.constexpr = TC if TC >= PP else PP
        tt = tl.arange(0, CP)[:, None]
        tr = tl.arange(0, CP)
        dv = tl.max_contiguous(d, VEC)
        col = b * D + dv[None, :]
        cok = (tt < CH) & dok[None, :]
        c0 = (tl.arange(0, BD) == 0)[None, :] & (tt < CH)  # the tile's first column: j in, dj out
        nch = tl.cdiv(T, CH)
        # the first chunk walked: the last in time
        gn, xn, mpn, xon, jn = _bwd_chunk_loads(g_ptr, x_ptr, out_ptr, j_ptr, (nch - 1) * CH + tt, cok, c0, col,
                                                row_stride, T, B, b, P, HAS_J)
        for cc in range(0, nch):
            t0 = (nch - 1 - cc) * CH
            gc = gn.to(acc)
            if HAS_J:
                xc = xn.to(acc)
                mpc = mpn.to(acc)
                xoc = xon.to(acc)
                jc = tl.sum(jn.to(acc), 1)  # one nonzero term per row: exact, NaN kept
                tc = t0 + tt
                okc = cok & (tc < T)
                if HAS_M0:  # m_{-1} = m0: the chunk at t0 = 0 only (masked off elsewhere)
                    mpc += tl.load(m0_ptr + col + 0 * tt, mask=okc & (tc == 0), other=0.0).to(acc)
                if HAS_H:  # x_{t-P} for t < P from the history
                    xoc += tl.load(h_ptr + tc.to(tl.int64) * row_stride + col, mask=okc & (tc < P),
                                   other=0.0).to(acc)
                djc = tl.sum(tl.zeros([CP, BD], acc), 1)
            # the chunk before in time (none before t0 = 0: masked)
            gn, xn, mpn, xon, jn = _bwd_chunk_loads(g_ptr, x_ptr, out_ptr, j_ptr, t0 - CH + tt, cok, c0, col,
                                                    row_stride, T, B, b, P, HAS_J)
            for k in tl.static_range(CH):
                i = CH - 1 - k
                t = t0 + i
                tok = t < T
                ok = dok & tok
                sel = tt == i
                lam = _row(gc, sel) + a_next * lam
                if HAS_J:
                    a, bb, c, da, db, dc = _gate(_row(jc, tr == i), rho, eta, xi)
                else:
                    a, bb, c = rho, eta, xi
                old = tl.sum(tl.where(rows == i % P, ring, 0.0), 0)
                tl.store(dx_ptr + tl.cast(t, tl.int64) * row_stride + b * D + d,
                         narrow(bb * lam - old, dx_ptr.dtype.element_ty), mask=ok)
                ring = tl.where(rows == i % P, (c * lam)[None, :], ring)
                if HAS_J:
                    xv, mp, xo = _row(xc, sel), _row(mpc, sel), _row(xoc, sel)
                    part = tl.sum(tl.where(ok, lam * (da * mp + db * xv - dc * xo), 0.0), 0)
                    djc = tl.where(tr == i, part, djc)
                a_next = a
            if HAS_J:
                # the chunk's CH sums, one atomic each, from the tiles' first column (one thread per row)
                tl.atomic_add(dj_ptr + (t0 + tt).to(tl.int64) * B + b + 0 * col,
                              tl.broadcast_to(djc[:, None], [CP, BD]), mask=c0 & (t0 + tt < T))
    tl.store(dm0_ptr + b * D + d, narrow(a_next * lam, dm0_ptr.dtype.element_ty), mask=dok)
    tl.store(dh_ptr + rows * row_stride + b * D + d[None, :], narrow(-ring, dh_ptr.dtype.element_ty),
             mask=(rows < P) & dok[None, :])


@triton.jit
def _bwd_chunk_loads(g_ptr, x_ptr, out_ptr, j_ptr, tn, cok, c0, col, row_stride, T, B, b, P: tl.constexpr,
                     HAS_J: tl.constexpr):
    """The chunked backward's tiles of the time steps tn [CP, 1], as loaded (x's dtype): g, and
    with a gate x, m_{t-1}, x_{t-P} and j (j in the tile's first column c0 only; without a gate
    the last four are g again, unused). Steps outside [0, T) load zeros (T = 0: nothing)."""
    okn = cok & (tn < T) & (tn >= 0)
    offn = tn.to(tl.int64) * row_stride + col
    gn = tl.load(g_ptr + offn, mask=okn, other=0.0)
    if HAS_J:
        xn = tl.load(x_ptr + offn, mask=okn, other=0.0)
        mpn = tl.load(out_ptr + offn - row_stride, mask=okn & (tn >= 1), other=0.0)
        xon = tl.load(x_ptr + offn - P * row_stride, mask=okn & (tn >= P), other=0.0)
        jn = tl.load(j_ptr + tn.to(tl.int64) * B + b + 0 * col, mask=c0 & (tn < T) & (tn >= 0), other=0.0)
    else:
        xn, mpn, xon, jn = gn, gn, gn, gn
    return gn, xn, mpn, xon, jn


# the backward restricted to the step loop (its old configs): the benchmark's "triton step loop" row
lior_recurrence_bwd_step_kernel = triton.autotune(
    configs=autotune_configs(lambda: [c for c in _bwd_configs() if c.kwargs["TC"] == 0],
                             test=[triton.Config({"BD": 128, "TC": 0, "VEC": 4}, num_warps=1)],
                             interp=[triton.Config({"BD": 16, "TC": 0, "VEC": 4}, num_warps=1)]),
    key=["T", "B", "D", "HAS_J"], reset_to_zero=["dj_ptr"])(lior_recurrence_bwd_kernel.fn)


def _pp(P):
    return next_pow2(P)


def _launch_seq(kernel, config, grid_b, D):
    """kernel ready for `[grid](args, **flags)`: autotuned, or with one triton.Config (tests and the
    benchmark's old-vs-new rows pass it) bypassing the autotuner."""
    if config is None:
        return launch(kernel), lambda meta: (grid_b, cdiv(D, meta["BD"])), {}
    kw = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return launch(kernel.fn), (grid_b, cdiv(D, config.kwargs["BD"])), kw


def lior_recurrence_fwd(x, j, m0, h, out, rho, eta, xi, P, config=None):
    """out [T, B, D] = the recurrence over x [T, B, D] (j [T, B], m0 [B, D], h [P, B, D] or None).
    config: a triton.Config (BD, TC, VEC, warps) instead of the autotuner's choice, or "step": the
    autotuner over the step loop's configs only."""
    T, B, D = x.shape
    if out.numel() == 0:
        return
    if isinstance(config, str) and config == "step":  # the step loop's configs only, autotuned (the benchmark's baseline row)
        kernel, grid, kw = _launch_seq(lior_recurrence_fwd_step_kernel, None, B, D)
    else:
        kernel, grid, kw = _launch_seq(lior_recurrence_fwd_kernel, config, B, D)
    kernel[grid](
        x, x if j is None else j, x if m0 is None else m0, x if h is None else h, out, T, B, D, rho, eta, xi,
        P=P, PP=_pp(P), HAS_J=j is not None, HAS_M0=m0 is not None, HAS_H=h is not None, **kw)


def lior_recurrence_bwd(g, x, j, m0, h, out, dx, dm0, dh, dj, rho, eta, xi, P, config=None):
    """dx [T, B, D], dm0 [B, D], dh [P, B, D] written; dj [T, B] float32 (zeros) accumulated.
    config: as in lior_recurrence_fwd."""
    T, B, D = x.shape
    if B * D == 0:
        return
    if isinstance(config, str) and config == "step":  # the step loop's configs only (the benchmark's baseline row)
        kernel, grid, kw = _launch_seq(lior_recurrence_bwd_step_kernel, None, B, D)
    else:
        kernel, grid, kw = _launch_seq(lior_recurrence_bwd_kernel, config, B, D)
    kernel[grid](
        g, x, x if j is None else j, x if m0 is None else m0, x if h is None else h, out, dx, dm0, dh,
        dj, T, B, D, rho, eta, xi, P=P, PP=_pp(P), HAS_J=j is not None, HAS_M0=m0 is not None,
        HAS_H=h is not None, **kw)


def _action_configs():
    # RE: the [BB, BF] tile's elements, BB = RE // BF rows (the old launcher's rule was RE 4096: BB 256
    # at n = 16, 256 programs for B = 65536). AHEAD 0: the old loop (a step's loads issued after the
    # previous step's reduction and store); AHEAD 1: the next step's tile loaded before this step's
    # reduction (a register double buffer; one feature block only, F <= BF). kernels/lior.md
    return [triton.Config({"RE": re, "AHEAD": ahead}, num_warps=w)
            for re in (512, 1024, 2048, 4096) for ahead in (0, 1) for w in (1, 2, 4) if re >= 128 * w]


# the old launcher's choice (BB = 4096 // BF rows, the F loop per step, default warps and stages): the
# benchmark's "triton old config" row
ACTION_OLD_CONFIG = triton.Config({"RE": 4096, "AHEAD": 0}, num_warps=4, num_stages=3)

_ACTION_CONFIGS = autotune_configs(_action_configs, test=[triton.Config({"RE": 1024, "AHEAD": 1}, num_warps=2)],
                                   interp=[triton.Config({"RE": 64, "AHEAD": 1}, num_warps=1)])


def _action_rows(RE, BF):
    return max(1, RE // BF)


# integral and mean are read and written in place: restored after each config the autotuner times
@triton.autotune(configs=_ACTION_CONFIGS, key=["W", "B", "F", "ONE_F"], restore_value=["int_ptr", "mean_ptr"])
@triton.jit
def lior_action_kernel(phi_ptr, w_ptr, r_ptr, cost_ptr, int_ptr, mean_ptr, count_ptr, W, B, F, s_pw, s_pb,
                       s_rw, s_rb, eps, dtau, BF: tl.constexpr, ONE_F: tl.constexpr, RE: tl.constexpr,
                       AHEAD: tl.constexpr):
    """phi [W, B, F] (feature stride 1), w [F], R read at t * s_rw + b * s_rb (stride 0 where it
    broadcasts); cost [W, B] written; integral, mean [B] and count [] (steps before this window)
    read, integral and mean written. A program owns BB = RE // BF rows and walks the W steps; ONE_F:
    F <= BF (one feature block), which the look-ahead loop (AHEAD 1) needs; else the old loop runs."""
    acc: tl.constexpr = tl.float32
    BB: tl.constexpr = RE // BF if RE >= BF else 1
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    eps, dtau = tl.cast(eps, acc), tl.cast(dtau, acc)
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rok = rb < B
    rb64 = rb.to(tl.int64)
    total = tl.zeros([BB], acc)
    if AHEAD > 0 and ONE_F:
        # the next step's v [BB, BF] and R [BB] are loaded before this step's reduction and store,
        # so a program always has a step's loads in flight (kernels/lior.md, bytes in flight)
        f = tl.arange(0, BF)
        fok = f < F
        wv = tl.load(w_ptr + f, mask=fok, other=0.0).to(acc)
        vptr = phi_ptr + rb64[:, None] * s_pb + f[None, :]
        vok = rok[:, None] & fok[None, :]
        rptr = r_ptr + rb64 * s_rb
        vn = tl.load(vptr, mask=vok & (W > 0), other=0.0)
        rn = tl.load(rptr, mask=rok & (W > 0), other=0.0)
        for t in range(0, W):
            v = vn.to(acc)
            r = rn.to(acc)
            tn = tl.cast(t + 1, tl.int64)
            vn = tl.load(vptr + tn * s_pw, mask=vok & (tn < W), other=0.0)
            rn = tl.load(rptr + tn * s_rw, mask=rok & (tn < W), other=0.0)
            q = tl.zeros([BB], acc) + tl.sum(v * v * wv[None, :], 1)  # as the old loop adds: 0 + sum
            q = tl.where(q < 0, 0.0, q)  # max(q, 0) that keeps NaN
            cost = r * tl.sqrt(q + eps)
            tl.store(cost_ptr + tl.cast(t, tl.int64) * B + rb64, narrow(cost, cost_ptr.dtype.element_ty), mask=rok)
            total += cost
    else:
        for t in range(0, W):
            q = tl.zeros([BB], acc)
            for f0 in range(0, F, BF):
                f = f0 + tl.arange(0, BF)
                fok = f < F
                wv = tl.load(w_ptr + f, mask=fok, other=0.0).to(acc)
                v = tl.load(phi_ptr + tl.cast(t, tl.int64) * s_pw + rb64[:, None] * s_pb + f[None, :],
                            mask=rok[:, None] & fok[None, :], other=0.0).to(acc)
                q += tl.sum(v * v * wv[None, :], 1)
            q = tl.where(q < 0, 0.0, q)  # max(q, 0) that keeps NaN
            r = tl.load(r_ptr + tl.cast(t, tl.int64) * s_rw + rb64 * s_rb, mask=rok, other=0.0).to(acc)
            cost = r * tl.sqrt(q + eps)
            tl.store(cost_ptr + tl.cast(t, tl.int64) * B + rb64, narrow(cost, cost_ptr.dtype.element_ty), mask=rok)
            total += cost
    n0 = tl.load(count_ptr).to(acc)
    n1 = n0 + W
    integ = tl.load(int_ptr + rb64, mask=rok, other=0.0).to(acc)
    mu = tl.load(mean_ptr + rb64, mask=rok, other=0.0).to(acc)
    tl.store(int_ptr + rb64, narrow(integ + dtau * total, int_ptr.dtype.element_ty), mask=rok)
    mu = tl.where(n1 > 0, (mu * n0 + total) / tl.maximum(n1, 1.0), mu)
    tl.store(mean_ptr + rb64, narrow(mu, mean_ptr.dtype.element_ty), mask=rok)


def lior_action(phi, w, r, cost, integral, mean, count, eps, dtau, config=None):
    """cost [W, B] written; integral, mean [B] updated from count [] (advanced by the caller).
    r is [W, B]-shaped (expanded: any strides). config: a triton.Config (RE, AHEAD, warps) instead
    of the autotuner's choice (ACTION_OLD_CONFIG: the old launcher's)."""
    W, B, F = phi.shape
    if B == 0:
        return
    BF = min(next_pow2(max(F, 1)), 128)
    if config is None:
        kernel, grid, kw = launch(lior_action_kernel), lambda meta: (cdiv(B, _action_rows(meta["RE"], BF)),), {}
    else:
        kw = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        kernel, grid = launch(lior_action_kernel.fn), (cdiv(B, _action_rows(config.kwargs["RE"], BF)),)
    kernel[grid](
        phi, w, r, cost, integral, mean, count, W, B, F, phi.stride(0), phi.stride(1), r.stride(0), r.stride(1),
        eps, dtau, BF=BF, ONE_F=F <= BF, **kw)
