"""Triton kernel of the contrastive update: the gated, clipped apply W += f G, b += s gb.

The GEMM that makes G (the unscaled stacked product [Yn ; -c Yf]^T [Xn ; Xf]) runs in cuBLAS
(geokern/ops/contrastive.py says why), and so does ||G|| (a float64 reduction); what is left is
memory-bound: read W and G once, write W once. The kernel also decides the gate and the clip from
||G|| itself, each program from the same few scalars, so no chain of 0-dim torch ops (about a
dozen launches of a few us each) sits between the norm and the apply. Skipped elements are never
stored, so a skipped W is bit-identical (-0.0 stays -0.0, NaN payloads stay) and no host reads
the flag.
"""

import torch
import triton
import triton.language as tl

from geokern._backend import interpret_mode
from geokern.kernels._common import cdiv, launch, mm_acc, narrow

BLOCK = 1024  # elements per program: 4 KB of float32 G per program, enough to hide latency
F32_MAX = tl.constexpr(3.4028234663852886e38)  # constexpr: a jit function reads no plain globals


@triton.jit
def _gate(norm_ptr, s, max_norm, HAS_CLIP: tl.constexpr):
    """(f, ok) of W: ||dW|| = s ||G|| (float64); ok when it is within float32's range (False for
    NaN and inf: any non-finite element of dW makes the norm non-finite, and a finite norm bounds
    every element); f = s, or max_norm / ||G|| where ||dW|| > max_norm (the exact clip)."""
    norm_g = tl.load(norm_ptr)
    norm = norm_g * s
    ok = norm <= F32_MAX
    if HAS_CLIP:
        # norm > max_norm > 0 implies norm_g > 0; the guard keeps the branch not taken finite
        f = tl.where(norm > max_norm, max_norm / tl.where(norm_g > 0, norm_g, 1.0), s)
    else:
        f = tl.where(ok, s, 0.0)  # a tensor (s alone is a Python float under the interpreter)
    return f.to(tl.float32), ok


