"""Quaternion and octonion products at the edges (issue 14): double backward, NaN rows,
empty leading dims, streams, CUDA graphs, dynamic shapes, autocast, determinism, and
tensors past 2**31 elements."""


import pytest
import torch
from _helpers import BACKENDS, need, capturable, gpu, run_isolated
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.reference import hypercomplex as ref

MUL = {4: geokern.quaternion_mul, 8: geokern.octonion_mul}
CONJ = {4: geokern.quaternion_conj, 8: geokern.octonion_conj}
NS = pytest.mark.parametrize("n", [4, 8], ids=["quat", "oct"])


def rand(shape, n, dtype=torch.float32):
    return torch.randn(*shape, n, device=DEVICE, dtype=torch.float64).to(dtype)


# ---- double backward ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shapes", [((3,), (3,)), ((3, 1), (2,))], ids=["same", "broadcast"])
@NS
def test_gradgradcheck_float64(n, shapes, backend):
    """The kernels' backward is differentiable again (it raised torch's 'no autograd formula
    was registered'): second and third derivatives against finite differences."""
    need(backend)
    a = rand(shapes[0], n, torch.float64).requires_grad_()
    b = rand(shapes[1], n, torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, y: MUL[n](x, y, backend=backend), (a, b))
    assert torch.autograd.gradgradcheck(lambda x: CONJ[n](x, backend=backend), (a,))
    # third order: the double backward is made of the same differentiable products
    g = rand(shapes[0] if len(shapes[0]) > len(shapes[1]) else shapes[1], n, torch.float64)

    def first(x, y):
        out = MUL[n](x, y, backend=backend)
        return torch.autograd.grad(out, (x, y), torch.broadcast_to(g, out.shape), create_graph=True)

    assert torch.autograd.gradgradcheck(lambda x, y: first(x, y)[0], (a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@NS
def test_double_backward_matches_reference(n, dtype, backend):
    """Second derivatives (of a gradient penalty) against the reference's autograd in float64."""
    need(backend)
    a0, b0 = rand((5, 1), n, dtype), rand((3,), n, dtype)
    w = rand((5, 3), n, dtype)

    def penalty(mul, a, b):
        out = mul(a, b)
        ga, gb = torch.autograd.grad((out * w).sum(), (a, b), create_graph=True)
        return (ga.float() ** 2).sum() + (gb.float() * ga.float().sum(0)).sum() + (out.float() ** 2).sum()

    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    got = torch.autograd.grad(penalty(lambda x, y: MUL[n](x, y, backend=backend), a, b), (a, b))
    a64, b64 = a0.double().requires_grad_(), b0.double().requires_grad_()
    w = w.double()
    want = torch.autograd.grad(penalty(lambda x, y: ref.hypercomplex_mul(x, y, n), a64, b64), (a64, b64))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, x, y in zip(("a", "b"), got, want):
        assert x.dtype == dtype
        err = ((x.double() - y).norm() / y.norm()).item()
        assert err < tol, f"{backend} mul{n} {dtype} second derivative in {name}: relative error {err:.2e}"


# ---- NaN --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@NS
def test_nan_rows(n, backend):
    """Output row r is all NaN exactly when row r of a or b (broadcast) holds a NaN; conj
    keeps NaN where it is. inf * 0 makes NaN as the reference's formula does."""
    need(backend)
    a, b = rand((6, 1), n), rand((5,), n)
    a[1, 0, 2] = float("nan")
    b[3, n - 1] = float("nan")
    a[4, 0, 0] = float("inf")  # times finite nonzero components: inf or NaN, as the formula says
    out = MUL[n](a, b, backend=backend)
    nan_in = torch.isnan(a).any(-1) | torch.isnan(b).any(-1)  # (6, 5)
    rows = torch.isnan(out)
    assert torch.equal(rows.all(-1) | ~rows.any(-1), torch.ones_like(nan_in)), f"{backend}: partial NaN row"
    want = ref.hypercomplex_mul(a.double(), b.double(), n)
    assert torch.equal(rows, torch.isnan(want)), f"{backend}: NaN positions differ from the reference"
    inf_in = torch.isinf(a).any(-1).expand_as(nan_in)
    assert (~(rows.any(-1) & ~nan_in) | inf_in).all(), f"{backend}: a NaN row without a NaN or inf input"
    assert rows.any(-1)[nan_in].all(), f"{backend}: a NaN input row gave a finite output"
    c = CONJ[n](a, backend=backend)
    assert torch.equal(torch.isnan(c), torch.isnan(a)), f"{backend}: conj moved a NaN"


# ---- empty ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", [((0, 3), (3,)), ((2, 0), (1,)), ((0,), (0,)), ((4, 1), (0,))],
                         ids=["a0x3-b3", "a2x0-b1", "a0-b0", "a4x1-b0"])
@NS
def test_empty_gives_zero_gradients(n, shapes, backend):
    need(backend)
    a, b = rand(shapes[0], n).requires_grad_(), rand(shapes[1], n).requires_grad_()
    out = MUL[n](a, b, backend=backend)
    assert out.numel() == 0 and out.grad_fn is not None, f"{backend}: empty output lost autograd"
    out.sum().backward()
    for name, t in (("a", a), ("b", b)):
        assert t.grad is not None and t.grad.shape == t.shape, f"{backend}: grad {name} shape"
        assert (t.grad == 0).all(), f"{backend}: grad {name} not zero"
    c = CONJ[n](a, backend=backend)
    assert c.shape == a.shape and c.grad_fn is not None


# ---- autocast ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@NS
def test_autocast_runs_in_input_dtype(n, backend):
    """Like torch.mul, not on autocast's lists: float32 stays float32, and mixed dtypes are
    promoted to the widest inside an autocast region."""
    need(backend)
    a, b = rand((7,), n), rand((7,), n)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = MUL[n](a, b, backend=backend)
        mixed = MUL[n](a, b.bfloat16(), backend=backend)
        assert torch.mul(a, b.bfloat16()).dtype == mixed.dtype == torch.float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, MUL[n](a, b, backend=backend), rtol=0, atol=0)
    torch.testing.assert_close(mixed, MUL[n](a, b.bfloat16().float(), backend=backend), rtol=0, atol=0)
    with pytest.raises(TypeError, match="b has dtype"):
        MUL[n](a, b.bfloat16(), backend=backend)


