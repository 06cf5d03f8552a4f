"""Triton kernels of quaternion and octonion attention (spec section 4; the definition is
geokern.reference.hypercomplex_attention): one forward kernel and a two-kernel backward,
shared by both algebras through N = 4 / 8 (common.py holds the algebra).

Launchers take q, qn (B, H, Tq, D) and k, v, kn (B, Hkv, Tk, D) with any strides, and
contiguous outputs; float16 / bfloat16 / float32 (float32 dots exact: "ieee").
"""

import torch

from geokern._backend import interpret_mode
from geokern.kernels._common import cdiv, launch, next_pow2
from geokern.kernels.hypercomplex_attention.attention_bwd import (hypercomplex_attention_bwd_dkdv_kernel,
                                                                  hypercomplex_attention_bwd_dq_kernel)
from geokern.kernels.hypercomplex_attention.attention_fwd import hypercomplex_attention_fwd_kernel

__all__ = ["hypercomplex_attention_fwd", "hypercomplex_attention_bwd"]

LOG2E = 1.4426950408889634

def _prec(dtype):
    # the interpreter's 16-bit dot is wrong in triton 3.8: it multiplies float32 copies
    if interpret_mode():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"

# The H100's shared memory per block (227 KiB): Triton only checks it at launch, where it raises
# OutOfResources. tests/test_kernels_compile.py checks every (n, BLOCK_D, dtype) against it.
SMEM_LIMIT = 232448


def _blocks(n, block_d, dtype):
    """(BLOCK_M, BLOCK_N, warps, stages). The octonion accumulators are [rows, 8 * BLOCK_D] float32,
    so the tiles shrink to keep rows * width within two budgets (width: the value row, at least
    2 BLOCK_D for the quaternion backward's q, q^, dy buffers):

    registers: 16K for 16-bit inputs (the budget the retrieval kernels measured; quaternions get
    flash-attention's 64 x 64), 4K for float32 octonions, whose "ieee" dots are FMA GEMMs holding
    both [rows, width] operands in registers. Above a thread's 255 registers ptxas does not spill a
    little: it falls back to 32 registers and kilobytes of local-memory stack per thread, which is
    slow and reserved per CUDA context for every resident thread (tests/test_kernels_resources.py).
    Octonions and float32 run on 8 warps, which halves each thread's share of the tiles (float32
    quaternions at D = 128 fell back to 32 registers on 4); 16-bit quaternions keep flash
    attention's 4 warps, which stay at 255 registers and under 1 KB of stack.

    shared memory: 8K for float32 (the FMA dots stage each float32 operand in shared memory, ~17
    bytes per unit of rows * width; 287744 > 232448 bytes for D = 24 octonions at 64 x 64). At the
    16-row floor of tl.dot the budget can still be exceeded (float32 octonions, D = 128): those
    loops are not software-pipelined (stages 1), which drops their double buffers."""
    if interpret_mode():
        return 16, 16, 4, 3
    width = max(block_d * (1 if n == 4 else 8), 2 * block_d)
    smem = 8192 if dtype == torch.float32 else 16384
    regs = 4096 if dtype == torch.float32 and n == 8 else 16384
    rows = max(16, min(64, min(smem, regs) // width))
    warps = 8 if n == 8 or dtype == torch.float32 else 4
    return rows, rows, warps, (1 if rows * width > smem else 3)

def _strides(*ts):
    return [s for t in ts for s in t.stride()]

def _common(q, k, causal, n):
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    block_d = max(16, next_pow2(D))
    bm, bn, warps, stages = _blocks(n, block_d, q.dtype)
    vw = block_d * (1 if n == 4 else 8)
    meta = dict(CAUSAL=bool(causal), N=n, PREC=_prec(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, VW=vw,
                num_warps=warps, num_stages=stages)
    return B, H, Hk, Tq, Tk, D, meta

def hypercomplex_attention_fwd(q, k, v, qn, kn, e, y, lse, causal, scale, n):
    """y (B, H, Tq, D) and lse (B, H, Tq) float32, written in place; e: the [n * n, n * n]
    float32 epilogue matrix (octonions; any float32 tensor for quaternions)."""
    B, H, Hk, Tq, Tk, D, meta = _common(q, k, causal, n)
    if y.numel() == 0:
        return y, lse
    grid = (cdiv(Tq, meta["BLOCK_M"]), B * H)
    launch(hypercomplex_attention_fwd_kernel)[grid](
        q, k, v, qn, kn, e, y, lse, *_strides(q, k, v, qn, kn),
        H, H // Hk, Tq, Tk, D, Tk - Tq, scale * LOG2E, **meta)
    return y, lse

def hypercomplex_attention_bwd(q, k, v, qn, kn, e, et, dy, y, lse, dq, dqn, dk, dkn, dv, causal, scale, n):
    """Writes dq, d q^ (B, H, Tq, D) and dk, d k^, dv (B, Hkv, Tk, D), contiguous; dy contiguous."""
    B, H, Hk, Tq, Tk, D, meta = _common(q, k, causal, n)
    if dq.numel() == 0 and dk.numel() == 0:
        return
    delta = (dy.float() * y.float()).sum(-1).contiguous()  # <dy, y> = the rows' sum of P dP
    strides = _strides(q, k, v, qn, kn)
    scalars = (H, H // Hk, Tq, Tk, D, Tk - Tq, scale * LOG2E, scale)
    if dq.numel():
        launch(hypercomplex_attention_bwd_dq_kernel)[(cdiv(Tq, meta["BLOCK_M"]), B * H)](
            q, k, v, qn, kn, e, et, dy, lse, delta, dq, dqn, *strides, *scalars, **meta)
    if dk.numel():
        launch(hypercomplex_attention_bwd_dkdv_kernel)[(cdiv(Tk, meta["BLOCK_N"]), B * Hk)](
            q, k, v, qn, kn, et, dy, lse, delta, dk, dkn, dv, *strides, *scalars, **meta)

def flops(B, H, Tq, Tk, D, n, causal):
    """Forward flops as the benchmarks count them: 2 Tq Tk (D + value width) per head, with value
    width D (quaternions) or 8 D (octonions), halved when causal and square."""
    width = D if n == 4 else 8 * D
    f = 2.0 * B * H * Tq * Tk * (D + width)
    return f / 2 if causal and Tq == Tk else f

