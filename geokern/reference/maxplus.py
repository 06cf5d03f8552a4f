"""Max-plus (tropical) and min-plus matrix products: the definition (spec section 1).

    C[..., i, j] = max_k (A[..., i, k] + B[..., k, j])        semiring="maxplus"
    C[..., i, j] = min_k (A[..., i, k] + B[..., k, j])        semiring="minplus"

A is (..., M, K), B is (..., K, N); the leading dims broadcast. -inf is the max-plus
semiring zero (+inf the min-plus one): an empty K gives it. Conventions every backend
follows:

- argmax (argmin for min-plus) is the k that wins each entry; ties go to the smallest k.
  For an entry whose sums are all -inf that is k = 0; for K = 0 it is -1. For a NaN entry
  the reference returns the first k whose sum is NaN; kernels return some k in [0, K)
  (NaN entries have no meaningful route).
- NaN: C[..., i, j] is NaN exactly when one of the sums it reads is NaN: a NaN anywhere in
  row i of A or in column j of B (whatever the other operand holds there, -inf included),
  or a sum -inf + inf (IEEE). Margin is NaN exactly where C is; argmax there is some k in
  [0, K) (the reference: the first NaN sum's k).
- margin is the gap between the winner and the runner-up over k (top1 - top2 for
  max-plus, top2 - top1 for min-plus): the entry cannot change under perturbations of
  the inputs smaller than margin / 2. It is +inf where there is no runner-up other than
  the semiring zero (K < 2, or every other sum is the zero), else 0 on ties, including a
  tie at the winning infinity (+inf for max-plus, -inf for min-plus), else the gap.
- Gradient flows through the argmax only: dA[i, k] = sum_j dC[i, j] [k == argmax(i, j)],
  likewise dB. The result below is built by gathering A and B at the argmax, so
  autograd of this function is exactly that rule.

Memory-bounded: K is processed in chunks so that no M x K x N tensor is formed
(at most about _CHUNK_ELEMS sums at a time). Works in any float dtype, on any device;
16-bit inputs are summed in their own dtype (rounding is monotone, so the max of the
rounded sums equals the rounded max: only the argmax among near-ties can differ from
a float32 computation).

Integer inputs (int16, int32; forward only: integer tensors carry no gradient) are for
dynamic programmes such as all-pairs shortest paths. The dtype's extreme values are
special: the semiring zero SENTINEL (max-plus: the minimum, -2**15 for int16, -2**31 for
int32, acts as -inf; min-plus: the maximum, 2**15 - 1, 2**31 - 1, acts as +inf) and the
OVERFLOW marker, the opposite extreme (int_overflow). A sum with the sentinel is the
sentinel, an entry whose sums all involve it is the sentinel (argmax 0), and an empty K
gives it. Results are exact for inputs in [-INT_BOUND, INT_BOUND] (5460 for int16,
357913940 for int32: a third of a quarter of the range, so that every sum stays inside the
kernels' accumulators without wrapping) or the sentinel; finite results then lie in
[-2 * INT_BOUND, 2 * INT_BOUND]. Any other input value (the overflow marker included) is
out of range, and C[..., i, j] is the OVERFLOW marker (argmax 0) exactly when row i of A or
column j of B holds one (as NaN for floats): never a wrapped or clamped value, never
"no path". A result beyond INT_BOUND is itself out of range as an input, so a loop that
feeds results back (repeated squaring) turns to the marker instead of going wrong: pick
the dtype by the largest possible result (see int_bound). Margin is float-only.
"""

import torch

SEMIRINGS = ("maxplus", "minplus")
INT_DTYPES = (torch.int16, torch.int32)
_CHUNK_ELEMS = 1 << 24


def int_bound(dtype):
    """INT_BOUND of an integer dtype: finite inputs in [-INT_BOUND, INT_BOUND] give exact results.

    (2**(bits-2) - 2) // 3: the kernels stand the sentinel in by +-2**(bits-2) (less one for
    min-plus), and a stand-in sum must stay beyond every finite sum: s - INT_BOUND > 2 INT_BOUND."""
    return (2 ** (torch.iinfo(dtype).bits - 2) - 2) // 3


