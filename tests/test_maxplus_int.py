"""Max-plus / min-plus matmul on integers (int16, int32): every backend against the
reference, exactly (integer sums are exact inside the documented range).

The sentinel (the dtype's minimum for max-plus, its maximum for min-plus) is the
semiring zero; inputs in [-INT_BOUND, INT_BOUND] give exact results (see
geokern.reference.maxplus). Also: split-K (CUDA) and all-pairs shortest paths by
repeated min-plus squaring, checked against Floyd-Warshall, with the argmax as the
witness that reconstructs each path.
"""

import pytest
import torch
from _custom_ops import check_opcheck, op_id, ops_here
from _helpers import BACKENDS, dtype_id, need
from conftest import DEVICE, HAS_CUDA
from test_maxplus import SEMIRINGS, shape_id

import geokern
from geokern.reference import maxplus as ref

INT_DTYPES = [torch.int16, torch.int32]

SHAPES = [((), (), 1, 1, 1), ((), (), 7, 33, 5), ((3,), (), 33, 7, 17), ((2, 1), (3,), 5, 129, 7)]
if HAS_CUDA:
    SHAPES += [((), (), 129, 257, 200), ((2,), (1,), 300, 129, 33), ((), (), 16, 5000, 24)]


def rand_int(*shape, dtype, lo=None, hi=None, sentinel_frac=0.0, semiring="maxplus"):
    """Uniform integers in [lo, hi] (default the exact range), some set to the sentinel."""
    q = ref.int_bound(dtype)
    lo = -q if lo is None else lo
    hi = q if hi is None else hi
    x = torch.randint(lo, hi + 1, shape, device=DEVICE, dtype=torch.int64)
    if sentinel_frac:
        x[torch.rand(shape, device=DEVICE) < sentinel_frac] = ref.int_sentinel(dtype, semiring)
    return x.to(dtype)


def check_int(backend, A, B, semiring, what=""):
    """C and argmax equal the reference exactly; value-only equals C."""
    name = f"{backend} {semiring} {A.dtype} {what}"
    c, idx = geokern.maxplus_matmul(A, B, return_argmax=True, semiring=semiring, backend=backend)
    rc, ri = ref.maxplus_matmul(A, B, True, semiring=semiring)
    assert c.dtype == A.dtype and idx.dtype == torch.int64, name
    assert torch.equal(c, rc), f"{name}: output differs from the reference at {(c != rc).nonzero()[:5].tolist()}"
    assert torch.equal(idx, ri), f"{name}: argmax differs from the reference at {(idx != ri).nonzero()[:5].tolist()}"
    value = geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend)
    assert torch.equal(value, rc), f"{name}: value-only output differs from the reference"
    return c, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_int_matches_reference(shape, dtype, semiring, backend):
    need(backend)
    ba, bb, M, K, N = shape
    A = rand_int(*ba, M, K, dtype=dtype, sentinel_frac=0.1, semiring=semiring)
    B = rand_int(*bb, K, N, dtype=dtype, sentinel_frac=0.1, semiring=semiring)
    check_int(backend, A, B, semiring)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=dtype_id)
def test_int_strided_and_broadcast(dtype, backend):
    need(backend)
    M, K, N = (23, 19, 17) if not HAS_CUDA else (300, 200, 260)
    A = rand_int(2, K, 2 * M, dtype=dtype).transpose(-1, -2)[:, ::2]
    B = rand_int(3 * K, N + 5, dtype=dtype)[::3, 2:-3]
    assert not A.is_contiguous() and not B.is_contiguous()
    check_int(backend, A, B, "maxplus", "strided")
    check_int(backend, A[:1].expand(3, M, K), B.expand(3, K, N), "minplus", "expanded")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=dtype_id)
def test_int_sentinel_and_range_edges(dtype, semiring, backend):
    """The sentinel absorbs every sum it is in; entries with no finite sum are the
    sentinel with argmax 0; finite results at +-2 INT_BOUND stay finite."""
    need(backend)
    q, zero = ref.int_bound(dtype), ref.int_sentinel(dtype, semiring)
    M, K, N = 6, 40, 5
    A = rand_int(M, K, dtype=dtype, semiring=semiring)
    B = rand_int(K, N, dtype=dtype, semiring=semiring)
    A[0] = zero  # a row of the sentinel: C row sentinel, argmax 0
    B[:, 1] = zero  # a column of it
    A[1, :30] = zero  # partly the sentinel: the winner is among the last 10 k
    A[2], B[:, 2] = q, q  # the largest finite result, 2 INT_BOUND
    A[3], B[:, 3] = -q, -q  # the smallest, -2 INT_BOUND
    A[4, ::2] = zero  # sentinel at even k of row 4, and at odd k of column 4: no finite sum
    B[1::2, 4] = zero
    c, idx = check_int(backend, A, B, semiring, "sentinel")
    assert (c[0] == zero).all() and (idx[0] == 0).all(), "sentinel row"
    assert (c[:, 1] == zero).all() and (idx[:, 1] == 0).all(), "sentinel column"
    assert (c[1, [0, 2, 3, 4]] != zero).all() and (idx[1, [0, 2, 3, 4]] >= 30).all(), "partly sentinel row"
    assert c[2, 2] == 2 * q and c[3, 3] == -2 * q, "range edges"
    assert c[4, 4] == zero and idx[4, 4] == 0, "no finite sum"
    c0, i0 = geokern.maxplus_matmul(A[:, :0], B[:0], return_argmax=True, semiring=semiring, backend=backend)
    assert (c0 == zero).all() and (i0 == -1).all(), "empty K gives the sentinel, argmax -1"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=dtype_id)
