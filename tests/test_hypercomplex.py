"""Quaternion and octonion products and conjugates: every backend against the reference."""

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import BACKENDS, DTYPES, dtype_id, need
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.reference import hypercomplex as ref

MUL = {4: geokern.quaternion_mul, 8: geokern.octonion_mul}
CONJ = {4: geokern.quaternion_conj, 8: geokern.octonion_conj}

# (a leading shape, b leading shape): equal, odd, broadcast both ways, scalar-like
SHAPES = [((7,), (7,)), ((3, 129), (3, 129)), ((5, 1, 3), (4, 1)), ((1,), (2, 6)), ((), (3,)), ((2, 3, 4, 5, 2), (3, 1, 5, 1))]
SIZE_BIG = (4, 1000) if HAS_CUDA else (2, 100)


def shapes_id(shapes):
    """'a5x1x3-b4x1' for leading shapes ((5, 1, 3), (4, 1)); 's' for a scalar-like ()."""
    a, b = ("x".join(map(str, s)) or "s" for s in shapes)
    return f"a{a}-b{b}"


def rand(shape, n, dtype=torch.float32, **kw):
    return torch.randn(*shape, n, device=DEVICE, dtype=torch.float64, **kw).to(dtype)


def check_mul(label, n, a, b, backend):
    """MUL[n] on (a, b) against the float64 reference, judged by the same-dtype reference."""
    out = MUL[n](a, b, backend=backend)
    assert out.dtype == a.dtype, f"{backend} {label} mul{n} dtype {out.dtype} != {a.dtype}"
    want = ref.hypercomplex_mul(a.double(), b.double(), n)
    assert_close(f"{backend} {label} mul{n} output", out, want, ref.hypercomplex_mul(a, b, n))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shapes", SHAPES, ids=shapes_id)
