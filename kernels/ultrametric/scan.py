"""The bucket-table kernels of hard-mode ultrametric attention (README.md beside this file).

Vocabulary shared by every kernel here. A *table* is one dense float32 block [N, D] of bucket
sums (and, forward only, an int32 block [N] of counts), one per (batch, key head) group g and
slot: table (g, slot) starts at tab + (g * SLOTS + slot) * N * D. Row `code` holds the sum over
the rows added so far whose level-l prefix code (reference.ultrametric.prefix_codes) is `code`.

*Sources* are the rows added to tables, *targets* the rows that read them:
  forward:  sources = keys (v, one head per group),   targets = queries (R heads per group)
  backward: sources = queries (dy / den, R heads),    targets = keys (dv, one head per group)
Both live on the key axis: position P in [0, Tk); a source (target) row index is P - SRC_OFF
(P - TGT_OFF): queries sit at P = Tk - Tq + i. The forward's target at P sees sources at
positions <= P; the backward (REVERSE) runs time backwards: targets see sources at >= P.

Digits are int tensors [B, heads, T, K] (contiguous); codes are built level by level
(code_l = sum_{m<l} p^m + value_l, value_l = value_{l-1} * p + digit_l) in int32: the launcher
refuses N > 2^16 tables.
"""

import triton
import triton.language as tl

from geokern.kernels._common import _INTERPRET


@triton.jit
def _digit(dig_ptr, digbase, rows, valid, l, K, p):
    """Digit l of each row as int32, clamped to [0, p - 1]: digits unchecked on the host (the
    decode state's ops by default, check_digits=False, capture and tracing) stay in bounds; the
    decode kernels mark such rows NaN besides (_bad_rows)."""
    d = tl.load(dig_ptr + (digbase + rows) * K + l, mask=valid, other=0).to(tl.int32)
    return tl.minimum(tl.maximum(d, 0), p - 1)


@triton.jit
def _bad_rows(dig_ptr, digbase, rows, valid, K, p):
    """Whether each valid row holds a digit outside [0, p - 1] (unclamped): the decode state's
    kernels (POISON) turn such rows into NaN rather than let the clamp answer for them, since its
    ops do not read the digits on the host (a sync per step)."""
    bad = tl.zeros_like(rows) != 0
    for l in range(K):
        d = tl.load(dig_ptr + (digbase + rows) * K + l, mask=valid, other=0).to(tl.int64)
        bad = bad | (d < 0) | (d >= p)
    return bad & valid


@triton.jit
def _src_rows(P0, b, head, keep_ptr, val_ptr, lse_ptr, HS, TS, SRC_OFF, Tk, D,
              SCALE_LSE: tl.constexpr, KEEP_SRC: tl.constexpr, C: tl.constexpr, CB: tl.constexpr,
              BD: tl.constexpr):
    """The sources at positions [P0, P0 + C) of head `head`, in a block of CB >= C rows (chunk_block):
    (rows [CB] int64, use [CB] bool, values [CB, BD] float32). A removed row (past the chunk or
    the end, padded key, query with no key) has use False and values 0, whatever it holds in memory."""
    pos = P0 + tl.arange(0, CB)
    rows = (pos - SRC_OFF).to(tl.int64)
    use = (tl.arange(0, CB) < C) & (rows >= 0) & (rows < TS)
    rd = tl.arange(0, BD)
    base = (b * HS + head).to(tl.int64) * TS
    vals = tl.load(val_ptr + (base + rows)[:, None] * D + rd[None, :], mask=use[:, None] & (rd < D)[None, :],
                   other=0.0).to(tl.float32)
    if KEEP_SRC:
        use = use & (tl.load(keep_ptr + b * Tk + pos, mask=use, other=0) != 0)
    if SCALE_LSE:  # dy / max(den, 1e-9); a query with no visible key (lse -inf) reaches no key
        lse = tl.load(lse_ptr + base + rows, mask=use, other=float("-inf"))
        use = use & (lse != float("-inf"))
        vals = vals / tl.maximum(tl.exp(lse), 1e-9)[:, None]
    vals = tl.where(use[:, None], vals, 0.0)
    return rows, use, vals