def test_int_ties_go_to_smallest_k(dtype, semiring, backend):
    need(backend)
    K = 40 if not HAS_CUDA else 1000
    A = rand_int(19, K, dtype=dtype, lo=0, hi=2)
    B = rand_int(K, 21, dtype=dtype, lo=0, hi=2)
    c, idx = geokern.maxplus_matmul(A, B, return_argmax=True, semiring=semiring, backend=backend)
    s = A.long()[:, :, None] + B.long()[None, :, :]
    best = s.amax(1) if semiring == "maxplus" else s.amin(1)
    first = torch.where(s == best[:, None, :], torch.arange(K, device=DEVICE)[None, :, None], K).amin(1)
    assert torch.equal(c.long(), best), f"{backend} {semiring} tie output"
    assert torch.equal(idx, first), f"{backend} {semiring}: ties must go to the smallest k"


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_is_forward_only(backend):
    need(backend)
    A, B = rand_int(4, 5, dtype=torch.int32), rand_int(5, 3, dtype=torch.int32)
    with pytest.raises(TypeError, match="return_margin is float-only"):
        geokern.maxplus_matmul(A, B, return_margin=True, backend=backend)
    with pytest.raises(RuntimeError, match="floating point"):  # torch's own: ints cannot require grad
        A.requires_grad_()
    with pytest.raises(TypeError, match="B has dtype torch.int16 but A has torch.int32"):
        geokern.maxplus_matmul(A, B.short(), backend=backend)


@pytest.mark.skipif(not HAS_CUDA, reason="the raw CUDA op's own checks run on CUDA tensors")
def test_int_cuda_op_checks():
    need("cuda")
    A, B = rand_int(4, 5, dtype=torch.int16), rand_int(5, 3, dtype=torch.int16)
    with pytest.raises(RuntimeError, match="margin is float-only"):
        torch.ops.geokern.maxplus_cuda(A, B, False, False, True, 0)
    _, idx = ref.maxplus_matmul(A, B, return_argmax=True)
    with pytest.raises(RuntimeError, match="grad must be floating point"):
        torch.ops.geokern.maxplus_backward_cuda(idx.short(), idx, [4, 5], [5, 3])


# ---- the operands as the CUDA kernels stream them -----------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="a CUDA-kernel path")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int16, torch.int32], ids=dtype_id
)
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_operand_layouts(semiring, dtype):
    """The CUDA forward streams padded k-major copies of A and B (float inputs already in
    that layout, A k-major and B row-major with M, N multiples of 128 and K of 32, are
    streamed as they are): every layout gives the reference's values, value-only and
    with argmax."""
    need("cuda")
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    for what, (A, B) in {
        "row-major": (r(2, 130, 264), r(264, 70)),
        "offset 1": (r(2, 130, 265)[..., 1:], r(264, 70)),
        "odd K": (r(2, 130, 261), r(261, 70)),
        "as streamed": (r(2, 64, 256).transpose(-1, -2), r(64, 256)),
        "as streamed, batched B": (r(96, 128).T, r(3, 96, 128)),
    }.items():
        if dtype.is_floating_point:
            A, B = A.to(dtype), B.to(dtype)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
        else:
            A, B = (A * 1000).to(dtype), (B * 1000).to(dtype)
            acc = dtype
        expect, expect_k = ref.maxplus_matmul(A.to(acc), B.to(acc), True, semiring=semiring)
        got = geokern.maxplus_matmul(A, B, semiring=semiring, backend="cuda")
        assert torch.equal(got, expect.to(dtype)), f"{dtype} {semiring} {what}: differs from the reference"
        got, got_k = geokern.maxplus_matmul(A, B, return_argmax=True, semiring=semiring, backend="cuda")
        assert torch.equal(got, expect.to(dtype)), f"{dtype} {semiring} {what}: with argmax, differs"
        assert torch.equal(got_k, expect_k), f"{dtype} {semiring} {what}: argmax differs"


