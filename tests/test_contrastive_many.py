"""The many-layer contrastive update (contrastive_update_many_, ContrastiveGroup): every layer of a
list against the float64 reference loop, for mixed shapes and every supported dtype pair; each
layer gated and clipped on its own; the grouped kernel's counters reset between calls; the tables
cached; no host synchronisation and CUDA-graph capture; empty lists; bad input refused with
nothing written."""

import pytest
import torch
from _helpers import capturable, dtype_id, gpu, need
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.ops import _contrastive_many as cm
from geokern.reference import contrastive as ref

BACKENDS = ["torch", "triton"]
# (out, in, Nn, Nf) per layer: one element, odd sizes past a 16-tile, unequal phases, wide and tall
LAYERS = [(7, 5, 3, 4), (1, 1, 1, 1), (33, 17, 8, 8), (20, 65, 2, 3), (40, 3, 5, 2)]
if HAS_CUDA:
    LAYERS += [(257, 129, 64, 63), (1024, 768, 32, 32)]
# (activity dtype, W / b dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
          (torch.bfloat16, torch.bfloat16)]


def dtypes_id(d):
    return f"act{dtype_id(d[0])}-W{dtype_id(d[1])}"


def make(layers=LAYERS, act=torch.float32, wdt=torch.float32, bias=True):
    """Ws, bs, and the four activity lists; the nudged phase near the free one."""
    def r(*s, dt):
        return torch.randn(*s, device=DEVICE, dtype=torch.float64).to(dt)

    Ws = [r(o, i, dt=wdt) for o, i, _, _ in layers]
    bs = [r(o, dt=wdt) if bias else None for o, _, _, _ in layers]
    Xf = [r(nf, i, dt=torch.float64) for _, i, _, nf in layers]
    Yf = [r(nf, o, dt=torch.float64) for o, _, _, nf in layers]
    Xn = [(x[:1].expand(n, -1) + 0.3 * r(n, x.shape[1], dt=torch.float64)) for x, (_, _, n, _) in zip(Xf, layers)]
    Yn = [(y[:1].expand(n, -1) + 0.3 * r(n, y.shape[1], dt=torch.float64)) for y, (_, _, n, _) in zip(Yf, layers)]
    acts = [[t.to(act).contiguous() for t in a] for a in (Xn, Yn, Xf, Yf)]
    return Ws, bs, acts


def updated(backend, Ws, bs, acts, **kw):
    Ws = [W.clone() for W in Ws]
    bs = [None if b is None else b.clone() for b in bs]
    geokern.contrastive_update_many_(Ws, bs, *acts, backend=backend, **kw)
    return Ws, bs


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def reference(Ws, bs, acts, lr, beta, dtype=torch.float64, **kw):
    """The loop of the one-layer reference, in `dtype` (float64: the truth; the activities'
    own dtype: what plain PyTorch makes of them)."""
    out_w, out_b = [], []
    for i, (W, b) in enumerate(zip(Ws, bs)):
        w = W.to(dtype) if dtype == torch.float64 else W.clone()
        bb = None if b is None else (b.to(dtype) if dtype == torch.float64 else b.clone())
        a = [x[i].to(dtype) if dtype == torch.float64 else x[i] for x in acts]
        ref.contrastive_update_(w, bb, *a, lr, beta, **kw)
        out_w.append(w)
        out_b.append(bb)
    return out_w, out_b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(max_norm=0.05), dict(centred=True, max_norm=1e6)],
                         ids=["plain", "clip", "centred-noclip"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtypes_id)
