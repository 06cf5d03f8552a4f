"""Quaternion / octonion linear layers: every backend against the float64 reference, the
layer against nn.Linear with the expanded weight, gradients, Parcollet et al.'s state dict
layout both ways, bad input, autocast, opcheck and compile."""

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import dtype_id, gpu, need
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.reference import hypercomplex as ref

OPS = {4: geokern.quaternion_linear, 8: geokern.octonion_linear}
LAYERS = {4: geokern.nn.QuaternionLinear, 8: geokern.nn.OctonionLinear}
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, O, I): component matrices [O, I]; odd blocks, blocks straddling the tiles, one row
SHAPES = [(7, 3, 5), (1, 5, 4), (19, 17, 18)] if not HAS_CUDA else [(7, 3, 5), (1, 5, 4), (129, 67, 33), (300, 128, 64)]


# Triton forward variants (the op's knobs): the GEMM kernel (stepwise: one K loop over all blocks;
# blocked: a K loop per block, the sign on the accumulator), the decode kernel whole-K and with
# K split across programs (float32 partials summed by a second kernel); backend "torch" ignores them
VARIANTS = {"gemm": dict(decode_max_rows=0, gemm_variant="stepwise"),
            "gemm-blocked": dict(decode_max_rows=0, gemm_variant="blocked"),
            "decode": dict(decode_max_rows=1 << 30, decode_splits=1),
            "decode-split": dict(decode_max_rows=1 << 30, decode_splits=3, decode_block_n=16)}


def _id(shape):
    return "M{}-O{}-I{}".format(*shape)


def _inputs(n, M, O, I, dtype, bias=True, lead=None):
    lead = (M,) if lead is None else lead
    x = torch.randn(*lead, n * I, device=DEVICE, dtype=dtype)
    ws = [torch.randn(O, I, device=DEVICE, dtype=dtype) / I**0.5 for _ in range(n)]
    b = torch.randn(n * O, device=DEVICE, dtype=dtype) if bias else None
    return x, ws, b


def _grads(out, leaves, g):
    return torch.autograd.grad(out, [t for t in leaves if t is not None], g)


def _check_against_reference(n, x, ws, b, backend, tag, variant="gemm"):
    leaves = [x, b, *ws]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in leaves]
    x_, b_, *w_ = leaves
    y = OPS[n](x_, *w_, bias=b_, backend=backend, **VARIANTS[variant])
    l64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    y64 = ref.hypercomplex_linear(l64[0], l64[2:], l64[1])
    lsame = [t.detach().requires_grad_() if t is not None else None for t in leaves]
    ysame = ref.hypercomplex_linear(lsame[0], lsame[2:], lsame[1])
    assert_close(f"{tag} output", y, y64.detach(), ysame.detach())
    g = torch.randn_like(y)
    names = ["dx", "dbias"] + [f"dW{c}" for c in range(n)]
    names = [nm for nm, t in zip(names, leaves) if t is not None]
    for nm, got, want, same in zip(names, _grads(y, leaves, g), _grads(y64, l64, g.double()), _grads(ysame, lsame, g)):
        assert_close(f"{tag} {nm}", got, want, same)


