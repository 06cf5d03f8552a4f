"""Tropical attention at the edges (issue 14): double backward, the NaN rule, masked
garbage, empty dims, streams, CUDA graphs, dynamic shapes, autocast, determinism, and
sizes past 2**31 elements."""


import pytest
import torch
from _helpers import BACKENDS, capturable, gpu, run_isolated, WRITES_PRELUDE
from _tropical import need
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.reference import tropical as ref

INF, NAN = float("inf"), float("nan")
OPTIONS = [(True, True), (False, True), (False, False)]  # (gauge_fix, score_center)


def rand(*shape, dtype=torch.float32, grid=None):
    x = torch.randn(*shape, device=DEVICE, dtype=torch.float64)
    if grid:  # exact sums in float32: routes equal the float64 reference's
        x = torch.round(x * grid) / grid
    return x.to(dtype)


def run(backend, q, k, v, **kw):
    return geokern.tropical_attention(q, k, v, backend=backend, **kw)


# ---- double backward ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("center", [True, False], ids=["center", "nocenter"])
def test_gradgradcheck_float64(center, backend):
    """The kernels' backward is differentiable (it raised torch's 'no autograd formula was
    registered'): second derivatives against finite differences."""
    need(backend, torch.float64)
    q, k, v = rand(1, 2, 6, 4, dtype=torch.float64), rand(1, 1, 6, 4, dtype=torch.float64), \
        rand(1, 1, 6, 4, dtype=torch.float64)
    args = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: run(backend, a, b, c, gauge_fix=False, score_center=center), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gauge_fix, center", OPTIONS, ids=lambda x: str(x))
def test_double_backward_matches_reference(gauge_fix, center, backend):
    """A gradient penalty through the attention: its gradient (second derivatives) in
    float32 against the float64 reference's autograd (inputs on a grid: the same routes)."""
    need(backend)
    B, H, Hkv, T, D = 2, 4, 2, 13, 6
    q, k, v = rand(B, H, T, D, grid=64), rand(B, Hkv, T, D, grid=64), rand(B, Hkv, T, D, grid=64)
    w = rand(B, H, T, D, grid=64)

    def penalty(f, args):
        y = f(*args)
        dq, dk, dv = torch.autograd.grad((y * y * w).sum(), args, create_graph=True)
        return (dq * dq).sum() + (dk * w[:, :Hkv]).sum() + (dv * dv).sum()

    kw = dict(gauge_fix=gauge_fix, score_center=center)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(penalty(lambda *a: run(backend, *a, **kw), args), args)
    a64 = [t.double().requires_grad_() for t in (q, k, v)]
    w = w.double()
    want = torch.autograd.grad(penalty(lambda *a: ref.tropical_attention(*a, **kw)[0], a64), a64)
    for name, x, y in zip(("q", "k", "v"), got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-4 * (1 + y.abs().max().item()),
                                   msg=f"{backend} second derivative in {name} {kw}")


# ---- NaN and masking --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gauge_fix, center", OPTIONS, ids=lambda x: str(x))
def test_nan_reaches_exactly_what_reads_it(gauge_fix, center, backend):
    """The rule in the docstring, written out: q[i] NaN -> y[i, :]; k[j] NaN -> y[i, :] for
    every i that sees j; v[j, d] NaN -> y[i, d] (all of y[i, :] with gauge_fix) for every i
    that sees j; nothing else. Margins: NaN exactly where the reference's are."""
    need(backend)
    T, D = 24, 5
    q, k, v = rand(1, 1, T, D), rand(1, 1, T, D), rand(1, 1, T, D)
    q[0, 0, 3, 1] = NAN
    k[0, 0, 17, 4] = NAN
    v[0, 0, 9, 2] = NAN
    y, gamma = run(backend, q, k, v, gauge_fix=gauge_fix, score_center=center, return_margins=True)
    want = torch.zeros(T, D, dtype=torch.bool, device=DEVICE)
    i = torch.arange(T, device=DEVICE)
    want[3, :] = True
    want[i >= 17, :] = True
    if gauge_fix:
        want[i >= 9, :] = True
    else:
        want[i >= 9, 2] = True
    assert torch.equal(torch.isnan(y[0, 0]), want), f"{backend}: NaN positions differ from the rule"
    y64, g64 = ref.tropical_attention(q.double(), k.double(), v.double(), True, gauge_fix, center, True)
    assert torch.equal(torch.isnan(y64[0, 0]), want), "reference: NaN positions differ from the rule"
    assert torch.equal(torch.isnan(gamma), torch.isnan(g64)), f"{backend}: margin NaN positions differ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("Tq, Tk", [(40, 40), (21, 45)], ids=["prefill", "chunked"])
