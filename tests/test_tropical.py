"""Fused tropical attention: every backend against the float64 reference, routes,
margins, gradients, non-finite inputs, ties, custom-op checks and bad input.

Kernels sum in float32 (float64 for float64 on Triton) and round once, so outputs are
judged against the float64 reference with the suite's tolerance table; routes (the
winning key per (query, channel) and the key of each row's score maximum) are checked
exactly where inputs are integers (exact sums, many ties: the smallest index must win)
and for consistency (the recorded key reproduces the output) elsewhere.
"""


import pytest
import torch
from _custom_ops import custom_op_tests, op as custom_op
from _helpers import BACKENDS, DTYPES, dtype_id
from _tolerance import assert_close
from _tropical import need
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.ops import tropical as ops
from geokern.reference import tropical as ref

INF, NAN = float("inf"), float("nan")

# (B, H, Hkv, Tq, Tk, D, causal): single element, odd sizes, decode (Tq = 1), chunked
# decode (Tk > Tq), grouped-query heads, non-causal with Tk < Tq
CPU_SHAPES = [
    (1, 1, 1, 1, 1, 1, True),
    (1, 2, 1, 7, 7, 5, True),
    (2, 2, 2, 19, 23, 17, True),
    (1, 1, 1, 1, 9, 3, True),
    (1, 3, 3, 9, 4, 8, False),
    (1, 2, 2, 33, 33, 64, True),
]
GPU_SHAPES = [(2, 4, 2, 257, 257, 64, True), (1, 2, 2, 300, 431, 100, True), (1, 1, 1, 129, 400, 128, False),
              (1, 2, 1, 700, 700, 33, True)] if HAS_CUDA else []
SHAPES = CPU_SHAPES + GPU_SHAPES
# every dtype on the small shapes; float32 and bfloat16 on the large ones (each new
# shape and dtype compiles Triton variants: this keeps the GPU run short)
SHAPE_DTYPES = [(s, d) for s in CPU_SHAPES for d in DTYPES] + [
    (s, d) for s in GPU_SHAPES for d in (torch.float32, torch.bfloat16)]


def _id(x):
    if isinstance(x, tuple) and len(x) == 7:
        B, H, Hkv, Tq, Tk, D, causal = x
        return f"B{B}-H{H}-KV{Hkv}-Tq{Tq}-Tk{Tk}-D{D}-{'causal' if causal else 'full'}"
    return dtype_id(x)


def _fwd_cuda(*args):
    """The custom op geokern::tropical_attention_cuda (the raw forward, no autograd)."""
    return ops._KERNELS["cuda"][0](*args)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


def qkv(shape, dtype=torch.float32):
    B, H, Hkv, Tq, Tk, D, _ = shape
    return rand(B, H, Tq, D, dtype=dtype), rand(B, Hkv, Tk, D, dtype=dtype), rand(B, Hkv, Tk, D, dtype=dtype)


def run(backend, q, k, v, **kw):
    return geokern.tropical_attention(q, k, v, backend=backend, **kw)