@pytest.mark.parametrize("n", [4, 8], ids=["quat", "oct"])
def test_mul_matches_reference(n, shapes, dtype, backend):
    need(backend)
    check_mul("broadcast", n, rand(shapes[0], n, dtype), rand(shapes[1], n, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [4, 8], ids=["quat", "oct"])
def test_mul_large_and_strided(n, dtype, backend):
    need(backend)
    # leading dims transposed, component stride 2, then rows sliced with a step
    a = rand((SIZE_BIG[1], SIZE_BIG[0]), 2 * n, dtype).transpose(0, 1)[..., ::2][:, 1:-1][:, ::3]
    b = rand(SIZE_BIG, n, dtype)[:, 1:-1][:, ::3]
    assert not a.is_contiguous() and not b.is_contiguous()
    check_mul("strided", n, a, b, backend)
    check_mul("dense", n, rand(SIZE_BIG, n, dtype), rand(SIZE_BIG, n, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [4, 8], ids=["quat", "oct"])
def test_conj_matches_reference(n, dtype, backend):
    need(backend)
    a = rand((3, 17), n, dtype)[:, ::2]
    out = CONJ[n](a, backend=backend)
    torch.testing.assert_close(out, ref.hypercomplex_conj(a, n), rtol=0, atol=0, msg=f"{backend} conj{n} output")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shapes", SHAPES[:4], ids=shapes_id)
@pytest.mark.parametrize("n", [4, 8], ids=["quat", "oct"])
def test_mul_backward_matches_reference(n, shapes, dtype, backend):
    need(backend)
    a = rand(shapes[0], n, dtype).requires_grad_()
    b = rand(shapes[1], n, dtype).requires_grad_()
    out = MUL[n](a, b, backend=backend)
    g = torch.randn_like(out)
    da, db = torch.autograd.grad(out, (a, b), g)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    da64, db64 = torch.autograd.grad(ref.hypercomplex_mul(a64, b64, n), (a64, b64), g.double())
    al, bl = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    dal, dbl = torch.autograd.grad(ref.hypercomplex_mul(al, bl, n), (al, bl), g)
    assert_close(f"{backend} mul{n} grad a", da, da64, dal)
    assert_close(f"{backend} mul{n} grad b", db, db64, dbl)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [4, 8], ids=["quat", "oct"])
def test_gradcheck_float64(n, backend):
    need(backend)
    a = rand((3, 1), n, torch.float64).requires_grad_()
    b = rand((2,), n, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: MUL[n](x, y, backend=backend), (a, b))
    assert torch.autograd.gradcheck(lambda x: CONJ[n](x, backend=backend), (a,))


def test_reference_backward_formula_matches_autograd():
    for n in (4, 8):
        a = rand((3, 1), n, torch.float64).requires_grad_()
        b = rand((5,), n, torch.float64).requires_grad_()
        g = torch.randn(3, 5, n, dtype=torch.float64, device=DEVICE)
        da, db = torch.autograd.grad(ref.hypercomplex_mul(a, b, n), (a, b), g)
        fa, fb = ref.hypercomplex_mul_backward(g, a.detach(), b.detach(), n)
        torch.testing.assert_close(fa, da, msg=f"mul{n} formula grad a")
        torch.testing.assert_close(fb, db, msg=f"mul{n} formula grad b")


# ---- algebra ---------------------------------------------------------------------


def _norm(x):
    return x.norm(dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_units(backend):
    need(backend)
    e = torch.eye(4, dtype=torch.float64, device=DEVICE)
    i, j, k = e[1], e[2], e[3]
    q = geokern.quaternion_mul
    torch.testing.assert_close(q(i, j, backend=backend), k)
    torch.testing.assert_close(q(j, i, backend=backend), -k)
    torch.testing.assert_close(q(i, i, backend=backend), -e[0])
    o = torch.eye(8, dtype=torch.float64, device=DEVICE)
    # e4 = (0, 1) in Cayley-Dickson: (a, 0)(0, 1) = (0, a), so e1 e4 = e5 and e4 e1 = -e5
    torch.testing.assert_close(geokern.octonion_mul(o[1], o[4], backend=backend), o[5])
    torch.testing.assert_close(geokern.octonion_mul(o[4], o[1], backend=backend), -o[5])
    torch.testing.assert_close(geokern.octonion_mul(o[4], o[4], backend=backend), -o[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [4, 8], ids=["quat", "oct"])
def test_norm_is_multiplicative(n, backend):
    need(backend)
    a, b = rand((64,), n, torch.float64), rand((64,), n, torch.float64)
    torch.testing.assert_close(_norm(MUL[n](a, b, backend=backend)), _norm(a) * _norm(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quaternions_associate(backend):
    need(backend)
    m = lambda x, y: geokern.quaternion_mul(x, y, backend=backend)  # noqa: E731
    a, b, c = (rand((64,), 4, torch.float64) for _ in range(3))
    torch.testing.assert_close(m(m(a, b), c), m(a, m(b, c)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_octonions_alternative_moufang_not_associative(backend):
    need(backend)
    m = lambda x, y: geokern.octonion_mul(x, y, backend=backend)  # noqa: E731
    x, y, z = (rand((64,), 8, torch.float64) for _ in range(3))
    torch.testing.assert_close(m(m(x, x), y), m(x, m(x, y)), msg="left alternative")
    torch.testing.assert_close(m(m(y, x), x), m(y, m(x, x)), msg="right alternative")
    torch.testing.assert_close(m(z, m(x, m(z, y))), m(m(m(z, x), z), y), msg="Moufang 1")
    torch.testing.assert_close(m(x, m(z, m(y, z))), m(m(m(x, z), y), z), msg="Moufang 2")
    torch.testing.assert_close(m(m(z, x), m(y, z)), m(m(z, m(x, y)), z), msg="Moufang 3")
    assoc_gap = (m(m(x, y), z) - m(x, m(y, z))).norm(dim=-1)
    assert (assoc_gap > 1e-3).all(), "random octonion triples should not associate"


# ---- custom ops -------------------------------------------------------------------


def _op_samples(qualname):
    n = 4
    a, b = rand((3, 5), n), rand((5,), n)
    if "backward" in qualname:
        return [(torch.randn(3, 5, n, device=DEVICE), a, b, n)]
    if "conj" in qualname:
        return [(a, n), (a[:, ::2], n)]
    return [(a, b, n), (a.transpose(0, 1), b[:1], n)]


# hypercomplex_mul / _conj only: "hypercomplex_" alone also named the attention ops
# (hypercomplex_attention_*, tests/test_hypercomplex_attention.py), which got these samples
test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests(("hypercomplex_mul", "hypercomplex_conj"), _op_samples)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public ops with their kernels needs CUDA tensors")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_public_op_compiles_with_backward(backend):
    need(backend)
    a, b = rand((4, 33), 8).requires_grad_(), rand((33,), 8).requires_grad_()
    f = torch.compile(lambda x, y: geokern.octonion_mul(geokern.octonion_conj(x, backend=backend), y, backend=backend).sum(), fullgraph=True)
    da, db = torch.autograd.grad(f(a, b), (a, b))
    ea, eb = torch.autograd.grad(ref.octonion_mul(ref.octonion_conj(a), b).sum(), (a, b))
    assert_close("compiled grad a", da, ea.double(), ea)
    assert_close("compiled grad b", db, eb.double(), eb)


# ---- bad input -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    need(backend)
    q = geokern.quaternion_mul
    good = rand((3,), 4)
    with pytest.raises(ValueError, match="b must have last dim 4"):
        q(good, rand((3,), 8), backend=backend)
    with pytest.raises(TypeError, match="b has dtype torch.float64 but a has torch.float32"):
        q(good, good.double(), backend=backend)
    with pytest.raises(TypeError, match="a must have dtype in"):
        q(good.long(), good.long(), backend=backend)
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        q(good, [1.0, 2.0, 3.0, 4.0], backend=backend)
    with pytest.raises(ValueError, match="leading dims of a"):
        q(rand((3,), 4), rand((5,), 4), backend=backend)
    with pytest.raises(ValueError, match="b is on meta"):
        q(good, torch.empty(3, 4, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="a must have at least 1 dim"):
        geokern.octonion_conj(torch.tensor(1.0, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        q(good, good, backend="numpy")
    empty = q(rand((0, 3), 4), rand((3,), 4), backend=backend)
    assert empty.shape == (0, 3, 4)


def test_unavailable_backend_is_an_error_not_a_fallback():
    cpu = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        geokern.quaternion_mul(cpu, cpu, backend="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="the raw CUDA op's own checks run on CUDA tensors")
def test_cuda_op_checks_its_inputs():
    need("cuda")
    a = rand((3,), 4)
    with pytest.raises(RuntimeError, match="n must be 4"):
        torch.ops.geokern.hypercomplex_mul_cuda(a, a, 5)
    with pytest.raises(RuntimeError, match="b has dtype"):
        torch.ops.geokern.hypercomplex_mul_cuda(a, a.double(), 4)
    with pytest.raises(RuntimeError, match=r"a must have last dim 8, got shape \[3, 4\]"):
        torch.ops.geokern.hypercomplex_conj_cuda(a, 8)
    with pytest.raises(RuntimeError, match=r"leading dims of a \[3, 4\] and b \[2, 4\] do not broadcast"):
        torch.ops.geokern.hypercomplex_mul_cuda(a, rand((2,), 4), 4)