def test_matches_the_reference_loop(dtypes, opts, backend):
    need(backend)
    act, wdt = dtypes
    Ws, bs, acts = make(act=act, wdt=wdt)
    bs[1] = None  # a layer without bias among layers with one
    lr, beta = 0.7, 0.5
    got_w, got_b = updated(backend, Ws, bs, acts, lr=lr, beta=beta, **opts)
    kw = dict(max_norm=opts.get("max_norm"), centred=opts.get("centred", False))
    w64, b64 = reference(Ws, bs, acts, lr, beta, **kw)
    ws, bsame = reference(Ws, bs, acts, lr, beta, dtype=None, **kw)
    for i, (W, b) in enumerate(zip(Ws, bs)):
        name = f"{backend} layer {i} {tuple(W.shape)} {dtypes_id(dtypes)} {opts}"
        assert got_w[i].dtype == wdt
        assert_close(f"{name} dW", got_w[i].double() - W.double(), w64[i] - W.double(), ws[i].double() - W.double())
        if b is None:
            assert got_b[i] is None
        else:
            assert_close(f"{name} db", got_b[i].double() - b.double(), b64[i] - b.double(),
                         bsame[i].double() - b.double())


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_many_equals_one_layer_calls(tf32):
    """The grouped launch against contrastive_update_ per layer (triton, cuBLAS GEMMs), float32."""
    need("triton")
    Ws, bs, acts = make(LAYERS[:4])
    got_w, got_b = updated("triton", Ws, bs, acts, lr=0.3, beta=0.5, max_norm=0.5, tf32=tf32)
    tol = dict(rtol=2e-3, atol=2e-4) if tf32 and HAS_CUDA else dict(rtol=1e-5, atol=1e-6)
    for i, (W, b) in enumerate(zip(Ws, bs)):
        w, bb = W.clone(), b.clone()
        geokern.contrastive_update_(w, bb, *(a[i] for a in acts), 0.3, 0.5, 0.5, backend="triton")
        torch.testing.assert_close(got_w[i], w, **tol, msg=f"layer {i} W, tf32={tf32}")
        torch.testing.assert_close(got_b[i], bb, **tol, msg=f"layer {i} b, tf32={tf32}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_layer_skips_only_itself(value, backend):
    need(backend)
    Ws, bs, acts = make(LAYERS[:4])
    Ws[2][0, 0], bs[2][1] = -0.0, -0.0  # a rewrite would turn -0.0 into +0.0
    acts[3][2].view(-1)[5] = value  # Yf of layer 2
    want_w, want_b = reference(Ws, bs, acts, 0.5, 1.0, dtype=None, max_norm=1.0)
    got_w, got_b = updated(backend, Ws, bs, acts, lr=0.5, beta=1.0, max_norm=1.0)
    assert torch.equal(bits(got_w[2]), bits(Ws[2])), f"{backend}: W[2] changed although its dW is non-finite"
    assert torch.equal(bits(got_b[2]), bits(bs[2])), f"{backend}: b[2] changed although its dW is non-finite"
    for i in (0, 1, 3):
        assert not torch.equal(got_w[i], Ws[i]), f"{backend}: W[{i}] was skipped with a finite dW"
        torch.testing.assert_close(got_w[i], want_w[i], rtol=1e-5, atol=1e-6, msg=f"{backend} W[{i}]")
        torch.testing.assert_close(got_b[i], want_b[i], rtol=1e-5, atol=1e-6, msg=f"{backend} b[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_db_skips_that_b_only(backend):
    need(backend)
    Ws, bs, acts = make(LAYERS[:3])
    acts[1][0][:, 1] = 3e38  # Yn of layer 0: the column sum overflows, db[0] non-finite
    acts[0][0].zero_()  # while Yn^T Xn = 0: dW[0] stays finite
    got_w, got_b = updated(backend, Ws, bs, acts, lr=0.5, beta=1.0)
    want_w, want_b = reference(Ws, bs, acts, 0.5, 1.0, dtype=None)
    assert torch.equal(bits(got_b[0]), bits(bs[0])), f"{backend}: b[0] changed although db[0] is non-finite"
    assert not torch.equal(got_w[0], Ws[0]), f"{backend}: W[0] was skipped although dW[0] is finite"
    for i in range(3):
        torch.testing.assert_close(got_w[i], want_w[i], rtol=1e-5, atol=1e-6, msg=f"{backend} W[{i}]")
    torch.testing.assert_close(got_b[1], want_b[1], rtol=1e-5, atol=1e-6, msg=f"{backend} b[1]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_is_exact_per_layer(backend):
    need(backend)
    Ws, bs, acts = make(LAYERS[:4])
    zeros = [torch.zeros_like(W) for W in Ws]
    full, _ = updated(backend, zeros, bs, acts, lr=1.0, beta=0.5)
    norms = [w.double().norm().item() for w in full]
    max_norm = sorted(norms)[1] * 1.0001  # some layers above it, some below
    clipped, _ = updated(backend, zeros, bs, acts, lr=1.0, beta=0.5, max_norm=max_norm)
    for i, (n, w, c) in enumerate(zip(norms, full, clipped)):
        if n > max_norm:
            got = c.double().norm().item()
            assert abs(got - max_norm) <= 1e-6 * max_norm, f"{backend} layer {i}: clipped norm {got} != {max_norm}"
            torch.testing.assert_close(c, w * (max_norm / n), rtol=1e-5, atol=1e-7, msg=f"{backend} layer {i}")
        else:
            assert torch.equal(c, w), f"{backend} layer {i}: clipped although ||dW|| {n} <= max_norm"


def test_counters_reset_and_tables_cached():
    """After a launch the grouped kernel's norms and counters are zero again (the last program
    resets them: a replay needs no memset); a second call with the same tensors reuses the
    tables, new activity tensors add one, and the result of two calls is two updates."""
    need("triton")
    Ws, bs, acts = make(LAYERS[:3])
    group = geokern.ContrastiveGroup(Ws, bs)
    w0 = [W.clone() for W in Ws]
    group.update_(*acts, 0.2, 0.5)
    for name, t in (("norm", group._norm), ("badb", group._badb), ("cnt", group._cnt)):
        assert not t.any(), f"{name} not reset after the launch: {t.tolist()}"
    group.update_(*acts, 0.2, 0.5)
    assert len(group._acts) == 1, "the same activity tensors built a second table"
    want, _ = reference(w0, [b.clone() for b in bs], acts, 0.2, 0.5, dtype=None)
    want, _ = reference(want, [b.clone() for b in bs], acts, 0.2, 0.5, dtype=None)
    for i in range(3):
        torch.testing.assert_close(Ws[i], want[i], rtol=1e-5, atol=1e-6, msg=f"W[{i}] after two calls")
    group.update_(*[[t.clone() for t in a] for a in acts], 0.2, 0.5)
    assert len(group._acts) == 2
    assert all(t._version == 3 for t in (*Ws, *bs)), "the version counters do not count the in-place writes"


def test_strided_rows():
    """Activities that are column slices of wider buffers (rows strided) and layers with no rows
    of W or no columns (b alone updated)."""
    need("triton")
    layers = [(6, 5, 3, 4), (0, 4, 2, 2), (5, 0, 2, 3)]
    Ws, bs, acts = make(layers)
    wide = [[torch.cat([t, torch.randn_like(t)], 1)[:, :t.shape[1]] for t in a] for a in acts]
    assert wide[0][0].stride(0) == 10
    got_w, got_b = updated("triton", Ws, bs, wide, lr=0.3, beta=1.0, max_norm=1.0)
    want_w, want_b = reference(Ws, bs, acts, 0.3, 1.0, dtype=None, max_norm=1.0)
    for i in range(3):
        torch.testing.assert_close(got_w[i], want_w[i], rtol=1e-5, atol=1e-6, msg=f"W[{i}]")
        torch.testing.assert_close(got_b[i], want_b[i], rtol=1e-5, atol=1e-6, msg=f"b[{i}]")
    assert not torch.equal(got_b[2], bs[2]), "b of a W with no columns was not updated"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists(backend):
    need(backend)
    geokern.contrastive_update_many_([], [], [], [], [], [], 0.1, 1.0, backend=backend)
    geokern.contrastive_update_many_([], None, [], [], [], [], 0.1, 1.0, max_norm=1.0, backend=backend)
    geokern.ContrastiveGroup([]).update_([], [], [], [], 0.1, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend, monkeypatch):
    need(backend)
    Ws, bs, acts = make(LAYERS[:3])

    def refuse(*a, **k):
        raise AssertionError("a host read of a tensor value (host synchronisation) during the update")

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2):  # the first call builds the tables, the second reads them from the cache
        geokern.contrastive_update_many_(Ws, bs, *acts, 0.5, 1.0, 0.1, backend=backend)
    monkeypatch.undo()
    assert all(torch.isfinite(W).all() for W in Ws)


@gpu
@capturable
def test_cuda_graph_capture():
    """One launch with nothing to copy or read back: it captures into a CUDA graph; a replay with
    NaN written into one layer's captured activities skips that layer and updates the others.
    Activities not seen before the capture are refused with the reason."""
    need("triton")
    Ws, bs, acts = make(LAYERS[:4])
    group = geokern.ContrastiveGroup(Ws, bs)
    group.update_(*acts, 0.5, 1.0, 0.1)  # compiles and caches the tables outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        group.update_(*acts, 0.5, 1.0, 0.1)
    w0, b0 = [W.clone() for W in Ws], [b.clone() for b in bs]
    g.replay()
    want_w, want_b = reference(w0, b0, acts, 0.5, 1.0, dtype=None, max_norm=0.1)
    for i in range(4):
        torch.testing.assert_close(Ws[i], want_w[i], msg=f"W[{i}] after a replay")
        torch.testing.assert_close(bs[i], want_b[i], msg=f"b[{i}] after a replay")
    acts[0][1][0, 0] = float("nan")
    w1 = [W.clone() for W in Ws]
    g.replay()
    assert torch.equal(bits(Ws[1]), bits(w1[1])), "a NaN replay changed W[1]"
    assert not torch.equal(Ws[0], w1[0]), "a NaN in layer 1 skipped layer 0 too"
    other = [[t.clone() for t in a] for a in acts]
    with pytest.raises(RuntimeError, match="once outside the capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            group.update_(*other, 0.5, 1.0, 0.1)


def test_float64_refused_by_triton():
    need("triton")
    Ws, bs, acts = make(LAYERS[:2], act=torch.float64, wdt=torch.float64)
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        geokern.contrastive_update_many_(Ws, bs, *acts, 0.1, 1.0, backend="triton")
    geokern.contrastive_update_many_(Ws, bs, *acts, 0.1, 1.0)  # auto: the reference loop


def _bad(change):
    Ws, bs, acts = make(LAYERS[:3])
    args = dict(Ws=Ws, bs=bs, Xns=acts[0], Yns=acts[1], Xfs=acts[2], Yfs=acts[3], lr=0.1, beta=1.0)
    change(args)
    return args


def _set(key, i, value):
    def f(a):
        a[key] = list(a[key])
        a[key][i] = value(a) if callable(value) else value
    return f


BAD = [
    ("Xns-short", lambda a: a.update(Xns=a["Xns"][:2]), ValueError, "Xns has 2 entries but Ws has 3"),
    ("bs-long", lambda a: a.update(bs=a["bs"] + [None]), ValueError, "bs has 4 entries but Ws has 3"),
    ("Ws-tensor", lambda a: a.update(Ws=a["Ws"][0]), TypeError, "Ws must be a list"),
    ("Yf-width", _set("Yfs", 2, lambda a: torch.randn(8, 3, device=DEVICE)), ValueError, r"Yf\[2\] must be \[N, 33\]"),
    ("rows", _set("Yns", 2, lambda a: torch.randn(5, 33, device=DEVICE)), ValueError,
     r"Xn\[2\] and Yn\[2\] must have the same rows"),
    ("empty-phase", lambda a: (_set("Xfs", 0, torch.randn(0, 5, device=DEVICE))(a),
                               _set("Yfs", 0, torch.randn(0, 7, device=DEVICE))(a)), ValueError, "no rows"),
    ("act-dtype-mix", lambda a: (_set("Xns", 1, lambda a: a["Xns"][1].bfloat16())(a),
                                 _set("Yns", 1, lambda a: a["Yns"][1].bfloat16())(a)), TypeError,
     r"Xn\[1\] has dtype torch.bfloat16 but Xn\[0\] has torch.float32"),
    ("W-dtype-mix", _set("Ws", 2, lambda a: a["Ws"][2].bfloat16()), TypeError, r"W\[2\] has dtype .* but W\[0\]"),
    ("b-shape", _set("bs", 2, lambda a: torch.randn(5, device=DEVICE)), ValueError, r"b\[2\] must have shape \(33,\)"),
    ("W-device", _set("Ws", 1, lambda a: a["Ws"][1].to("meta")), ValueError,
     r"W\[1\] is on meta|is on .* but W\[1\] is on meta"),
    ("Xf-device", _set("Xfs", 2, lambda a: a["Xfs"][2].to("meta")), ValueError, r"Xf\[2\] is on meta"),
    ("W-strided", _set("Ws", 0, lambda a: a["Ws"][0].T.contiguous().T), ValueError, r"W\[0\] must be contiguous"),
    ("X-col-stride", _set("Xns", 0, lambda a: a["Xns"][0].T.contiguous().T), ValueError,
     r"Xn\[0\] must have unit stride"),
    ("beta-0", lambda a: a.update(beta=0.0), ValueError, "beta must be > 0"),
    ("max_norm-neg", lambda a: a.update(max_norm=-1.0), ValueError, "max_norm must be > 0"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument_and_writes_nothing(case, backend):
    need(backend)
    _, change, exc, msg = case
    good = _bad(lambda a: None)
    geokern.contrastive_update_many_(**good, backend=backend)  # a good call first: its group and tables cached
    args = dict(good)
    change(args)  # replaces entries, keeps the good call's other tensors (the cached group's parameters)
    before = {i: W.clone() for i, W in enumerate(args["Ws"]) if not W.is_meta} if isinstance(args["Ws"], list) else {}
    with pytest.raises(exc, match=msg):
        geokern.contrastive_update_many_(**args, backend=backend)
    for i, w in before.items():
        assert torch.equal(bits(args["Ws"][i]), bits(w)), f"W[{i}] written although the call was refused"


@pytest.mark.parametrize("backend", BACKENDS)
def test_aliasing_parameters_refused(backend):
    """The same W twice (or two views of one buffer), or a W that is also an activity: the kernel
    would write memory that other programs read; refused before anything runs."""
    need(backend)
    Ws, bs, acts = make([(6, 5, 3, 4), (6, 5, 2, 2)])
    w0 = Ws[0].clone()
    with pytest.raises(ValueError, match=r"W\[1\] overlaps W\[0\]"):
        geokern.contrastive_update_many_([Ws[0], Ws[0]], bs, *acts, 0.1, 1.0, backend=backend)
    buf = torch.randn(12, 5, device=DEVICE)
    with pytest.raises(ValueError, match="overlaps"):
        geokern.contrastive_update_many_([buf[:6], buf[5:11]], None, *acts, 0.1, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"b\[0\] overlaps b\[1\]|b\[1\] overlaps b\[0\]"):
        geokern.contrastive_update_many_(Ws, [bs[0], bs[0]], *acts, 0.1, 1.0, backend=backend)
    assert torch.equal(Ws[0], w0)
    if backend == "triton":  # the reference loop reads each layer's activities before it writes
        xs = list(acts[0])
        xs[1] = Ws[1][:2]  # an activity that is W[1] itself: [2, 5] rows of W[1] [6, 5]
        ys = list(acts[1])
        ys[1] = ys[1][:2]
        with pytest.raises(ValueError, match=r"overlaps"):
            geokern.contrastive_update_many_(Ws, bs, xs, ys, acts[2], acts[3], 0.1, 1.0, backend=backend)


@pytest.mark.parametrize("peer", ["torch-loop", "autograd+SGD"])
@pytest.mark.parametrize("dt", ["fp32", "tf32", "bf16"])
def test_bench_many_case_checks_every_implementation(dt, peer):
    """The many-layer benchmark's implementations and peers (tiny, on this machine's device) pass
    the runner's check before timing, keep updating on a second call, and leave the inputs alone."""
    from geokern.bench import contrastive as bench
    from geokern.bench.runner import _rel_err

    need("triton")
    case = bench._many_case(3, 9, 7, 3, dt, device=DEVICE, peer=peer)
    inputs = case.make_inputs()
    want = case.reference(*inputs)
    assert set(case.peers) == {peer} and "triton" in case.impls
    if HAS_CUDA and peer == "torch-loop":
        assert "triton-graph" in case.impls
    for name, fn in {**case.impls, **case.peers}.items():
        err = _rel_err(fn(*inputs), want)
        assert err <= case.tol, f"bench {name} {dt}: relative error {err:.2e} > {case.tol}"
        assert not torch.equal(fn(*inputs)[0], want[0].float()), f"bench {name}: the second call did not update"
    assert all(W.abs().sum() == 0 for W in inputs[0]), "an implementation updated the shared input Ws"


def test_deterministic_mode_with_max_norm():
    """The clip factor reads each layer's norm, summed with float64 atomics: under
    torch.use_deterministic_algorithms(True) the Triton update with max_norm raises (names the op and
    backend='torch'), warns with warn_only=True, and runs without max_norm; the torch backend runs."""
    need("triton")
    Ws, bs, acts = make(LAYERS[:2])
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match=r"contrastive_update_many_ with max_norm.*backend='torch'"):
            geokern.contrastive_update_many_(Ws, bs, *acts, 0.1, 1.0, 1.0, backend="triton")
        geokern.contrastive_update_many_(Ws, bs, *acts, 0.1, 1.0, backend="triton")
        geokern.contrastive_update_many_(Ws, bs, *acts, 0.1, 1.0, 1.0, backend="torch")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="contrastive_update_many_ with max_norm"):
            geokern.contrastive_update_many_(Ws, bs, *acts, 0.1, 1.0, 1.0, backend="triton")
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)