# ---- GPU: streams, graphs, compile, determinism -----------------------------------


@gpu
@capturable
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@NS
def test_side_stream_and_cuda_graph(n, backend):
    need(backend)
    a, b = rand((300, 1), n).requires_grad_(), rand((77,), n).requires_grad_()
    g = rand((300, 77), n)
    want = MUL[n](a, b, backend=backend)
    want_grads = torch.autograd.grad(want, (a, b), g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up (Triton compiles) on the side stream
            out = MUL[n](a, b, backend=backend)
            grads = torch.autograd.grad(out, (a, b), g)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for x, y in zip(grads, want_grads):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = MUL[n](a.detach(), b.detach(), backend=backend)
        conj = CONJ[n](out, backend=backend)
    a.data.copy_(rand((300, 1), n))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, MUL[n](a.detach(), b.detach(), backend=backend), rtol=0, atol=0)
    torch.testing.assert_close(conj, ref.hypercomplex_conj(out, n), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@NS
def test_compile_dynamic(n, backend):
    need(backend)
    torch._dynamo.reset()
    f = torch.compile(lambda x, y: CONJ[n](MUL[n](x, y, backend=backend), backend=backend), dynamic=True,
                      fullgraph=True)
    for rows in (5, 33, 129):
        a, b = rand((rows, 1), n).requires_grad_(), rand((3,), n).requires_grad_()
        out = f(a, b)
        torch.testing.assert_close(out, ref.hypercomplex_conj(ref.hypercomplex_mul(a, b, n), n), rtol=1e-6, atol=1e-6)
        da, db = torch.autograd.grad(out.sum(), (a, b))
        ea, eb = torch.autograd.grad(ref.hypercomplex_conj(ref.hypercomplex_mul(a, b, n), n).sum(), (a, b))
        torch.testing.assert_close(da, ea, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db, eb, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@NS
def test_deterministic_mode(n, backend):
    """No atomics: runs under torch.use_deterministic_algorithms(True), bit-identical twice."""
    need(backend)
    a, b = rand((1000, 1), n).requires_grad_(), rand((64,), n).requires_grad_()
    g = rand((1000, 64), n)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(MUL[n](a, b, backend=backend), (a, b), g) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


# ---- past 2**31 elements ----------------------------------------------------------

_HUGE = """
import torch, geokern
from geokern.reference import hypercomplex as ref
n, backend, grad = {n}, {backend!r}, {grad}
rows = 2**31 // n + 7  # the output passes 2**31 elements
a0 = torch.randn(1, n, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
a = a0.expand(rows, n)  # stride 0: no memory
b = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
out = getattr(geokern, "quaternion_mul" if n == 4 else "octonion_mul")(a, b, backend=backend)
assert out.shape == (rows, n) and out.numel() > 2**31, out.shape
# spot checks: the first and the last rows, and rows around the 2**31 / n boundary
idx = torch.tensor([0, 1, rows // 2, 2**31 // n - 1, 2**31 // n, 2**31 // n + 1, rows - 2, rows - 1], device="cuda")
want = ref.hypercomplex_mul(a[idx].double(), b[idx].double(), n)
err = (out[idx].double() - want).abs().max().item()
assert err < 0.02 * want.abs().max().item(), ("output", err)
if grad:
    g = torch.ones(1, n, device="cuda", dtype=torch.bfloat16).expand(rows, n)
    (da,) = torch.autograd.grad(out, (a0,), g)
    del out
    # dA = sum over rows of g conj(b_r) = g conj(sum_r b_r): linear in b
    want = ref.hypercomplex_mul(g[:1].double(), ref.hypercomplex_conj(b.double().sum(0, keepdim=True), n), n)
    rel = ((da.double() - want).norm() / want.norm()).item()
    assert da.shape == (1, n) and rel < 2e-2, ("grad a", rel)
print("ok")
"""


@pytest.mark.huge
@gpu
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@NS
def test_past_2_31_elements(n, backend, grad):
    """A broadcast operand (stride 0) against a large one, the output and the gradient's
    full-shape buffer past 2**31 elements: spot values around the boundary are right."""
    need(backend)
    assert "ok" in run_isolated(_HUGE.format(n=n, backend=backend, grad=grad))
