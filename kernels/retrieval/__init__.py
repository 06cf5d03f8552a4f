"""Triton kernels of the retrieval family and their launchers (what geokern.ops.retrieval imports).

    retrieval_attention_fwd / retrieval_attention_bwd   softmax(-beta R sqrt(g(k - q) + eps)) @ V
                                                        (attention_fwd.py, attention_bwd.py)
    retrieval_cost_fwd / retrieval_cost_bwd             R sqrt(max(g(k - q), 0) + eps) (cost.py)

Inputs are 4-D: [NB0, NB1, L, F] with size-1 batch dims where an operand is shared; r is
[NB0|1, NB1|1, LQ|1, M|1] float32, mask likewise (bool) or None; w [F] float32, the diagonal
metric. A bank (bk, bv, br) has the same layout with its own length in place of M, and no mask.
README.md beside this file holds the measurements behind the tuning choices.
"""

import math

import torch

from geokern._backend import interpret_mode
from geokern._checks import broadcast_shapes
from geokern.kernels._common import cdiv, launch, next_pow2
from geokern.kernels.retrieval.attention_bwd import retrieval_attention_bwd_dq_kernel, retrieval_attention_bwd_kernel
from geokern.kernels.retrieval.attention_fwd import retrieval_attention_fwd_kernel
from geokern.kernels.retrieval.common import (MASK_KEY, MASK_NONE, MASK_PAIR, R_BATCH, R_KEY, R_PAIR, R_QUERY,
                                              even_block, sqnorm_kernel)
from geokern.kernels.retrieval.cost import retrieval_cost_bwd_kernel, retrieval_cost_fwd_kernel

__all__ = ["retrieval_attention_fwd", "retrieval_attention_bwd", "retrieval_cost_fwd", "retrieval_cost_bwd", "MAX_F"]

LOG2E = math.log2(math.e)
MAX_F = 128  # the cost's backward holds all features of a tile at once


def r_mode(r):
    return int(r.shape[-2] != 1) + 2 * int(r.shape[-1] != 1)


def _mask_mode(mask):
    return MASK_NONE if mask is None else (MASK_KEY if mask.shape[-2] == 1 else MASK_PAIR)


def _programs(n):
    """n programs on grid axis x (every launch here is one axis: y and z stop at 65535)."""
    if n >= 2**31:
        raise ValueError(f"retrieval: {n} Triton programs needed, more than a grid axis holds (2^31 - 1); "
                         "split the batch")
    return n


def _pow2(n):
    return max(16, next_pow2(n))


def _prec(dtype):
    # float32 inputs: exact float32 dots (tf32 would cancel badly in |q|^2 + |k|^2 - 2 q.k)
    if interpret_mode():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _norm_mma(dtype, mask, knob):
    """Whether the forward adds the norms and sums the rows on tensor cores (common.norm_split):
    knob -1 (choose) or 1 for 16-bit inputs, 0 never. float32 inputs keep exact float32 adds, and
    masked launches keep them too (Triton 3.6's software pipeliner crashed compiling the masked
    tensor-core norm path for some shapes on the H100; unmasked launches ran clean)."""
    return knob != 0 and dtype in (torch.float16, torch.bfloat16) and mask is None


def _pipelined(d, knob):
    """Whether the forward issues the next tile's distance GEMM before this tile's softmax: knob
    0 / 1 forces it; -1 chooses it from D = 128 on (at D = 64 the extra live tile costs more than
    the overlap gains: README.md)."""
    return _pow2(d) >= 128 if knob < 0 else bool(knob)


