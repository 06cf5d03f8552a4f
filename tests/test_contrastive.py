"""Contrastive (equilibrium-propagation) update: every backend against the float64 reference, the
finite gate (NaN / inf anywhere: W and b bit-identical), the exact clip, streaming == one-shot,
no host synchronisation, bad input, and the custom ops' opcheck / compile."""

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import capturable, dtype_id, gpu, need, run_isolated
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.reference import contrastive as ref

KERNEL_BACKENDS = ["torch", "triton"]
# (out, in, Nn, Nf): single element, odd sizes, unequal phases, and one where Gram is the default
SHAPES = [(1, 1, 1, 1), (7, 5, 3, 4), (33, 17, 8, 8), (20, 65, 2, 3), (70, 90, 4, 4)]
if HAS_CUDA:
    SHAPES += [(257, 129, 64, 63), (1024, 768, 32, 32)]
# (activity dtype, W / b dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.float64, torch.float64)]


def shape_id(s):
    return "out{}-in{}-Nn{}-Nf{}".format(*s)


def dtypes_id(d):
    return f"act{dtype_id(d[0])}-W{dtype_id(d[1])}"


def make(out, inn, nn, nf, act=torch.float32, wdt=torch.float32):
    def r(*s, dt):
        return torch.randn(*s, device=DEVICE, dtype=torch.float64).to(dt)

    W, b = r(out, inn, dt=wdt), r(out, dt=wdt)
    # the nudged phase near the free one, as in equilibrium propagation (the difference is small)
    Xf, Yf = r(nf, inn, dt=act), r(nf, out, dt=act)
    Xn, Yn = r(nn, inn, dt=act), r(nn, out, dt=act)
    return W, b, Xn, Yn, Xf, Yf