def test_masked_keys_change_nothing(Tq, Tk, garbage, backend):
    """NaN / +-inf in the keys and values that the causal mask hides from a query leave its
    output and margin bit for bit as they are with finite values there (on diagonal blocks
    and in the tails of tiles alike)."""
    need(backend)
    q, k, v = rand(1, 2, Tq, 8), rand(1, 1, Tk, 8), rand(1, 1, Tk, 8)
    first = Tk - Tq + 11  # keys from here on are hidden from queries 0..10
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, :, first:, ::3] = garbage
    dirty_v[:, :, first:, 1::2] = garbage
    for gauge_fix, center in OPTIONS:
        kw = dict(gauge_fix=gauge_fix, score_center=center, return_margins=True)
        y, g = run(backend, q, k, v, **kw)
        dy, dg = run(backend, q, dirty_k, dirty_v, **kw)
        assert torch.equal(dy[:, :, :11], y[:, :, :11]), f"{backend} {kw}: a hidden key changed an output"
        assert torch.equal(dg[:, :, :11], g[:, :, :11]), f"{backend} {kw}: a hidden key changed a margin"
        if garbage != garbage:  # the queries that see a NaN key are NaN
            assert torch.isnan(dy[:, :, 11:]).all(), f"{backend} {kw}: a visible NaN key was dropped"


# ---- empty ------------------------------------------------------------------------

