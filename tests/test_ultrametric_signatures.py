"""Random-hyperplane signatures (geokern.ultrametric_signatures): every backend against the float64
reference on the dots that are not within rounding of 0 (the tie rule: dot == 0 gives 0, NaN
gives 0), fused projection or head vectors, per-head or shared planes, dtypes, non-contiguous
inputs, knobs, no gradient, empty and bad input, custom-op checks."""

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import dtype_id, need
from conftest import DEVICE

import geokern
from geokern.reference import ultrametric as ref

BACKENDS = ["torch", "triton"]
# (B, T, Din or None: head vectors, H, D, K, planes shared)
CASES = [
    (2, 37, 40, 3, 16, 8, False),
    (1, 1, 7, 2, 5, 1, True),
    (1, 19, 130, 1, 33, 13, False),
    (2, 23, None, 4, 16, 8, False),
    (1, 17, None, 3, 7, 5, True),
]
MARGIN = 1e-3  # |dot| below MARGIN |h| |plane| may round to either side in float32 / 16-bit inputs


def _id(c):
    if isinstance(c, torch.dtype):
        return dtype_id(c)
    B, T, Din, H, D, K, shared = c
    return f"B{B}-T{T}-{'Din' + str(Din) if Din else 'heads'}-H{H}-D{D}-K{K}{'-shared' if shared else ''}"


def make(case, dtype=torch.float32):
    B, T, Din, H, D, K, shared = case
    planes = torch.randn(*(() if shared else (H,)), K, D, device=DEVICE)
    if Din is None:
        return torch.randn(B, H, T, D, device=DEVICE).to(dtype), planes, None
    return torch.randn(B, T, Din, device=DEVICE).to(dtype), planes, torch.randn(H * D, Din, device=DEVICE).to(dtype)


def decided(x, planes, weight):
    """[B, H, T, K] bool: the float64 dot of the (rounded) inputs is at least MARGIN |h| |plane| from 0."""
    B, H, T, D, K = ref.check_signature_inputs(x, planes, weight)
    h = x.double()
    if weight is not None:
        h = (h @ weight.double().T).view(B, T, H, D).transpose(1, 2)
    P = planes.double().expand(H, K, D)
    dots = torch.einsum("bhtd,hkd->bhtk", h, P)
    scale = h.norm(dim=-1, keepdim=True) * P.norm(dim=-1)[None, :, None, :]
    return dots.abs() > MARGIN * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, backend, dtype):
    need(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on backend='torch' (test_bad_input checks the error)")
    x, planes, weight = make(case, dtype)
    got = geokern.ultrametric_signatures(x, planes, weight, backend=backend)
    want = ref.hyperplane_signatures(x, planes, weight)
    assert got.dtype == torch.int8 and got.shape == want.shape, "digits: dtype or shape"
    assert ((got == 0) | (got == 1)).all(), "digits: outside {0, 1}"
    sure = decided(x, planes, weight)
    assert sure.float().mean() > 0.9, "test inputs: too many dots near 0 to compare"
    bad = (got != want) & sure
    assert not bad.any(), f"digits: {int(bad.sum())} of {int(sure.sum())} decided bits differ from the reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_nan_give_zero(backend):
    """dot == 0 (orthogonal, +0 and -0 vectors) gives 0; a tiny positive dot gives 1; NaN gives 0."""
    need(backend)
    D = 4
    planes = torch.eye(D, device=DEVICE)[:2]  # plane 0 = e0, plane 1 = e1
    x = torch.zeros(1, 1, 5, D, device=DEVICE)
    x[0, 0, 0, 2] = 1.0  # orthogonal to both planes
    x[0, 0, 1] = -0.0
    x[0, 0, 2, 0], x[0, 0, 2, 1] = 1e-30, -1e-30
    x[0, 0, 3, 0] = float("nan")
    x[0, 0, 4, 1] = -2.0
    got = geokern.ultrametric_signatures(x, planes, backend=backend)
    want = torch.tensor([[0, 0], [0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.int8, device=DEVICE)
    assert torch.equal(got[0, 0], want), f"digits: {got[0, 0].tolist()} != {want.tolist()}"
    assert torch.equal(ref.hyperplane_signatures(x, planes), got), "reference: another tie rule"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_projection_equals_projecting_first(backend):
    """x @ weight.T split into heads, then the head-vector form: the same digits (decided dots)."""
    need(backend)
    x, planes, weight = make(CASES[0])
    B, T, Din, H, D, K, _ = CASES[0]
    heads = (x.double() @ weight.double().T).view(B, T, H, D).transpose(1, 2).float()
    fused = geokern.ultrametric_signatures(x, planes, weight, backend=backend)
    split = geokern.ultrametric_signatures(heads, planes, backend=backend)
    sure = decided(x, planes, weight)
    assert not ((fused != split) & sure).any(), "digits: fused projection vs head vectors"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    need(backend)
    x, planes, weight = make(CASES[0])
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    wt = weight.T.contiguous().T
    pt = planes.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (xt.is_contiguous() or wt.is_contiguous() or pt.is_contiguous())
    assert torch.equal(geokern.ultrametric_signatures(xt, pt, wt, backend=backend),
                       geokern.ultrametric_signatures(x, planes, weight, backend=backend)), "digits: strided inputs"


@pytest.mark.parametrize("block_t", [16, 32, 64])
def test_block_t_does_not_change_the_result(block_t):
    need("triton")
    x, planes, weight = make(CASES[2])
    assert torch.equal(geokern.ultrametric_signatures(x, planes, weight, block_t=block_t, backend="triton"),
                       geokern.ultrametric_signatures(x, planes, weight, backend="triton")), f"block_t={block_t}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient(backend):
    """Digits are discrete: int8, outside autograd, whatever requires grad."""
    need(backend)
    x, planes, weight = make(CASES[0])
    x, planes, weight = (t.requires_grad_() for t in (x, planes, weight))
    d = geokern.ultrametric_signatures(x, planes, weight, backend=backend)
    assert d.dtype == torch.int8 and not d.requires_grad and d.grad_fn is None, "digits: carry a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_digits_feed_attention_and_top1(backend):
    need(backend)
    B, H, T, D, K = 1, 2, 21, 16, 6
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE) for _ in range(3))
    planes = torch.randn(H, K, D, device=DEVICE)
    qd, kd = (geokern.ultrametric_signatures(t, planes, backend=backend) for t in (q, k))
    y = geokern.ultrametric_attention(qd, kd, v, backend=backend)
    assert y.shape == (B, H, T, D) and y.isfinite().all()
    y1 = geokern.ultrametric_top1(q, k, v, qd, kd, backend=backend)
    assert y1.shape == (B, T, D) and y1.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(0, 5, 8), (2, 0, 8)], ids=["B0", "T0"])