def int_sentinel(dtype, semiring):
    """The value of an integer dtype that stands for the semiring zero (-inf / +inf)."""
    info = torch.iinfo(dtype)
    return info.min if semiring == "maxplus" else info.max


def int_overflow(dtype, semiring):
    """The value an integer result takes where an input it reads is out of range: the
    extreme opposite the sentinel (the maximum for max-plus, the minimum for min-plus)."""
    info = torch.iinfo(dtype)
    return info.max if semiring == "maxplus" else info.min


def int_out_of_range(A, B, semiring):
    """Which entries of C read an out-of-range input: a bool tensor broadcastable to C's
    shape, (..., M, 1) | (..., 1, N). Reductions over A's rows and B's columns and one
    elementwise pass over C's shape; device-side, no host sync."""
    q = int_bound(A.dtype)

    def bad(x, dim):
        if x.shape[dim] == 0:  # K = 0: nothing is read (amax of nothing is an error)
            shape = list(x.shape)
            del shape[dim]
            return x.new_zeros(shape, dtype=torch.bool)
        if semiring == "maxplus":
            # |x| of the sentinel (the dtype's minimum) wraps to itself, below q: one pass
            return x.abs().amax(dim) > q
        # min-plus: the sentinel is the maximum; ~x = -x - 1 maps it to the minimum (whose |.|
        # wraps) and (q, max) to [q + 2, max] in |.|, while in-range x give at most q + 1
        return (x.amin(dim) < -q) | (torch.bitwise_not(x).abs_().amax(dim) > q + 1)

    return bad(A, -1).unsqueeze(-1) | bad(B, -2).unsqueeze(-2)


def _int_matmul(A, B, return_argmax, semiring):
    """Integer inputs: the float64 definition with the sentinel as the semiring zero, and the
    overflow marker where an out-of-range input is read."""
    zero = int_sentinel(A.dtype, semiring)
    inf = float("-inf") if semiring == "maxplus" else float("inf")
    a = A.double().masked_fill(A == zero, inf)
    b = B.double().masked_fill(B == zero, inf)
    C, idx = maxplus_matmul(a, b, True, False, semiring)
    bad = int_out_of_range(A, B, semiring)
    # in range, finite results lie within +-2 INT_BOUND: the clamp only tames the entries
    # the marker overwrites
    info = torch.iinfo(A.dtype)
    C = torch.where(torch.isinf(C), float(zero), C.clamp(info.min + 1, info.max - 1))
    C = torch.where(bad, float(int_overflow(A.dtype, semiring)), C).to(A.dtype)
    idx = idx.masked_fill(bad, 0)
    return (C, idx) if return_argmax else C