def ref64(q, k, v, **kw):
    return ref.tropical_attention(q.double(), k.double(), v.double(), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype", SHAPE_DTYPES, ids=_id)
def test_matches_reference(shape, dtype, backend):
    need(backend, dtype, shape[5])
    q, k, v = qkv(shape, dtype)
    causal = shape[6]
    for gauge_fix, center in ((True, True), (False, True), (False, False)):
        kw = dict(causal=causal, gauge_fix=gauge_fix, score_center=center, return_margins=True)
        y, gamma = run(backend, q, k, v, **kw)
        y64, g64 = ref64(q, k, v, **kw)
        ysame, gsame = ref.tropical_attention(q, k, v, **kw)
        what = f"{backend} gauge_fix={gauge_fix} center={center}"
        assert y.dtype == dtype and gamma.dtype == dtype
        # outputs and margins are differences of maxima of q + k + v: their rounding error scales
        # with |q| + |k| + |v|, not with the (possibly small) difference, and depends on the
        # order of the subtractions
        scale = (q.abs().max() + k.abs().max() + v.abs().max()).item()
        _close_at_scale(f"{what} output", y, y64, ysame, scale)
        # margins: +inf where a query has one key; the finite ones against the reference
        fin = torch.isfinite(g64)
        assert torch.equal(torch.isfinite(gamma), fin), f"{what} margin: +inf positions differ"
        if fin.any():
            _close_at_scale(f"{what} margin", gamma[fin], g64[fin], gsame[fin], scale)


def _close_at_scale(name, got, want64, same, scale):
    """assert_close's relative judgement, or, failing it, an absolute error within a few
    roundings at `scale` (the size of the terms summed) beyond the same-dtype torch error."""
    try:
        assert_close(name, got, want64, same)
    except AssertionError:
        err = (got.double() - want64).abs().max().item()
        base = (same.double() - want64).abs().max().item()
        bound = 2 * base + 8 * torch.finfo(got.dtype).eps * scale
        assert err <= bound, f"{name}: largest error {err:.3e} > bound {bound:.3e} (same-dtype torch {base:.3e})"


def _core(backend, q, k, v, causal, center):
    if backend == "torch":
        return ops._tropical_attention_cpu(q, k, v, causal, center, True, True)
    return ops._KERNELS[backend][0](q, k, v, causal, center, True, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", CPU_SHAPES + GPU_SHAPES[1:2], ids=_id)
def test_routes_reproduce_the_output(shape, backend):
    """The recorded key of every (i, d) is visible to query i and gives y exactly."""
    need(backend, D=shape[5])
    q, k, v = qkv(shape)
    causal, H, Hkv = shape[6], shape[1], shape[2]
    for center in (True, False):
        y, idx, jm, _ = _core(backend, q, k, v, causal, center)
        assert idx.dtype == torch.int32 and jm.dtype == torch.int32
        kr, vr = ref.repeat_kv(k, H).double(), ref.repeat_kv(v, H).double()
        s, vis = ref.scores(q.double(), kr, causal)
        j = idx.long()
        if vis is not None:
            Tq = q.shape[2]
            rows = torch.arange(Tq, device=DEVICE).view(1, 1, Tq, 1).expand_as(j)
            assert vis[rows, j].all(), f"{backend}: a recorded key is hidden from its query"
        m = s.gather(-1, jm.long().unsqueeze(-1)) if center else torch.zeros_like(s[..., :1])
        if center:
            # float32 scores are the exact ones rounded once: their maximum may sit one ulp off
            torch.testing.assert_close(m.squeeze(-1), s.amax(-1), rtol=1e-6, atol=1e-6,
                                       msg=f"{backend}: rowarg is not a score maximum")
        sj, vj = s.gather(-1, j), vr.gather(2, j)
        want = sj + vj - m
        # y is s + v - m in float32: a few roundings of each term's size (a wrong route is off by O(1))
        err = (y.double() - want).abs()
        bound = 4 * torch.finfo(torch.float32).eps * (sj.abs() + vj.abs() + m.abs()) + 1e-7
        assert (err <= bound).all(), (f"{backend}: route vs output, largest error {err.max().item():.3e} "
                                      f"(bound there {bound.flatten()[err.argmax()].item():.3e})")


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA kernel runs on CUDA tensors")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_id)
def test_cuda_forward_is_the_float32_computation(shape):
    """The CUDA forward rounds each q + k and each s + v once in float32 (and y - m once)
    and takes maxima exactly: its output, routes and score-maximum keys are those of
    that computation done by brute force (first index among ties), bit for bit, with and
    without the routes recorded. (Against float64, routes may flip where two sums round
    to one float32; this pins the kernel's own arithmetic.)"""
    need("cuda", D=shape[5])
    q, k, v = qkv(shape)
    causal, H, Tq, Tk = shape[6], shape[1], shape[3], shape[4]
    kr, vr = ref.repeat_kv(k, H), ref.repeat_kv(v, H)
    vis = ref.causal_visible(Tq, Tk, DEVICE) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=DEVICE)
    s = (q.unsqueeze(3) + kr.unsqueeze(2)).amax(-1).masked_fill(~vis, -INF)  # float32 scores
    z = (s.unsqueeze(-1) + vr.unsqueeze(2)).masked_fill(~vis[..., None], -INF)  # (B, H, Tq, Tk, D)
    top, want_idx = z.amax(3), z.argmax(3)
    for center in (True, False):
        m = s.amax(-1, keepdim=True) if center else torch.zeros_like(s[..., :1])
        want_y = top - m
        y, idx, jm, _ = _fwd_cuda(q, k, v, causal, center, True, False)
        assert torch.equal(y, want_y), f"center={center}: output with routes, {(y != want_y).sum().item()} differ"
        assert torch.equal(idx.long(), want_idx), f"center={center}: {(idx.long() != want_idx).sum().item()} routes differ"
        if center:
            bad = jm.long() != s.argmax(-1)
            assert not bad.any(), f"{bad.sum().item()} score-maximum keys differ"
        y0 = _fwd_cuda(q, k, v, causal, center, False, False)[0]
        assert torch.equal(y0, want_y), f"center={center}: output, {(y0 != want_y).sum().item()} differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_smallest_index(backend):
    """Integer inputs: sums are exact and tie everywhere; every backend's routes and
    outputs equal the reference's exactly (smallest d, smallest key)."""
    need(backend)
    for causal in (True, False):
        shape = (2, 2, 1, 21, 21, 6)
        q = torch.randint(-2, 3, shape[:2] + shape[3:4] + shape[5:]).float().to(DEVICE)
        k = torch.randint(-2, 3, (2, 1, 21, 6)).float().to(DEVICE)
        v = torch.randint(-2, 3, (2, 1, 21, 6)).float().to(DEVICE)
        y, idx, jm, mg = _core(backend, q, k, v, causal, True)
        ry, ridx, rjm, rmg = ref.core(q.double(), k.double(), v.double(), causal, True, True)
        assert torch.equal(y.double(), ry), f"{backend}: output with ties"
        assert torch.equal(idx, ridx), f"{backend}: value-stage route with ties (smallest key must win)"
        assert torch.equal(jm, rjm), f"{backend}: score-maximum key with ties (smallest key must win)"
        assert torch.equal(mg.double(), rmg), f"{backend}: margins with ties (0 where the top two tie)"
        for center in (True, False):
            qg, kg, vg = (t.double().requires_grad_() for t in (q, k, v))
            gy = rand(*y.shape, dtype=torch.float64)
            want = torch.autograd.grad(ref.tropical_attention(qg, kg, vg, causal, False, center)[0], (qg, kg, vg), gy)
            if backend == "cuda":
                qg, kg, vg = (t.float().detach().requires_grad_() for t in (q, k, v))
            got = torch.autograd.grad(run(backend, qg, kg, vg, causal=causal, gauge_fix=False, score_center=center),
                                      (qg, kg, vg), gy.to(qg.dtype))
            for name, a, b in zip(("dq", "dk", "dv"), got, want):
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=f"{backend} {name} with ties")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """q, k, v as the module makes them: (B, T, H, D) views transposed to (B, H, T, D)."""
    need(backend)
    B, T, H, D = 2, 37, 3, 16
    x = rand(B, T, 3 * H, D)
    q, k, v = (x[:, :, i * H : (i + 1) * H].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    for gauge_fix in (True, False):
        y = run(backend, q, k, v, gauge_fix=gauge_fix)
        want = ref64(q, k, v, gauge_fix=gauge_fix)[0]
        assert_close(f"{backend} strided output", y, want, ref.tropical_attention(q, k, v, gauge_fix=gauge_fix)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs(backend):
    """NaN reaches exactly the queries that see it; -inf is the semiring zero; a key the
    mask hides never enters, even with a NaN or +inf value."""
    need(backend)
    B, H, T, D = 1, 2, 40, 8
    q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
    q[0, 0, 5, 2] = NAN       # one query's scores
    k[0, 1, 30, 1] = NAN      # the queries that see key 30
    v[0, 0, 33, 4] = NAN      # channel 4 (and, through the gauge fix, all) of queries seeing key 33
    v[0, 1, 20, 3] = INF
    v[0, 0, 10, :] = -INF     # a value row of semiring zeros
    q[0, 1, 12, :] = -INF     # a query whose scores are all -inf: y = -inf - (-inf) = NaN
    k[0, 0, 3, 6] = -INF
    for gauge_fix, center in ((True, True), (False, True), (False, False)):
        kw = dict(gauge_fix=gauge_fix, score_center=center)
        y = run(backend, q, k, v, **kw)
        want = ref64(q, k, v, **kw)[0]
        what = f"{backend} gauge_fix={gauge_fix} center={center}"
        assert torch.equal(torch.isnan(y), torch.isnan(want)), f"{what}: NaN positions differ"
        for sign in (1, -1):
            assert torch.equal(y == sign * INF, want == sign * INF), f"{what}: {sign:+d}inf positions differ"
        fin = torch.isfinite(want)
        torch.testing.assert_close(y[fin].double(), want[fin], rtol=1e-6, atol=1e-6, msg=f"{what} finite part")


@pytest.mark.parametrize("backend", BACKENDS)
def test_evt_shift(backend):
    """evt_shift cancels under score centring and shifts y without it."""
    need(backend)
    q, k, v = qkv((1, 2, 2, 11, 11, 7, True))
    for center in (True, False):
        y = run(backend, q, k, v, gauge_fix=False, score_center=center, evt_shift=1.25)
        want = ref64(q, k, v, gauge_fix=False, score_center=center, evt_shift=1.25)[0]
        torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6, msg=f"{backend} center={center}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    need(backend)
    q, k, v = rand(2, 2, 0, 5), rand(2, 2, 0, 5), rand(2, 2, 0, 5)
    y, g = run(backend, q, k, v, return_margins=True)
    assert y.shape == (2, 2, 0, 5) and g.shape == (2, 2, 0)
    y = run(backend, rand(0, 2, 3, 5), rand(0, 2, 3, 5), rand(0, 2, 3, 5))
    assert y.shape == (0, 2, 3, 5)


GRAD_SHAPES = [(1, 2, 1, 9, 9, 5, True), (2, 2, 2, 13, 17, 6, True), (1, 1, 1, 8, 5, 4, False)]
if HAS_CUDA:
    GRAD_SHAPES += [(2, 4, 2, 200, 200, 64, True), (1, 2, 2, 150, 150, 100, True)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=_id)
def test_backward_matches_reference(shape, backend):
    """dq, dk, dv against autograd of the float64 reference (random inputs: no ties but
    the exact zeros of the gauge fix, whose gradient the gauge fix cancels)."""
    need(backend, D=shape[5])
    dtype = torch.float64 if backend == "triton" else torch.float32
    q, k, v = qkv(shape, dtype)
    if dtype == torch.float32:
        # on a grid of 2**-12 every sum the forward and backward form is exact in float32, so the
        # routes are those of the float64 reference (ties, now and then, go to the smallest index
        # on both sides); with arbitrary float32 inputs two sums 1 ulp apart round to one float32
        # and a route may flip (about 1 test in 60 at 200 queries, seen on an H100)
        q, k, v = (torch.round(t * 4096) / 4096 for t in (q, k, v))
    for gauge_fix, center in ((True, True), (False, True), (False, False)):
        kw = dict(causal=shape[6], gauge_fix=gauge_fix, score_center=center)
        gy = rand(*q.shape, dtype=dtype)
        if dtype == torch.float32:
            # the CUDA backward sums gradients with float32 atomics in no fixed order, and a
            # key that wins the centring for many queries sums terms of about 8 that cancel:
            # off the grid the rounding (order dependent) exceeded 1e-5 about once in 10 runs;
            # on a 2**-6 grid every partial sum below 2**17 is exact, in any order
            gy = torch.round(gy * 64) / 64
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        got = torch.autograd.grad(run(backend, *args, **kw), args, gy)
        a64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(ref.tropical_attention(*a64, **kw)[0], a64, gy.double())
        # absolute and relative: a gradient can cancel to (almost) zero, e.g. dq of a query
        # whose every channel is won by its score-maximum key (the centring takes it back)
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol,
                                       msg=f"{backend} {name} gauge_fix={gauge_fix} center={center}")


@pytest.mark.parametrize("backend", ["torch"] + (["cuda"] if HAS_CUDA else []))
def test_backward_formula_matches_autograd(backend):
    """The explicit backward (the CUDA op's CPU implementation, and the kernels' formula)
    equals autograd of the reference core."""
    if backend == "cuda":
        need("cuda")
    q, k, v = (t.requires_grad_() for t in qkv((2, 4, 2, 15, 19, 6, True), torch.float64))
    gy = rand(*q.shape, dtype=torch.float64)
    for center in (True, False):
        y, idx, jm, _ = ref.core(q, k, v, True, center, False)
        want = torch.autograd.grad(y, (q, k, v), gy)
        got = ref.core_backward(gy, q.detach(), k.detach(), idx, jm, center)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, msg=f"core_backward {name} center={center}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck_float64(backend):
    need(backend, torch.float64)
    q, k, v = (t.requires_grad_() for t in qkv((1, 2, 1, 6, 6, 4, True), torch.float64))
    for center in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b, c: run(backend, a, b, c, gauge_fix=False, score_center=center), (q, k, v)
        ), f"{backend} gradcheck center={center}"


