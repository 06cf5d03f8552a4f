"""Triton kernel of the contrastive update: the gated, clipped apply W += f G, b += s gb.

The GEMM that makes G (the unscaled stacked product [Yn ; -c Yf]^T [Xn ; Xf]) runs in cuBLAS
(geokern/ops/contrastive.py says why), and so does ||G|| (a float64 reduction); what is left is
memory-bound: read W and G once, write W once. The kernel also decides the gate and the clip from
||G|| itself, each program from the same few scalars, so no chain of 0-dim torch ops (about a
dozen launches of a few us each) sits between the norm and the apply. Skipped elements are never
stored, so a skipped W is bit-identical (-0.0 stays -0.0, NaN payloads stay) and no host reads
the flag.
"""

import triton
import triton.language as tl

from geokern.kernels._common import launch, narrow

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
    w_blocks = triton.cdiv(n_w, BLOCK)
    grid = (w_blocks + triton.cdiv(n_b, BLOCK),)
    if grid[0] == 0:
        return
    launch(contrastive_apply_kernel)[grid](
        w, g, n_w, b, gb, n_b, norm_g, float(s), float(max_norm or 0.0), w_blocks,
        HAS_CLIP=max_norm is not None, BLOCK=BLOCK,
    )