@triton.jit
def _add_rows(tab, cnt, dig_ptr, digbase, rows, use, vals, K, p, D, COUNT: tl.constexpr, BD: tl.constexpr):
    """Add each used row's values to its K + 1 prefix buckets (atomics: rows of one block may
    share a bucket)."""
    rd = tl.arange(0, BD)
    m2 = use[:, None] & (rd < D)[None, :]
    code = tl.zeros_like(rows).to(tl.int32)  # the root, code 0
    tl.atomic_add(tab + code.to(tl.int64)[:, None] * D + rd[None, :], vals, mask=m2, sem="relaxed")
    if COUNT:
        tl.atomic_add(cnt + code, tl.full(code.shape, 1, tl.int32), mask=use, sem="relaxed")
    val = tl.zeros_like(code)
    base = 0
    pw = 1
    for l in range(1, K + 1):
        dl = _digit(dig_ptr, digbase, rows, use, l - 1, K, p)
        base += pw
        pw *= p
        val = val * p + dl
        code = base + val
        tl.atomic_add(tab + code.to(tl.int64)[:, None] * D + rd[None, :], vals, mask=m2, sem="relaxed")
        if COUNT:
            tl.atomic_add(cnt + code, tl.full(code.shape, 1, tl.int32), mask=use, sem="relaxed")


@triton.jit
def _f32(x):
    """A float argument as a float32 scalar: under torch.compile float arguments arrive as float64,
    which would make every weight of the hot loops a float64 value (and change the accumulators'
    type); cast once per program instead."""
    return tl.full([], x, tl.float32)


@triton.jit
def _read_rows(tab, cnt, dig_ptr, digbase, rows, valid, K, p, log2a, am1, D,
               COUNT: tl.constexpr, EXCL: tl.constexpr, C: tl.constexpr, BD: tl.constexpr):
    """sum_m w_m * table[code_m(row)] for each target row, every w_m >= 0 (nothing cancels;
    reference.ultrametric.read_codes): (acc [C, BD], den [C], seen [C]). log2a and am1 are
    float32 (_f32).
    EXCL False (alpha > 1): the K + 1 prefix buckets, w_0 = 1, w_l = alpha^(l-1) (alpha - 1).
    EXCL True (alpha <= 1, where those weights are <= 0 and cancel): disjoint buckets, the p - 1
    siblings of the row's level-l bucket with weight alpha^(l-1) for l = 1..K, then its level-K
    bucket with weight alpha^K: (p - 1) K + 1 reads."""
    rd = tl.arange(0, BD)
    m2 = valid[:, None] & (rd < D)[None, :]
    den = tl.zeros([C], tl.float32)
    seen = tl.zeros([C], tl.int1)
    if COUNT:  # the root bucket (code 0) holds every source so far
        c0 = tl.load(cnt + tl.zeros([C], tl.int32), mask=valid, other=0, cache_modifier=".cg")
        seen = c0 > 0
    if EXCL:
        acc = tl.zeros([C, BD], tl.float32)
    else:
        acc = tl.load(tab + rd[None, :] + tl.zeros([C, 1], tl.int64), mask=m2, other=0.0, cache_modifier=".cg")
        if COUNT:
            den = c0.to(tl.float32)
    val = tl.zeros([C], tl.int32)
    code = tl.zeros([C], tl.int32)
    base = 0
    pw = 1
    for l in range(1, K + 1):
        dl = _digit(dig_ptr, digbase, rows, valid, l - 1, K, p)
        base += pw
        pw *= p
        if EXCL:  # the siblings of this level's bucket: keys whose first differing digit is digit l
            w = tl.exp2((l - 1) * log2a)
            for c in range(p):
                sib = valid & (dl != c)
                scode = base + val * p + c
                acc += w * tl.load(tab + scode.to(tl.int64)[:, None] * D + rd[None, :],
                                   mask=sib[:, None] & (rd < D)[None, :], other=0.0, cache_modifier=".cg")
                if COUNT:
                    den += w * tl.load(cnt + scode, mask=sib, other=0, cache_modifier=".cg").to(tl.float32)
        val = val * p + dl
        code = base + val
        if not EXCL:
            w = am1 * tl.exp2((l - 1) * log2a)
            acc += w * tl.load(tab + code.to(tl.int64)[:, None] * D + rd[None, :], mask=m2, other=0.0,
                               cache_modifier=".cg")
            if COUNT:
                den += w * tl.load(cnt + code, mask=valid, other=0, cache_modifier=".cg").to(tl.float32)
    if EXCL:  # the row's level-K bucket: the keys equal to it in every digit
        w = tl.exp2(K * log2a)
        acc += w * tl.load(tab + code.to(tl.int64)[:, None] * D + rd[None, :], mask=m2, other=0.0, cache_modifier=".cg")
        if COUNT:
            den += w * tl.load(cnt + code, mask=valid, other=0, cache_modifier=".cg").to(tl.float32)
    return acc, den, seen