def test_reference_is_memory_bounded(monkeypatch):
    """The reference chunks queries: with a tiny chunk budget it gives the same result."""
    q, k, v = qkv((1, 2, 2, 23, 23, 5, True), torch.float64)
    want = ref.tropical_attention(q, k, v, return_margins=True)
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 40)
    got = ref.tropical_attention(q, k, v, return_margins=True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def _op_samples(qualname):
    q, k, v = qkv((1, 2, 1, 9, 9, 5, True))
    if "backward" not in qualname:
        return [(q, k, v, True, True, True, True), (q, k, v, False, False, False, False)]
    _, idx, jm, _ = custom_op(qualname.replace("_backward", ""))(q, k, v, True, True, True, False)
    return [(rand(*q.shape), q, k, idx, jm, True), (rand(*q.shape), q, k, idx, jm, False)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("tropical_attention_", _op_samples)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public op with its kernels needs CUDA tensors")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_public_op_compiles_with_backward(backend):
    need(backend)
    q, k, v = (t.requires_grad_() for t in qkv((1, 2, 1, 65, 65, 16, True)))
    f = torch.compile(lambda a, b, c: run(backend, a, b, c).square().sum(), fullgraph=True)
    got = torch.autograd.grad(f(q, k, v), (q, k, v))
    want = torch.autograd.grad(run(backend, q, k, v).square().sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        # the backward adds into dq / dk / dv with float32 atomics: compiled and eager runs sum in
        # different orders, so they agree to rounding, not bit for bit (a wrong route is O(1) off)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=f"compiled {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    need(backend)
    q, k, v = qkv((1, 2, 2, 5, 5, 4, True))
    f = geokern.tropical_attention
    cases = [
        (lambda: f(q[0], k, v, backend=backend), ValueError, "q must"),
        (lambda: f(q, k.int(), v, backend=backend), TypeError, "k must have dtype"),
        (lambda: f(q, k, v[:, :, :4], backend=backend), ValueError, "k and v must have the same shape"),
        (lambda: f(q, k[..., :3], v[..., :3], backend=backend), ValueError, "must match q"),
        (lambda: f(rand(1, 3, 5, 4), k, v, backend=backend), ValueError, "must divide"),
        (lambda: f(q, k[:, :, :3], v[:, :, :3], backend=backend), ValueError, "Tk >= Tq"),
        (lambda: f(q, k[:, :, :0], v[:, :, :0], causal=False, backend=backend), ValueError, "at least one key"),
        (lambda: f(q, k, v, causal=1, backend=backend), TypeError, "causal must be a bool"),
        (lambda: f(q, k, v, evt_shift="x", backend=backend), TypeError, "evt_shift"),
        (lambda: f(q, k, v, evt_shift=float("nan"), backend=backend), TypeError, "evt_shift"),
        (lambda: f(q, k.double(), v, backend=backend), TypeError, "dtype"),
        (lambda: f(q, k, v, backend="nope"), ValueError, "backend must be one of"),
    ]
    if backend == "cuda":
        cases.append((lambda: f(q.double(), k.double(), v.double(), backend="cuda"), ValueError, "float32"))
        cases.append((lambda: f(rand(1, 1, 3, 129), rand(1, 1, 3, 129), rand(1, 1, 3, 129), backend="cuda"),
                      ValueError, "head dims up to 128"))
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_unavailable_backend_is_an_error_not_a_fallback():
    if HAS_CUDA:
        pytest.skip("every backend may be available here")
    q, k, v = qkv((1, 1, 1, 3, 3, 2, True))
    with pytest.raises(RuntimeError, match="unavailable"):
        geokern.tropical_attention(q, k, v, backend="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA op's own checks run on CUDA tensors")
def test_cuda_op_checks_its_inputs():
    need("cuda")
    q, k, v = qkv((1, 2, 2, 5, 5, 4, True))
    with pytest.raises(RuntimeError, match="Tk >= Tq"):
        _fwd_cuda(q, k[:, :, :3], v[:, :, :3], True, True, False, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        _fwd_cuda(q.double(), k.double(), v.double(), True, True, False, False)
    with pytest.raises(RuntimeError, match="must divide"):
        _fwd_cuda(rand(1, 3, 5, 4), k, v, True, True, False, False)