def test_empty(dims, backend):
    need(backend)
    B, T, Din = dims
    x, planes, weight = torch.randn(B, T, Din, device=DEVICE), torch.randn(3, 4, device=DEVICE), \
        torch.randn(2 * 4, Din, device=DEVICE)
    assert geokern.ultrametric_signatures(x, planes, weight, backend=backend).shape == (B, 2, T, 3)
    xh = torch.randn(B, 2, T, 4, device=DEVICE)
    assert geokern.ultrametric_signatures(xh, planes, backend=backend).shape == (B, 2, T, 3)


def _bad():
    x, w, pl = torch.randn(1, 5, 8, device=DEVICE), torch.randn(2 * 4, 8, device=DEVICE), \
        torch.randn(3, 4, device=DEVICE)
    return {
        "int x": (dict(x=x.long(), planes=pl, weight=w), {}, TypeError, "x"),
        "int planes": (dict(x=x, planes=pl.long(), weight=w), {}, TypeError, "planes"),
        "1-D planes": (dict(x=x, planes=pl[0], weight=w), {}, ValueError, "planes"),
        "planes heads": (dict(x=x, planes=torch.randn(3, 3, 4, device=DEVICE), weight=w), {}, ValueError, "planes"),
        "weight rows": (dict(x=x, planes=pl, weight=torch.randn(7, 8, device=DEVICE)), {}, ValueError, "weight"),
        "Din": (dict(x=torch.randn(1, 5, 9, device=DEVICE), planes=pl, weight=w), {}, ValueError, "Din"),
        "x 3-D without weight": (dict(x=x, planes=pl), {}, ValueError, "x"),
        "D without weight": (dict(x=torch.randn(1, 2, 5, 5, device=DEVICE), planes=pl), {}, ValueError, "D = 4"),
        "mixed dtypes": (dict(x=x.half(), planes=pl, weight=w), {}, TypeError, "weight"),
        "block_t": (dict(x=x, planes=pl, weight=w), dict(block_t=24), ValueError, "block_t"),
        "backend": (dict(x=x, planes=pl, weight=w), dict(backend="gpu"), ValueError, "backend"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_bad()))
def test_bad_input(name, backend):
    need(backend)
    args, kw, exc, word = _bad()[name]
    with pytest.raises(exc, match=word):
        geokern.ultrametric_signatures(**args, **{"backend": backend, **kw})


def test_triton_refusals_and_cuda():
    need("triton")
    x = torch.randn(1, 2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        geokern.ultrametric_signatures(x.double(), torch.randn(4, 16, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="K <= 128"):
        geokern.ultrametric_signatures(x, torch.randn(129, 16, device=DEVICE), backend="triton")
    with pytest.raises(RuntimeError, match="cuda"):
        geokern.ultrametric_signatures(x, torch.randn(4, 16, device=DEVICE), backend="cuda")


def _op_samples(qualname):
    x, planes, weight = make(CASES[0])
    P = planes.float().contiguous().to(DEVICE)
    xh, P2, _ = make(CASES[4], torch.bfloat16)
    return [(x.to(DEVICE), weight.to(DEVICE), P, 3, 0), (xh.to(DEVICE), None, P2[None].float().to(DEVICE), 3, 16)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("ultrametric_signatures_", _op_samples)