def updated(backend, W, b, *acts, **kw):
    W, b = W.clone(), (None if b is None else b.clone())
    geokern.contrastive_update_(W, b, *acts, backend=backend, **kw)
    return W, b


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(max_norm=0.05), dict(centred=True, gram=True),
                                  dict(max_norm=0.05, gram=False), dict(max_norm=1e6, gram=True)],
                         ids=["plain", "clip", "centred-gram", "clip-direct", "noclip-gram"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtypes_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_reference(shape, dtypes, opts, backend):
    need(backend)
    if backend == "triton" and torch.float64 in dtypes:
        pytest.skip("float64 runs the reference (checked: test_float64_refused_by_triton)")
    act, wdt = dtypes
    W, b, *acts = make(*shape, act, wdt)
    lr, beta = 0.7, 0.5
    got_w, got_b = updated(backend, W, b, *acts, lr=lr, beta=beta, **opts)
    kw = dict(max_norm=opts.get("max_norm"), centred=opts.get("centred", False))
    w64, b64 = W.double(), b.double()
    ref.contrastive_update_(w64, b64, *(a.double() for a in acts), lr, beta, **kw)
    # the same-dtype reference: float32 (float64) arithmetic on the same inputs, W and b rounded
    ws, bs = W.clone(), b.clone()
    ref.contrastive_update_(ws, bs, *acts, lr, beta, **kw)
    name = f"{backend} {shape_id(shape)} {dtypes_id(dtypes)} {opts}"
    assert got_w.dtype == wdt and got_b.dtype == wdt
    # the update itself (W_new - W_old) is the quantity of interest; W's rounding floors it
    assert_close(f"{name} dW", (got_w.double() - W.double()), w64 - W.double(), ws.double() - W.double())
    assert_close(f"{name} db", (got_b.double() - b.double()), b64 - b.double(), bs.double() - b.double())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_bias_and_strided_w(backend):
    need(backend)
    W, b, *acts = make(9, 6, 3, 5)
    want_w, _ = updated("torch", W, b, *acts, lr=0.3, beta=1.0)
    got_w, _ = updated(backend, W, None, *acts, lr=0.3, beta=1.0)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6, msg="W without bias")
    Wt = W.T.contiguous().T  # column-major [out, in]: the strided fallback of the apply
    bt = torch.stack([b, b], 1)[:, 0]
    geokern.contrastive_update_(Wt, bt, *acts, 0.3, 1.0, backend=backend)
    torch.testing.assert_close(Wt, want_w, rtol=1e-5, atol=1e-6, msg="strided W")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("gram", [False, True], ids=["direct", "gram"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", range(4), ids=["Xn", "Yn", "Xf", "Yf"])
def test_non_finite_input_skips_the_whole_update(where, value, gram, backend):
    need(backend)
    W, b, *acts = make(6, 5, 3, 4)
    W[0, 0], W[1, 1], b[2] = -0.0, float("nan"), -0.0  # a rewrite would turn -0.0 into +0.0
    a = acts[where]
    a.view(-1)[torch.randint(a.numel(), ())] = value
    w0, b0 = W.clone(), b.clone()
    geokern.contrastive_update_(W, b, *acts, 0.5, 1.0, 1.0, gram=gram, backend=backend)
    assert torch.equal(bits(W), bits(w0)), f"{backend}: W changed although dW is non-finite"
    assert torch.equal(bits(b), bits(b0)), f"{backend}: b changed although dW is non-finite"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_finite_db_alone_skips_b_only(backend):
    need(backend)
    W, b, Xn, Yn, Xf, Yf = make(4, 3, 2, 2)
    Yn[:, 1] = 3e38  # the column sum overflows to inf: db non-finite
    Xn.zero_()  # while Yn^T Xn = 0, so dW stays finite
    w0, b0 = W.clone(), b.clone()
    geokern.contrastive_update_(W, b, Xn, Yn, Xf, Yf, 0.5, 1.0, gram=False, backend=backend)
    assert torch.equal(bits(b), bits(b0)), f"{backend}: b changed although db is non-finite"
    want, _ = updated("torch", w0, None, Xn, Yn, Xf, Yf, lr=0.5, beta=1.0)
    assert not torch.equal(W, w0), f"{backend}: W was skipped although dW is finite"
    torch.testing.assert_close(W, want, msg=f"{backend}: W with non-finite db")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_update_bumps_version_counters(backend):
    """A backward through W or b saved before the update raises, as after any in-place op,
    instead of silently using the updated values (the Triton kernels write through pointers)."""
    need(backend)
    W, b, *acts = make(7, 5, 3, 4)
    a = torch.ones_like(W, requires_grad=True)
    c = torch.ones_like(b, requires_grad=True)
    saved_w, saved_b = (a * W).sum(), (c * b).sum()
    geokern.contrastive_update_(W, b, *acts, 0.5, 1.0, backend=backend)
    for saved in (saved_w, saved_b):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("gram", [False, True], ids=["direct", "gram"])
def test_clip_is_exact(gram, backend):
    need(backend)
    W, b, *acts = make(12, 10, 3, 3)
    W.zero_()  # W_new = dW: its norm is the clip's
    full, _ = updated(backend, W, b, *acts, lr=1.0, beta=0.5)
    norm = full.double().norm().item()
    clipped, _ = updated(backend, W, b, *acts, lr=1.0, beta=0.5, max_norm=norm / 3, gram=gram)
    got = clipped.double().norm().item()
    assert abs(got - norm / 3) <= 1e-6 * norm, f"{backend}: clipped norm {got} != max_norm {norm / 3}"
    torch.testing.assert_close(clipped, full / 3, rtol=1e-5, atol=1e-7, msg="clip scales, keeps direction")
    # at or above the norm the clip does nothing: bit-identical to no clip
    same, _ = updated(backend, W, b, *acts, lr=1.0, beta=0.5, max_norm=norm * 1.01, gram=gram)
    assert torch.equal(same, full), f"{backend}: a max_norm above ||dW|| changed the update"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("gram", [False, True], ids=["direct", "gram"])
def test_clip_is_exact_when_the_phases_nearly_agree(gram, backend):
    """At small beta the nudged phase is the free one plus a little: ||dW|| is a tiny difference of
    large Gram terms, which the float64 Gram form still gets right (float32 would not)."""
    need(backend)
    W, b, Xn, Yn, Xf, Yf = make(40, 30, 6, 6)
    Xn, Yn = Xf + 1e-4 * torch.randn_like(Xf), Yf + 1e-4 * torch.randn_like(Yf)
    W.zero_()
    w64 = W.double()
    ref.contrastive_update_(w64, None, Xn.double(), Yn.double(), Xf.double(), Yf.double(), 1.0, 1.0)
    max_norm = w64.norm().item() / 2
    got, _ = updated(backend, W, b, Xn, Yn, Xf, Yf, lr=1.0, beta=1.0, max_norm=max_norm, gram=gram)
    err = abs(got.double().norm().item() - max_norm) / max_norm
    assert err <= 1e-4, f"{backend} gram={gram}: clipped norm off by {err:.2e} (relative) with nearly equal phases"


def test_gram_choice():
    """gram=None: the Gram form only where the spec allows it and its float64 flops are cheaper."""
    from geokern.ops.contrastive import use_gram

    assert use_gram(8, 70, 90) and use_gram(64, 4096, 4096)
    assert not use_gram(3000, 4096, 4096)  # beyond the spec's 2N < in out / (in + out)
    assert not use_gram(1024, 4096, 4096)  # allowed by the spec, but float64 Grams cost more than a read
    assert not use_gram(4, 1, 1000)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
def test_streaming_equals_one_shot(centred, backend):
    need(backend)
    W, b, Xn, Yn, Xf, Yf = make(11, 9, 10, 7)
    want_w, want_b = updated(backend, W, b, Xn, Yn, Xf, Yf, lr=0.4, beta=0.5, max_norm=0.2, centred=centred)
    stats = geokern.ContrastiveStats(11, 9, device=DEVICE)
    for lo, hi in ((0, 3), (3, 4), (4, 10)):  # uneven steps, phases interleaved
        stats.add_(Xn[lo:hi], Yn[lo:hi], "nudged")
        if lo < 7:
            stats.add_(Xf[lo:min(hi, 7)], Yf[lo:min(hi, 7)], "free")
    got_w, got_b = W.clone(), b.clone()
    stats.apply_(got_w, got_b, 0.4, 0.5, max_norm=0.2, centred=centred, backend=backend)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6, msg=f"{backend} streaming W")
    torch.testing.assert_close(got_b, want_b, rtol=1e-5, atol=1e-6, msg=f"{backend} streaming b")
    stats.reset()
    with pytest.raises(ValueError, match="no rows"):
        stats.apply_(got_w, got_b, 0.4, 0.5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_streaming_bf16_activities(backend):
    need(backend)
    W, b, *acts = make(8, 6, 4, 4, act=torch.bfloat16)
    want_w, want_b = updated(backend, W, b, *acts, lr=0.4, beta=0.5)
    stats = geokern.ContrastiveStats(8, 6, device=DEVICE)
    stats.add_(acts[0], acts[1], "nudged")
    stats.add_(acts[2], acts[3], "free")
    stats.apply_(W, b, 0.4, 0.5, backend=backend)
    torch.testing.assert_close(W, want_w, rtol=1e-5, atol=1e-6, msg=f"{backend} streaming bf16 W")
    torch.testing.assert_close(b, want_b, rtol=1e-5, atol=1e-6, msg=f"{backend} streaming bf16 b")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_host_sync(backend, monkeypatch):
    """Nothing reads a tensor's value on the host during the call (no .item(), bool(), int(),
    float(), tolist()): the gate and the clip stay on the device."""
    need(backend)
    W, b, *acts = make(6, 5, 3, 4)
    stats = geokern.ContrastiveStats(6, 5, device=DEVICE)

    def refuse(*a, **k):
        raise AssertionError("a host read of a tensor value (host synchronisation) during the update")

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    geokern.contrastive_update_(W, b, *acts, 0.5, 1.0, 0.1, gram=True, backend=backend)
    geokern.contrastive_update_(W, b, *acts, 0.5, 1.0, 0.1, gram=False, backend=backend)
    stats.add_(acts[0], acts[1], "nudged")
    stats.add_(acts[2], acts[3], "free")
    stats.apply_(W, b, 0.5, 1.0, 0.1, backend=backend)
    monkeypatch.undo()
    assert torch.isfinite(W).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_does_not_lower_the_precision(backend):
    """Inside an autocast region (a training step's) the float32 activities stay float32."""
    need(backend)
    W, b, *acts = make(12, 10, 4, 4)
    want_w, want_b = updated(backend, W, b, *acts, lr=0.5, beta=0.5)
    stats = geokern.ContrastiveStats(12, 10, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got_w, got_b = updated(backend, W, b, *acts, lr=0.5, beta=0.5)
        stats.add_(acts[0], acts[1], "nudged")
        stats.add_(acts[2], acts[3], "free")
        sw, sb = W.clone(), b.clone()
        stats.apply_(sw, sb, 0.5, 0.5, backend=backend)
    for name, got, want in (("W", got_w, want_w), ("b", got_b, want_b), ("streaming W", sw, want_w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{backend} {name} under autocast")


@gpu
@capturable
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture(backend):
    """No host synchronisation on the GPU: the update captures into a CUDA graph, and a replay
    with NaN refilled into the captured activities skips the update."""
    need(backend)
    W, b, *acts = make(64, 48, 8, 8)
    geokern.contrastive_update_(W, b, *acts, 0.5, 1.0, 0.1, backend=backend)  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        geokern.contrastive_update_(W, b, *acts, 0.5, 1.0, 0.1, backend=backend)
    w0, b0 = W.clone(), b.clone()
    g.replay()
    want_w, want_b = updated(backend, w0, b0, *acts, lr=0.5, beta=1.0, max_norm=0.1)
    torch.testing.assert_close(W, want_w, msg=f"{backend} W after a replay")
    torch.testing.assert_close(b, want_b, msg=f"{backend} b after a replay")
    acts[1][0, 0] = float("nan")
    w1, b1 = W.clone(), b.clone()
    g.replay()
    assert torch.equal(bits(W), bits(w1)) and torch.equal(bits(b), bits(b1)), f"{backend}: a NaN replay changed W or b"


def test_kernel_compiles_for_sm90():
    """The apply kernel compiles to sm_90 machine code on any machine (no GPU needed): the CPU
    interpreter accepts code the compiler rejects (a variable of two widths across an if, a plain
    global), so CI checks the compiler too."""
    run_isolated("""
        import os
        os.environ["TRITON_INTERPRET"] = "0"  # before triton.jit decorates the kernel
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from geokern.kernels.contrastive import contrastive_apply_kernel as k

        for wdt, clip in (("fp32", True), ("bf16", False)):
            sig = {"w_ptr": f"*{wdt}", "g_ptr": "*fp32", "n_w": "i64", "b_ptr": f"*{wdt}", "gb_ptr": "*fp32",
                   "n_b": "i32", "norm_ptr": "*fp64", "s": "fp32", "max_norm": "fp32", "w_blocks": "i32",
                   "HAS_CLIP": "constexpr", "BLOCK": "constexpr"}
            src = ASTSource(fn=k, signature=sig, constexprs={"HAS_CLIP": clip, "BLOCK": 1024})
            assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
    """, timeout=300)


def test_float64_refused_by_triton():
    need("triton")
    W, b, *acts = make(3, 2, 2, 2, torch.float64, torch.float64)
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        geokern.contrastive_update_(W, b, *acts, 0.1, 1.0, backend="triton")
    geokern.contrastive_update_(W, b, *acts, 0.1, 1.0)  # auto: the reference


def test_cuda_backend_refused_with_the_issue():
    W, b, *acts = make(3, 2, 2, 2)
    with pytest.raises(RuntimeError, match="#22"):
        geokern.contrastive_update_(W, b, *acts, 0.1, 1.0, backend="cuda")


def _bad(**change):
    W, b, Xn, Yn, Xf, Yf = make(4, 3, 2, 2)
    args = dict(W=W, b=b, Xn=Xn, Yn=Yn, Xf=Xf, Yf=Yf, lr=0.1, beta=1.0)
    args.update(change)
    return args


BAD = [
    ("W-1d", dict(W=torch.randn(4)), ValueError, "W must have at least 2 dim"),
    ("W-int", dict(W=torch.zeros(4, 3, dtype=torch.int32)), TypeError, "W must have dtype"),
    ("b-shape", dict(b=torch.randn(3)), ValueError, r"b must have shape \(4,\)"),
    ("Xn-width", dict(Xn=torch.randn(2, 5)), ValueError, r"Xn must be \[N, 3\]"),
    ("Yf-width", dict(Yf=torch.randn(2, 3)), ValueError, r"Yf must be \[N, 4\]"),
    ("rows", dict(Yn=torch.randn(3, 4)), ValueError, "Xn and Yn must have the same rows"),
    ("empty-phase", dict(Xf=torch.randn(0, 3), Yf=torch.randn(0, 4)), ValueError, "no rows"),
    ("Yn-dtype", dict(Yn=torch.randn(2, 4, dtype=torch.float64)), TypeError, "Yn has dtype"),
    ("Xf-dtype", dict(Xf=torch.randn(2, 3).bfloat16(), Yf=torch.randn(2, 4).bfloat16()), TypeError, "Xf has dtype"),
    ("Xn-list", dict(Xn=[[1.0]]), TypeError, "Xn must be a torch.Tensor"),
    ("beta-0", dict(beta=0.0), ValueError, "beta must be > 0"),
    ("lr-tensor", dict(lr=torch.tensor(0.1)), TypeError, "lr must be a Python float"),
    ("max_norm-neg", dict(max_norm=-1.0), ValueError, "max_norm must be > 0"),
    # another device than W's (meta: a second device on any machine)
    ("Xf-device", dict(Xf=torch.randn(2, 3, device="meta")), ValueError, "Xf is on meta"),
    ("b-device", dict(b=torch.randn(4, device="meta")), ValueError, "b is on meta"),
    ("W-device", dict(W=torch.randn(4, 3, device="meta")), ValueError, "b is on .* but W is on meta"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case):
    _, change, exc, msg = case
    args = _bad(**change)
    if DEVICE.type == "cuda":  # the CPU tensors above are on the wrong device there: move them
        args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and not v.is_meta else v) for k, v in args.items()}
    with pytest.raises(exc, match=msg):
        geokern.contrastive_update_(**args)


@gpu
def test_device_mismatch_names_the_argument():
    W, b, Xn, Yn, Xf, Yf = make(4, 3, 2, 2)
    with pytest.raises(ValueError, match="Xf is on cpu"):
        geokern.contrastive_update_(W, b, Xn, Yn, Xf.cpu(), Yf, 0.1, 1.0)
    with pytest.raises(ValueError, match="b is on cpu"):
        geokern.contrastive_update_(W, b.cpu(), Xn, Yn, Xf, Yf, 0.1, 1.0)


def test_stats_bad_input():
    stats = geokern.ContrastiveStats(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="phase must be one of"):
        stats.add_(torch.randn(2, 3, device=DEVICE), torch.randn(2, 4, device=DEVICE), "clamped")
    with pytest.raises(ValueError, match=r"X must be \[N, 3\]"):
        stats.add_(torch.randn(2, 5, device=DEVICE), torch.randn(2, 4, device=DEVICE), "free")
    with pytest.raises(ValueError, match=r"W must have shape \(4, 3\)"):
        stats.apply_(torch.randn(3, 4, device=DEVICE), None, 0.1, 1.0)


def op_samples(qualname):
    W, b, *acts = make(6, 5, 3, 4)
    if "stats_apply" in qualname:
        gn, sn, _ = ref.phase_stats(acts[0], acts[1])
        gf, sf, _ = ref.phase_stats(acts[2], acts[3])
        return [(W, b, gn, gf, sn, sf, 3, 4, 0.5, 1.0, 0.1, False),
                (W, b, gn, gf, sn, sf, 3, 4, 0.5, 1.0, None, True)]
    return [(W, b, *acts, 0.5, 1.0, 0.1, False, True), (W, b, *acts, 0.5, 1.0, None, True, False)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests(("contrastive_update_", "contrastive_stats_"), op_samples)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_bench_case_checks_every_implementation(dt):
    """The benchmark's implementations and peers (tiny, on this machine's device) pass the check the
    runner makes before timing, and a second call keeps updating (each has its own W)."""
    from geokern.bench import contrastive as bench
    from geokern.bench.runner import _rel_err

    need("triton")
    case = bench._case(9, 7, 3, dt, device=DEVICE)
    inputs = case.make_inputs()
    want = case.reference(*inputs)
    assert set(case.peers) == {"autograd+SGD", "torch"} and "triton" in case.impls
    for name, fn in {**case.impls, **case.peers}.items():
        err = _rel_err(fn(*inputs), want)
        assert err <= case.tol, f"bench {name} {dt}: relative error {err:.2e} > {case.tol}"
        assert not torch.equal(fn(*inputs)[0], want[0].float()), f"bench {name}: the second call did not update"
    assert inputs[0].abs().sum() == 0, "an implementation updated the shared input W"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_layer(backend):
    """W with no columns: dW is empty (finite), so b alone is updated; no rows: nothing to do."""
    need(backend)
    for out, inn in ((0, 5), (4, 0)):
        W, b, *acts = make(out, inn, 3, 2)
        want_w, want_b = updated("torch", W, b, *acts, lr=0.3, beta=1.0, max_norm=1.0)
        got_w, got_b = updated(backend, W, b, *acts, lr=0.3, beta=1.0, max_norm=1.0)
        assert got_w.shape == (out, inn)
        torch.testing.assert_close(got_b, want_b, msg=f"{backend} b of a W {tuple(W.shape)}")
        if out:
            assert not torch.equal(got_b, b), f"{backend}: b not updated for W {tuple(W.shape)}"