# (backend, forward variant): the reference once, the Triton kernels in every variant
BACKEND_VARIANTS = [("torch", "gemm")] + [("triton", v) for v in VARIANTS]


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float64], ids=dtype_id)
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend,variant", BACKEND_VARIANTS, ids=["-".join(bv) for bv in BACKEND_VARIANTS])
def test_matches_reference(backend, variant, n, dtype, shape):
    need(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take 16-bit and float32 inputs (float64 runs on the reference)")
    x, ws, b = _inputs(n, *shape, dtype)
    _check_against_reference(n, x, ws, b, backend, f"{backend} {variant} n={n}", variant)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend,variant", BACKEND_VARIANTS, ids=["-".join(bv) for bv in BACKEND_VARIANTS])
def test_no_bias_3d_strided(backend, variant, n):
    need(backend)
    # (batch, seq, features) with x a non-contiguous view, and components that are strided views
    x = torch.randn(2, n * 6, 3, device=DEVICE).transpose(1, 2)
    wt = torch.randn(n, 6, 5, device=DEVICE).transpose(1, 2)  # [n, 5, 6] with strides (30, 1, 5)
    _check_against_reference(n, x, list(wt.unbind(0)), None, backend, f"{backend} {variant} strided n={n}", variant)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_agree_bf16(variant, n):
    """Every forward variant against the GEMM kernel at bfloat16 with a bias, more rows than one
    decode row tile holds (n = 8 stacks at most 32 rows) and a split count that leaves the last
    K slice empty (K tiles 2 of 16 at I = 20 under the interpreter: slices of 1, the third empty)."""
    need("triton")
    x, ws, b = _inputs(n, 37, 19, 20, torch.bfloat16)
    y = OPS[n](x, *ws, bias=b, backend="triton", **VARIANTS[variant])
    y64 = ref.hypercomplex_linear(x.double(), [w.double() for w in ws], b.double())
    want = OPS[n](x, *ws, bias=b, backend="triton", decode_max_rows=0)
    assert_close(f"{variant} n={n}", y, y64, want)


# (rows, O, I) for the blocked GEMM: I a multiple of the K tile (16 under the interpreter: the
# unmasked loop alone, then with a remainder step), I below one tile (the remainder alone), one row
BLOCKED_SHAPES = [(33, 16, 32), (20, 9, 48), (17, 24, 40), (5, 7, 3), (1, 16, 16)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", BLOCKED_SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [4, 8])
def test_blocked_gemm_equals_stepwise(n, dtype, shape, bias):
    """The blocked GEMM variant against the reference and against the stepwise kernel: the same
    products summed in the same order (the sign moved from the x tile to the accumulator is an
    exact negation), so the two agree exactly under the interpreter (float32 tiles, upcast dots)."""
    need("triton")
    x, ws, b = _inputs(n, *shape, dtype, bias=bias)
    y = OPS[n](x, *ws, bias=b, backend="triton", **VARIANTS["gemm-blocked"])
    y64 = ref.hypercomplex_linear(x.double(), [w.double() for w in ws], None if b is None else b.double())
    step = OPS[n](x, *ws, bias=b, backend="triton", **VARIANTS["gemm"])
    assert_close(f"blocked n={n}", y, y64, step)
    if DEVICE.type == "cpu":
        assert torch.equal(y, step), "blocked and stepwise differ under the interpreter"


@pytest.mark.parametrize("n", [4, 8])
def test_blocked_gemm_strided_weights(n):
    """Components that are strided views (K stride 5, not 1) and an x with a row stride past its
    width: the blocked kernel's pointer increments follow the strides."""
    need("triton")
    x = torch.randn(21, n * 24 + 7, device=DEVICE)[:, 3:3 + n * 24]
    wt = torch.randn(n, 24, 11, device=DEVICE).transpose(1, 2)  # [n, 11, 24] with strides (264, 1, 11)
    _check_against_reference(n, x, list(wt.unbind(0)), torch.randn(n * 11, device=DEVICE), "triton",
                             f"blocked strided n={n}", "gemm-blocked")


def _layer_and_dense(n, fin, fout, backend):
    """Our layer and the nn.Linear holding its expanded weight and bias."""
    layer = LAYERS[n](fin, fout, backend=backend, device=DEVICE)
    dense = torch.nn.Linear(fin, fout, device=DEVICE)
    with torch.no_grad():
        dense.weight.copy_(layer.expanded_weight())
        dense.bias.copy_(layer.bias)
    return layer, dense


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_equals_dense_linear(backend, n):
    need(backend)
    layer, dense = _layer_and_dense(n, n * 5, n * 3, backend)
    x = torch.randn(2, 4, n * 5, device=DEVICE, requires_grad=True)
    y, yd = layer(x), dense(x)
    torch.testing.assert_close(y, yd, msg="layer output vs nn.Linear with the expanded weight")
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (dxd,) = torch.autograd.grad(yd, x, g)
    torch.testing.assert_close(dx, dxd, msg="dx vs nn.Linear")
    # dW_c is the gradient of the expanded weight pulled back through the expansion
    wc = layer.weight.detach().clone().requires_grad_()
    dw_exp = torch.autograd.grad(layer(x), layer.weight, g)[0]
    want = torch.autograd.grad(torch.nn.functional.linear(x, ref.expand_weight(wc.unbind(0)), layer.bias), wc, g)[0]
    torch.testing.assert_close(dw_exp, want, msg="dW vs the expansion's gradient")


@pytest.mark.parametrize("n", [4, 8])
def test_gradcheck_float64(n):
    x, ws, b = _inputs(n, 3, 2, 3, torch.float64)
    args = [t.requires_grad_() for t in (x, *ws, b)]
    assert torch.autograd.gradcheck(lambda x, *r: OPS[n](x, *r[:-1], bias=r[-1], backend="torch"), args)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend, n):
    need(backend)
    x, ws, b = _inputs(n, 0, 3, 5, torch.float32, lead=(2, 0))
    leaves = [t.requires_grad_() for t in (x, b, *ws)]
    y = OPS[n](x, *ws, bias=b, backend=backend)
    assert y.shape == (2, 0, n * 3)
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
    for t, g in zip(leaves, grads):
        assert g.shape == t.shape and not g.any(), "empty batch: gradients must be zeros of the inputs' shapes"



@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_in_features(backend, n, bias):
    """in_features = 0: y is the bias broadcast over the rows (zeros without one), dbias the
    summed gradient, dx and every dW zeros of their shapes (Triton once failed to reshape x)."""
    need(backend)
    x, ws, b = _inputs(n, 0, 3, 0, torch.float32, bias=bias, lead=(2, 5))
    leaves = [t.requires_grad_() for t in (x, b, *ws) if t is not None]
    y = OPS[n](x, *ws, bias=b, backend=backend)
    want = torch.zeros(2, 5, n * 3, device=DEVICE) + (b.detach() if bias else 0)
    assert y.shape == (2, 5, n * 3) and torch.equal(y, want), "y"
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    for t, dt in zip(leaves, grads):
        assert dt.shape == t.shape, "gradient shape"
        if t is b:
            assert torch.allclose(dt, g.sum((0, 1))), "dbias"
        else:
            assert not dt.any(), "dx / dW: zeros"

# ---- Parcollet et al.'s layout --------------------------------------------------


def parcollet_quaternion_linear(x, r, i, j, k, bias):
    """Their forward, from their documented formula: weights [in/4, out/4], y = x @ K + bias
    with K's column blocks [r, -i, -j, -k], [i, r, -k, j], [j, k, r, -i], [k, -j, i, r]."""
    kr = torch.cat([r, -i, -j, -k], dim=0)
    ki = torch.cat([i, r, -k, j], dim=0)
    kj = torch.cat([j, k, r, -i], dim=0)
    kk = torch.cat([k, -j, i, r], dim=0)
    return x @ torch.cat([kr, ki, kj, kk], dim=1) + bias


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parcollet_state_dict_loads(backend):
    need(backend)
    theirs = {name: torch.randn(5, 3, device=DEVICE) for name in ("r_weight", "i_weight", "j_weight", "k_weight")}
    theirs["bias"] = torch.randn(12, device=DEVICE)
    layer = geokern.nn.QuaternionLinear(20, 12, backend=backend, device=DEVICE)
    layer.load_state_dict(theirs)
    x = torch.randn(4, 20, device=DEVICE)
    torch.testing.assert_close(layer(x), parcollet_quaternion_linear(x, *(theirs[k] for k in list(theirs)[:4]), theirs["bias"]),
                               msg="our layer with their state dict vs their formula")
    # nested under a prefix, as inside a model
    model = torch.nn.Sequential(geokern.nn.QuaternionLinear(20, 12, backend=backend, device=DEVICE))
    model.load_state_dict({f"0.{k}": v for k, v in theirs.items()})
    torch.testing.assert_close(model(x), layer(x), msg="prefixed load")


def test_parcollet_export():
    layer = geokern.nn.QuaternionLinear(20, 12, device=DEVICE)
    theirs = layer.parcollet_state_dict()
    assert set(theirs) == {"r_weight", "i_weight", "j_weight", "k_weight", "bias"}
    assert theirs["r_weight"].shape == (5, 3)
    x = torch.randn(4, 20, device=DEVICE)
    torch.testing.assert_close(parcollet_quaternion_linear(x, *(theirs[k] for k in ("r_weight", "i_weight", "j_weight", "k_weight")),
                                                           theirs["bias"]), layer(x).detach(), msg="their formula with our export")
    back = geokern.nn.QuaternionLinear(20, 12, device=DEVICE)
    back.load_state_dict(theirs)
    torch.testing.assert_close(back.weight, layer.weight, msg="round trip of the weight")


def test_parcollet_state_dict_bad():
    layer = geokern.nn.QuaternionLinear(20, 12, device=DEVICE)
    with pytest.raises(KeyError, match="missing"):
        layer.load_state_dict({"r_weight": torch.randn(5, 3), "bias": torch.randn(12)})
    bad = {k: torch.randn(3, 5) for k in ("r_weight", "i_weight", "j_weight", "k_weight")}
    with pytest.raises(ValueError, match=r"r_weight must have shape \(5, 3\)"):
        layer.load_state_dict({**bad, "bias": torch.randn(12)})


# ---- bad input ----------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 8])
def test_bad_input(n):
    name = LAYERS[n].__name__
    with pytest.raises(ValueError, match=f"{name}: in_features must be a positive multiple of {n}, got {n + 2}"):
        LAYERS[n](n + 2, n)
    with pytest.raises(ValueError, match=f"{name}: out_features must be a positive multiple of {n}"):
        LAYERS[n](n, n * 2 + 1)
    op, f = OPS[n], OPS[n].__name__
    x, ws, b = _inputs(n, 3, 2, 3, torch.float32)
    with pytest.raises(ValueError, match=f"{f}: x's last dim \\(in_features\\) must be a multiple of {n}"):
        op(x[:, :-1], *ws)
    with pytest.raises(ValueError, match=f"{f}: x's last dim \\(in_features\\) must be {n} \\* "):
        op(x[:, :-n], *ws)
    with pytest.raises(ValueError, match="has shape \\(2, 4\\) but"):
        op(x, *ws[:-1], torch.randn(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="must be 2-D"):
        op(x, *ws[:-1], ws[-1][None])
    with pytest.raises(TypeError, match="has dtype torch.float16 but x has torch.float32"):
        op(x, *ws[:-1], ws[-1].half())
    with pytest.raises(TypeError, match="x must have dtype in"):
        op(x.long(), *ws)
    with pytest.raises(ValueError, match=f"bias must have shape \\({n * 2},\\)"):
        op(x, *ws, bias=b[:-1])
    with pytest.raises(RuntimeError, match="the CUDA kernel of this op is not built yet"):
        op(x, *ws, backend="cuda")
    if HAS_CUDA:
        with pytest.raises(ValueError, match="is on"):
            op(x.cpu(), *ws)
    need("triton")
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16 or float32"):
        op(x.double(), *(w.double() for w in ws), backend="triton")
    for knob, bad in (("decode_max_rows", -1), ("decode_splits", 1.5), ("decode_block_n", 24), ("decode_block_n", 8),
                      ("gemm_variant", "fast"), ("gemm_variant", 1)):
        with pytest.raises(ValueError, match=f"{f}: {knob} must be"):
            op(x, *ws, backend="triton", **{knob: bad})


# ---- autocast -----------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_like_linear(backend, n):
    need(backend)
    layer, dense = _layer_and_dense(n, n * 4, n * 2, backend)
    x = torch.randn(3, n * 4, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y, yd = layer(x), dense(x)
    assert y.dtype == yd.dtype == torch.bfloat16, f"autocast output dtype {y.dtype}, nn.Linear gives {yd.dtype}"
    assert_close("autocast output", y, ref.hypercomplex_linear(x.double(), layer.weight.double().unbind(0),
                                                                layer.bias.double()).detach(), yd.detach())
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32


# ---- custom ops ---------------------------------------------------------------


def _op_samples(qualname):
    n = 4 if "quaternion" in qualname else 8
    dev = DEVICE  # CPU without a GPU: test_opcheck then checks the samples against the schema only
    x, ws, b = _inputs(n, 33, 17, 20, torch.bfloat16)
    x, ws, b = x.to(dev), [w.to(dev) for w in ws], b.to(dev)
    if "backward" in qualname:
        g = torch.randn(33, n * 17, device=dev, dtype=torch.bfloat16)
        return [(g, x, ws, True, True, True), (g, x, ws, True, False, False), (g[:0], x[:0], ws, True, True, True)]
    return [(x, ws, b), (x.float(), [w.float() for w in ws], None), (x[:0], ws, b)]


(test_opcheck_quaternion, test_compile_fullgraph_quaternion,
 test_fake_trace_quaternion) = custom_op_tests("quaternion_linear", _op_samples)
(test_opcheck_octonion, test_compile_fullgraph_octonion,
 test_fake_trace_octonion) = custom_op_tests("octonion_linear", _op_samples)


@gpu
@pytest.mark.parametrize("n", [4, 8])
def test_public_op_compiles_with_backward(n):
    need("triton")
    x, ws, b = _inputs(n, 37, 16, 24, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, b, *ws)]
    f = torch.compile(lambda x, b, *w: OPS[n](x, *w, bias=b, backend="triton").float().square().sum(), fullgraph=True)
    got = torch.autograd.grad(f(*leaves), leaves)
    want = torch.autograd.grad(OPS[n](*[leaves[0], *leaves[2:]], bias=leaves[1], backend="triton").float().square().sum(), leaves)
    for i, (a, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, w, msg=f"compiled grad {i}")


@pytest.mark.parametrize("n", [4, 8])
def test_op_bodies_trace_on_fake_tensors(n, monkeypatch):
    """The Triton ops' bodies around their launches, traced on fake tensors as torch.compile
    traces a torch.library.triton_op (make_fx), on any machine: the launchers stubbed, nothing
    between the op boundary and the kernels may depend on tensor data. The sign table once came
    from tensor ops inside the body (left_mul_blocks), and fullgraph failed on the H100 with
    "Could not guard on data-dependent expression Eq(u0, 1)"."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from geokern.ops import hypercomplex as ops

    ref.left_mul_blocks.cache_clear()  # cached, it would hide tensor ops a body calls it for
    seen, signs = [], []

    def stub(name, result):
        def launcher(*args):
            seen.append(name)
            signs.append(next(a for a in args if isinstance(a, tuple)))
            return args[result].zero_()
        monkeypatch.setattr(ops.tkl, f"hypercomplex_linear_{name}", launcher)

    stub("fwd", 3), stub("bwd_input", 2), stub("bwd_weight", 2)
    x, ws, b = _inputs(n, 5, 3, 4, torch.float32)
    g = torch.randn(5, n * 3, dtype=torch.float32, device=DEVICE)
    body = lambda x, b, g, *ws: (ops._linear_triton(x, list(ws), b),  # noqa: E731
                                 *ops._linear_backward_triton(g, x, list(ws), True, True, True))
    for mode in ("fake", "symbolic"):
        y, dx, dw, db = make_fx(body, tracing_mode=mode)(x, b, g, *ws)(x, b, g, *ws)
        assert y.shape == (5, n * 3) and dx.shape == x.shape and dw.shape == (n, 3, 4) and db.shape == (n * 3,)
    assert seen == ["fwd", "bwd_input", "bwd_weight"] * 2, seen  # one per trace (the graph holds their zero_)
    assert all(s == ref.left_mul_blocks(n)[1] for s in signs), "the launchers got another sign table"
