"""LIoR family: the kernel by hand, the memory convolution (FFT == direct == a loop), the recurrence
(sequence == T steps, every backend vs the float64 reference, gradients), the action, custom ops.
Edges (NaN, empty, bad input) and the layer are in test_lior_edges.py."""

import math

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import dtype_id, need
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.metric import diag, rotor_diag
from geokern.reference import lior as ref

KERNEL_BACKENDS = ["torch", "triton"]
GAINS = dict(rho=0.9, eta=1.0, xi=0.5)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


def params64(**kw):
    base = dict(a=1.3, b=0.4, gamma=0.7, delta=0.8, xi=0.03, eta=0.6, omega=1.1, phi=0.3, zeta=0.15,
                logit_e=0.2, logit_f=-0.4, logit_o=0.5)
    return ref.lior_params(torch.float64, DEVICE, **{**base, **kw})


def dtypes_for(backend):
    return [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if backend == "torch" else [])


# ---- kernel ----------------------------------------------------------------------


def _kernel_by_hand(dt, p):
    a, b, gamma, delta, xi, eta, omega, phi, zeta, l0, l1, l2 = p
    z = [math.exp(l) for l in (l0, l1, l2)]
    w = [v / sum(z) for v in z]
    dt = max(dt, 0.1)

    def ex(v):
        return math.exp(min(max(v, -20.0), 20.0))

    k = (w[0] * a * ex(-b * dt) + w[1] * gamma * ex(-delta * math.log(dt)) * ex(-xi * dt)
         + w[2] * eta * math.cos(omega * dt + phi) * ex(-zeta * dt))
    return min(max(k, -100.0), 100.0)


@pytest.mark.parametrize("case", ["plain", "exp-clip", "k-clip", "small-dt"])
def test_kernel_by_hand(case):
    kw = {"plain": {}, "exp-clip": dict(b=-50.0, delta=30.0), "k-clip": dict(a=1e4), "small-dt": {}}[case]
    p = params64(**kw)
    dts = [0.0, 0.05, 0.1, 0.5, 1.0, 3.0, 17.0] if case == "small-dt" else [0.3, 1.0, 2.5, 9.0, 40.0]
    got = geokern.lior_kernel(torch.tensor(dts, dtype=torch.float64, device=DEVICE), p)
    want = torch.tensor([_kernel_by_hand(d, p.tolist()) for d in dts], dtype=torch.float64)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12, msg=f"kernel {case}")
    if case == "k-clip":
        assert (got.abs() <= 100).all() and (got == 100).any(), "K must be clipped to [-100, 100]"
    if case == "small-dt":
        assert got[0] == got[1] == got[2], "dt below 0.1 must read as 0.1"


def test_kernel_float32_and_gradient():
    p = params64()
    dt = torch.rand(50, dtype=torch.float64, device=DEVICE) * 20
    k32 = geokern.lior_kernel(dt.float(), p.float())
    assert k32.dtype == torch.float32
    assert_close("kernel f32", k32, ref.lior_kernel(dt, p))
    dtr, pr = dt.clone().requires_grad_(), p.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda d, q: geokern.lior_kernel(d, q), (dtr, pr))


# ---- memory convolution ----------------------------------------------------------


def _conv_by_loop(x, p):
    T = x.shape[0]
    k = [_kernel_by_hand(float(i + 1), p.tolist()) for i in range(T)]
    s = abs(sum(k)) + 1e-8
    w0 = torch.softmax(p[9:12], 0)[0].item()
    out = torch.zeros_like(x)
    for t in range(T):
        acc = sum(k[j] / s * x[t - j] for j in range(t + 1))
        out[t] = w0 * x[t] + (1 - w0) * acc
    return out


@pytest.mark.parametrize("T", [1, 2, 7, 33])
def test_memory_conv_by_loop(T):
    x, p = rand(T, 2, 3, dtype=torch.float64), params64()
    want = _conv_by_loop(x, p)
    for method in ("direct", "fft"):
        torch.testing.assert_close(geokern.lior_memory_conv(x, p, method=method), want, rtol=1e-10, atol=1e-12,
                                   msg=f"memory conv {method} vs the loop, T={T}")


@pytest.mark.parametrize("T", [5, 64, 129, 300])
def test_memory_conv_fft_equals_direct(T):
    x, p = rand(T, 3, 5, dtype=torch.float64), params64(delta=0.3)
    d = geokern.lior_memory_conv(x, p, method="direct")
    f = geokern.lior_memory_conv(x, p, method="fft")
    torch.testing.assert_close(f, d, rtol=1e-10, atol=1e-12, msg=f"FFT vs direct, T={T}")