# ---- split-K (CUDA) -------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="split-K is a CUDA-kernel path")
@pytest.mark.parametrize("splits", [0, 3, 7], ids=["auto", "3", "7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16, torch.int32], ids=dtype_id)
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_split_k(semiring, dtype, splits):
    """Slices of K combined in k order (num_splits: 0 chooses, n forces n): the same C and
    argmax (ties too) as one pass."""
    need("cuda")
    M, K, N = 40, 3001, 70  # one output tile: auto splits K
    if dtype.is_floating_point:
        A = torch.randint(0, 4, (2, M, K), device=DEVICE).to(dtype)  # many ties across slices
        B = torch.randint(0, 4, (K, N), device=DEVICE).to(dtype)
        A[0, 3] = float("-inf") if semiring == "maxplus" else float("inf")
        A[1, 5, 2000] = float("nan")
    else:
        A = rand_int(2, M, K, dtype=dtype, lo=0, hi=3, sentinel_frac=0.05, semiring=semiring)
        B = rand_int(K, N, dtype=dtype, lo=0, hi=3, sentinel_frac=0.05, semiring=semiring)
        A[0, 3] = ref.int_sentinel(dtype, semiring)
    c, idx = geokern.maxplus_matmul(A, B, return_argmax=True, semiring=semiring, num_splits=splits, backend="cuda")
    acc = torch.float32 if dtype.is_floating_point else dtype
    rc, ri = ref.maxplus_matmul(A.to(acc), B.to(acc), True, semiring=semiring)
    torch.testing.assert_close(c.to(acc), rc, rtol=0, atol=0, equal_nan=True, msg=f"split {splits} output")
    ok = ~torch.isnan(rc) if dtype.is_floating_point else torch.ones_like(ri, dtype=torch.bool)
    assert torch.equal(idx[ok], ri[ok]), f"split {splits}: argmax differs"
    value = geokern.maxplus_matmul(A, B, semiring=semiring, num_splits=splits, backend="cuda")
    torch.testing.assert_close(value, c, rtol=0, atol=0, equal_nan=True, msg=f"split {splits} value-only")


# ---- all-pairs shortest paths ------------------------------------------------------------


def _floyd_warshall(W):
    """Plain PyTorch Floyd-Warshall over a float64 weight matrix (inf: no edge)."""
    D = W.clone()
    for k in range(D.shape[0]):
        D = torch.minimum(D, D[:, k : k + 1] + D[k : k + 1, :])
    return D


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.float32], ids=dtype_id)
def test_all_pairs_shortest_paths(dtype, backend):
    """Repeated min-plus squaring of a random graph's weight matrix (0 diagonal, the
    semiring zero for no edge) gives all-pairs shortest paths; each squaring's argmax is a
    midpoint that splits every path into two shorter ones (the witness that rebuilds it)."""
    need(backend)
    n = 45 if not HAS_CUDA else 300
    g = torch.Generator(device="cpu").manual_seed(11)
    W = torch.randint(1, 20, (n, n), generator=g).double()
    W[torch.rand(n, n, generator=g) < (0.97 if n > 100 else 0.9)] = float("inf")
    W[:, -3:] = float("inf")  # three nodes nobody reaches: unreachable pairs stay the semiring zero
    W.fill_diagonal_(0)
    expect = _floyd_warshall(W)
    assert torch.isfinite(expect).float().mean() > 0.5 and torch.isinf(expect).any(), "graph too (dis)connected"
    if dtype.is_floating_point:
        D = W.to(dtype)
        inf = float("inf")
    else:
        inf = ref.int_sentinel(dtype, "minplus")
        D = torch.where(torch.isinf(W), inf, W).to(dtype)
    D = D.to(DEVICE)
    for _ in range((n - 1).bit_length()):
        prev = D
        D, mid = geokern.maxplus_matmul(prev, prev, return_argmax=True, semiring="minplus", backend=backend)
        fin = D != inf
        via = prev.gather(1, mid) + prev.gather(0, mid)  # prev[i, mid] + prev[mid, j]
        assert torch.equal(via[fin], D[fin]), f"{backend} {dtype}: argmax is not a shortest midpoint"
    got = torch.where(D == inf, float("inf"), D.double()).cpu()
    torch.testing.assert_close(got, expect, rtol=0, atol=0, msg=f"{backend} {dtype} shortest paths")


# ---- custom ops on integers --------------------------------------------------------------


@pytest.mark.parametrize("qualname", [q for q in ops_here("maxplus_") if "backward" not in q], ids=op_id)
def test_int_opcheck(qualname):
    A, B = rand_int(3, 7, 10, dtype=torch.int32), rand_int(10, 5, dtype=torch.int32)
    check_opcheck(qualname, [(A, B, False, True, False, 0), (A.short(), B.short(), True, False, False, 3)])
