"""Max-plus / min-plus matmul: every backend against the reference.

Kernels sum in float32 (float64 for float64) and round once; because rounding is
monotone, C, argmax and margin must equal the reference evaluated on the inputs
widened to that precision, bit for bit. C is also judged against the float64
reference with the suite's tolerance table.
"""

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import BACKENDS, DTYPES, dtype_id, need
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.reference import maxplus as ref

SEMIRINGS = ["maxplus", "minplus"]
INF = float("inf")

# (A batch, B batch, M, K, N): single element, odd sizes, batch broadcast both ways
SHAPES = [((), (), 1, 1, 1), ((), (), 7, 33, 5), ((3,), (), 33, 7, 17), ((2, 1), (3,), 5, 129, 7)]
if HAS_CUDA:
    SHAPES += [((), (), 129, 257, 200), ((2,), (1,), 300, 129, 33)]


def shape_id(x):
    """A(batch)-B(batch)-M-K-N for a SHAPES entry ('s': no batch dims)."""
    ba, bb, m, k, n = x
    return f"A{'x'.join(map(str, ba)) or 's'}-B{'x'.join(map(str, bb)) or 's'}-M{m}-K{k}-N{n}"


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_against_reference(backend, A, B, semiring, what=""):
    """C, argmax, margin of `backend` vs the reference evaluated at the backend's
    accumulation precision: exactly, up to the final rounding to 16 bits."""
    c, idx, mg = geokern.maxplus_matmul(A, B, return_argmax=True, return_margin=True, semiring=semiring, backend=backend)
    acc = A.dtype if backend == "torch" else acc_dtype(A.dtype)  # torch sums in the input dtype
    rc, ri, rm = ref.maxplus_matmul(A.to(acc), B.to(acc), True, True, semiring)
    name = f"{backend} {semiring} {what}"
    assert c.dtype == A.dtype and mg.dtype == A.dtype and idx.dtype == torch.int64
    # one rounding to 16 bits: allow one ulp (the Triton interpreter rounds halves up)
    ulp = torch.finfo(A.dtype).eps if A.dtype.itemsize == 2 else 0.0
    torch.testing.assert_close(c, rc.to(A.dtype), rtol=ulp, atol=0, equal_nan=True, msg=f"{name} output")
    torch.testing.assert_close(mg, rm.to(A.dtype), rtol=ulp, atol=0, equal_nan=True, msg=f"{name} margin")
    finite = ~torch.isnan(rc)
    assert torch.equal(idx[finite], ri[finite]), f"{name} argmax differs from the reference"
    K = A.shape[-1]
    assert ((idx >= 0) & (idx < max(K, 1))).all(), f"{name} argmax out of [0, K)"
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_reference(shape, dtype, semiring, backend):
    need(backend)
    ba, bb, M, K, N = shape
    A, B = rand(*ba, M, K, dtype=dtype), rand(*bb, K, N, dtype=dtype)
    c = check_against_reference(backend, A, B, semiring)
    value_only = geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend)
    torch.testing.assert_close(value_only, c, rtol=0, atol=0, msg=f"{backend} value-only output vs with argmax")
    r64 = ref.maxplus_matmul(A.double(), B.double(), semiring=semiring)
    assert_close(f"{backend} {semiring} output", c, r64, ref.maxplus_matmul(A, B, semiring=semiring))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_strided_inputs(dtype, backend):
    need(backend)
    M, K, N = (67, 45, 39) if not HAS_CUDA else (300, 200, 260)
    A = rand(2, K, 2 * M, dtype=dtype).transpose(-1, -2)[:, ::2]  # m stride 2, k stride 2M
    B = rand(3 * K, N + 5, dtype=dtype)[::3, 2:-3]  # k stride 3(N+5)
    assert not A.is_contiguous() and not B.is_contiguous()
    check_against_reference(backend, A, B, "maxplus", "strided")
    check_against_reference(backend, A[:1].expand(3, M, K), B.expand(3, K, N), "minplus", "expanded")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_ties_go_to_smallest_k(semiring, backend):
    need(backend)
    A = torch.randint(0, 3, (19, 40), device=DEVICE).float()
    B = torch.randint(0, 3, (40, 21), device=DEVICE).float()
    c, idx, mg = geokern.maxplus_matmul(A, B, return_argmax=True, return_margin=True, semiring=semiring, backend=backend)
    s = A[:, :, None] + B[None, :, :]
    best = s.amax(1) if semiring == "maxplus" else s.amin(1)
    first = torch.where(s == best[:, None, :], torch.arange(40, device=DEVICE)[None, :, None], 40).amin(1)
    torch.testing.assert_close(c, best, msg=f"{backend} tie output")
    assert torch.equal(idx, first), f"{backend} {semiring}: ties must go to the smallest k"
    nties = (s == best[:, None, :]).sum(1)
    assert torch.equal(mg == 0, nties > 1), f"{backend} {semiring}: margin must be 0 exactly where the best is tied"


