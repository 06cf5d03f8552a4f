"""Triton kernels for the metric-weighted retrieval cost R * sqrt(max(g(dv, dv), 0) + eps).

The metric is diagonal with weights w (other metrics reach here as a linear feature map, see
geokern/metric.py). dv = k - q is formed directly in float32 for every (query, key) pair of a
tile ([BLOCK_X, BLOCK_Y, BLOCK_F] differences, features in chunks of BLOCK_F): no expansion as
|q|^2 + |k|^2 - 2 q.k, so no cancellation when q is close to k.

Backward (spec section 2, with g the gradient of the cost): for a pair,
    c = g R / spd * [s >= 0],   ddv = c w dv,   dq = -sum_keys ddv,   dk = sum_queries ddv,
    dw = sum c dv^2 / 2,        dR = g spd
One kernel serves both sides: for every point x (a query, or a key) it sums over the points y
that meet it, x - y = -dv on the query side and dv on the key side, so out = w sum_y c (x - y)
is dq or dk. Where x is shared across a batch dim (a shared key bank), the points of every batch
meet it.

Shapes: q [NB0, NB1, LQ, F], k [1|NB0, 1|NB1, M, F] (stride 0 where broadcast), w [F] float32,
r float32 read through strides over [b0, b1, LQ, M] (zero where broadcast). The launchers are in
__init__.py.
"""

import triton
import triton.language as tl


@triton.jit
def retrieval_cost_fwd_kernel(q_ptr, k_ptr, w_ptr, r_ptr, out_ptr,
                              sq0, sq1, sql, sqf, sk0, sk1, skl, skf, sr0, sr1, srl, srm,
                              NB1, LQ, M, F, eps,
                              BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_F: tl.constexpr):
    """q: [NB0, NB1, LQ, F], k: [NB0|1, NB1|1, M, F] -> out: [NB0 * NB1, LQ, M] float32.
    One program: a BLOCK_X x BLOCK_Y tile of (query, key) pairs of one batch, dv = k - q formed
    per pair in float32, features in chunks of BLOCK_F."""
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    eps = tl.cast(eps, tl.float32)
    # one grid axis (y and z stop at 65535: 2^25 keys made "invalid argument"), 64-bit indices
    nx, ny = tl.cdiv(LQ, BLOCK_X), tl.cdiv(M, BLOCK_Y)
    pid = tl.program_id(0).to(tl.int64)
    pid_x, pid_y, pid_b = pid % nx, (pid // nx) % ny, pid // (nx * ny)
    b0, b1 = pid_b // NB1, pid_b % NB1
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_y = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xv, yv = offs_x < LQ, offs_y < M
    q_b, k_b = q_ptr + b0 * sq0 + b1 * sq1, k_ptr + b0 * sk0 + b1 * sk1
    s = tl.zeros([BLOCK_X, BLOCK_Y], tl.float32)
    for f0 in range(0, F, BLOCK_F):  # s = sum_f w_f (k - q)_f^2, features in chunks
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fv = offs_f < F
        q = tl.load(q_b + offs_x[:, None] * sql + offs_f[None, :] * sqf, mask=xv[:, None] & fv[None, :], other=0.0)
        k = tl.load(k_b + offs_y[:, None] * skl + offs_f[None, :] * skf, mask=yv[:, None] & fv[None, :], other=0.0)
        w = tl.load(w_ptr + offs_f, mask=fv, other=0.0)
        d = k.to(tl.float32)[None, :, :] - q.to(tl.float32)[:, None, :]
        s += tl.sum(d * d * w[None, None, :], 2)
    tile = xv[:, None] & yv[None, :]
    r = tl.load(r_ptr + b0 * sr0 + b1 * sr1 + offs_x[:, None] * srl + offs_y[None, :] * srm, mask=tile, other=0.0)
    # NaN in q, k, w or r stays NaN (tl.maximum drops a NaN operand by default)
    cost = r * tl.sqrt_rn(tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL) + eps)
    tl.store(out_ptr + (pid_b * LQ + offs_x[:, None]) * M + offs_y[None, :], cost, mask=tile)