class _Segment:
    """One key segment expanded (as strided views) to the batch shape `lead`, with its norms.

    shared_k / shared_v: one copy of the keys / values for the whole batch whose gradient is one
    copy too (its extent in `grads`, (dk, dv) shapes, is [1, 1]): the backward adds into [M, F]."""

    def __init__(self, k, v, r, mask, w, lead, lq, split=False, grads=None):
        self.k, self.v, self.r, self.mask = k, v, r, mask
        self.m = k.shape[2]
        self.ke = k.expand(lead + tuple(k.shape[2:]))
        # per key, once (a bank stays unexpanded); split: the forward's norms on tensor cores
        kn = sqnorm(k, w, split=split)
        self.kn = kn.expand(lead + tuple(kn.shape[2:]))
        self.ve = v.expand(lead + tuple(v.shape[2:]))
        self.re = r.expand(lead + (lq, self.m))  # for its strides; kernels get r (never empty) itself
        # the bool mask itself (Triton loads *i1 as bytes): torch.compile traces this launcher, and
        # inductor (torch 2.11) cannot lower a uint8 view of a bool computed in the graph
        self.me = None if mask is None else mask.expand(lead + (lq, self.m))
        self.r_mode = r_mode(r)
        nb = lead[0] * lead[1]
        dk_s, dv_s = grads or (k.shape, v.shape)
        self.shared_k = nb > 1 and tuple(dk_s[:2]) == (1, 1)
        self.shared_v = nb > 1 and tuple(dv_s[:2]) == (1, 1)

    def strides(self, with_mask):
        s = [*self.ke.stride(), *self.kn.stride()[:3], *self.ve.stride(), *self.re.stride()]
        if with_mask:
            s += [0, 0, 0, 0] if self.me is None else [*self.me.stride()]
        return s

    def long(self):
        """Whether an offset inside one batch of this segment (key, norm or value element) may pass
        int32: the forward then advances 64-bit tile bases (a little more work per score)."""
        ks, vs = self.k.stride(), self.v.stride()  # (the norms' row stride is at most 16)
        reach = (self.m + 128) * max(abs(ks[2]), abs(vs[2]), 16) + abs(ks[3]) * self.k.shape[3]
        return reach + abs(vs[3]) * self.v.shape[3] >= 2**31

    def even(self):
        # an empty segment is not "even": the pipelined forward loads its first tile before the
        # loop, and without masks that would read an empty tensor
        return self.m > 0 and self.m % even_block() == 0


def _segments(q, k, v, w, r, mask, bk, bv, br, split=False, shapes=None):
    lead = tuple(broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2]))
    lq = q.shape[2]
    seg = _Segment(k, v, r, mask, w, lead, lq, split, shapes and shapes[0][1:3])
    bank = None
    if bk is not None and bk.shape[2] > 0:
        bank = _Segment(bk, bv, br, None, w, lead, lq, split, shapes and shapes[1][1:3])
    return lead, seg, bank


def sqnorm(x, w, xw=None, split=False):
    """|x|^2_w per row of x [NB0, NB1, L, F] (any strides) as float32 [NB0, NB1, L]; with xw
    (contiguous, x's shape and dtype) also writes w x rounded to x's dtype there. With split,
    [NB0, NB1, L, 16] bfloat16: the key side of common.norm_split."""
    nb0, nb1, l, d = x.shape
    shape, dtype = ((nb0, nb1, l, 16), torch.bfloat16) if split else ((nb0, nb1, l), torch.float32)
    out = torch.empty(shape, dtype=dtype, device=x.device)
    if out.numel() == 0:
        return out
    bl = 64
    launch(sqnorm_kernel)[(_programs(cdiv(l, bl) * nb0 * nb1),)](
        x, w, out, out if xw is None else xw, *x.stride(), nb1, l, d, WRITE_XW=xw is not None, SPLIT=split, BLOCK_L=bl,
        BLOCK_D=_pow2(d))
    return out


# ---- attention ---------------------------------------------------------------------