@triton.jit
def _store_rows(out_ptr, lse_ptr, keep_ptr, outbase, rows, valid, acc, den, seen, b, pos, Tk, D,
                FWD: tl.constexpr, BD: tl.constexpr):
    """Forward: y = acc / max(den, 1e-9) and lse = log(den) (-inf where no key is seen).
    Backward: dv = acc, zero for a padded key."""
    rd = tl.arange(0, BD)
    m2 = valid[:, None] & (rd < D)[None, :]
    if FWD:
        y = acc / tl.maximum(den, 1e-9)[:, None]
        tl.store(lse_ptr + outbase + rows, tl.where(seen, tl.log(den), float("-inf")), mask=valid)
    else:
        keep = tl.load(keep_ptr + b * Tk + pos, mask=valid, other=0) != 0
        y = tl.where(keep[:, None], acc, 0.0)
    tl.store(out_ptr + (outbase + rows)[:, None] * D + rd[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _count_dot(a, b):
    """a @ b of 0 / 1 matrices, exact (float16 operands hold 0 and 1, float32 sums count): on the
    tensor cores; float32 copies under the interpreter (its 16-bit dot is wrong in triton 3.8).
    An "ieee" float32 dot here is ~6k FFMA of code that the rest of the kernel's registers pay for."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def count_nonfinite(vis, vals):
    """(nan, pinf, ninf) [rows, BD] float32: per target row and channel, how many of the sources it
    sees (vis [rows, cols]) hold NaN / +inf / -inf in vals [cols, BD]."""
    vf = vals.to(tl.float32)
    return _count_dot(vis, vf != vf), _count_dot(vis, vf == float("inf")), _count_dot(vis, vf == -float("inf"))


@triton.jit
def apply_nonfinite(dense, nan, pinf, ninf):
    """dense with the counted non-finite values put back: NaN where a NaN or both infinities are
    seen, else +inf / -inf where one is."""
    return tl.where((nan > 0) | ((pinf > 0) & (ninf > 0)), float("nan"),
                    tl.where(pinf > 0, float("inf"), tl.where(ninf > 0, -float("inf"), dense)))


@triton.jit
def reinsert_nonfinite(dense, vals, vis, finite):
    """dense = W @ where(finite, vals, 0) with the non-finite values put back: a non-finite value
    reaches exactly the targets that see its row, counted through the visibility pattern vis
    [rows, cols] (W * inf would also poison hidden targets, W * NaN every target). Three more
    dots, only for a block that holds one (vals [cols, BD], finite its mask)."""
    if tl.max(tl.where(finite, 0, 1)) > 0:
        nan, pinf, ninf = count_nonfinite(vis, vals)
        dense = apply_nonfinite(dense, nan, pinf, ninf)
    return dense


@triton.jit
def _lcp_block(tdig, tbase, trows, tvalid, sdig, sbase, srows, suse, K, CB: tl.constexpr):
    """lcp [CB, CB] int32 between target rows and source rows (leading equal digits)."""
    alive = tl.full([CB, CB], 1, tl.int1)
    lcp = tl.zeros([CB, CB], tl.int32)
    for l in range(K):
        dt = tl.load(tdig + (tbase + trows) * K + l, mask=tvalid, other=0).to(tl.int32)
        ds = tl.load(sdig + (sbase + srows) * K + l, mask=suse, other=-1).to(tl.int32)
        alive = alive & (dt[:, None] == ds[None, :])
        lcp += alive.to(tl.int32)
    return lcp


@triton.jit
def ultrametric_summary_kernel(
    sdig_ptr, val_ptr, lse_ptr, keep_ptr, tab_ptr, cnt_ptr,
    HS, NS, TS, SRC_OFF, Tk, Hkv, K, p, N, D, SLOTS, CPS, nchunks,
    SCALE_LSE: tl.constexpr, KEEP_SRC: tl.constexpr, COUNT: tl.constexpr, C: tl.constexpr, CB: tl.constexpr,
    BD: tl.constexpr, POISON: tl.constexpr,
):
    # sdig: [B, HS, TS, K] int; val: [B, HS, TS, D]; tab: [B * Hkv, SLOTS, N, D] fp32, cnt [.., N] i32.
    # One program: segment s (chunks [s * CPS, (s + 1) * CPS) of C positions) of one group g;
    # adds its sources (NS heads per group) into table (g, s). grid (segments, B * Hkv). POISON (the
    # decode append): a source with an out-of-range digit adds NaN values (_bad_rows).
    s = tl.program_id(0)
    g = tl.program_id(1)
    b = g // Hkv
    hk = g % Hkv
    tab = tab_ptr + (g.to(tl.int64) * SLOTS + s) * N * D
    cnt = cnt_ptr + (g.to(tl.int64) * SLOTS + s) * N
    for c in range(s * CPS, tl.minimum((s + 1) * CPS, nchunks)):
        for r in range(NS):
            head = hk * NS + r
            rows, use, vals = _src_rows(c * C, b, head, keep_ptr, val_ptr, lse_ptr, HS, TS, SRC_OFF, Tk, D,
                                        SCALE_LSE, KEEP_SRC, C, CB, BD)
            digbase = (b * HS + head).to(tl.int64) * TS
            if POISON:
                vals = tl.where(_bad_rows(sdig_ptr, digbase, rows, use, K, p)[:, None], float("nan"), vals)
            _add_rows(tab, cnt, sdig_ptr, digbase, rows, use, vals, K, p, D, COUNT, BD)


@triton.jit
def ultrametric_prefix_kernel(tab_ptr, S, WIDTH, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    # tab: [G, S + 1, WIDTH] (float32 sums or int32 counts). One program: BLOCK columns of one
    # group g, grid (cdiv(WIDTH, BLOCK), G). Slot s becomes the sum of the slots before it
    # (after it, REVERSE): the table a segment's scan starts from; slot S gets the total.
    g = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < WIDTH
    base = tab_ptr + g * (S + 1) * WIDTH + cols
    run = tl.zeros([BLOCK], tab_ptr.dtype.element_ty)
    for i in range(S):
        s = S - 1 - i if REVERSE else i
        x = tl.load(base + s * WIDTH, mask=m, other=0)
        tl.store(base + s * WIDTH, run, mask=m)
        run += x
    tl.store(base + S * WIDTH, run, mask=m)


@triton.jit
def ultrametric_read_kernel(
    tdig_ptr, tab_ptr, cnt_ptr, out_ptr, lse_ptr, keep_ptr,
    HT, TR, TT, TGT_OFF, Tk, Hkv, K, p, N, D, SLOTS, slot, log2a, am1,
    FWD: tl.constexpr, EXCL: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, POISON: tl.constexpr,
):
    # tdig: [B, HT, TT, K]; out: [B, HT, TT, D] (lse [B, HT, TT] forward). One program: C targets of
    # one (batch, target head), grid (cdiv(TT, C), B * HT); they read table (group, slot) only
    # (non-causal attention, decode): every source is visible to every target. POISON (the decode
    # query, forward): a target with an out-of-range digit gets y and lse NaN (_bad_rows).
    log2a, am1 = _f32(log2a), _f32(am1)
    bh = tl.program_id(1)
    b = bh // HT
    g = b * Hkv + (bh % HT) // TR
    rows = (tl.program_id(0) * C + tl.arange(0, C)).to(tl.int64)
    valid = rows < TT
    tab = tab_ptr + (g.to(tl.int64) * SLOTS + slot) * N * D
    cnt = cnt_ptr + (g.to(tl.int64) * SLOTS + slot) * N
    base = bh.to(tl.int64) * TT
    acc, den, seen = _read_rows(tab, cnt, tdig_ptr, base, rows, valid, K, p, log2a, am1, D, FWD, EXCL, C, BD)
    if POISON:
        bad = _bad_rows(tdig_ptr, base, rows, valid, K, p)
        acc = tl.where(bad[:, None], float("nan"), acc)
        den = tl.where(bad, float("nan"), den)
        seen = seen | bad  # lse = log(NaN), not the -inf of a query that sees no key
    _store_rows(out_ptr, lse_ptr, keep_ptr, base, rows, valid, acc, den, seen, b, rows + TGT_OFF, Tk, D, FWD, BD)


@triton.jit
def ultrametric_scan_kernel(
    tdig_ptr, sdig_ptr, val_ptr, slse_ptr, keep_ptr, tab_ptr, cnt_ptr, out_ptr, lse_ptr,
    HT, NT, TT, TGT_OFF, HS, NS, TS, SRC_OFF, Tk, Hkv, K, p, N, D, SLOTS, CPS, nchunks, log2a, am1,
    FWD: tl.constexpr, SCALE_LSE: tl.constexpr, KEEP_SRC: tl.constexpr, EXCL: tl.constexpr, C: tl.constexpr,
    CB: tl.constexpr, BD: tl.constexpr,
):
    # The causal scan. tdig: [B, HT, TT, K], sdig: [B, HS, TS, K], val: [B, HS, TS, D]; tables as in
    # the summary kernel, slot s holding the sum of the sources before segment s (after it,
    # backward). One program: segment s of group g, grid (segments, B * Hkv): chunk by chunk (in
    # time order), its NT target heads read the table and add the chunk's own visible sources
    # densely (C x C weights, a tensor-core dot), then the chunk's sources enter the table. The
    # chunk's rows sit in blocks of CB = chunk_block(C) >= 16 rows (tl.dot's least K on sm_90; a
    # power of two for tl.arange), the rows past C masked off.
    log2a, am1 = _f32(log2a), _f32(am1)
    s = tl.program_id(0)
    g = tl.program_id(1)
    b = g // Hkv
    hk = g % Hkv
    tab = tab_ptr + (g.to(tl.int64) * SLOTS + s) * N * D
    cnt = cnt_ptr + (g.to(tl.int64) * SLOTS + s) * N
    c_lo = s * CPS
    c_hi = tl.minimum((s + 1) * CPS, nchunks)
    rd = tl.arange(0, BD)
    for i in range(c_hi - c_lo):
        if FWD:
            c = c_lo + i
        else:
            c = c_hi - 1 - i
        P0 = c * C
        pos = P0 + tl.arange(0, CB)
        trows = (pos - TGT_OFF).to(tl.int64)
        tvalid = (tl.arange(0, CB) < C) & (trows >= 0) & (trows < TT)
        for rt in range(NT):
            tbase = (b * HT + hk * NT + rt).to(tl.int64) * TT
            acc, den, seen = _read_rows(tab, cnt, tdig_ptr, tbase, trows, tvalid, K, p, log2a, am1, D, FWD, EXCL, CB,
                                        BD)
            for rs in range(NS):
                shead = hk * NS + rs
                sbase = (b * HS + shead).to(tl.int64) * TS
                srows, suse, vals = _src_rows(P0, b, shead, keep_ptr, val_ptr, slse_ptr, HS, TS, SRC_OFF, Tk, D,
                                              SCALE_LSE, KEEP_SRC, C, CB, BD)
                lcp = _lcp_block(tdig_ptr, tbase, trows, tvalid, sdig_ptr, sbase, srows, suse, K, CB)
                if FWD:
                    vis = pos[None, :] <= pos[:, None]
                else:
                    vis = pos[None, :] >= pos[:, None]
                vis = vis & suse[None, :] & tvalid[:, None]
                W = tl.where(vis, tl.exp2(lcp.to(tl.float32) * log2a), 0.0)
                finite = (vals == vals) & (tl.abs(vals) != float("inf"))
                dense = tl.dot(W, tl.where(finite, vals, 0.0), input_precision="ieee")
                acc += reinsert_nonfinite(dense, vals, vis, finite)
                if FWD:
                    den += tl.sum(W, axis=1)
                    seen = seen | (tl.max(vis.to(tl.int32), axis=1) > 0)
            _store_rows(out_ptr, lse_ptr, keep_ptr, tbase, trows, tvalid, acc, den, seen, b, pos, Tk, D, FWD, BD)
        # every read of this chunk is done before its sources change the table
        tl.debug_barrier()
        for rs in range(NS):
            shead = hk * NS + rs
            srows, suse, vals = _src_rows(P0, b, shead, keep_ptr, val_ptr, slse_ptr, HS, TS, SRC_OFF, Tk, D,
                                          SCALE_LSE, KEEP_SRC, C, CB, BD)
            _add_rows(tab, cnt, sdig_ptr, (b * HS + shead).to(tl.int64) * TS, srows, suse, vals, K, p, D, FWD, BD)
        tl.debug_barrier()