@pytest.mark.parametrize("backend", BACKENDS)
def test_semiring_zero_and_nan(backend):
    need(backend)
    M, K, N = 9, 37, 11
    A, B = rand(M, K), rand(K, N)
    A[2] = -INF  # a row of the semiring zero: C row -inf, argmax 0, margin +inf
    B[:, 4] = -INF
    A[5, 3] = float("nan")  # NaN in A poisons row 5, in B column 7
    B[10, 7] = float("nan")
    A[6, 20] = -INF  # -inf + inf = NaN: row 6, column 8
    B[20, 8] = INF
    A[7, :30] = -INF  # partly -inf: still a finite winner among the last k
    check_against_reference(backend, A, B, "maxplus", "special values")
    c, idx, mg = geokern.maxplus_matmul(A, B, return_argmax=True, return_margin=True, backend=backend)
    ok = [j for j in range(N) if j not in (7, 8)]  # NaN: B[10, 7]; -inf + B[20, 8] = inf
    assert torch.isneginf(c[2, ok]).all() and (idx[2, ok] == 0).all() and torch.isposinf(mg[2, ok]).all()
    assert torch.isnan(c[5]).all() and torch.isnan(c[:, 7]).all() and torch.isnan(c[6, 8])
    assert torch.isfinite(c[7, :4]).all() and (idx[7, :4] >= 30).all()
    check_against_reference(backend, A, B, "minplus", "special values")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    need(backend)
    c = geokern.maxplus_matmul(rand(0, 5), rand(5, 3), backend=backend)
    assert c.shape == (0, 3)
    c, idx, mg = geokern.maxplus_matmul(rand(2, 4, 0), rand(0, 3), return_argmax=True, return_margin=True, backend=backend)
    assert c.shape == (2, 4, 3) and torch.isneginf(c).all() and (idx == -1).all() and torch.isposinf(mg).all()
    c = geokern.maxplus_matmul(rand(4, 0), rand(0, 3), semiring="minplus", backend=backend)
    assert torch.isposinf(c).all()


# ---- gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [((), (), 7, 33, 5), ((2, 1), (3,), 17, 9, 13)], ids=shape_id)
def test_backward_matches_reference(shape, dtype, backend):
    need(backend)
    ba, bb, M, K, N = shape
    A = rand(*ba, M, K, dtype=dtype).requires_grad_()
    B = rand(*bb, K, N, dtype=dtype).requires_grad_()
    out = geokern.maxplus_matmul(A, B, backend=backend)
    g = torch.randn_like(out)
    dA, dB = torch.autograd.grad(out, (A, B), g)
    # the route is the one the kernel sees: the reference at the accumulation precision
    acc = acc_dtype(dtype)
    A64, B64 = A.detach().to(acc).double().requires_grad_(), B.detach().to(acc).double().requires_grad_()
    _, route = ref.maxplus_matmul(A.detach().to(acc), B.detach().to(acc), return_argmax=True)
    dA64, dB64 = ref.maxplus_matmul_backward(g.double(), route, A.shape, B.shape)
    # the same-dtype baseline: the route torch finds in the input dtype. (Not autograd through
    # the reference's gather: its bf16 backward is a 32-bit atomic on a 16-bit element, which
    # compute-sanitizer reports past the end of an odd-sized gradient.)
    _, route_d = ref.maxplus_matmul(A.detach(), B.detach(), return_argmax=True)
    dAl, dBl = ref.maxplus_matmul_backward(g, route_d, A.shape, B.shape)
    assert dA.dtype == dtype and dB.dtype == dtype
    assert_close(f"{backend} grad A", dA, dA64, dAl)
    assert_close(f"{backend} grad B", dB, dB64, dBl)
    del A64, B64