def retrieval_attention_fwd(q, k, v, w, r, mask, bk, bv, br, beta, eps, pipeline=-1, norm_mma=-1):
    """(out [NB0, NB1, LQ, DV] in v's dtype, lse [NB0, NB1, LQ] float32); bk / bv / br: an
    optional second key segment (a bank, usually shared by the batch) or None.

    pipeline: issue the next key tile's GEMM before this tile's softmax (-1 choose, 0 off, 1 on);
    norm_mma: norms and row sums on tensor cores for 16-bit unmasked launches (-1 / 1 on, 0 off)."""
    split = _norm_mma(q.dtype, mask, norm_mma)
    lead, seg, bank = _segments(q, k, v, w, r, mask, bk, bv, br, split)
    lq, d, dv = q.shape[2], q.shape[3], v.shape[3]
    out = torch.empty(lead + (lq, dv), dtype=v.dtype, device=v.device)
    lse = torch.empty(lead + (lq,), dtype=torch.float32, device=v.device)
    nb = lead[0] * lead[1]
    if nb * lq == 0:  # (d_v = 0 still runs: the lse is an output)
        return out, lse
    if seg.m == 0 and bank is None:
        return out.zero_(), lse.fill_(float("-inf"))
    qe = q.expand(lead + (lq, d))
    two = bank or seg  # the kernel ignores segment 2 without HAS_BANK: any valid tensors do
    me = seg.me if seg.me is not None else r.new_zeros((1,), dtype=torch.bool)
    eb = even_block()
    grid = lambda meta: (_programs(cdiv(lq, meta["BLOCK_M"]) * nb),)  # noqa: E731
    args = (qe, w, seg.ke, seg.kn, seg.ve, seg.r, me, two.ke, two.kn, two.ve, two.r, out, lse,
            *qe.stride(), *seg.strides(True), *two.strides(False), lead[1], lq, seg.m, two.m, d, dv,
            float(beta) * LOG2E, float(eps))
    kw = dict(R_MODE=seg.r_mode, MASK_MODE=_mask_mode(mask), R2_MODE=two.r_mode, HAS_BANK=bank is not None,
              PREC=_prec(q.dtype), EVEN_M=lq % eb == 0, EVEN_N=seg.even(), EVEN_N2=two.even(),
              EVEN_D=_pow2(d) == d, EVEN_DV=_pow2(dv) == dv, NORM_MMA=split, PIPE=_pipelined(d, pipeline),
              BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv))
    # beta > 0: rows whose logits all passed float32 (beta * R * spd) get their hard-min limit from a
    # second pass of the same program (beta = 0 cannot overflow, and its cost-unit differences would
    # read -inf * 0)
    launch(retrieval_attention_fwd_kernel)[grid](*args, **kw, HARD_PASS=beta > 0, LONG_N=seg.long(),
                                                 LONG_N2=two.long())
    return out, lse


def _long_q(lq, d, dv, seg, bank, me):
    """Whether a query-row offset inside one batch may pass int32 in the backward's loop: rows of
    qw / do / dqa (D, DV wide), of a per-pair dR (M wide), of R or the mask through their strides."""
    widths = [_pow2(d), _pow2(dv), seg.m, abs(seg.re.stride(2)), abs(me.stride(2)) if me.dim() == 4 else 0]
    if bank is not None:
        widths += [bank.m, abs(bank.re.stride(2))]
    return (lq + 128) * (max(widths) + 128) >= 2**31


def _eps_pos(eps):
    """eps is a positive normal float32: the distances' clamp keeps them >= eps > 0, and the
    backward needs no zero-distance selects (a subnormal eps may flush to 0 on the GPU)."""
    return float(eps) >= 2.0**-126


def _own_dtype(x, shape):
    """A gradient buffer's dtype: x's own where the buffer has x's shape (the kernel rounds each entry
    once and nothing is summed after it: no float32 buffer and cast pass), else float32 (the sum
    over broadcast dims that follows runs in float32)."""
    return x.dtype if tuple(x.shape) == tuple(shape) else torch.float32


def _grad_buffers(s, lead, lq, d, dv):
    """(dk, dv, dr) buffers of one segment: float32 zeros where added into atomically (or not
    written: dR without NEED_DR); dk / dv written whole in the inputs' dtype where no sum follows."""
    f32 = dict(dtype=torch.float32, device=s.k.device)
    dk_s, dv_s = lead + (s.m, d), lead + (s.m, dv)
    dk = (torch.zeros((1, 1, s.m, d), **f32) if s.shared_k
          else torch.empty(dk_s, dtype=_own_dtype(s.k, dk_s), device=s.k.device))
    dvv = (torch.zeros((1, 1, s.m, dv), **f32) if s.shared_v
           else torch.empty(dv_s, dtype=_own_dtype(s.v, dv_s), device=s.k.device))
    dr_shape = {R_BATCH: (lq, 1), R_QUERY: (lq, 1), R_KEY: (1, s.m), R_PAIR: (lq, s.m)}[s.r_mode]
    return dk, dvv, torch.zeros(lead + dr_shape, **f32)


