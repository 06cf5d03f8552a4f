"""LIoR family edges: NaN reaches exactly what reads it, empty inputs, bad input, the layer."""

import pytest
import torch
from _helpers import WRITES_PRELUDE, need, run_isolated
from conftest import DEVICE

import geokern
from geokern.metric import diag
from geokern.reference import lior as ref

KERNEL_BACKENDS = ["torch", "triton"]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _state(B):
    return (torch.zeros(B, device=DEVICE), torch.zeros(B, device=DEVICE),
            torch.zeros((), dtype=torch.int64, device=DEVICE))


# ---- NaN -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_memory_conv_nonfinite_reaches_its_column_from_its_time(bad, method):
    x = rand(40, 2, 3)
    x[17, 1, 2] = bad
    out = geokern.lior_memory_conv(x, geokern.lior_params(device=DEVICE), method=method)
    want = torch.zeros_like(out, dtype=torch.bool)
    want[17:, 1, 2] = True
    assert torch.equal(torch.isnan(out), want), f"{method}: NaN must cover out[t >= 17] of column (1, 2) only"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_recurrence_nan_reaches_its_row_from_its_time(backend):
    need(backend)
    x, j = rand(12, 3, 20), rand(12, 3)
    x[4, 0, 7] = float("nan")
    j[6, 2] = float("nan")
    out = geokern.lior_recurrence(x, j, backend=backend)
    want = torch.zeros_like(out, dtype=torch.bool)
    want[4:, 0, 7] = True
    want[6:, 2, :] = True
    assert torch.equal(torch.isnan(out), want), f"{backend}: NaN in the wrong places"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_action_nan_reaches_its_row_only(backend):
    need(backend)
    v, R = rand(4, 6, 5), torch.rand(4, 6, device=DEVICE)
    v[2, 1, 3] = float("nan")
    R[0, 4] = float("nan")
    integral, mean, count = _state(6)
    cost = geokern.lior_action_(v, R, diag(torch.rand(5, device=DEVICE)), integral, mean, count, backend=backend)
    want = torch.zeros_like(cost, dtype=torch.bool)
    want[2, 1] = want[0, 4] = True
    assert torch.equal(torch.isnan(cost), want), f"{backend}: NaN cost in the wrong places"
    rows = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    rows[[1, 4]] = True
    assert torch.equal(torch.isnan(integral), rows) and torch.equal(torch.isnan(mean), rows)


# ---- empty -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4), (5, 0, 4), (5, 3, 0)], ids=["T0", "B0", "D0"])
def test_recurrence_empty(shape, backend):
    need(backend)
    T, B, D = shape
    x = rand(T, B, D).requires_grad_()
    j = rand(T, B).requires_grad_()
    m0 = rand(B, D).requires_grad_()
    out = geokern.lior_recurrence(x, j, m0=m0, backend=backend)
    assert out.shape == (T, B, D)
    gx, gj, gm = torch.autograd.grad(out.sum(), (x, j, m0))
    assert gx.shape == x.shape and gj.shape == j.shape and gm.shape == m0.shape
    if T == 0:  # no step: m0 reaches nothing
        assert torch.equal(gm, torch.zeros_like(gm))
    for g in (gx, gj):
        assert not torch.isnan(g).any()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_step_and_action_empty(backend):
    need(backend)
    m, ring = rand(0, 5), rand(4, 0, 5)
    pos = torch.zeros((), dtype=torch.int64, device=DEVICE)
    geokern.lior_recurrence_step_(m, ring, pos, rand(0, 5), backend=backend)
    assert pos.item() == 1
    integral, mean, count = _state(3)
    mean.fill_(2.0)
    cost = geokern.lior_action_(rand(0, 3, 4), 1.0, diag(torch.ones(4, device=DEVICE)), integral, mean, count,
                                backend=backend)
    assert cost.shape == (0, 3) and count.item() == 0
    assert torch.equal(mean, torch.full_like(mean, 2.0)), "a window of no step leaves the mean alone"
    integral, mean, count = _state(0)
    cost = geokern.lior_action_(rand(4, 0, 4), 1.0, diag(torch.ones(4, device=DEVICE)), integral, mean, count,
                                backend=backend)
    assert cost.shape == (4, 0) and count.item() == 4


def test_memory_conv_empty():
    p = geokern.lior_params(device=DEVICE).requires_grad_()
    for shape in [(0, 3), (5, 0)]:
        x = rand(*shape).requires_grad_()
        out = geokern.lior_memory_conv(x, p)
        assert out.shape == shape
        gx, gp = torch.autograd.grad(out.sum(), (x, p), allow_unused=True)
        assert gx.shape == x.shape and (gp is None or torch.equal(gp, torch.zeros_like(gp)))


