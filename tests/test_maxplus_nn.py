"""geokern.nn.TropicalLinear against its definition, written out with broadcasting."""

import pytest
import torch
from _helpers import BACKENDS, need
from conftest import DEVICE

from geokern.nn import TropicalLinear


def _definition(x, w, b, semiring):
    s = x.double()[..., None, :] + w.double()  # [..., out, in]
    y = s.amax(-1) if semiring == "maxplus" else s.amin(-1)
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", ["maxplus", "minplus"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_definition_and_routes_gradient(backend, semiring, bias):
    need(backend)
    layer = TropicalLinear(19, 7, bias=bias, semiring=semiring, backend=backend, device=DEVICE)
    x = torch.randn(2, 3, 19, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 7)
    want = _definition(x, layer.weight, layer.bias, semiring)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-6, msg=f"{backend} output")
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), [x, layer.weight] + ([layer.bias] if bias else []))
    xd = x.detach().double().requires_grad_()
    wd = layer.weight.detach().double().requires_grad_()
    bd = layer.bias.detach().double().requires_grad_() if bias else None
    ref = torch.autograd.grad((_definition(xd, wd, bd, semiring) * g.double()).sum(), [xd, wd] + ([bd] if bias else []))
    for name, a, e in zip(("x", "weight", "bias"), got, ref):
        torch.testing.assert_close(a.double(), e, rtol=0, atol=1e-6, msg=f"{backend} grad {name}")


def test_bad_input():
    layer = TropicalLinear(4, 3)
    with pytest.raises(ValueError, match="x must have last dim 4"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="semiring must be"):
        TropicalLinear(4, 3, semiring="maxtimes")
    assert "semiring='maxplus'" in repr(layer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_and_empty_batch(backend):
    """No host sync in forward: the module compiles with fullgraph=True (CPU: the torch
    backend; Triton on CPU runs eagerly only). An empty batch gives an empty output and zero
    gradients."""
    need(backend)
    m = TropicalLinear(7, 5, backend=backend, device=DEVICE)
    x = torch.randn(3, 4, 7, device=DEVICE)
    if backend == "torch" or DEVICE.type == "cuda":
        y = torch.compile(m, fullgraph=True)(x)
        torch.testing.assert_close(y, m(x), rtol=0, atol=0, msg=f"{backend}: compiled module output")
    x0 = torch.randn(0, 7, device=DEVICE, requires_grad=True)
    y0 = m(x0)
    y0.sum().backward()
    assert y0.shape == (0, 5) and x0.grad.shape == (0, 7), f"{backend}: empty batch shapes"
    assert (m.weight.grad == 0).all() and (m.bias.grad == 0).all(), f"{backend}: empty batch gradients"