@triton.jit
def contrastive_apply_kernel(w_ptr, g_ptr, n_w, b_ptr, gb_ptr, n_b, norm_ptr, s, max_norm, w_blocks,
                             HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """w: [n_w] (W flattened, contiguous, its own dtype), g: [n_w] float32; b: [n_b], gb: [n_b]
    float32 (db = s gb); norm: float64 [] = ||G||_F. Programs [0, w_blocks) each update BLOCK
    elements of W, the rest BLOCK elements of b: one launch for both. b is updated where W is
    and every element of db is finite (each b program scans gb for that: out elements, small)."""
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: W may hold more than 2**31 elements
    f, ok = _gate(norm_ptr, s, max_norm, HAS_CLIP)
    if pid < w_blocks:
        # a skipped update masks every element off: nothing is read or stored
        # (names differ between the branches: n_w and n_b may differ in width, i64 / i32)
        lim_w = tl.where(ok, n_w, 0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m_w = offs < lim_w
        w = tl.load(w_ptr + offs, mask=m_w)
        g = tl.load(g_ptr + offs, mask=m_w)
        tl.store(w_ptr + offs, narrow(w.to(tl.float32) + f * g, w_ptr.dtype.element_ty), mask=m_w)
    else:
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, n_b, BLOCK):
            o = start + tl.arange(0, BLOCK)
            d = tl.load(gb_ptr + o, mask=o < n_b, other=0.0) * s
            bad += tl.where(tl.abs(d) <= F32_MAX, 0, 1)  # NaN and inf both fail the comparison
        lim_b = tl.where(ok & (tl.sum(bad, 0) == 0), n_b, 0)
        offs = (pid - w_blocks) * BLOCK + tl.arange(0, BLOCK)
        m_b = offs < lim_b
        b = tl.load(b_ptr + offs, mask=m_b)
        gb = tl.load(gb_ptr + offs, mask=m_b)
        tl.store(b_ptr + offs, narrow(b.to(tl.float32) + s * gb, b_ptr.dtype.element_ty), mask=m_b)


def contrastive_apply(w, g, b, gb, norm_g, s, max_norm):
    """Launch the apply on contiguous w, g (same numel), b, gb (same numel; b may be empty);
    norm_g: float64 0-dim ||g||; s: the float scale of dW = s g; max_norm: float or None."""
    n_w, n_b = w.numel(), b.numel()
    w_blocks = cdiv(n_w, BLOCK)
    grid = (w_blocks + cdiv(n_b, BLOCK),)
    if grid[0] == 0:
        return
    launch(contrastive_apply_kernel)[grid](
        w, g, n_w, b, gb, n_b, norm_g, float(s), float(max_norm or 0.0), w_blocks,
        HAS_CLIP=max_norm is not None, BLOCK=BLOCK,
    )


# ---- many layers, one launch -----------------------------------------------------------------
#
# Columns of the per-layer table (int64 [L, META]) that the grouped kernel reads; the launcher in
# geokern/ops/_contrastive_many.py builds it with these names.
META_COLS = ("w", "b", "xn", "yn", "xf", "yf", "out", "inn", "nn", "nf", "sxn", "syn", "sxf", "syf",
             "g_off", "gb_off", "tiles_n", "tiles", "has_b")
META = tl.constexpr(20)  # META_COLS padded to an even width
(_W, _B, _XN, _YN, _XF, _YF, _OUT, _INN, _NN, _NF, _SXN, _SYN, _SXF, _SYF, _GOFF, _GBOFF, _TILESN, _TILES,
 _HASB) = (tl.constexpr(i) for i in range(len(META_COLS)))


@triton.jit
def _as_ptr(addr, KIND: tl.constexpr):
    """An int64 address from the table as a pointer to KIND ("fp32", "bf16", "fp16"): strings, not
    tl dtypes, as constexprs, so the launch passes only plain values (what torch.compile's capture
    of a Triton launch takes)."""
    if KIND == "bf16":
        return addr.to(tl.pointer_type(tl.bfloat16))
    elif KIND == "fp16":
        return addr.to(tl.pointer_type(tl.float16))
    else:
        return addr.to(tl.pointer_type(tl.float32))


@triton.jit
def _accumulate(acc, accb, y_ptr, sy, x_ptr, sx, n, rm, rn, out, inn, PREC: tl.constexpr, BK: tl.constexpr):
    """acc += Y^T X over the n rows of one phase (Y [n, out] rows sy apart, X [n, in] rows sx
    apart, unit inner stride), for output rows rm and columns rn; accb += the column sums of Y."""
    for k0 in range(0, n, BK):
        rk = (k0 + tl.arange(0, BK)).to(tl.int64)
        y = tl.load(y_ptr + rk[:, None] * sy + rm[None, :], mask=(rk[:, None] < n) & (rm[None, :] < out), other=0.0)
        x = tl.load(x_ptr + rk[:, None] * sx + rn[None, :], mask=(rk[:, None] < n) & (rn[None, :] < inn), other=0.0)
        acc = mm_acc(tl.trans(y), x, acc, PREC)  # "upcast" under the interpreter (its 16-bit dot is wrong)
        accb += tl.sum(y.to(tl.float32), 0)
    return acc, accb


@triton.jit
def _many_gemm_tile(row, layer, rm, rn, tn, out, inn, ws_ptr, norm_ptr, badb_ptr, cnt_ptr, lr_beta,
                    ACT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One [BM, BN] tile of G = Yn^T Xn - c Yf^T Xf (c = Nn / Nf) into the workspace, its sum of
    squares (float64) into norm[layer]; the first column tile also writes gb = sum Yn - c sum Yf
    for its rows and counts db's non-finite elements into badb[layer]. Then it arrives."""
    nn = tl.load(row + _NN)
    nf = tl.load(row + _NF)
    c = nn.to(tl.float32) / nf.to(tl.float32)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    accb = tl.zeros([BM], dtype=tl.float32)
    xf = _as_ptr(tl.load(row + _XF), ACT)
    yf = _as_ptr(tl.load(row + _YF), ACT)
    acc, accb = _accumulate(acc, accb, yf, tl.load(row + _SYF), xf, tl.load(row + _SXF), nf, rm, rn, out, inn,
                            PREC, BK)
    acc = acc * -c  # the free sum first, scaled once, so one accumulator holds both phases
    accb = accb * -c
    xn = _as_ptr(tl.load(row + _XN), ACT)
    yn = _as_ptr(tl.load(row + _YN), ACT)
    acc, accb = _accumulate(acc, accb, yn, tl.load(row + _SYN), xn, tl.load(row + _SXN), nn, rm, rn, out, inn,
                            PREC, BK)
    m2 = (rm[:, None] < out) & (rn[None, :] < inn)
    tl.store(ws_ptr + tl.load(row + _GOFF) + rm[:, None] * inn + rn[None, :], acc, mask=m2)
    a64 = acc.to(tl.float64)  # masked-off elements are 0; float64: large squares do not overflow
    tl.atomic_add(norm_ptr + layer, tl.sum(tl.sum(a64 * a64, 1), 0))
    if tn == 0:
        mb = rm < out
        tl.store(ws_ptr + tl.load(row + _GBOFF) + rm, accb, mask=mb)
        d = accb * (lr_beta / nn.to(tl.float32))
        tl.atomic_add(badb_ptr + layer, tl.sum(tl.where(mb & ~(tl.abs(d) <= F32_MAX), 1, 0), 0))
    tl.debug_barrier()  # every thread's stores precede the release below (the CTA's arrival)
    tl.atomic_add(cnt_ptr + layer, 1, sem="release")


@triton.jit
def _many_apply_tile(row, layer, rm, rn, tn, out, inn, ws_ptr, norm_ptr, badb_ptr, cnt_ptr, lr_beta, max_norm,
                     W_DT: tl.constexpr, HAS_CLIP: tl.constexpr):
    """Wait until every G tile of `layer` has arrived, decide its gate and clip from ||G||, and
    apply W += f G (and b += s gb from the first column tile) to one tile; skipped: no store."""
    tiles = tl.load(row + _TILES)
    arrived = tl.atomic_add(cnt_ptr + layer, 0, sem="acquire")
    while arrived < tiles:  # tiles of G hold earlier tickets: their programs run, never wait
        arrived = tl.atomic_add(cnt_ptr + layer, 0, sem="acquire")
    tl.debug_barrier()
    s = lr_beta / tl.load(row + _NN).to(tl.float32)
    norm_g = tl.sqrt(tl.load(norm_ptr + layer, volatile=True))
    norm = norm_g * s
    ok = norm <= F32_MAX
    if HAS_CLIP:
        f = tl.where(norm > max_norm, max_norm / tl.where(norm_g > 0, norm_g, 1.0), s)
    else:
        f = tl.where(ok, s, 0.0)
    f = f.to(tl.float32)
    lim = tl.where(ok, out, 0)  # a skipped layer masks every element off: nothing read or stored
    m2 = (rm[:, None] < lim) & (rn[None, :] < inn)
    w_ptr = _as_ptr(tl.load(row + _W), W_DT) + rm[:, None] * inn + rn[None, :]
    w = tl.load(w_ptr, mask=m2)
    g = tl.load(ws_ptr + tl.load(row + _GOFF) + rm[:, None] * inn + rn[None, :], mask=m2)
    tl.store(w_ptr, narrow(w.to(tl.float32) + f * g, w_ptr.dtype.element_ty), mask=m2)
    if tn == 0:
        if tl.load(row + _HASB) != 0:
            okb = ok & (tl.load(badb_ptr + layer, volatile=True) == 0)
            mb = rm < tl.where(okb, out, 0)
            b_ptr = _as_ptr(tl.load(row + _B), W_DT) + rm
            b = tl.load(b_ptr, mask=mb)
            gb = tl.load(ws_ptr + tl.load(row + _GBOFF) + rm, mask=mb)
            tl.store(b_ptr, narrow(b.to(tl.float32) + s * gb, b_ptr.dtype.element_ty), mask=mb)


@triton.jit
def contrastive_many_kernel(meta_ptr, tiles_ptr, ws_ptr, norm_ptr, badb_ptr, cnt_ptr, n_tiles, n_layers, lr_beta,
                            max_norm, ACT: tl.constexpr, W_DT: tl.constexpr, PREC: tl.constexpr,
                            HAS_CLIP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            RB: tl.constexpr):
    """Every layer's contrastive update in one launch of 2 * n_tiles programs.

    meta: int64 [L, META] (META_COLS: the addresses of W [out, in] and b [out] (W_DT: "fp32",
    "bf16" or "fp16"; contiguous), Xn [Nn, in], Yn [Nn, out], Xf [Nf, in], Yf [Nf, out] (ACT, the
    same kinds; unit inner stride, rows s* apart),
    the sizes, the layer's offsets into ws, its column tiles and tiles); tiles: int32 [n_tiles, 2]
    = (layer, tile in the layer, row-major over [BM, BN] tiles of W); ws: float32 G of every layer
    then gb of every layer; norm float64 [L], badb int32 [L], cnt int32 [L + 2] (arrivals per layer,
    the ticket, the programs done): zero before the launch, and zero again after it (the last
    program resets them, so a CUDA graph replays the launch with no memset).

    Each program draws a ticket (atomic, so tickets follow the order programs start, whatever the
    hardware's order): tickets [0, n_tiles) compute a tile of G, tickets [n_tiles, 2 n_tiles) apply
    one. An apply waits for its layer's G tiles, which hold smaller tickets, so their programs are
    running and never wait: no deadlock, whatever the occupancy. lr_beta = lr / beta (2 beta
    centred): s = lr_beta / Nn per layer, dW = s G clipped, db = s gb."""
    t = tl.atomic_add(cnt_ptr + n_layers, 1)
    is_apply = t >= n_tiles
    idx = tl.where(is_apply, t - n_tiles, t).to(tl.int64)
    layer = tl.load(tiles_ptr + 2 * idx)
    tile = tl.load(tiles_ptr + 2 * idx + 1)
    row = meta_ptr + layer.to(tl.int64) * META
    out = tl.load(row + _OUT)
    inn = tl.load(row + _INN)
    tiles_n = tl.load(row + _TILESN)
    tm = tile // tiles_n
    tn = tile % tiles_n
    rm = tm.to(tl.int64) * BM + tl.arange(0, BM)
    rn = tn.to(tl.int64) * BN + tl.arange(0, BN)
    if is_apply:
        _many_apply_tile(row, layer, rm, rn, tn, out, inn, ws_ptr, norm_ptr, badb_ptr, cnt_ptr, lr_beta, max_norm,
                         W_DT, HAS_CLIP)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + n_layers + 1, 1)
        if done == n_tiles - 1:  # the last program: every other one has read what it needed
            for l0 in range(0, n_layers, RB):
                lo = l0 + tl.arange(0, RB)
                tl.store(norm_ptr + lo, tl.zeros([RB], dtype=tl.float64), mask=lo < n_layers)
                tl.store(badb_ptr + lo, tl.zeros([RB], dtype=tl.int32), mask=lo < n_layers)
                tl.store(cnt_ptr + lo, tl.zeros([RB], dtype=tl.int32), mask=lo < n_layers)
            tl.store(cnt_ptr + n_layers, 0)
            tl.store(cnt_ptr + n_layers + 1, 0)
    else:
        _many_gemm_tile(row, layer, rm, rn, tn, out, inn, ws_ptr, norm_ptr, badb_ptr, cnt_ptr, lr_beta,
                        ACT, PREC, BM, BN, BK)


_KIND = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def contrastive_many(meta, tiles, ws, norm, badb, cnt, n_tiles, lr_beta, max_norm, act_dtype, w_dtype, tf32,
                     block_m, block_n, block_k, num_warps, num_stages):
    """Launch the grouped update (contrastive_many_kernel) on the tables that
    geokern.ops._contrastive_many builds; act_dtype / w_dtype: torch dtypes of the activities and
    of W and b; tf32: float32 activities multiply on TF32 tensor cores (else IEEE float32)."""
    if n_tiles == 0:
        return
    prec = ("tf32" if tf32 else "ieee") if act_dtype == torch.float32 else "tf32"  # 16-bit: no choice
    if interpret_mode():
        prec = "upcast"
    # launched as is, not through launch(): no triton_op runs this (raw address tables), so a
    # wrap_triton kernel would go through torch's higher-order op on every eager call
    contrastive_many_kernel[(2 * n_tiles,)](
        meta, tiles, ws, norm, badb, cnt, n_tiles, norm.numel(), float(lr_beta), float(max_norm or 0.0),
        ACT=_KIND[act_dtype], W_DT=_KIND[w_dtype], PREC=prec, HAS_CLIP=max_norm is not None, BM=block_m, BN=block_n,
        BK=block_k, RB=128, num_warps=num_warps, num_stages=num_stages,
    )