def test_reference_backward_formula_matches_autograd():
    A = rand(3, 1, 6, 20, dtype=torch.float64).requires_grad_()
    B = rand(4, 20, 9, dtype=torch.float64).requires_grad_()
    C, idx = ref.maxplus_matmul(A, B, return_argmax=True)
    g = torch.randn_like(C)
    dA, dB = torch.autograd.grad(C, (A, B), g)
    fA, fB = ref.maxplus_matmul_backward(g, idx, A.shape, B.shape)
    torch.testing.assert_close(fA, dA, msg="formula grad A")
    torch.testing.assert_close(fB, dB, msg="formula grad B")


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gradcheck_float64(backend):
    need(backend)
    A = rand(2, 3, 5, dtype=torch.float64).requires_grad_()
    B = rand(5, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: geokern.maxplus_matmul(x, y, backend=backend), (A, B))
    f = lambda x, y: geokern.maxplus_matmul(x, y, semiring="minplus", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (A, B))


def test_reference_is_memory_bounded(monkeypatch):
    """The reference never forms the M x K x N sums at once: chunks over K agree."""
    A, B = rand(2, 9, 50, dtype=torch.float64), rand(50, 11, dtype=torch.float64)
    full = ref.maxplus_matmul(A, B, True, True)
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 2 * 9 * 11 * 3)  # 3 k per chunk
    chunked = ref.maxplus_matmul(A, B, True, True)
    for name, x, y in zip(("output", "argmax", "margin"), full, chunked):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"chunked {name}")


# ---- custom ops ----------------------------------------------------------------------


def _op_samples(qualname):
    A, B = rand(3, 7, 10), rand(10, 5)
    if "backward" in qualname:
        _, idx = ref.maxplus_matmul(A, B, return_argmax=True)
        return [(torch.randn(3, 7, 5, device=DEVICE), idx, [3, 7, 10], [10, 5])]
    return [(A, B, False, True, True, 0), (A.transpose(-1, -2)[..., :5, :], B[:7], True, False, False, 2)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("maxplus_", _op_samples)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public op with its kernels needs CUDA tensors")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_public_op_compiles_with_backward(backend):
    need(backend)
    A, B = rand(2, 33, 20).requires_grad_(), rand(20, 17).requires_grad_()
    f = torch.compile(lambda x, y: geokern.maxplus_matmul(x, y, backend=backend).square().sum(), fullgraph=True)
    dA, dB = torch.autograd.grad(f(A, B), (A, B))
    eA, eB = torch.autograd.grad(ref.maxplus_matmul(A, B).square().sum(), (A, B))
    assert_close("compiled grad A", dA, eA.double(), eA)
    assert_close("compiled grad B", dB, eB.double(), eB)


# ---- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    need(backend)
    mp = geokern.maxplus_matmul
    A, B = rand(4, 5), rand(5, 3)
    with pytest.raises(ValueError, match="disagree on K"):
        mp(A, rand(6, 3), backend=backend)
    with pytest.raises(TypeError, match="B has dtype torch.float64 but A has torch.float32"):
        mp(A, B.double(), backend=backend)
    with pytest.raises(TypeError, match="A must have dtype in"):
        mp(A.long(), B.long(), backend=backend)
    with pytest.raises(TypeError, match="B must be a torch.Tensor"):
        mp(A, [[1.0]], backend=backend)
    with pytest.raises(ValueError, match="A must have at least 2 dim"):
        mp(A[0], B, backend=backend)
    with pytest.raises(ValueError, match="batch dims of A"):
        mp(rand(2, 4, 5), rand(3, 5, 3), backend=backend)
    with pytest.raises(ValueError, match="B is on meta"):
        mp(A, torch.empty(5, 3, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="semiring must be one of"):
        mp(A, B, semiring="maxtimes", backend=backend)
    with pytest.raises(TypeError, match="return_argmax must be a bool"):
        mp(A, B, return_argmax=1, backend=backend)
    with pytest.raises(TypeError, match="num_splits must be an int"):
        mp(A, B, num_splits=2.0, backend=backend)
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        mp(A, B, num_splits=-1, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        mp(A, B, backend="numpy")


def test_unavailable_backend_is_an_error_not_a_fallback():
    cpu = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        geokern.maxplus_matmul(cpu, cpu.T, backend="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="the raw CUDA op's own checks run on CUDA tensors")
def test_cuda_op_checks_its_inputs():
    need("cuda")
    A = rand(4, 5)
    with pytest.raises(RuntimeError, match="disagree on K"):
        torch.ops.geokern.maxplus_cuda(A, rand(6, 3), False, False, False, 0)
    with pytest.raises(RuntimeError, match="b has dtype"):
        torch.ops.geokern.maxplus_cuda(A, rand(5, 3).double(), False, False, False, 0)
    with pytest.raises(RuntimeError, match="num_splits must be >= 0"):
        torch.ops.geokern.maxplus_cuda(A, rand(5, 3), False, False, False, -1)