def _route(A, B):
    """(top1, argmax, top2) of max-plus over k for broadcast A (L, M, K), B (L, K, N)."""
    L, M, K = A.shape
    N = B.shape[-1]
    kc = max(1, min(K, _CHUNK_ELEMS // max(1, L * M * N)))
    top1 = top2 = idx = None
    for k0 in range(0, K, kc):
        k1 = min(K, k0 + kc)
        s = A[:, :, k0:k1, None] + B[:, None, k0:k1, :]  # (L, M, kc, N)
        ks = torch.arange(k0, k1, device=A.device).view(1, 1, -1, 1)
        # chunk winner: NaN wins (first NaN k), else the max, ties to the smallest k
        nan = torch.isnan(s)
        c1 = s.amax(dim=2)  # propagates NaN
        win = torch.where(nan.any(dim=2, keepdim=True), nan, s == c1.unsqueeze(2))
        i1 = torch.where(win, ks, K).amin(dim=2)
        # runner-up in the chunk: the max after removing the winner (one copy of it)
        s2 = s.masked_fill(ks == i1.unsqueeze(2), float("-inf"))
        c2 = s2.amax(dim=2) if k1 - k0 > 1 else torch.full_like(c1, float("-inf"))
        if top1 is None:
            top1, idx, top2 = c1, i1, c2
            continue
        # combine with earlier chunks: a later k takes over only if strictly greater
        # (or the first NaN); earlier k keeps ties
        take = (c1 > top1) | (torch.isnan(c1) & ~torch.isnan(top1))
        new2 = torch.where(take, torch.maximum(top1, c2), torch.maximum(top2, c1))
        top1, idx, top2 = torch.where(take, c1, top1), torch.where(take, i1, idx), new2
    return top1, idx, top2


def maxplus_matmul(A, B, return_argmax=False, return_margin=False, semiring="maxplus"):
    """C = A (max,+) B, optionally with (argmax, margin). See the module docstring."""
    if semiring not in SEMIRINGS:
        raise ValueError(f"maxplus_matmul: semiring must be one of {SEMIRINGS}, got {semiring!r}")
    if A.dim() < 2 or B.dim() < 2 or A.shape[-1] != B.shape[-2]:
        raise ValueError(f"maxplus_matmul: A (..., M, K) and B (..., K, N) do not match: {tuple(A.shape)}, {tuple(B.shape)}")
    if A.dtype in INT_DTYPES:
        if return_margin:
            raise TypeError(f"maxplus_matmul: return_margin is float-only, got {A.dtype} inputs")
        return _int_matmul(A, B, return_argmax, semiring)
    sign = 1.0 if semiring == "maxplus" else -1.0
    lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    M, K, N = A.shape[-2], A.shape[-1], B.shape[-1]
    Ae, Be = A.expand(*lead, M, K), B.expand(*lead, K, N)
    if K == 0:
        # + the (zero) sums of the empty operands: C stays differentiable, with zero gradients
        C = A.new_full((*lead, M, N), -sign * float("inf")) + (A.sum() + B.sum())
        idx = torch.full((*lead, M, N), -1, dtype=torch.int64, device=A.device)
        margin = torch.full_like(C, float("inf"))
    else:
        with torch.no_grad():
            L = lead.numel()
            a = (sign * Ae.detach()).reshape(L, M, K)
            b = (sign * Be.detach()).reshape(L, K, N)
            top1, idx, top2 = _route(a, b)
            idx = idx.reshape(*lead, M, N)
            gap = top1 - top2
            # a tie (at +inf too, where the gap is NaN) is 0; no runner-up but the zero is +inf
            gap = torch.where(top1 == top2, 0.0, gap)
            margin = torch.where((top2 == float("-inf")) & ~torch.isnan(top1), float("inf"), gap)
            margin = margin.reshape(*lead, M, N)
        # C built by gathering the winners: exact, and differentiable along the route only
        C = Ae.gather(-1, idx) + Be.gather(-2, idx)
    out = (C,)
    if return_argmax:
        out += (idx,)
    if return_margin:
        out += (margin,)
    return out[0] if len(out) == 1 else out


def maxplus_matmul_backward(grad, argmax, a_shape, b_shape):
    """(dA, dB) for C = maxplus_matmul(A, B) from dC = grad and the argmax route.

    dA[..., i, k] = sum_j grad[..., i, j] [k == argmax[..., i, j]], dB likewise; summed
    over dims where A or B was broadcast. Accumulates in float32 (float64 for float64).
    """
    *lead, M, N = grad.shape
    K = a_shape[-1]
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    dA = torch.zeros(*lead, M, K, dtype=acc, device=grad.device)
    dB = torch.zeros(*lead, K, N, dtype=acc, device=grad.device)
    if K > 0 and grad.numel() > 0:
        dA.scatter_add_(-1, argmax, g)
        dB.scatter_add_(-2, argmax, g)
    return dA.sum_to_size(a_shape).to(grad.dtype), dB.sum_to_size(b_shape).to(grad.dtype)