# ---- bad input -------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bad_recurrence_input(backend):
    need(backend)
    x = rand(5, 2, 3)
    rec = geokern.lior_recurrence
    with pytest.raises(ValueError, match=r"x must be \[T, B, D\]"):
        rec(rand(5, 2, 3, 1), backend=backend)
    with pytest.raises(ValueError, match="p \\(the ring size\\) must be an int >= 1"):
        rec(x, p=0, backend=backend)
    with pytest.raises(ValueError, match=r"j must have shape \(5, 2\)"):
        rec(x, rand(5, 3), backend=backend)
    with pytest.raises(ValueError, match=r"history must have shape \(4, 2, 3\)"):
        rec(x, history=rand(3, 2, 3), backend=backend)
    with pytest.raises(TypeError, match="j has dtype torch.float64 but x has torch.float32"):
        rec(x, rand(5, 2).double(), backend=backend)
    with pytest.raises(TypeError, match="x must have dtype in"):
        rec(x.long(), backend=backend)
    with pytest.raises(ValueError, match="rho must be a finite number"):
        rec(x, rho=float("nan"), backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bad_step_input(backend):
    need(backend)
    m, ring, x = rand(2, 3), rand(4, 2, 3), rand(2, 3)
    pos = torch.zeros((), dtype=torch.int64, device=DEVICE)
    step = geokern.lior_recurrence_step_
    with pytest.raises(ValueError, match=r"ring must be \[p, B, D\]"):
        step(m, rand(4, 3, 3), pos, x, backend=backend)
    with pytest.raises(ValueError, match=r"ring must be \[p, B, D\]"):
        step(m, rand(0, 2, 3), pos, x, backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 3\)"):
        step(m, ring, pos, rand(3, 3), backend=backend)
    with pytest.raises(TypeError, match="pos must be a one-element int64 tensor"):
        step(m, ring, pos.int(), x, backend=backend)
    with pytest.raises(TypeError, match="x has dtype torch.float16 but m has torch.float32"):
        step(m, ring, pos, x.half(), backend=backend)
    with pytest.raises(ValueError, match="ring is updated in place and must be contiguous"):
        step(m, rand(2, 3, 4).permute(2, 0, 1), pos, x, backend=backend)
    with pytest.raises(ValueError, match=r"j must have shape \(2,\)"):
        step(m, ring, pos, x, rand(3), backend=backend)
    assert pos.item() == 0 and torch.equal(ring, ring), "a refused call changes nothing"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bad_action_input(backend):
    need(backend)
    v = rand(3, 4, 5)
    integral, mean, count = _state(4)
    act = geokern.lior_action_
    m = diag(torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="metric is for n = 6 coordinates, v has n = 5"):
        act(v, 1.0, diag(torch.ones(6, device=DEVICE)), integral, mean, count, backend=backend)
    with pytest.raises(ValueError, match="does not broadcast to"):
        act(v, torch.ones(3, 5, device=DEVICE), m, integral, mean, count, backend=backend)
    with pytest.raises(TypeError, match="integral must have dtype in"):
        act(v, 1.0, m, integral.double(), mean, count, backend=backend)
    with pytest.raises(ValueError, match=r"mean must have shape \(4,\)"):
        act(v, 1.0, m, integral, torch.zeros(5, device=DEVICE), count, backend=backend)
    with pytest.raises(TypeError, match="count must be a one-element int64 tensor"):
        act(v, 1.0, m, integral, mean, 0, backend=backend)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        act(v, 1.0, m, integral, mean, count, eps=-1.0, backend=backend)
    with pytest.raises(TypeError, match="metric must be a geokern.metric metric"):
        act(v, 1.0, torch.ones(5), integral, mean, count, backend=backend)


def test_bad_kernel_and_conv_input_and_backends():
    # every tensor on DEVICE: each check below must be the one that fires, not a device mismatch
    p = geokern.lior_params(device=DEVICE)
    with pytest.raises(ValueError, match=r"params must have shape \(12,\)"):
        geokern.lior_kernel(torch.ones(3, device=DEVICE), p[:9])
    with pytest.raises(ValueError, match="method must be 'auto', 'direct' or 'fft'"):
        geokern.lior_memory_conv(rand(4, 2), p, method="conv")
    # the method is an argument value: refused before (and whatever) the devices are
    with pytest.raises(ValueError, match="method must be 'auto', 'direct' or 'fft'"):
        geokern.lior_memory_conv(rand(4, 2), p.to("meta"), method="conv")
    with pytest.raises(ValueError, match="params is on meta but x is on"):
        geokern.lior_memory_conv(rand(4, 2), p.to("meta"))
    with pytest.raises(ValueError, match="params is on meta but dt is on"):
        geokern.lior_kernel(rand(3), p.to("meta"))
    with pytest.raises(ValueError, match="unknown parameter"):
        geokern.lior_params(alpha=1.0)
    with pytest.raises(RuntimeError, match="issue #21"):
        geokern.lior_recurrence(rand(3, 2, 2), backend="cuda")
    with pytest.raises(RuntimeError, match="issue #21"):
        geokern.lior_memory_conv(rand(3, 2), p, backend="cuda")
    with pytest.raises(RuntimeError, match="issue #21"):
        geokern.lior_recurrence_step_(rand(2, 2), rand(4, 2, 2), torch.zeros((), dtype=torch.int64, device=DEVICE),
                                      rand(2, 2), backend="cuda")


def test_triton_refuses_float64_by_name():
    need("triton")
    with pytest.raises(TypeError, match="the Triton kernels take float16 / bfloat16 / float32, got torch.float64"):
        geokern.lior_recurrence(rand(3, 2, 2, dtype=torch.float64), backend="triton")


# ---- the layer -------------------------------------------------------------------


def test_lior_memory_layer():
    layer = geokern.nn.LiorMemory(a=2.0, device=DEVICE)
    assert layer.params.shape == (12,) and layer.params[0].item() == 2.0
    x = rand(30, 2, 8)
    out = layer(x)
    torch.testing.assert_close(out, ref.lior_memory_conv(x, layer.params.detach(), "direct"), rtol=1e-5, atol=1e-6)
    bf = geokern.nn.LiorMemory(a=2.0, batch_first=True, method="fft").to(DEVICE)  # .to moves params too
    torch.testing.assert_close(bf(x.transpose(0, 1)).transpose(0, 1), out, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert layer.params.grad is not None and torch.isfinite(layer.params.grad).all()
    assert layer.params.grad.abs().sum() > 0, "the kernel's parameters must learn"
    assert layer.kernel_weights(30).shape == (30,)
    with pytest.raises(ValueError, match="LiorMemory: x must be a tensor with a time dim"):
        bf(torch.ones(3))


def test_deterministic_mode_gate_backward():
    """The Triton recurrence backward adds dj across D-blocks with float32 atomics: under
    torch.use_deterministic_algorithms(True) it raises as torch's nondeterministic ops do, naming
    backend='torch'; without a gate (no dj) it runs, and so does the torch backend."""
    need("triton")
    x = torch.randn(5, 2, 40, device=DEVICE, requires_grad=True)
    j = torch.randn(5, 2, device=DEVICE, requires_grad=True)
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = geokern.lior_recurrence(x, j, backend="triton")
        with pytest.raises(RuntimeError, match="lior_recurrence backward.*backend='triton'.*backend='torch'"):
            out.sum().backward()
        geokern.lior_recurrence(x, backend="triton").sum().backward()
        geokern.lior_recurrence(x, j, backend="torch").sum().backward()
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


_WRITES = WRITES_PRELUDE + """
from geokern.kernels import lior as tk
t = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
W, B, F, T, D, P = 4, 64, 16, 8, 32, 4
act = dict(phi_ptr=t(W, B, F), w_ptr=t(F), r_ptr=t(W, B), cost_ptr=t(W, B), int_ptr=t(B), mean_ptr=t(B),
           count_ptr=t(1, dt=torch.int64), W=W, B=B, F=F, s_pw=B * F, s_pb=F, s_rw=B, s_rb=1, eps=1e-8, dtau=0.1,
           BF=16, ONE_F=True)
bwd = dict(g_ptr=t(T, B, D), x_ptr=t(T, B, D), j_ptr=t(T, B), m0_ptr=t(B, D), h_ptr=t(P, B, D), out_ptr=t(T, B, D),
           dx_ptr=t(T, B, D), dm0_ptr=t(B, D), dh_ptr=t(P, B, D), dj_ptr=t(T, B), T=T, B=B, D=D, rho=0.9, eta=1.0,
           xi=0.5, P=P, PP=P, HAS_J=True, HAS_M0=True, HAS_H=True)
cases = [("action", tk.lior_action_kernel, act, dict(RE=4096, AHEAD=0)), ("action", tk.lior_action_kernel, act,
         dict(RE=512, AHEAD=1)), ("bwd", tk.lior_recurrence_bwd_kernel, bwd, dict(BD=32, TC=0, VEC=4)),
         ("bwd", tk.lior_recurrence_bwd_kernel, bwd, dict(BD=32, TC=8, VEC=1))]
for name, kernel, kw, cfg in cases:
    k2 = {**kw, **cfg}
    if hasattr(tkw, "identify_accessed_tensors"):  # newer torch
        written = [d.name for d in tkw.identify_accessed_tensors(kernel.fn, k2, {}).read_writes.writes]
    else:
        written = tkw.identify_mutated_tensors(kernel.fn, k2, {})
    print(name, cfg, sorted(written))
"""


def test_compile_sees_the_kernels_write_only_their_outputs():
    """torch.compile copies every tensor its TTIR analysis says a user Triton kernel writes: the
    action's loops (the old one and the look-ahead) write only cost, integral and mean, the
    backward's (the step loop and the chunked one) only dx, dm0, dh, dj. The TTIR needs no GPU."""
    pytest.importorskip("triton")
    out = run_isolated(_WRITES)
    for loop in ("{'RE': 4096, 'AHEAD': 0}", "{'RE': 512, 'AHEAD': 1}"):
        assert f"action {loop} ['cost_ptr', 'int_ptr', 'mean_ptr']" in out, out
    for loop in ("{'BD': 32, 'TC': 0, 'VEC': 4}", "{'BD': 32, 'TC': 8, 'VEC': 1}"):
        assert f"bwd {loop} ['dh_ptr', 'dj_ptr', 'dm0_ptr', 'dx_ptr']" in out, out
