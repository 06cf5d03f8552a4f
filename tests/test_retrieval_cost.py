"""Retrieval cost, metrics and curvature scalar: every backend against the float64 reference."""

import math

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import BACKENDS, dtype_id, need
from _retrieval import KERNEL_DTYPES, make_R, metric_of, rnd
from _tolerance import assert_close
from conftest import DEVICE

import geokern
import geokern.metric as gm
from geokern.reference import retrieval as ref


# ---- the cost: reference semantics ----------------------------------------------


def test_cost_hand_computed():
    q = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    c = geokern.retrieval_cost(q, k, 2.0, gm.diag(torch.tensor([1.0, 1.0], dtype=torch.float64)), eps=0.0)
    torch.testing.assert_close(c, torch.tensor([[10.0, 0.0, 2.0]], dtype=torch.float64))
    # lam weights each coordinate; eps sits inside the sqrt
    c = geokern.retrieval_cost(q, k, 1.0, gm.diag(torch.tensor([4.0, 0.25], dtype=torch.float64)), eps=1.0)
    torch.testing.assert_close(c, torch.tensor([[math.sqrt(36 + 4 + 1), 1.0, math.sqrt(5.0)]], dtype=torch.float64))
    # a quarter turn in the (0, 1) plane swaps which coordinate lam weights
    rot = gm.rotor_diag(torch.tensor([4.0, 0.25], dtype=torch.float64), torch.tensor([math.pi / 2], dtype=torch.float64), [(0, 1)])
    c = geokern.retrieval_cost(q, k[:1], 1.0, rot, eps=0.0)
    torch.testing.assert_close(c, torch.tensor([[math.sqrt(4 * 16 + 0.25 * 9)]], dtype=torch.float64))
    # an indefinite lowrank metric: g < 0 is clamped, cost = R sqrt(eps)
    eye = torch.eye(2, dtype=torch.float64)
    lr = gm.lowrank(1.0, eye, torch.ones(2, dtype=torch.float64), eye[:, :1], torch.tensor([-10.0], dtype=torch.float64))
    c = geokern.retrieval_cost(q, k[2:], 3.0, lr, eps=1e-8)
    torch.testing.assert_close(c, torch.tensor([[3e-4]], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["diag", "rotor_diag", "lowrank"])
def test_metric_features_reproduce_the_quadratic_form(kind):
    params, make = metric_of(kind, 6)
    m = make(params)
    dv = rnd(50, 6)
    phi, w = m.features(dv)
    torch.testing.assert_close(m.quad(dv), (phi * phi * w).sum(-1))
    # linear: phi(k - q) = phi(k) - phi(q), which the fused path relies on
    a, b = rnd(50, 6), rnd(50, 6)
    torch.testing.assert_close(m.features(a - b)[0], m.features(a)[0] - m.features(b)[0])


def test_rotor_is_out_of_place_and_ordered():
    lam = torch.ones(3, dtype=torch.float64)
    th = torch.tensor([0.3, -1.1], dtype=torch.float64)
    m = gm.rotor_diag(lam, th, [(0, 1), (1, 2)])
    x = rnd(4, 3)
    x0 = x.clone()
    r = m.rotate(x)
    assert torch.equal(x, x0), "rotate must not modify its input"
    c0, s0, c1, s1 = math.cos(0.3), math.sin(0.3), math.cos(-1.1), math.sin(-1.1)
    a = c0 * x0[:, 0] - s0 * x0[:, 1]
    b = s0 * x0[:, 0] + c0 * x0[:, 1]
    torch.testing.assert_close(r, torch.stack([a, c1 * b - s1 * x0[:, 2], s1 * b + c1 * x0[:, 2]], -1))


@pytest.mark.parametrize("rshape", ["scalar", "query", "key", "pair"])
def test_cost_shapes_and_R_broadcast(rshape):
    B, M, n = 4, 9, 5
    q, k = rnd(B, n), rnd(M, n)
    R = {"scalar": 1.5, "query": rnd(B, 1).abs(), "key": rnd(M).abs(), "pair": rnd(B, M).abs()}[rshape]
    lam = torch.rand(n, dtype=torch.float64, device=DEVICE) + 0.1
    c = geokern.retrieval_cost(q, k, R, gm.diag(lam))
    want = (torch.as_tensor(R, dtype=torch.float64, device=DEVICE)
            * torch.sqrt(((k[None] - q[:, None]) ** 2 * lam).sum(-1) + 1e-8))
    torch.testing.assert_close(c, want)
    # the same rows as a [B, Lq=1, n] query against per-row keys
    c3 = geokern.retrieval_cost(q[:, None], k.expand(B, M, n), R if rshape in ("scalar", "key") else R.unsqueeze(-2), gm.diag(lam))
    torch.testing.assert_close(c3[:, 0], want)


@pytest.mark.parametrize("kind", ["diag", "rotor_diag", "lowrank"])
def test_metric_gradients_by_finite_differences(kind):
    params, make = metric_of(kind, 5)
    params = [p.requires_grad_() for p in params]
    q, k, v = rnd(2, 3, 5), rnd(2, 7, 5), rnd(2, 7, 4)
    R = (rnd(2, 3, 1).abs() + 0.5).requires_grad_()

    def f(*p):
        return ref.retrieval_attention(q, k, v, R, make(p), 1.3), ref.retrieval_cost(q, k, R, make(p))

    assert torch.autograd.gradcheck(f, params)


# ---- the cost: every backend vs the float64 reference -------------------------------

# (query shape, keys shape, R kind)
COST_CASES = {
    "decode-B5-M37-shared-bank": ((5, 8), (37, 8), "query"),
    "3d-B2-L9-M13-per-row": ((2, 9, 6), (2, 13, 6), "pair"),
    "4d-headshared-L7-M20-D16": ((2, 3, 7, 16), (2, 1, 20, 16), "key"),
    "2d-B3-M7-scalar": ((3, 4), (7, 4), "scalar"),
}


def _run_cost(backend, dtype, q, k, R, make, params, compute_dtype=None):
    q, k = (t.detach().to(dtype).requires_grad_() for t in (q, k))
    ps = [p.detach().clone().requires_grad_() for p in params]
    Rt = R.detach().clone().requires_grad_() if isinstance(R, torch.Tensor) else R
    if backend == "ref":
        cost = ref.retrieval_cost(q, k, Rt, make(ps), 1e-8, compute_dtype)
    else:
        cost = geokern.retrieval_cost(q, k, Rt, make(ps), 1e-8, backend=backend)
    g = torch.randn(cost.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(cost.device, cost.dtype)
    (cost * g).sum().backward()
    grads = {"dquery": q.grad, "dkeys": k.grad, **{f"dmetric[{i}]": p.grad for i, p in enumerate(ps)}}
    if isinstance(Rt, torch.Tensor):
        grads["dR"] = Rt.grad
    return cost, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["diag", "rotor_diag", "lowrank"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(COST_CASES))
def test_cost_matches_reference(case, dtype, kind, backend):
    """Output and every gradient; one key equals one query (g = 0: the clamp and the eps)."""
    need(backend)
    qs, ks, rkind = COST_CASES[case]
    q, k = rnd(*qs), rnd(*ks)
    if kind != "lowrank" or backend == "torch":
        # lowrank features are GEMMs over the whole query / key tensor (geokern.metric): two equal
        # rows may round differently there, and d cost / d dv at g = 0 scales that by 1 / sqrt(eps)
        k[(0,) * (k.dim() - 1)] = q[(0,) * (q.dim() - 1)]
    q, k = q.to(dtype).double(), k.to(dtype).double()
    R = make_R(rkind, qs, ks)
    params, make = metric_of(kind, qs[-1])
    params = [p.to(dtype).double() for p in params]
    c64, g64 = _run_cost("ref", torch.float64, q, k, R, make, params)
    # eps = 1e-8 underflows in float16: that reference divides by zero at g = 0, so float16 is
    # judged by the float32 reference's error (plus the float16 floor)
    cd, gd = _run_cost("ref", dtype, q, k, R, make, params, compute_dtype=torch.float32 if dtype == torch.float16 else dtype)
    c, g = _run_cost(backend, dtype, q, k, R, make, params)
    assert c.dtype == torch.float32 and c.shape == c64.shape
    # judged at the inputs' precision: the kernels see rotor / lowrank features in that dtype
    assert_close("cost", c.to(dtype), c64.float(), cd.float())
    for name in g64:
        assert torch.isfinite(g[name]).all(), f"{name}: non-finite ({backend}, {dtype})"
        assert_close(name, g[name].to(dtype), g64[name], gd[name])


# ---- curvature scalar ----------------------------------------------------------------


def _explicit_curvature(R4, g, eps):
    """The double trace written out index by index (float64, one row)."""
    n = R4.shape[-1]
    total = 0.0
    for mu in range(n):
        for nu in range(n):
            for rho in range(n):
                for sigma in range(n):
                    total += float(R4[mu, nu, rho, sigma]) * float(g[mu, rho]) * float(g[nu, sigma])
    return math.sqrt(abs(total / n**2) + eps)


def test_curvature_scalar_matches_explicit_sum():
    n, B = 3, 4
    R4 = torch.randn(B, n, n, n, n, dtype=torch.float64, device=DEVICE)
    a = torch.randn(B, n, n, dtype=torch.float64, device=DEVICE)
    g = a @ a.transpose(-1, -2) + n * torch.eye(n, dtype=torch.float64, device=DEVICE)
    out = geokern.curvature_scalar(R4, g, 1e-8)
    assert out.shape == (B,)
    for b in range(B):
        assert out[b].item() == pytest.approx(_explicit_curvature(R4[b].cpu(), g[b].cpu(), 1e-8), rel=1e-12)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_curvature_scalar_dtypes_and_shared_metric(dtype):
    n = 8
    R4 = torch.randn(5, n, n, n, n, device=DEVICE).to(dtype)
    g = (torch.eye(n, device=DEVICE) + 0.1 * torch.randn(n, n, device=DEVICE)).to(dtype)  # shared by all rows
    out = geokern.curvature_scalar(R4, g)
    assert out.shape == (5,) and out.dtype == (torch.float32 if dtype != torch.float64 else dtype)
    want = ref.curvature_scalar(R4.double(), g.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6, msg="curvature_scalar output")


def test_curvature_scalar_gradcheck_and_eps():
    n = 2
    R4 = torch.randn(3, n, n, n, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = torch.randn(3, n, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, m: geokern.curvature_scalar(r, m, 1e-6), (R4, g))
    zero = geokern.curvature_scalar(torch.zeros(n, n, n, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64), 1e-8)
    assert zero.item() == pytest.approx(1e-4), "a vanishing trace gives sqrt(eps)"


def test_curvature_scalar_bad_input():
    R4, g = torch.randn(2, 3, 3, 3, 3), torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="R4 must end in four equal dims"):
        geokern.curvature_scalar(torch.randn(2, 3, 3, 3, 4), g)
    with pytest.raises(ValueError, match=r"g_inv must end in \(3, 3\)"):
        geokern.curvature_scalar(R4, torch.randn(2, 4, 4))
    with pytest.raises(TypeError, match="g_inv has dtype torch.float64 but R4 has torch.float32"):
        geokern.curvature_scalar(R4, g.double())
    with pytest.raises(ValueError, match="leading dims of R4"):
        geokern.curvature_scalar(R4, torch.randn(5, 3, 3))
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        geokern.curvature_scalar(R4, g, backend="triton")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        geokern.curvature_scalar(R4, g, backend="cuda")


# ---- custom ops ------------------------------------------------------------------


def cost_op_samples(qualname):
    """Argument tuples of retrieval_cost_<backend> / retrieval_cost_backward_<backend> (one schema)."""
    q, k = torch.randn(2, 1, 5, 8, device=DEVICE), torch.randn(1, 1, 9, 8, device=DEVICE)
    k2 = torch.randn(2, 1, 4, 8, device=DEVICE)
    w = torch.rand(8, device=DEVICE) + 0.5
    r, rq = torch.rand(1, 1, 1, 9, device=DEVICE) + 0.5, torch.rand(2, 1, 5, 1, device=DEVICE) + 0.5
    rp = torch.rand(2, 1, 5, 4, device=DEVICE) + 0.5
    if "backward" not in qualname:
        return [(q, k, w, r, 1e-8), (q, k2, w, rq, 1e-6)]
    return [(torch.randn(2, 1, 5, 9, device=DEVICE), q, k, w, r, 1e-8),
            (torch.randn(2, 1, 5, 4, device=DEVICE), q, k2, w, rp, 1e-8)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("retrieval_cost_", cost_op_samples)