EMPTY = {  # (q shape, k shape)
    "Tq0": ((2, 2, 0, 5), (2, 1, 3, 5)),
    "Tq0-Tk0": ((2, 2, 0, 5), (2, 2, 0, 5)),
    "B0": ((0, 2, 3, 5), (0, 2, 3, 5)),
    "H0": ((1, 0, 3, 5), (1, 1, 3, 5)),
    "D0": ((1, 2, 3, 0), (1, 2, 4, 0)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_gives_zero_gradients(case, backend):
    """Empty outputs stay on the autograd graph (the torch backend lost it): backward gives
    zeros of the inputs' shapes; margins are +inf where rows exist (D = 0)."""
    need(backend)
    qs, ks = EMPTY[case]
    q, k, v = rand(*qs).requires_grad_(), rand(*ks).requires_grad_(), rand(*ks).requires_grad_()
    y, gamma = run(backend, q, k, v, return_margins=True)
    assert y.shape == q.shape and gamma.shape == q.shape[:3], f"{backend}: shapes {y.shape}, {gamma.shape}"
    assert (gamma == INF).all()
    assert y.grad_fn is not None, f"{backend}: the empty output has no grad_fn"
    y.sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all(), f"{backend}: grad {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_without_keys_are_refused(backend):
    need(backend)
    with pytest.raises(ValueError, match="at least one key"):
        run(backend, rand(1, 1, 2, 3), rand(1, 1, 0, 3), rand(1, 1, 0, 3), causal=False)
    with pytest.raises(ValueError, match="at least one key"):
        ref.tropical_attention(rand(1, 1, 2, 3), rand(1, 1, 0, 3), rand(1, 1, 0, 3), causal=False)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_too_many_heads_is_refused_before_launch(backend):
    need(backend)
    q = rand(1, 1, 2, 3).expand(1, 65536, 2, 3)
    k = rand(1, 1, 2, 3)
    with pytest.raises(ValueError, match="65535"):
        run(backend, q, k, k)


# ---- autocast ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend):
    """Not on autocast's cast lists: float32 stays float32 (max-plus has no matmul to run in
    bf16); mixed dtypes are promoted to the widest inside an autocast region."""
    need(backend)
    q, k, v = rand(1, 2, 9, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    want = run(backend, q, k, v)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = run(backend, q, k, v)
        mixed = run(backend, q, k.bfloat16(), v)
    assert y.dtype == torch.float32 and mixed.dtype == torch.float32
    assert torch.equal(y, want)
    assert torch.equal(mixed, run(backend, q, k.bfloat16().float(), v))
    with pytest.raises(TypeError, match="dtype"):
        run(backend, q, k.bfloat16(), v)


# ---- GPU: streams, graphs, compile, determinism -----------------------------------


@gpu
@capturable
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_side_stream_and_cuda_graph(backend):
    need(backend)
    q, k, v = rand(2, 4, 130, 32), rand(2, 2, 130, 32), rand(2, 2, 130, 32)
    want = run(backend, q, k, v, return_margins=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up (Triton compiles and tunes) on the side stream
            got = run(backend, q, k, v, return_margins=True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{backend}: side stream"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, gamma = run(backend, q, k, v, return_margins=True)
    q.copy_(rand(2, 4, 130, 32))
    graph.replay()
    torch.cuda.synchronize()
    want = run(backend, q, k, v, return_margins=True)
    assert torch.equal(y, want[0]) and torch.equal(gamma, want[1]), f"{backend}: CUDA graph replay"


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_dynamic(backend):
    need(backend)
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: run(backend, a, b, c).square().sum(), dynamic=True, fullgraph=True)
    for T in (17, 40, 129):
        q, k, v = (rand(1, 2, T, 16, grid=4096).requires_grad_() for _ in range(3))
        got = torch.autograd.grad(f(q, k, v), (q, k, v))
        want = torch.autograd.grad(run(backend, q, k, v).square().sum(), (q, k, v))
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=f"T={T} {name}")


_WRITES = WRITES_PRELUDE + """
from geokern.kernels import tropical as tk
B, H, T, D = 1, 2, 40, 16
t = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt)  # noqa: E731
q, k, v = t(B, H, T, D), t(B, H, T, D), t(B, H, T, D)
st = dict(zip(("sqb", "sqh", "sqt", "sqd", "skb", "skh", "skt", "skd"), (*q.stride(), *k.stride())))
sizes = dict(H=H, G=1, Tq=T, Tk=T, D=D)
kernels = {
    "bwd": (tk.tropical_attention_bwd_kernel, dict(
        g_ptr=t(B, H, T, D), q_ptr=q, k_ptr=k, idx_ptr=t(B, H, T, D, dt=torch.int32), jm_ptr=t(B, H, T, dt=torch.int32),
        dq_ptr=t(B, H, T, D), dk_ptr=t(B, H, T, D), dv_ptr=t(B, H, T, D), **sizes, **st, CENTER=center, BQ=32, BD=D)),
    "fwd": (tk.tropical_attention_fwd_kernel, dict(
        qt_ptr=q, kt_ptr=k, v_ptr=v, y_ptr=t(B, H, T, D), idx_ptr=t(B, H, T, D, dt=torch.int32),
        jm_ptr=t(B, H, T, dt=torch.int32), mg_ptr=t(B, H, T), scr_ptr=t(4096), **sizes, **dict(zip(
        ("svb", "svh", "svt", "svd"), v.stride())), CAUSAL=True, CENTER=center, ARGMAX=True, MARGIN=True,
        BQ=64, BJ=64, BD=D)),
}
for name, (kernel, kw) in kernels.items():
    if hasattr(tkw, "identify_accessed_tensors"):  # newer torch
        written = [d.name for d in tkw.identify_accessed_tensors(kernel, kw, {}).read_writes.writes]
    else:
        written = tkw.identify_mutated_tensors(kernel, kw, {})
    print(name, sorted(written))
"""


@pytest.mark.parametrize("center", [True, False], ids=["center", "nocenter"])
def test_compile_sees_the_kernels_write_only_their_outputs(center):
    """torch.compile clones every tensor that its analysis of a user Triton kernel's TTIR says the
    kernel writes. The backward's route search, a helper taking the q and k pointers, made q and k
    look written (the analysis counts every argument of a call whose result reaches a stored-to
    address): two needless copies per compiled backward, and with dynamic shapes Inductor (torch
    2.11) failed decomposing them (test_compile_dynamic[triton]). The TTIR needs no GPU."""
    pytest.importorskip("triton")
    out = run_isolated(f"center = {center}\n" + _WRITES)
    assert "bwd ['dk_ptr', 'dq_ptr', 'dv_ptr']" in out, out
    assert "fwd ['idx_ptr', 'jm_ptr', 'mg_ptr', 'scr_ptr', 'y_ptr']" in out, out


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic_mode(backend):
    """The backward adds with atomics; under torch.use_deterministic_algorithms(True) it is
    bit-identical from run to run, and equals the atomic one to rounding."""
    need(backend)
    q, k, v = rand(2, 4, 300, 64), rand(2, 1, 300, 64), rand(2, 1, 300, 64)
    args = [t.requires_grad_() for t in (q, k, v)]
    gy = rand(2, 4, 300, 64)
    fast = torch.autograd.grad(run(backend, *args), args, gy)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(run(backend, *args), args, gy) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for name, a, b, c, f in zip(("dq", "dk", "dv"), *runs, fast):
        assert torch.equal(a, b) and torch.equal(a, c), f"{backend} {name}: deterministic runs differ"
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-5 * float(f.abs().max()), msg=f"{backend} {name}")


# ---- past 2**31 elements ----------------------------------------------------------

_HUGE_HEADS = """
import torch, geokern
from geokern.reference import tropical as ref
backend = {backend!r}
H, T, D = 32769, 512, 128  # y, q and the routes: H * T * D > 2**31 elements, one head below it
small = torch.randn(1, 1, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 1, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 1, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
q = small.expand(1, H, T, D)
y = geokern.tropical_attention(q, k, v, gauge_fix=False, backend=backend)
assert y.numel() > 2**31
want = geokern.tropical_attention(small, k, v, gauge_fix=False, backend=backend)
for h in (0, 1, 2**31 // (T * D) - 1, 2**31 // (T * D), H - 1):  # every head is the same
    assert torch.equal(y[0, h], want[0, 0]), ("output head", h)
# the gradient of the last head only (past 2**31 elements): dq of every other head is 0, and
# dk, dv (shared by all heads) are that head's; a sum over heads would cancel in float32
gh = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
g = torch.zeros_like(y)
g[0, -1] = gh
gq, gk, gv = torch.autograd.grad(y, (q, k, v), g)
del y, g
assert gq[0, :-1].abs().max().item() == 0, "dq of heads without a gradient"
wq, wk, wv = torch.autograd.grad(want, (small, k, v), gh[None, None])
for name, a, b in (("dq", gq[:, -1:], wq), ("dk", gk, wk), ("dv", gv, wv)):
    rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert rel < 1e-2, (name, rel)
print("ok")
"""

_HUGE_STRIDES = """
import torch, geokern
backend = {backend!r}
T, W, D = 4100, 2**19 + 3, 4  # strided views: (T - 1) * W > 2**31 within one head
base = torch.empty(T, W, device="cuda")
base[:, : 3 * D] = torch.randn(T, 3 * D, device="cuda")
q, k, v = (base[:, i * D : (i + 1) * D][None, None] for i in range(3))
assert q.stride(2) == W
args = [t.requires_grad_() for t in (q, k, v)]
y = geokern.tropical_attention(*args, gauge_fix=False, backend=backend)
dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
want = geokern.tropical_attention(*dense, gauge_fix=False, backend=backend)
assert torch.equal(y, want), "output"
gy = torch.randn_like(y)
got, exp = torch.autograd.grad(y, args, gy), torch.autograd.grad(want, dense, gy)
for name, a, b in zip(("dq", "dk", "dv"), got, exp):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=name)
print("ok")
"""


@pytest.mark.huge
@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_past_2_31_elements_across_heads(backend):
    """q (broadcast over heads: no memory), y, the routes and dq past 2**31 elements."""
    need(backend)
    assert "ok" in run_isolated(_HUGE_HEADS.format(backend=backend))


@pytest.mark.huge
@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_views_past_2_31_within_a_head(backend):
    """q, k, v as narrow column slices of a (T, 2**19 + 3) buffer: offsets past 2**31 in one
    head, forward and backward equal those of contiguous copies."""
    need(backend)
    assert "ok" in run_isolated(_HUGE_STRIDES.format(backend=backend))
