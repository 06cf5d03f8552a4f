"""Random-hyperplane bit signatures fused into the projection (reference.ultrametric.hyperplane_signatures).

One program: BT tokens of one (batch, head). With a projection weight it forms the head's
projection tile h [BT, D] = x[b, tokens, :] @ weight[h D : (h + 1) D, :]^T in registers
(float32 accumulation over Din in BC-wide steps: tensor-core dots for 16-bit inputs, "ieee"
float32 dots for float32 so that no tf32 rounding moves a dot across 0), then the plane dots
h @ planes[h]^T [BT, K] (float32 "ieee") and stores digit l = [dot > 0] as int8. The float
projection never reaches memory: per token the kernel reads Din x-values (from L2 after the
first head) and writes H K bytes, where the unfused path writes and rereads H D floats.

Ties: dot == 0 (and -0) gives 0, and NaN gives 0 (a false comparison), as the reference.
"""

import torch
import triton
import triton.language as tl

from geokern._backend import interpret_mode
from geokern.kernels._common import _INTERPRET, cdiv, launch, next_pow2


@triton.jit
def dot_f32acc(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b with float32 accumulation. The interpreter's dot misreads bfloat16 operands
    (Triton 3.8), so there they are widened to float32 first: exact products either way, as the
    GPU's tensor-core dot makes them."""
    if _INTERPRET and (a.dtype == tl.bfloat16 or a.dtype == tl.float16):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def ultrametric_signatures_kernel(
    x_ptr, w_ptr, planes_ptr, out_ptr, T, H, Din, D, K, PLANE_HS,
    HAS_W: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
    BK: tl.constexpr,
):
    # x: [B, T, Din] (HAS_W) or [B, H, T, D]; w: [H * D, Din]; planes: [H or 1, K, D] float32
    # (head stride PLANE_HS: 0 when shared); out: [B, H, T, K] int8. All contiguous.
    # grid (cdiv(T, BT), H, B): one program = BT tokens of head h of batch b.
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tm = t < T
    rd = tl.arange(0, BD)
    dm = rd < D
    if HAS_W:
        acc = tl.zeros([BT, BD], tl.float32)
        rc = tl.arange(0, BC)
        xrow = x_ptr + (b * T + t.to(tl.int64))[:, None] * Din
        wrow = w_ptr + (h * D + rd.to(tl.int64))[None, :] * Din
        for c0 in range(0, Din, BC):
            cm = (c0 + rc) < Din
            xt = tl.load(xrow + (c0 + rc)[None, :], mask=tm[:, None] & cm[None, :], other=0.0)
            wt = tl.load(wrow + (c0 + rc)[:, None], mask=cm[:, None] & dm[None, :], other=0.0)  # [BC, BD]
            acc = dot_f32acc(xt, wt, acc, PREC)
    else:
        xrow = x_ptr + ((b * H + h) * T + t.to(tl.int64))[:, None] * D
        acc = tl.load(xrow + rd[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    rk = tl.arange(0, BK)
    km = rk < K
    pl = tl.load(planes_ptr + h * PLANE_HS + rk[None, :] * D + rd[:, None], mask=dm[:, None] & km[None, :],
                 other=0.0)  # [BD, BK]: planes[h]^T
    dots = tl.dot(acc, pl, input_precision="ieee")  # [BT, BK]
    bits = (dots > 0).to(tl.int8)
    out = out_ptr + ((b * H + h) * T + t.to(tl.int64))[:, None] * K + rk[None, :]
    tl.store(out, bits, mask=tm[:, None] & km[None, :])


def blocks(D, K, block_t=0):
    """(BT, BC, BD, BK): tokens per program (block_t, 0: 16 under the interpreter, 64 for
    D <= 128 else 32), the Din step, and D and K padded to powers of two >= 16 (tl.dot's least)."""
    BD = max(16, next_pow2(D))
    BK = max(16, next_pow2(K))
    BT = block_t or (16 if interpret_mode() else (64 if BD <= 128 else 32))
    return BT, (32 if interpret_mode() else 64), BD, BK


def ultrametric_signatures_fwd(x, weight, planes, out, block_t=0):
    """x [B, T, Din] with weight [H * D, Din], or x [B, H, T, D] with weight None; planes
    [H or 1, K, D] float32; writes out [B, H, T, K] int8. Contiguous; 16-bit x uses tensor-core
    dots, float32 x "ieee" dots."""
    B, H, T, K = out.shape
    D = planes.shape[-1]
    BT, BC, BD, BK = blocks(D, K, block_t)
    Din = x.shape[-1] if weight is not None else D
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    launch(ultrametric_signatures_kernel)[(cdiv(T, BT), H, B)](
        x, x if weight is None else weight, planes, out, T, H, Din, D, K, 0 if planes.shape[0] == 1 else K * D,
        HAS_W=weight is not None, PREC=prec, BT=BT, BC=BC, BD=BD, BK=BK, num_warps=4 if BD <= 128 else 8)

