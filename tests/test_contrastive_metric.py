"""The metric / rotor update (contrastive_metric_update_): the reference against the rule in plain
Python floats, the Triton kernel against the float64 reference, the float32 atan2, the finite
gate (lam and theta bit-identical), the clamp, the radius threshold, the wrap, dL on the device,
no host synchronisation, bad input, and the custom op's opcheck / compile."""

import math

import pytest
import torch
import triton
import triton.language as tl
from _custom_ops import custom_op_tests
from _helpers import capturable, dtype_id, gpu, need, run_isolated
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
import geokern.metric as gm
from geokern.kernels._common import atan2
from geokern.reference import contrastive as ref

BACKENDS = ["torch", "triton"]
PI32 = float(torch.tensor(math.pi, dtype=torch.float32))


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def planes(n, count):
    """`count` random rotation planes (i != j) of n coordinates."""
    out = []
    for _ in range(count):
        i, j = torch.randperm(n)[:2].tolist()
        out.append((i, j))
    return out


def make(kind, n, dt=torch.float32, pairs=None):
    lam = (torch.rand(n, device=DEVICE, dtype=torch.float64) * 1.5 + 0.5).to(dt)
    if kind == "diag":
        return gm.diag(lam)
    pairs = planes(n, n + 1) if pairs is None else pairs
    return gm.rotor_diag(lam, (torch.rand(len(pairs), device=DEVICE, dtype=torch.float64) * 6 - 3).to(dt), pairs)


def clone(m, dt=None):
    cast = (lambda t: t.clone()) if dt is None else (lambda t: t.to(dt).clone())
    return gm.diag(cast(m.lam)) if m.kind == "diag" else gm.rotor_diag(cast(m.lam), cast(m.theta), m.pairs)


def state(m):
    return (m.lam,) if m.kind == "diag" else (m.lam, m.theta)


def update(backend, m, x, dL, lr=0.6, beta=0.5, **kw):
    out = clone(m)
    geokern.contrastive_metric_update_(out, x, dL, lr, beta, backend=backend, **kw)
    return out


# ---- the definition ----------------------------------------------------------------------------


