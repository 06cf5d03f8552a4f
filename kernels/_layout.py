"""Layouts over broadcast, strided leading (batch) dims, without copies.

The Python twin of csrc/common.cuh's RowLayout: leading dims are coalesced where
every operand is linear across them; operands broadcast along a dim get stride 0.
Kernels turn a flat row (or batch) index into an operand's offset with row_offset.
"""

import triton
import triton.language as tl  # noqa: F401  (the interpreter asserts a jit function's module imports it)


MAX_DIMS = 4


@triton.jit
def row_offset(idx, s1, s2, s3, t0, t1, t2, t3):
    """Element offset of flat index `idx` over sizes (s0, s1, s2, s3) with strides t."""
    i3 = idx % s3
    r = idx // s3
    i2 = r % s2
    r = r // s2
    i1 = r % s1
    i0 = r // s1
    return i0 * t0 + i1 * t1 + i2 * t2 + i3 * t3


def broadcast_strides(t, lead, trailing=1):
    """Strides of t's leading dims (all but its last `trailing`) viewed as `lead`,
    zero where t is broadcast."""
    n, nt = len(lead), t.dim() - trailing
    out = [0] * n
    for i in range(n):
        it = i - (n - nt)
        if it >= 0 and t.shape[it] != 1:
            out[i] = t.stride(it)
    return out


def contiguous_strides(lead, n):
    st, s = [0] * len(lead), n
    for i in range(len(lead) - 1, -1, -1):
        st[i] = s
        s *= lead[i]
    return st


def row_layout(lead, strides):
    """(sizes, [strides per operand]) padded to MAX_DIMS, or None if more dims remain.

    Sizes are ordered outermost first; padding dims have size 1 and stride 0.
    """
    sz, st = [], [[] for _ in strides]
    for d, size in enumerate(lead):
        if size == 1:
            continue
        if sz and all(st[o][-1] == strides[o][d] * size for o in range(len(strides))):
            sz[-1] *= size
            for o in range(len(strides)):
                st[o][-1] = strides[o][d]
        else:
            sz.append(size)
            for o in range(len(strides)):
                st[o].append(strides[o][d])
    if len(sz) > MAX_DIMS:
        return None
    pad = MAX_DIMS - len(sz)
    return [1] * pad + sz, [[0] * pad + s for s in st]


def layout_for(a, b, lead, n):
    """(a, b, sizes, strides) for operands a, b and a contiguous output of shape lead+(n,).

    Copies a and b only when more than MAX_DIMS dims cannot be merged.
    """
    lay = row_layout(lead, [broadcast_strides(a, lead), broadcast_strides(b, lead), contiguous_strides(lead, n)])
    if lay is None:
        full = tuple(lead) + (n,)
        a, b = a.expand(full).contiguous(), b.expand(full).contiguous()
        lay = row_layout(lead, [broadcast_strides(a, lead), broadcast_strides(b, lead), contiguous_strides(lead, n)])
    sizes, strides = lay
    return a, b, sizes, strides