def retrieval_attention_bwd(do, q, k, v, w, r, mask, bk, bv, br, out, lse, dlse, beta, eps, need_dr, shapes):
    """(dq, dk, dv, dr, dbank_k, dbank_v, dbank_r, dw) at `shapes`: ((dq, dk, dv, dr),
    (_, dbank_k, dbank_v, dbank_r) or None) as geokern.ops.retrieval gives them; without a bank
    its three are empty [0]. dw is [F]. dr (dbank_r) stay zeros unless need_dr. float32, except
    dq / dk / dv (and the bank's) that have their input's shape: those come in the input's dtype.

    dlse (optional, lse's shape) is the gradient of the log-sum-exp output: with
    d lse / d logit_j = p_j it enters as delta_i = rowsum(dO * O)_i - dlse_i."""
    lead, seg, bank = _segments(q, k, v, w, r, mask, bk, bv, br, shapes=shapes)
    lq, d, dv = q.shape[2], q.shape[3], v.shape[3]
    nb = lead[0] * lead[1]
    bd = _pow2(d)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    dq = torch.empty(lead + (lq, d), dtype=_own_dtype(q, lead + (lq, d)), device=dev)
    dw = torch.zeros((bd,), **f32)
    dk, dvv, dr = _grad_buffers(seg, lead, lq, d, dv)
    if bank is not None:
        dk2, dv2, dr2 = _grad_buffers(bank, lead, lq, d, dv)
    elif bk is not None:  # an empty bank: zero gradients of its (empty) shapes
        dk2, dv2, dr2 = (torch.zeros(s, **f32) for s in shapes[1][1:])
    else:
        dk2, dv2, dr2 = (torch.zeros((0,), **f32) for _ in range(3))

    def finish():
        grads = [g.sum_to_size(s) for g, s in zip((dk, dvv, dr), shapes[0][1:])]
        if bk is not None:
            dk2_, dv2_, dr2_ = (g.sum_to_size(s) for g, s in zip((dk2, dv2, dr2), shapes[1][1:]))
        else:
            dk2_, dv2_, dr2_ = dk2, dv2, dr2
        return (dq, *grads, dk2_, dv2_, dr2_, dw[:d])

    if nb * lq == 0 or (seg.m == 0 and bank is None):
        dq.zero_(), dk.zero_(), dvv.zero_()
        return finish()
    qe = q.expand(lead + (lq, d)).contiguous()
    qw = torch.empty_like(qe)
    # qw = w q / psc in q's dtype: psc, a power of two, keeps float16 finite (one max over q, float16
    # only); appended to w, where the kernels read it (their loads of w stop at F)
    if q.dtype == torch.float16:  # the other dtypes' kernels never read psc: no ops for it
        psc = torch.ones(1, **f32)
        if qe.numel() > 0:
            # over finite entries only: one inf coordinate must not bring the overflow back for every row
            amax = (qe.abs().nan_to_num(0.0, 0.0, 0.0).amax(dim=(0, 1, 2)).float() * w.abs()).amax()
            psc = torch.exp2(torch.ceil(torch.log2(amax / 16384.0))).clamp(min=1.0).reshape(1)
        w = torch.cat([w, psc])
    qn = sqnorm(qe, w, qw)
    do = do.expand(lead + (lq, dv)).contiguous()
    delta = (do.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float().expand(delta.shape)
    delta = delta.contiguous()
    lse = lse.contiguous()
    dqa = torch.zeros(lead + (lq, d), **f32)
    rs = torch.zeros(lead + (lq,), **f32)
    two = bank or seg
    b_dk, b_dv, b_dr = (dk2, dv2, dr2) if bank is not None else (dw.new_zeros(1), dw.new_zeros(1), dw.new_zeros(1))
    me = seg.me if seg.me is not None else r.new_zeros((1,), dtype=torch.bool)
    eb = even_block()
    nblk = lambda bn: cdiv(seg.m, bn) + (cdiv(bank.m, bn) if bank is not None else 0)  # noqa: E731
    grid = lambda meta: (_programs(nblk(meta["BLOCK_N"]) * nb),)  # noqa: E731
    launch(retrieval_attention_bwd_kernel)[grid](
        qw, qn, do, lse, delta, w, dqa, rs, dw,
        seg.ke, seg.kn, seg.ve, seg.r, me, dk, dvv, dr,
        two.ke, two.kn, two.ve, two.r, b_dk, b_dv, b_dr,
        *seg.strides(True), *two.strides(False), lead[1], lq, seg.m, two.m, d, dv,
        float(beta) * LOG2E, float(beta), float(eps),
        R_MODE=seg.r_mode, MASK_MODE=_mask_mode(mask), R2_MODE=two.r_mode, HAS_BANK=bank is not None,
        SHARED_K=seg.shared_k, SHARED_V=seg.shared_v, SHARED_K2=two.shared_k, SHARED_V2=two.shared_v,
        NEED_DR=bool(need_dr), PREC=_prec(q.dtype), EVEN_M=lq % eb == 0, EVEN_N=seg.even(), EVEN_N2=two.even(),
        EVEN_D=bd == d, EVEN_DV=_pow2(dv) == dv, BLOCK_D=bd, BLOCK_DV=_pow2(dv), EPS_POS=_eps_pos(eps),
        LONG_Q=_long_q(lq, d, dv, seg, bank, me),
    )
    rows = nb * lq
    br_ = 64
    launch(retrieval_attention_bwd_dq_kernel)[(cdiv(rows, br_),)](qe, dqa, rs, w, dq, dw, rows, d,
                                                                          BLOCK_R=br_, BLOCK_D=bd)
    return finish()


# ---- cost --------------------------------------------------------------------------


def _blocks(f):
    """(BLOCK_X = BLOCK_Y, BLOCK_F): at most 4096 pair-feature differences in a tile."""
    bf = max(16, next_pow2(f))
    if interpret_mode():
        return 8, bf
    bxy = 4
    while bxy * 2 <= 32 and (bxy * 2) ** 2 * bf <= 4096:
        bxy *= 2
    return bxy, bf


def _bstrides(t):
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(4)]