@pytest.mark.parametrize("method", ["direct", "fft", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_memory_conv_low_precision(dtype, method):
    x64, p = rand(70, 2, 9, dtype=torch.float64), params64()
    out = geokern.lior_memory_conv(x64.to(dtype), p.float(), method=method)
    assert out.dtype == dtype
    assert_close(f"memory conv {method}", out, ref.lior_memory_conv(x64, p, "direct"),
                 ref.lior_memory_conv(x64.to(dtype), p.to(dtype) if dtype != torch.float32 else p.float(), "direct"))


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_memory_conv_gradcheck(method):
    x = rand(9, 2, 2, dtype=torch.float64).requires_grad_()
    p = params64().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: geokern.lior_memory_conv(a, b, method=method), (x, p))


# ---- recurrence ------------------------------------------------------------------


SEQ = [(1, 1, 1), (7, 3, 5), (13, 2, 37), (9, 4, 70)]


def seq_id(s):
    return "T{}-B{}-D{}".format(*s)


def _seq_inputs(shape, dtype, gate, state, p=4):
    T, B, D = shape
    x = rand(T, B, D, dtype=dtype)
    j = rand(T, B, dtype=dtype) if gate else None
    m0 = rand(B, D, dtype=dtype) if state else None
    h = rand(p, B, D, dtype=dtype) if state else None
    return x, j, m0, h


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("gate,state", [(False, False), (True, True)], ids=["plain", "gate+state"])
@pytest.mark.parametrize("shape", SEQ, ids=seq_id)
def test_recurrence_matches_reference(shape, gate, state, backend):
    need(backend)
    for dtype in dtypes_for(backend):
        x, j, m0, h = _seq_inputs(shape, dtype, gate, state)
        out = geokern.lior_recurrence(x, j, m0=m0, history=h, backend=backend, **GAINS)
        assert out.dtype == dtype
        want = ref.lior_recurrence(x.double(), _d(j), **GAINS, m0=_d(m0), history=_d(h))
        same = ref.lior_recurrence(x, j, **GAINS, m0=m0, history=h)
        assert_close(f"{backend} recurrence {dtype_id(dtype)}", out, want, same)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("p", [1, 3, 4, 6])
def test_sequence_equals_T_steps(p, backend):
    need(backend)
    T, B, D = 11, 3, 19
    x, j = rand(T, B, D), rand(T, B)
    seq = geokern.lior_recurrence(x, j, p=p, backend=backend, **GAINS)
    m, ring = torch.zeros(B, D, device=DEVICE), torch.zeros(p, B, D, device=DEVICE)
    pos = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for t in range(T):
        got = geokern.lior_recurrence_step_(m, ring, pos, x[t], j[t], backend=backend, **GAINS)
        assert got is m
        torch.testing.assert_close(m, seq[t], rtol=1e-5, atol=1e-6, msg=f"{backend} step {t} vs sequence (p={p})")
    assert pos.item() == T, "pos must count the steps"
    for t in range(T - p, T):  # the ring holds the last p inputs, x_t at slot t % p
        torch.testing.assert_close(ring[t % p], x[t], rtol=0, atol=0, msg=f"ring slot {t % p}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_step_without_gate_and_history_continues_a_sequence(backend):
    """A sequence split in two: the second half with m0 = the first's last m and the history = the
    first half's last p inputs equals the whole; the step without a gate uses factors 1."""
    need(backend)
    T, B, D, p = 10, 2, 7, 4
    x = rand(T, B, D)
    whole = geokern.lior_recurrence(x, backend=backend, **GAINS)
    first = geokern.lior_recurrence(x[:6], backend=backend, **GAINS)
    second = geokern.lior_recurrence(x[6:], m0=first[-1], history=x[6 - p:6], backend=backend, **GAINS)
    torch.testing.assert_close(second, whole[6:], rtol=1e-5, atol=1e-6, msg=f"{backend} split sequence")
    m, ring = torch.zeros(B, D, device=DEVICE), torch.zeros(p, B, D, device=DEVICE)
    pos = torch.zeros((), dtype=torch.int64, device=DEVICE)
    geokern.lior_recurrence_step_(m, ring, pos, x[0], backend=backend, **GAINS)
    torch.testing.assert_close(m, GAINS["eta"] * x[0], msg=f"{backend} first step without gate")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", SEQ[1:], ids=seq_id)
def test_recurrence_gradients(shape, dtype):
    need("triton")
    x, j, m0, h = _seq_inputs(shape, dtype, True, True)
    leaves = [t.requires_grad_() for t in (x, j, m0, h)]
    out = geokern.lior_recurrence(x, j, m0=m0, history=h, backend="triton", **GAINS)
    g = rand(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, g)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(ref.lior_recurrence(l64[0], l64[1], **GAINS, m0=l64[2], history=l64[3]), l64,
                               g.double())
    ld = [t.detach().clone().requires_grad_() for t in leaves]
    same = torch.autograd.grad(ref.lior_recurrence(ld[0], ld[1], **GAINS, m0=ld[2], history=ld[3]), ld, g)
    for name, a, w, s in zip(("dx", "dj", "dm0", "dhistory"), grads, want, same):
        assert a.dtype == dtype, f"{name} dtype"
        assert_close(f"triton recurrence {name}", a, w, s)


def test_recurrence_gradcheck_reference():
    x, j = rand(6, 2, 3, dtype=torch.float64).requires_grad_(), rand(6, 2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: geokern.lior_recurrence(a, b, p=2, backend="torch"), (x, j))


# ---- action ----------------------------------------------------------------------


def _state(B, dtype=torch.float32):
    return (torch.zeros(B, dtype=dtype, device=DEVICE), torch.zeros(B, dtype=dtype, device=DEVICE),
            torch.zeros((), dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("r_kind", ["number", "row", "step-row"])
@pytest.mark.parametrize("metric_kind", ["diag", "rotor"])
def test_action_over_two_windows(metric_kind, r_kind, backend):
    need(backend)
    W, B, n = 5, 9, 6
    lam = torch.rand(n, device=DEVICE) + 0.1
    lam[0] = -0.05  # an indefinite metric: g clamped at 0
    metric = diag(lam) if metric_kind == "diag" else rotor_diag(lam, torch.rand(2, device=DEVICE), [(0, 1), (2, 5)])
    R = {"number": 1.7, "row": torch.rand(B, device=DEVICE) + 0.5,
         "step-row": torch.rand(2 * W, B, device=DEVICE) + 0.5}[r_kind]
    v = rand(2 * W, B, n)
    integral, mean, count = _state(B)
    costs = []
    for w in range(2):
        r = R[w * W:(w + 1) * W] if r_kind == "step-row" else R
        costs.append(geokern.lior_action_(v[w * W:(w + 1) * W], r, metric, integral, mean, count, dtau=0.1,
                                          backend=backend))
    m64 = diag(lam.double()) if metric_kind == "diag" else rotor_diag(lam.double(), metric.theta.double(), metric.pairs)
    R64 = R.double() if isinstance(R, torch.Tensor) else R
    cost64, i64, mu64, n64 = ref.lior_action(v.double(), R64, m64, 1e-8, 0.1)
    assert_close(f"{backend} action cost", torch.cat(costs), cost64)
    assert_close(f"{backend} action integral", integral, i64)
    assert_close(f"{backend} action mean", mean, mu64)
    assert count.item() == 2 * W
    torch.testing.assert_close(mean.double(), cost64.mean(0), rtol=1e-6, atol=0, msg="mean is the mean of the cost")


# ---- custom ops ------------------------------------------------------------------


def _op_samples(qualname):
    T, B, D, p = 7, 3, 10, 4
    x, j, m0, h = rand(T, B, D), rand(T, B), rand(B, D), rand(p, B, D)
    if "step" in qualname:
        pos = torch.tensor(5, dtype=torch.int64, device=DEVICE)
        return [(rand(B, D), rand(p, B, D), rand(B, D), rand(B), pos.clone(), 0.9, 1.0, 0.5),
                (rand(B, D), rand(3, B, D), rand(B, D), None, pos.clone(), 0.5, 2.0, 0.1)]
    if "action" in qualname:
        st = _state(B)
        return [(rand(5, B, 6), torch.rand(6, device=DEVICE), torch.rand(5, B, device=DEVICE), *st, 1e-8, 0.1)]
    if "backward" in qualname:
        out = geokern.lior_recurrence(x, j, m0=m0, history=h, **GAINS)
        return [(rand(T, B, D), x, j, m0, h, out, 0.9, 1.0, 0.5, p),
                (rand(T, B, D), x, None, None, None, geokern.lior_recurrence(x, **GAINS), 0.9, 1.0, 0.5, p)]
    return [(x, j, m0, h, 0.9, 1.0, 0.5, p), (x, None, None, None, 0.9, 1.0, 0.5, 3)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("lior_", _op_samples)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public op with its kernels needs CUDA tensors")
def test_public_recurrence_compiles_with_backward():
    x, j = rand(9, 4, 33).requires_grad_(), rand(9, 4).requires_grad_()
    f = torch.compile(lambda a, b: geokern.lior_recurrence(a, b, backend="triton").square().sum(), fullgraph=True)
    got = torch.autograd.grad(f(x, j), (x, j))
    want = torch.autograd.grad(ref.lior_recurrence(x, j).square().sum(), (x, j))
    for name, a, w in zip(("dx", "dj"), got, want):
        assert_close(f"compiled {name}", a, w.double(), w)


# ---- the forward's loops, each config the GPU autotuner may pick ---------------------------------

# (BD, TC, VEC, warps): the step loop (TC 0); chunks shorter than, equal to and longer than p, not
# multiples of p (TC 8 with p 3: chunks of 6 in a tile of 8; p 9 > TC: chunks of p in a tile of 16)
FWD_LOOPS = [(16, 0, 4, 1), (16, 4, 1, 1), (16, 8, 1, 1), (32, 16, 2, 1), (8, 32, 1, 1)]


@pytest.mark.parametrize("loop", FWD_LOOPS, ids=lambda c: f"BD{c[0]}-TC{c[1]}-VEC{c[2]}")
@pytest.mark.parametrize("p", [1, 3, 4, 9])
def test_recurrence_forward_loops_match_reference(loop, p):
    need("triton")
    import triton

    from geokern.kernels import lior as tk
    bd, tc, vec, warps = loop
    cfg = triton.Config({"BD": bd, "TC": tc, "VEC": vec}, num_warps=warps)
    # T: shorter than a chunk, one chunk and a ragged tail; D: a partial column block
    for T, gate, state, dtype in ((5, True, True, torch.float32), (37, False, False, torch.float32),
                                  (37, True, True, torch.bfloat16), (1, False, True, torch.float32)):
        B, D = 2, 21
        x, j = rand(T, B, D, dtype=dtype), (rand(T, B, dtype=dtype) if gate else None)
        m0, h = (rand(B, D, dtype=dtype), rand(p, B, D, dtype=dtype)) if state else (None, None)
        out = torch.full_like(x, float("nan"))
        tk.lior_recurrence_fwd(x, j, m0, h, out, *GAINS.values(), p, config=cfg)
        want = ref.lior_recurrence(x.double(), _d(j), **GAINS, p=p, m0=_d(m0), history=_d(h))
        same = ref.lior_recurrence(x, j, **GAINS, p=p, m0=m0, history=h)
        assert_close(f"loop {loop} p={p} T={T} {dtype_id(dtype)}", out, want, same)


def test_recurrence_forward_loops_keep_nan_in_their_row():
    """NaN in x[t] or j[t] reaches m[t' >= t] of its row only, in the chunked loop too (the j tile
    is summed over columns: its one loaded term per row carries the NaN)."""
    need("triton")
    import triton

    from geokern.kernels import lior as tk
    T, B, D, p = 19, 3, 10, 3
    x, j = rand(T, B, D), rand(T, B)
    x[7, 1, 4] = float("nan")
    j[11, 2] = float("nan")
    for cfg in (triton.Config({"BD": 16, "TC": 0, "VEC": 4}, num_warps=1),
                triton.Config({"BD": 8, "TC": 8, "VEC": 1}, num_warps=1)):
        out = torch.empty_like(x)
        tk.lior_recurrence_fwd(x, j, None, None, out, *GAINS.values(), p, config=cfg)
        bad = out.isnan()
        assert bad[7:, 1, 4].all() and bad[11:, 2].all(), cfg
        assert not bad[:7, 1].any() and not bad[:11, 2].any() and not bad[:, 0].any(), cfg
        assert not bad[:, 1, :4].any() and not bad[:, 1, 5:].any(), cfg


# ---- the action's loops, each config the GPU autotuner may pick ----------------------------------

# (RE, AHEAD, warps): the old loop (AHEAD 0) at the old launcher's tile and a small one, the
# look-ahead loop (AHEAD 1) at 32-64 rows for n = 16 and at a tile under one row's BF (RE < BF: 1 row)
ACTION_LOOPS = [(4096, 0, 4), (256, 0, 1), (512, 1, 1), (1024, 1, 2), (64, 1, 1), (8, 1, 1)]


@pytest.mark.parametrize("loop", ACTION_LOOPS, ids=lambda c: f"RE{c[0]}-AHEAD{c[1]}-w{c[2]}")
def test_action_loops_match_reference(loop):
    """Every loop against the float64 reference: partial row blocks (B not a multiple of the rows),
    n not a power of two, one step (W 1: the look-ahead's first load is its last), phi in bfloat16 /
    float16, R broadcast over steps (stride 0), n > 128 (two feature blocks: the look-ahead config
    falls back to the old loop), and NaN in v and R kept in their (step, row)."""
    need("triton")
    import triton

    from geokern.kernels import lior as tk
    re, ahead, warps = loop
    cfg = triton.Config({"RE": re, "AHEAD": ahead}, num_warps=warps)
    for W, B, n, dtype, r_kind, nan in ((7, 45, 16, torch.float32, "step-row", False),
                                        (1, 70, 6, torch.float32, "row", False),
                                        (5, 33, 13, torch.bfloat16, "step-row", True),
                                        (4, 20, 16, torch.float16, "row", True),
                                        (3, 9, 130, torch.float32, "step-row", True)):
        phi = rand(W, B, n, dtype=dtype)
        w = torch.rand(n, device=DEVICE) - 0.1  # some negative weights: q may fall below 0 (clamped)
        R = torch.rand(W, B, device=DEVICE) + 0.5 if r_kind == "step-row" else \
            (torch.rand(B, device=DEVICE) + 0.5).expand(W, B)
        if nan:
            phi[W // 2, B - 1, n - 1] = float("nan")
            R = R.clone()
            R[0, 3] = float("nan")
        integral, mean = torch.rand(B, device=DEVICE), torch.rand(B, device=DEVICE)
        count = torch.tensor(3, dtype=torch.int64, device=DEVICE)
        i0, mu0 = integral.clone(), mean.clone()
        cost = torch.full((W, B), float("nan"), device=DEVICE)
        tk.lior_action(phi, w, R, cost, integral, mean, count, 1e-8, 0.1, config=cfg)
        q = (phi.double().square() * w.double()).sum(-1).clamp_min(0)  # clamp keeps NaN
        want = R.double() * (q + 1e-8).sqrt()
        bad = torch.zeros(W, B, dtype=torch.bool, device=DEVICE)
        if nan:
            bad[W // 2, B - 1] = bad[0, 3] = True
        assert torch.equal(cost.isnan(), bad) and torch.equal(want.isnan(), bad), loop
        ok = ~bad.any(0)  # the rows without NaN, compared

        def fin(t):
            return t.nan_to_num(0.0)
        assert_close(f"action {loop} W{W} B{B} n{n} {dtype_id(dtype)}", fin(cost), fin(want))
        assert_close(f"action {loop} integral", integral[ok], (i0.double() + 0.1 * want.sum(0))[ok])
        assert_close(f"action {loop} mean", mean[ok], ((mu0.double() * 3 + want.sum(0)) / (3 + W))[ok])
        assert torch.equal(integral.isnan(), bad.any(0)) and torch.equal(mean.isnan(), bad.any(0)), loop


# ---- the backward's loops, each config the GPU autotuner may pick --------------------------------

# (BD, TC, VEC, warps): the step loop (TC 0); chunks shorter than, equal to and longer than p, not
# multiples of p, several D-blocks (BD 8 with D 21: three programs add into one dj[t, b])
BWD_LOOPS = [(16, 0, 4, 1), (16, 4, 1, 1), (16, 8, 1, 1), (32, 16, 2, 1), (8, 32, 1, 1)]


@pytest.mark.parametrize("loop", BWD_LOOPS, ids=lambda c: f"BD{c[0]}-TC{c[1]}-VEC{c[2]}")
@pytest.mark.parametrize("p", [1, 3, 4, 9])
def test_recurrence_backward_loops_match_reference(loop, p):
    """dx, dj, dm0, dhistory of each loop against float64 autograd through the reference: T shorter
    than a chunk, a ragged tail, T = 1, with and without the gate and the state, bfloat16."""
    need("triton")
    import triton

    from geokern.kernels import lior as tk
    bd, tc, vec, warps = loop
    cfg = triton.Config({"BD": bd, "TC": tc, "VEC": vec}, num_warps=warps)
    for T, gate, state, dtype in ((5, True, True, torch.float32), (37, False, False, torch.float32),
                                  (37, True, True, torch.bfloat16), (1, True, False, torch.float32),
                                  (23, True, False, torch.float32), (23, False, True, torch.float32)):
        B, D = 2, 21
        x, j = rand(T, B, D, dtype=dtype), (rand(T, B, dtype=dtype) if gate else None)
        m0, h = (rand(B, D, dtype=dtype), rand(p, B, D, dtype=dtype)) if state else (None, None)
        out = ref.lior_recurrence(x, j, **GAINS, p=p, m0=m0, history=h).to(dtype)
        g = rand(T, B, D, dtype=dtype)
        dx, dm0, dh = torch.full_like(x, float("nan")), x.new_full((B, D), float("nan")), \
            x.new_full((p, B, D), float("nan"))
        dj = torch.zeros(T, B, device=DEVICE)
        tk.lior_recurrence_bwd(g, x, j, m0, h, out, dx, dm0, dh, dj, *GAINS.values(), p, config=cfg)
        leaves = [t for t in (x, j, m0, h) if t is not None]
        l64 = [t.double().requires_grad_() for t in leaves]
        it = iter(l64)
        args = [next(it) if t is not None else None for t in (x, j, m0, h)]
        want = dict(zip([n for n, t in zip(("dx", "dj", "dm0", "dh"), (x, j, m0, h)) if t is not None],
                        torch.autograd.grad(ref.lior_recurrence(args[0], args[1], **GAINS, p=p, m0=args[2],
                                                                history=args[3]), l64, g.double())))
        ld = [t.clone().requires_grad_() for t in leaves]
        it = iter(ld)
        args = [next(it) if t is not None else None for t in (x, j, m0, h)]
        same = dict(zip(want, torch.autograd.grad(ref.lior_recurrence(args[0], args[1], **GAINS, p=p, m0=args[2],
                                                                      history=args[3]), ld, g)))
        got = {"dx": dx, "dj": dj, "dm0": dm0, "dh": dh}
        name = f"bwd loop {loop} p={p} T={T} gate={gate} state={state} {dtype_id(dtype)}"
        for k in want:
            assert_close(f"{name} {k}", got[k], want[k], same[k])
        if not gate:
            assert not dj.any(), f"{name}: dj written without a gate"
        if not state:  # the gradients to a zero state are still defined: compare with a zero state's
            z64 = [t.double().requires_grad_() for t in (x, torch.zeros(B, D, device=DEVICE),
                                                         torch.zeros(p, B, D, device=DEVICE))]
            w = torch.autograd.grad(ref.lior_recurrence(z64[0], _d(j), **GAINS, p=p, m0=z64[1], history=z64[2]),
                                    z64[1:], g.double())
            assert_close(f"{name} dm0", dm0, w[0])
            assert_close(f"{name} dh", dh, w[1])


def test_recurrence_backward_loops_keep_nan_in_their_row():
    """NaN in g[t] reaches dx[t' <= t] of its row (the adjoint walks backwards), and dj of that row
    only: the chunked loop's per-chunk dj sums keep it to its (t, b)."""
    need("triton")
    import triton

    from geokern.kernels import lior as tk
    T, B, D, p = 19, 3, 10, 3
    x, j = rand(T, B, D), rand(T, B)
    out = ref.lior_recurrence(x, j, **GAINS, p=p)
    g = rand(T, B, D)
    g[11, 1, 4] = float("nan")
    for cfg in (triton.Config({"BD": 16, "TC": 0, "VEC": 4}, num_warps=1),
                triton.Config({"BD": 8, "TC": 8, "VEC": 1}, num_warps=1)):
        dx, dm0, dh = torch.empty_like(x), torch.empty(B, D, device=DEVICE), torch.empty(p, B, D, device=DEVICE)
        dj = torch.zeros(T, B, device=DEVICE)
        tk.lior_recurrence_bwd(g, x, j, None, None, out, dx, dm0, dh, dj, *GAINS.values(), p, config=cfg)
        bad = dx.isnan()
        assert bad[:12, 1, 4].all() and not bad[12:].any(), cfg
        assert not bad[:, 0].any() and not bad[:, 2].any() and not bad[:, 1, :4].any(), cfg
        assert dj[:12, 1].isnan().all() and not dj[12:].isnan().any(), cfg
        assert not dj[:, 0].isnan().any() and not dj[:, 2].isnan().any(), cfg