def test_reference_is_the_rule_in_plain_floats():
    xs = [[0.3, -1.2, 2.0], [1.1, 0.4, -0.5]]
    lam, theta, pairs = [0.7, 1.3, 99.9], [0.4, -2.9], [(0, 1), (2, 0)]
    dL, lr, beta = 0.8, 0.3, 0.2
    v = [sum(col) / len(xs) for col in zip(*xs)]
    for t, (a, b) in zip(theta, pairs):
        c, s = math.cos(t), math.sin(t)
        v[a], v[b] = c * v[a] - s * v[b], s * v[a] + c * v[b]
    sv = lr / beta * dL
    tot = sum(u * u for u in v)
    want_lam = [min(max(lm + sv * u * u / (tot + 1e-8), 0.01), 100.0) for lm, u in zip(lam, v)]
    want_theta = []
    for t, (a, b) in zip(theta, pairs):
        r = math.hypot(v[a], v[b])
        t = t + (0.01 * sv * -1.0 * math.atan2(v[b], v[a]) * r if r >= 1e-6 else 0.0)
        want_theta.append((t + math.pi) % (2 * math.pi) - math.pi)
    m = gm.rotor_diag(torch.tensor(lam, dtype=torch.float64), torch.tensor(theta, dtype=torch.float64), pairs)
    ref.contrastive_metric_update_(m, torch.tensor(xs, dtype=torch.float64), dL, lr, beta)
    assert want_lam[2] == 100.0, "the case should reach the clamp"
    torch.testing.assert_close(m.lam, torch.tensor(want_lam, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.theta, torch.tensor(want_theta, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ---- the Triton kernel against the reference -------------------------------------------------

# (n, N, rows_per_program): one coordinate and one row; odd sizes; the parallel stage with several
# blocks and a partial last one (53 = 3 * 16 + 5, 300 = 4 * 64 + 44); one program reading all rows
SHAPES = [(1, 1, 0), (2, 7, 3), (7, 53, 16), (16, 300, 64), (33, 129, 0), (5, 40, 40)]
# (state dtype, activity dtype)
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16)]


def _angle_diff(a, b):
    return ref.wrap_angle(a.double() - b.double())


@pytest.mark.parametrize("dL", [-0.4, 0.55], ids=["dL-neg", "dL-pos"])
@pytest.mark.parametrize("kind", ["diag", "rotor_diag"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"state{dtype_id(d[0])}-x{dtype_id(d[1])}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-N{}-rpp{}".format(*s))
def test_triton_matches_reference(shape, dtypes, kind, dL):
    need("triton")
    n, N, rpp = shape
    if kind == "rotor_diag" and n < 2:
        pytest.skip("a rotation plane needs two coordinates")
    sdt, xdt = dtypes
    m = make(kind, n, sdt)
    # an offset mean: v of order 1, so the angle increments are of order 0.01-0.1
    x = (torch.randn(N, n, device=DEVICE, dtype=torch.float64) + 1.5).to(xdt)
    got = update("triton", m, x, dL, rows_per_program=rpp)
    want = clone(m, torch.float64)
    ref.contrastive_metric_update_(want, x.double(), dL, 0.6, 0.5)
    same = update("torch", m, x, dL)
    name = f"n{n} N{N} rpp{rpp} {kind} {dtypes}"
    lam0 = m.lam.double()
    assert got.lam.dtype == sdt
    assert_close(f"{name} dlam", got.lam.double() - lam0, want.lam - lam0, same.lam.double() - lam0)
    if kind == "rotor_diag":
        assert not torch.equal(want.theta, m.theta.double()), "the case should move the angles"
        th0 = m.theta
        assert_close(f"{name} dtheta", _angle_diff(got.theta, th0), _angle_diff(want.theta, th0),
                     _angle_diff(same.theta, th0))


@triton.jit
def _atan2_kernel(y_ptr, x_ptr, o_ptr, n, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    m = o < n
    tl.store(o_ptr + o, atan2(tl.load(y_ptr + o, mask=m), tl.load(x_ptr + o, mask=m)), mask=m)


def test_atan2_matches_torch():
    """kernels/_common.py's atan2 within 3 ulp of the float64 atan2 over random pairs spanning
    many exponents, and exactly (sign of zero included) at the special values."""
    need("triton")

    def run(y, x):
        out = torch.empty_like(y)
        _atan2_kernel[(triton.cdiv(y.numel(), 1024),)](y, x, out, y.numel(), B=1024)
        return out

    n = 1 << 15
    e = torch.randint(-60, 60, (2, n), device=DEVICE).float()
    y = torch.randn(n, device=DEVICE) * 2 ** e[0]
    x = torch.randn(n, device=DEVICE) * 2 ** e[1]
    y[:64], x[:64] = 1.0 + torch.rand(64, device=DEVICE) * 1e-3, torch.ones(64, device=DEVICE)  # near pi / 4
    got, want = run(y, x).double(), torch.atan2(y.double(), x.double())
    ulp = (torch.nextafter(want.float(), torch.tensor(math.inf, device=DEVICE)).double() - want.float().double()).abs()
    err = ((got - want).abs() / ulp).max().item()
    assert err <= 3.0, f"atan2: {err:.2f} ulp from the float64 value"
    inf, nan = math.inf, math.nan
    vals = [0.0, -0.0, 1.0, -1.0, 2.5e-38, -3e38, inf, -inf, nan]
    ys = torch.tensor([a for a in vals for _ in vals], device=DEVICE)
    xs = torch.tensor([b for _ in vals for b in vals], device=DEVICE)
    got, want = run(ys, xs), torch.atan2(ys.double(), xs.double()).float()
    same = (bits(got) == bits(want)) | (got.isnan() & want.isnan())
    assert same.all(), f"atan2 special values: {[(a, b, g, w) for a, b, g, w, s in zip(ys.tolist(), xs.tolist(), got.tolist(), want.tolist(), same.tolist()) if not s]}"


# ---- the gate --------------------------------------------------------------------------------


def _gate_case(case):
    """(metric, x, dL, lr, beta) of one gate case: float32 state, theta 0 where the case needs v = the
    mean itself (a rotation would mix the huge coordinates)."""
    m = make("rotor_diag", 4, pairs=[(0, 1), (2, 3), (1, 3)])
    x = torch.randn(5, 4, device=DEVICE) + 1.0
    dL, lr, beta = 0.5, 0.6, 0.5
    if case.startswith("x-"):
        x[2, 1] = {"x-nan": math.nan, "x-inf": math.inf, "x-neginf": -math.inf}[case]
    elif case.startswith("dL"):
        v = math.nan if "nan" in case else math.inf
        dL = torch.tensor(v, device=DEVICE) if "tensor" in case else v
    elif case.startswith("lam-") or case.startswith("theta-"):
        t = m.lam if case.startswith("lam") else m.theta
        t[1] = {"nan": math.nan, "inf": math.inf, "neginf": -math.inf}[case.split("-")[1]]
    elif case == "overflow-lam-only":  # c v^2 = 1e20 * 1e20 overflows; the angles' c r ~ 1e30 does not
        m.theta.zero_()
        x, dL, lr, beta = torch.full((1, 4), 1e10, device=DEVICE), 1e20, 1.0, 1.0
    elif case == "overflow-angles-only":  # sum v^2 and r^2 overflow: dlam = c v^2 / inf = 0, dtheta inf
        m.theta.zero_()
        x, dL, lr, beta = torch.full((1, 4), 1.5e19, device=DEVICE), 1e-30, 1.0, 1.0
    m.lam[0] = -0.0  # a rewrite (even of the same value) would turn -0.0 into +0.0
    return m, x, dL, lr, beta


GATE = ["x-nan", "x-inf", "x-neginf", "dL-nan", "dL-inf", "dL-tensor-nan", "dL-tensor-inf", "lam-nan", "lam-inf",
        "lam-neginf", "theta-nan", "theta-inf", "overflow-lam-only", "overflow-angles-only"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GATE)
def test_non_finite_skips_the_whole_update(case, backend):
    need(backend)
    m, x, dL, lr, beta = _gate_case(case)
    if case.startswith("overflow"):  # the case is what it says: one kind of increment non-finite
        dlam, dtheta, _ = ref.metric_delta(m, x, dL, lr, beta)
        lam_bad, th_bad = not torch.isfinite(dlam).all(), not torch.isfinite(dtheta).all()
        assert (lam_bad, th_bad) == ((True, False) if "lam" in case else (False, True)), (dlam, dtheta)
    before = [t.clone() for t in state(m)]
    geokern.contrastive_metric_update_(m, x, dL, lr, beta, backend=backend, rows_per_program=2)
    for name, t, t0 in zip(("lam", "theta"), state(m), before):
        assert torch.equal(bits(t), bits(t0)), f"{backend} {case}: {name} changed although the update is skipped"


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_update_runs_where_the_gate_cases_start(backend):
    """The gate cases' finite starting point does update (else the gate test proves nothing)."""
    need(backend)
    m, x, dL, lr, beta = _gate_case("none")
    before = [t.clone() for t in state(m)]
    geokern.contrastive_metric_update_(m, x, dL, lr, beta, backend=backend, rows_per_program=2)
    for name, t, t0 in zip(("lam", "theta"), state(m), before):
        assert not torch.equal(t, t0), f"{backend}: {name} not updated"


# ---- clamp, radius, wrap -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_and_wrap_apply_even_when_dL_is_zero(backend):
    need(backend)
    lam = torch.tensor([1e-5, -3.0, 0.5, 250.0, 100.5], device=DEVICE)
    theta = torch.tensor([4.0, -7.0, 0.25], device=DEVICE)
    m = gm.rotor_diag(lam, theta, [(0, 1), (2, 3), (4, 0)])
    geokern.contrastive_metric_update_(m, torch.randn(3, 5, device=DEVICE), 0.0, 0.5, 0.5, backend=backend)
    torch.testing.assert_close(m.lam, torch.tensor([0.01, 0.01, 0.5, 100.0, 100.0], device=DEVICE), rtol=0, atol=0)
    want = torch.tensor([4.0 - 2 * math.pi, -7.0 + 2 * math.pi, 0.25], device=DEVICE)
    torch.testing.assert_close(m.theta, want, rtol=0, atol=1e-6)
    big = gm.diag(torch.tensor([1.0, 2.0], device=DEVICE))  # a large increment: clamped at 100
    geokern.contrastive_metric_update_(big, torch.ones(2, 2, device=DEVICE), 1e6, 1.0, 1.0, backend=backend)
    assert big.lam.tolist() == [100.0, 100.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_radius_threshold(backend):
    """A plane whose radius is under 1e-6 keeps its angle exactly; one just over it moves."""
    need(backend)
    x = torch.tensor([[3e-7, 4e-7, 1.2e-6, 1.6e-6]], device=DEVICE)  # radii 5e-7 and 2e-6
    m = gm.rotor_diag(torch.ones(4, device=DEVICE), torch.zeros(2, device=DEVICE), [(0, 1), (2, 3)])
    geokern.contrastive_metric_update_(m, x, 1e6, 1.0, 1.0, backend=backend)
    assert bits(m.theta[0]) == 0, f"{backend}: the angle of a plane of radius 5e-7 moved"
    want = -0.01 * 1e6 * math.atan2(1.6e-6, 1.2e-6) * 2e-6
    assert m.theta[1].item() == pytest.approx(want, rel=1e-4), f"{backend}: the plane of radius 2e-6"


def _wrap_inputs():
    """Finite angles: float32 neighbours of multiples of pi and of the clamp's bounds, the band
    1e7 .. 1.2e8 (where the reduction misses the range by a few units), every magnitude."""
    g = torch.Generator().manual_seed(7)
    mags = 2.0 ** torch.randint(-20, 128, (2000,), generator=g).float() * (torch.rand(2000, generator=g) + 1) / 2
    base = torch.tensor([k * math.pi for k in range(-64, 65)] + [1e8, -1e8, 3.4e38, -3.4e38, 1e8 + 8, 3e7 * math.pi])
    near = torch.cat([base.float(), torch.nextafter(base.float(), torch.tensor(math.inf)),
                      torch.nextafter(base.float(), torch.tensor(-math.inf))])
    band = (torch.rand(1000, generator=g) * 1.1e8 + 1e7) * (torch.randint(0, 2, (1000,), generator=g) * 2 - 1)
    return torch.cat([near, band, mags, -mags]).to(DEVICE)  # the edges first: the kernel's test takes a prefix


@pytest.mark.parametrize("dt", [torch.float32, torch.float64], ids=dtype_id)
def test_wrap_angle_lands_in_range(dt):
    t = _wrap_inputs().to(dt)
    w = ref.wrap_angle(t)
    pi = PI32 if dt == torch.float32 else math.pi
    assert ((w >= -pi) & (w < pi)).all(), f"wrap_angle {dt}: {t[(w < -pi) | (w >= pi)].tolist()[:8]} leave [-pi, pi)"
    small = t.abs() < 1e4  # where the dtype still resolves the angle: the same angle modulo 2 pi
    assert (torch.remainder(w[small].double() - t[small].double() + math.pi, 2 * math.pi) - math.pi).abs().max() < 1e-3


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_triton_wrap_lands_in_range(dt):
    """dL = 0: theta_new = wrap(theta); every finite angle (huge ones too) lands in [-pi, pi)."""
    need("triton")
    t = _wrap_inputs()[:1800]  # one angle a plane: the rotation loop is slow under the interpreter
    t = t[t.abs() <= torch.finfo(dt).max].to(dt)
    m = gm.rotor_diag(torch.ones(2, device=DEVICE), t.clone(), [(0, 1)] * t.numel())
    geokern.contrastive_metric_update_(m, torch.zeros(1, 2, device=DEVICE), 0.0, 1.0, 1.0, backend="triton")
    w = m.theta.float()
    pi = PI32 if dt == torch.float32 else math.pi
    assert ((w >= -pi) & (w < pi)).all(), f"{dt}: {t[(w < -pi) | (w >= pi)].tolist()[:8]} leave [-pi, pi)"
    if dt == torch.float32:  # the reference's float32 wrap, up to the last bits of a rounded reduction
        assert (_angle_diff(w, ref.wrap_angle(t.float())).abs() <= 1e-5 * t.abs().clamp(1, 1e8)).all()


# ---- dL on the device, no host sync, graphs, version counters --------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dl_dt", [torch.float32, torch.float64], ids=dtype_id)
def test_dL_as_a_device_tensor(dl_dt, backend):
    need(backend)
    m, x = make("rotor_diag", 6), torch.randn(9, 6, device=DEVICE) + 1
    want = update(backend, m, x, 0.375)
    got = update(backend, m, x, torch.tensor(0.375, device=DEVICE, dtype=dl_dt))
    for t, w in zip(state(got), state(want)):
        assert torch.equal(t, w), f"{backend}: dL as a {dl_dt} tensor differs from the number"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend, monkeypatch):
    need(backend)
    m, x = make("rotor_diag", 5), torch.randn(40, 5, device=DEVICE)
    dL = torch.tensor(0.3, device=DEVICE)
    update(backend, m, x, dL)  # the plane table is cached by a first call (a copy, not a read)

    def refuse(*a, **k):
        raise AssertionError("a host read of a tensor value (host synchronisation) during the update")

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    geokern.contrastive_metric_update_(m, x, dL, 0.5, 1.0, backend=backend, rows_per_program=8)
    geokern.contrastive_metric_update_(m, x, 0.2, 0.5, 1.0, backend=backend)
    monkeypatch.undo()
    assert torch.isfinite(m.lam).all()


@gpu
@capturable
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture(backend):
    """The update captures into a CUDA graph; a replay with NaN in the captured dL skips it."""
    need(backend)
    m, x = make("rotor_diag", 8), torch.randn(64, 8, device=DEVICE) + 1
    dL = torch.tensor(0.4, device=DEVICE)
    geokern.contrastive_metric_update_(m, x, dL, 0.5, 1.0, backend=backend, rows_per_program=16)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        geokern.contrastive_metric_update_(m, x, dL, 0.5, 1.0, backend=backend, rows_per_program=16)
    before = clone(m)
    g.replay()
    want = update(backend, before, x, dL, 0.5, 1.0, rows_per_program=16)
    for t, w in zip(state(m), state(want)):
        torch.testing.assert_close(t, w, msg=f"{backend}: after a replay")
    dL.fill_(math.nan)
    kept = [t.clone() for t in state(m)]
    g.replay()
    assert all(torch.equal(bits(t), bits(k)) for t, k in zip(state(m), kept)), f"{backend}: a NaN replay wrote"


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_bumps_version_counters(backend):
    need(backend)
    m, x = make("rotor_diag", 4), torch.randn(3, 4, device=DEVICE)
    saved = [(torch.ones_like(t, requires_grad=True) * t).sum() for t in state(m)]
    geokern.contrastive_metric_update_(m, x, 0.3, 0.5, 1.0, backend=backend)
    for s in saved:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            s.backward()


# ---- bad input ----------------------------------------------------------------------------


def _bad(**change):
    args = dict(metric=make("rotor_diag", 4), x_free=torch.randn(3, 4, device=DEVICE), dL=0.2, lr=0.1, beta=1.0)
    args.update(change)
    return args


BAD = [
    ("lowrank", dict(metric=gm.lowrank(1.0, torch.eye(4), torch.ones(4), torch.zeros(4, 1), torch.ones(1))),
     ValueError, "lowrank has no rotor"),
    ("not-a-metric", dict(metric=torch.ones(4)), TypeError, "metric must be a geokern.metric"),
    ("x-width", dict(x_free=torch.randn(3, 5)), ValueError, "x_free must have last dim 4"),
    ("x-int", dict(x_free=torch.ones(3, 4, dtype=torch.int32)), TypeError, "x_free must have dtype"),
    ("x-empty", dict(x_free=torch.randn(0, 4)), ValueError, "has no rows"),
    ("x-device", dict(x_free=torch.randn(3, 4, device="meta")), ValueError, "x_free is on meta"),
    ("dL-1d", dict(dL=torch.ones(1)), ValueError, "dL must be a Python number or a 0-dim tensor"),
    ("dL-bool", dict(dL=True), TypeError, "dL must be a Python number"),
    ("dL-device", dict(dL=torch.tensor(1.0, device="meta")), ValueError, "dL is on meta"),
    ("lr-inf", dict(lr=math.inf), ValueError, "lr must be finite"),
    ("lr-tensor", dict(lr=torch.tensor(0.1)), TypeError, "lr must be a Python float"),
    ("beta-0", dict(beta=0.0), ValueError, "beta must be nonzero"),
    ("beta-nan", dict(beta=math.nan), ValueError, "beta must be finite"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument_and_writes_nothing(case):
    _, change, exc, msg = case
    args = _bad(**change)
    if DEVICE.type == "cuda":
        args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and not v.is_meta and k != "lr" else v)
                for k, v in args.items()}
    m = args["metric"]
    before = [t.clone() for t in state(m)] if isinstance(m, gm.RotorDiag) else []
    with pytest.raises(exc, match=msg):
        geokern.contrastive_metric_update_(**args)
    if before:
        assert all(torch.equal(bits(t), bits(b)) for t, b in zip(state(m), before)), "written before refusing"


@pytest.mark.parametrize("rpp", [-1, 1.5, True])
def test_bad_rows_per_program(rpp):
    with pytest.raises(ValueError, match="rows_per_program must be an int >= 0"):
        geokern.contrastive_metric_update_(**_bad(), rows_per_program=rpp)


def test_backends_refused_by_name():
    need("triton")
    with pytest.raises(RuntimeError, match="#22"):
        geokern.contrastive_metric_update_(**_bad(), backend="cuda")
    m64 = make("diag", 3, torch.float64)
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        geokern.contrastive_metric_update_(m64, torch.randn(2, 3, device=DEVICE), 0.1, 0.1, 1.0, backend="triton")
    geokern.contrastive_metric_update_(m64, torch.randn(2, 3, device=DEVICE), 0.1, 0.1, 1.0)  # auto: the reference


def test_strided_state_and_batched_rows():
    """lam and theta as strided views of one buffer, x_free [B, T, n] non-contiguous: as contiguous."""
    need("triton")
    buf = torch.rand(2, 9, device=DEVICE) + 0.5
    m = gm.rotor_diag(buf[0, ::2], buf[1, :3] - 1, [(0, 1), (3, 2), (4, 1)])
    x = torch.randn(3, 4, 5, device=DEVICE).transpose(0, 1) + 1
    want = update("torch", gm.rotor_diag(m.lam.clone(), m.theta.clone(), m.pairs), x, 0.5)
    geokern.contrastive_metric_update_(m, x, 0.5, 0.6, 0.5, backend="triton", rows_per_program=5)
    for t, w in zip(state(m), state(want)):
        torch.testing.assert_close(t, w, rtol=1e-5, atol=1e-6)


# ---- the custom op, the huge case --------------------------------------------------------------


def op_samples(qualname):
    m, x = make("rotor_diag", 5), torch.randn(13, 5, device=DEVICE)
    pairs = torch.tensor(m.pairs, dtype=torch.int32, device=DEVICE)
    return [(m.lam.clone(), m.theta.clone(), pairs, x, None, 0.3, 1.2, 0),
            (m.lam.clone(), m.theta.clone(), pairs, x, torch.tensor(0.3, device=DEVICE), 0.0, 1.2, 4),
            (m.lam.clone(), m.lam.new_empty(0), pairs[:0], x, None, -0.2, 0.5, 0)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("contrastive_metric_", op_samples)


@pytest.mark.huge
@pytest.mark.skipif(not HAS_CUDA, reason="tensors past 2**31 elements need a GPU")
@pytest.mark.parametrize("rpp", [2**25 + 7, 1 << 20], ids=["one-program", "row-sums"])
def test_rows_past_2_31_elements(rpp):
    """x_free [2**25 + 7, 64] bf16 (2**31 + 448 elements), zero but its first and last rows: a row
    offset that wraps at 2**31 reads another (zero) row in place of the last. rows_per_program = N:
    one program reads every row (0 would choose the row-sum stage at this N)."""
    run_isolated(f"""
import torch, geokern, geokern.metric as gm
from geokern.reference import contrastive as ref
N = 2**25 + 7
x = torch.zeros(N, 64, device="cuda", dtype=torch.bfloat16)
x[0] = 1
x[-1] = torch.arange(64, device="cuda") * 16.0
m = gm.diag(torch.ones(64, device="cuda"))
geokern.contrastive_metric_update_(m, x, 1.0, 1.0, 1.0, backend="triton", rows_per_program={rpp})
mean = (x[0].double() + x[-1].double()) / N
want = gm.diag(torch.ones(64, device="cuda", dtype=torch.float64))
ref.contrastive_metric_update_(want, mean[None], 1.0, 1.0, 1.0)
torch.testing.assert_close(m.lam.double(), want.lam, rtol=1e-4, atol=1e-6)
""")