def retrieval_cost_fwd(q, k, w, r, eps):
    """cost [NB0, NB1, LQ, M] float32."""
    lead = tuple(broadcast_shapes(q.shape[:2], k.shape[:2]))
    lq, m, f = q.shape[2], k.shape[2], q.shape[3]
    out = torch.empty(lead + (lq, m), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    bxy, bf = _blocks(min(f, 32))
    grid = (_programs(cdiv(lq, bxy) * cdiv(m, bxy) * lead[0] * lead[1]),)
    launch(retrieval_cost_fwd_kernel)[grid](
        q, k, w, r, out, *_bstrides(q), *_bstrides(k), *_bstrides(r), lead[1], lq, m, f, float(eps),
        BLOCK_X=bxy, BLOCK_Y=bxy, BLOCK_F=bf)
    return out


def _side(x, y, w, g, sg, r, sr, out, outw, drx, drp, lead, lx, ly, eps):
    nx0, nx1 = out.shape[0], out.shape[1]
    f = x.shape[3]
    bxy, bf = _blocks(f)
    grid = (_programs(cdiv(lx, bxy) * nx0 * nx1),)
    dummy = out
    launch(retrieval_cost_bwd_kernel)[grid](
        x, y, w, g, r, out, outw if outw is not None else dummy, drx if drx is not None else dummy,
        drp if drp is not None else dummy,
        *_bstrides(x), *_bstrides(y), *sg, *sr, *(_bstrides(drp) if drp is not None else [0, 0, 0, 0]),
        lead[0], lead[1], nx1, lx, ly, f, float(eps),
        LOOP0=nx0 == 1 and lead[0] > 1, LOOP1=nx1 == 1 and lead[1] > 1, WRITE_W=outw is not None,
        WRITE_DRX=drx is not None, WRITE_DRP=drp is not None, BLOCK_X=bxy, BLOCK_Y=bxy, BLOCK_F=bf)


def retrieval_cost_bwd(grad, q, k, w, r, eps, shapes):
    """(dq, dk, dr, dw), float32, at the shapes (dq, dk, dr) that geokern.ops.retrieval gives."""
    lead = tuple(grad.shape[:2])
    lq, m = q.shape[2], k.shape[2]
    dq_s, dk_s, dr_s = shapes
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dr = torch.zeros(dq_s, **f32), torch.zeros(dk_s, **f32), torch.zeros(dr_s, **f32)
    dwp = torch.zeros((lead[0] * lead[1] * lq, q.shape[3]), **f32)
    if grad.numel() == 0:
        return dq, dk, dr, dwp.sum(0)
    mode = r_mode(r)
    sg, sr = _bstrides(grad), _bstrides(r)
    _side(q, k, w, grad, sg, r, sr, dq, dwp, dr if mode < 2 else None, dr if mode == 3 else None, lead, lq, m, eps)
    tr = lambda s: [s[0], s[1], s[3], s[2]]  # noqa: E731
    _side(k, q, w, grad, tr(sg), r, tr(sr), dk, None, dr if mode == 2 else None, None, lead, m, lq, eps)
    return dq, dk, dr, dwp.sum(0)