@triton.jit
def retrieval_cost_bwd_kernel(x_ptr, y_ptr, w_ptr, g_ptr, r_ptr, out_ptr, outw_ptr, drx_ptr, drp_ptr,
                              sx0, sx1, sxl, sxf, sy0, sy1, syl, syf, sg0, sg1, sgx, sgy, sr0, sr1, srx, sry,
                              sd0, sd1, sdx, sdy,
                              NB0, NB1, NX1, LX, LY, F, eps,
                              LOOP0: tl.constexpr, LOOP1: tl.constexpr, WRITE_W: tl.constexpr, WRITE_DRX: tl.constexpr,
                              WRITE_DRP: tl.constexpr,
                              BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_F: tl.constexpr):
    """x: [NX0, NX1, LX, F] (the queries, or the keys), y: [.., LY, F] the other side, g / r over
    [NB0, NB1, LX, LY] -> out [NX0 * NX1, LX, F]. One program: BLOCK_X points x of one batch (every
    batch where x is shared) against every y: out = w sum c (x - y), outw = sum c (x - y)^2 / 2,
    drx = sum g spd, drp = g spd per pair. F <= BLOCK_F."""
    # inductor passes Python floats as fp64 (eager Triton: fp32); fp64 would leak into the loop state
    eps = tl.cast(eps, tl.float32)
    nx = tl.cdiv(LX, BLOCK_X)  # one grid axis, 64-bit indices (as the forward)
    pid = tl.program_id(0).to(tl.int64)
    pid_x, pid_b = pid % nx, pid // nx
    xb0, xb1 = pid_b // NX1, pid_b % NX1
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_f = tl.arange(0, BLOCK_F)
    xv, fv = offs_x < LX, offs_f < F
    x = tl.load(x_ptr + xb0 * sx0 + xb1 * sx1 + offs_x[:, None] * sxl + offs_f[None, :] * sxf,
                mask=xv[:, None] & fv[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs_f, mask=fv, other=0.0)
    acc = tl.zeros([BLOCK_X, BLOCK_F], tl.float32)
    accw = tl.zeros([BLOCK_X, BLOCK_F], tl.float32)
    dr = tl.zeros([BLOCK_X], tl.float32)
    n0 = NB0 if LOOP0 else 1
    n1 = NB1 if LOOP1 else 1
    for i0 in range(0, n0):
        for i1 in range(0, n1):
            b0 = i0 if LOOP0 else xb0
            b1 = i1 if LOOP1 else xb1
            y_b = y_ptr + b0 * sy0 + b1 * sy1
            for y0 in range(0, LY, BLOCK_Y):
                offs_y = tl.cast(y0, tl.int64) + tl.arange(0, BLOCK_Y)
                yv = offs_y < LY
                tile = xv[:, None] & yv[None, :]
                y = tl.load(y_b + offs_y[:, None] * syl + offs_f[None, :] * syf, mask=yv[:, None] & fv[None, :],
                            other=0.0).to(tl.float32)
                d = x[:, None, :] - y[None, :, :]  # [BLOCK_X, BLOCK_Y, BLOCK_F]
                s = tl.sum(d * d * w[None, None, :], 2)
                g = tl.load(g_ptr + b0 * sg0 + b1 * sg1 + offs_x[:, None] * sgx + offs_y[None, :] * sgy, mask=tile,
                            other=0.0)
                r = tl.load(r_ptr + b0 * sr0 + b1 * sr1 + offs_x[:, None] * srx + offs_y[None, :] * sry, mask=tile,
                            other=0.0)
                spd = tl.sqrt_rn(tl.maximum(s, 0.0) + eps)
                # spd = 0 (eps = 0, x = y): the subgradient 0 of sqrt at 0, not g r / 0
                c = tl.where(tile & (s >= 0.0) & (spd > 0.0), g * r / spd, 0.0)
                acc += tl.sum(c[:, :, None] * d, 1)
                if WRITE_W:
                    accw += tl.sum(c[:, :, None] * d * d, 1)
                gs = tl.where(tile, g * spd, 0.0)
                if WRITE_DRX:
                    dr += tl.sum(gs, 1)
                if WRITE_DRP:
                    tl.store(drp_ptr + b0 * sd0 + b1 * sd1 + offs_x[:, None] * sdx + offs_y[None, :] * sdy, gs, mask=tile)
    row = pid_b * LX + offs_x
    tl.store(out_ptr + row[:, None] * F + offs_f[None, :], acc * w[None, :], mask=xv[:, None] & fv[None, :])
    if WRITE_W:
        tl.store(outw_ptr + row[:, None] * F + offs_f[None, :], 0.5 * accw, mask=xv[:, None] & fv[None, :])
    if WRITE_DRX:
        tl.store(drx_ptr + row, dr, mask=xv)
