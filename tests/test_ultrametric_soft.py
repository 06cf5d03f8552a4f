"""Soft-mode ultrametric attention (the soft LCP kernel, mode="soft"): every backend against the
float64 reference and a dense float64 re-implementation of the spec's formula; causal /
non-causal / chunked prefill / decode, padding, GQA, lse, gradients to q, k (float digits) and v
against the reference's autograd, the clamp and large weights, equality with the hard mode on
hard digits, hidden non-finite values, bad input, custom-op checks. The kernel backends, Triton and
CUDA (csrc/ultrametric/soft.cu), run every kernel test; the CUDA one is deterministic."""

import math

import pytest
import torch
import _custom_ops
from _custom_ops import custom_op_tests
from _helpers import DTYPES, dtype_id, need
from _tolerance import assert_close, lse_weight_floor, rel_err
from _ultrametric import digits, soft_brute
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern import _backend
from geokern.reference import ultrametric as ref

KERNELS = ["triton", "cuda"]
BACKENDS = ["torch", *KERNELS]

# (B, H, Hkv, Tq, Tk, K, D, causal, padded)
CPU_CASES = [
    (1, 2, 2, 37, 37, 4, 16, True, False),
    (2, 4, 2, 29, 29, 3, 5, True, True),
    (1, 3, 1, 1, 40, 5, 7, True, True),
    (1, 2, 2, 13, 50, 2, 33, True, True),
    (1, 2, 1, 23, 31, 8, 17, False, True),
    (1, 1, 1, 1, 1, 1, 4, True, False),
]
# the fourth: K = 16, D = 200, the largest the CUDA kernels take in registers (K <= 16, D <= 256);
# the last: non-causal with more queries than keys
GPU_CASES = [(2, 8, 2, 1000, 1000, 8, 64, True, True), (1, 4, 4, 300, 700, 6, 128, True, False),
             (1, 4, 2, 513, 513, 8, 65, False, True), (1, 4, 2, 129, 257, 16, 200, True, True),
             (1, 4, 2, 70, 40, 5, 33, False, True)] if HAS_CUDA else []
ALPHA, BETA = 1.7, 6.0  # a beta at which partial matches matter (32 makes the kernel nearly hard)


def _id(c):
    if not isinstance(c, tuple):
        return dtype_id(c)
    B, H, Hkv, Tq, Tk, K, D, causal, pad = c
    return f"B{B}-H{H}-KV{Hkv}-Tq{Tq}-Tk{Tk}-K{K}-D{D}-{'causal' if causal else 'full'}{'-pad' if pad else ''}"


def make(case, dtype=torch.float32, grad=False):
    B, H, Hkv, Tq, Tk, K, D, causal, pad = case
    q = torch.rand(B, H, Tq, K, device=DEVICE, dtype=torch.float64).to(dtype)
    k = torch.rand(B, Hkv, Tk, K, device=DEVICE, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, device=DEVICE, dtype=torch.float64).to(dtype)
    keep = (torch.rand(B, Tk, device=DEVICE) > 0.3) if pad else None
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, keep, causal


def run(backend, q, k, v, keep, causal, alpha=ALPHA, beta=BETA):
    return geokern.ultrametric_attention(q, k, v, alpha=alpha, mode="soft", lcp_beta=beta, causal=causal,
                                         key_padding_mask=keep, return_lse=True, backend=backend)


def _check_lse(lse, lse64):
    assert torch.equal(lse.isinf(), lse64.isinf()), "lse: -inf (no visible key) at other queries than the reference"
    fin = lse64.isfinite()
    assert_close("lse", lse[fin], lse64[fin].float(), lse64[fin].float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CPU_CASES + GPU_CASES, ids=_id)
def test_matches_reference(case, backend):
    need(backend)
    q, k, v, keep, causal = make(case)
    y, lse = run(backend, q, k, v, keep, causal)
    y64, lse64 = ref.soft_lcp_attention(q.double(), k.double(), v.double(), ALPHA, BETA, causal=causal,
                                        key_padding_mask=keep, return_lse=True)
    assert_close("y", y, y64.float(), y64.float())
    _check_lse(lse, lse64)


@pytest.mark.parametrize("case", CPU_CASES[:5], ids=_id)
def test_reference_is_the_spec(case):
    """The reference against the spec's formula written out densely (float64), y and lse."""
    q, k, v, keep, causal = make(case, torch.float64)
    y, lse = ref.soft_lcp_attention(q, k, v, ALPHA, BETA, causal=causal, key_padding_mask=keep, return_lse=True)
    yb, lb = soft_brute(q, k, v, ALPHA, BETA, causal, keep)
    torch.testing.assert_close(y, yb, rtol=1e-12, atol=1e-12, msg="y vs the spec's formula")
    torch.testing.assert_close(lse, lb, rtol=1e-12, atol=1e-12, msg="lse vs the spec's formula")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CPU_CASES[:5] + GPU_CASES[:1] + GPU_CASES[3:], ids=_id)
def test_gradients(case, backend):
    """dq, dk (float digits) and dv against the float64 reference's autograd."""
    need(backend)
    B, H, Hkv, Tq, Tk, K, D, causal, pad = case
    q, k, v, keep, causal = make(case, grad=True)
    y, _ = run(backend, q, k, v, keep, causal)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (q, k, v), dy)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y64 = ref.soft_lcp_attention(*x64, ALPHA, BETA, causal=causal, key_padding_mask=keep)
    want = torch.autograd.grad(y64, x64, dy.double())
    # The Triton backward forms every weight as exp2(lcp log2 alpha - log2 den) from the forward's
    # lse (not a running max): log2 den, up to log2(Tk alpha^K) = 16 at Tk = 1000, K = 8, is rounded
    # four times in float32 (the forward's m + log2 l, its natural-log lse, lse * log2 e in the
    # launcher, the kernel's subtraction), each up to 2^-24 * 16 in the exponent. dv's error grew
    # with it past the fixed 1e-6 floor on the H100 (1.24e-6 at B2-H8-KV2-T1000-K8-D64; the float32
    # reference, which divides by den, stayed near 2e-7 at Tk = 256 and 1000 on the CPU): the floor
    # grows with log2(Tk alpha^K), 2.7e-6 more there, 1.4e-6 at Tk = 37, K = 4. A wrong weight or a
    # missed key is off by orders of magnitude more.
    # the CUDA backward forms its weights from the forward's lse the same way (csrc/ultrametric/soft.cu)
    floor = lse_weight_floor(Tk, ALPHA**K) if backend in KERNELS else 0.0
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(name, a, b.float(), extra_floor=floor)
    if keep is not None:
        pad = ~keep[:, None, :, None]
        assert not got[1][pad.expand_as(got[1])].any(), "dk: a padded key got a gradient"
        assert not got[2][pad.expand_as(got[2])].any(), "dv: a padded key got a gradient"


# on a GPU also the wide rows (D 65, 200: the CUDA kernels' 4 and 8 channels per lane) in 16 bits
@pytest.mark.parametrize("case", [CPU_CASES[1]] + GPU_CASES[2:4], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(dtype, backend, case):
    need(backend)
    if backend in KERNELS and dtype == torch.float64:
        pytest.skip("float64 runs on backend='torch' (test_bad_input checks the error)")
    q, k, v, keep, causal = make(case, dtype, grad=True)
    y, lse = run(backend, q, k, v, keep, causal)
    assert y.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    dy = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, (q, k, v), dy))
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y64 = ref.soft_lcp_attention(*x64, ALPHA, BETA, causal=causal, key_padding_mask=keep)
    want = (y64, *torch.autograd.grad(y64, x64, dy.double()))
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    ys = ref.soft_lcp_attention(*xs, ALPHA, BETA, causal=causal, key_padding_mask=keep)
    same = (ys, *torch.autograd.grad(ys, xs, dy))
    for name, a, b, c in zip(("y", "dq", "dk", "dv"), got, want, same):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_close(name, a, b.to(dtype), c)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_equals_hard_mode_on_hard_digits(p, causal, backend):
    """Integer-valued digits at lcp_beta = 32: exp(-32) stands for 0, and the soft kernel is the
    hard mode (float32 tolerance), y and lse, with padding and GQA."""
    need("triton")
    need(backend)
    B, H, Hkv, T, K, D = 1, 4, 2, 41, 5, 12
    qd, kd = digits(B, H, T, K, p), digits(B, Hkv, T, K, p)
    v = torch.randn(B, Hkv, T, D, device=DEVICE)
    keep = torch.rand(B, T, device=DEVICE) > 0.2
    hard, lh = geokern.ultrametric_attention(qd, kd, v, alpha=2.0, p=p, causal=causal, key_padding_mask=keep,
                                             return_lse=True, backend="triton")
    soft, ls = geokern.ultrametric_attention(qd.float(), kd.float(), v, alpha=2.0, mode="soft", lcp_beta=32.0,
                                             causal=causal, key_padding_mask=keep, return_lse=True, backend=backend)
    hard64, lh64 = ref.ultrametric_attention(qd, kd, v.double(), 2.0, p=p, causal=causal, key_padding_mask=keep,
                                             return_lse=True)
    assert_close("y soft vs hard (float64)", soft, hard64.float())
    assert_close("y soft vs hard (triton)", soft, hard.double())
    fin = lh64.isfinite()
    assert torch.equal(ls.isinf(), lh64.isinf())
    assert_close("lse soft vs hard", ls[fin], lh64[fin].float())


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("alpha", [0.05, 1.0, 1e6], ids=["clamp", "alpha1", "huge"])
def test_weight_extremes(alpha, backend):
    """alpha = 0.05, K = 8: every weight is under 1e-9 for near-equal digits, so the spec's clamp
    of the weight sum holds (y is not a weighted mean there, and its gradient drops the sum's
    term); alpha = 1: uniform weights, no digit gradient; alpha = 1e6: weights up to 1e48, past
    float32 without the online maximum."""
    need(backend)
    B, H, T, K, D = 1, 2, 23, 8, 8
    base = torch.rand(B, H, 1, K, device=DEVICE, dtype=torch.float64)
    q = (base + 0.01 * torch.rand(B, H, T, K, device=DEVICE, dtype=torch.float64)).float().requires_grad_()
    k = (base + 0.01 * torch.rand(B, H, T, K, device=DEVICE, dtype=torch.float64)).float().requires_grad_()
    v = torch.randn(B, H, T, D, device=DEVICE, requires_grad=True)
    y, lse = run(backend, q, k, v, None, True, alpha=alpha)
    dy = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, (q, k, v), dy))
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y64, l64 = ref.soft_lcp_attention(*x64, alpha, BETA, return_lse=True)
    if alpha == 0.05:
        assert (l64 < torch.log(torch.tensor(1e-9, dtype=torch.float64))).all(), "the case must hit the clamp"
    want = (y64, *torch.autograd.grad(y64, x64, dy.double()))
    # weights of exponent |lcp log2 alpha| ~ 35 (clamp) or 160 (huge) carry float32 rounding of that
    # size: judged against the float32 reference's error
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    ys, ls = ref.soft_lcp_attention(*xs, alpha, BETA, return_lse=True)
    same = (ys, *torch.autograd.grad(ys, xs, dy))
    for name, a, b, c in zip(("y", "dq", "dk", "dv"), got, want, same):
        if alpha == 1.0 and name in ("dq", "dk"):
            assert not a.any(), f"{name}: alpha = 1 gives the digits no gradient"
            continue
        if alpha == 1e6:  # float32 torch overflows (inf weights): the bound is lcp's rounding, K ulps of
            # float32, times ln alpha (the weights' sensitivity to lcp)
            bound = 2 * K * 2.0**-24 * math.log(alpha)
            assert rel_err(a, b) < bound, f"{name}: {rel_err(a, b):.2e} > {bound:.2e}"
        else:
            assert_close(name, a, b.float(), c)
    if alpha != 1e6:
        assert_close("lse", lse, l64.float(), ls)
    else:
        assert rel_err(lse, l64) < 1e-6, "lse"


@pytest.mark.parametrize("backend", KERNELS)
def test_hidden_non_finite_values_stay_hidden(backend):
    """A padded key or a later key (causal) with NaN / inf values reaches no query; a visible NaN
    reaches exactly the queries that see it; +inf and -inf seen together give NaN."""
    need(backend)
    B, H, T, K, D = 1, 2, 37, 3, 16
    q, k = torch.rand(B, H, T, K, device=DEVICE), torch.rand(B, H, T, K, device=DEVICE)
    v = torch.randn(B, H, T, D, device=DEVICE)
    keep = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    keep[0, 5] = False
    v[0, :, 5] = float("nan")  # padded
    v[0, :, 20, :3] = float("nan")  # visible from position 20 on
    v[0, :, 30, 3] = float("inf")
    v[0, :, 33, 4] = float("inf")
    v[0, :, 35, 4] = -float("inf")
    y, _ = run(backend, q, k, v, keep, True)
    assert not y[:, :, :20].isnan().any(), "NaN leaked to queries before the NaN key"
    assert y[:, :, 20:, :3].isnan().all(), "a visible NaN must reach every query that sees it"
    assert not y[:, :, :, 5:].isnan().any() and not y[..., 3].isnan().any(), "NaN in channels without one"
    assert y[:, :, 30:, 3].isposinf().all() and y[:, :, :30, 3].isfinite().all(), "+inf reaches exactly its viewers"
    assert y[:, :, 33:35, 4].isposinf().all() and y[:, :, 35:, 4].isnan().all(), "+inf, then +inf and -inf: NaN"
    assert y[:, :, :33, 4].isfinite().all(), "channel 4 before its infinities"
    vh = v.nan_to_num(0.0, 0.0, 0.0)
    vh[0, :, 5] = float("nan")  # only the padded key's NaN: every gradient stays finite
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, vh))
    yh, _ = run(backend, qg, kg, vg, keep, True)
    grads = torch.autograd.grad(yh, (qg, kg, vg), torch.randn_like(yh))
    assert yh.isfinite().all() and all(g.isfinite().all() for g in grads), "a padded key's NaN reached a gradient"
    qn = q.clone()
    qn[0, 1, 7, 2] = float("nan")  # a NaN digit: its own row only
    yn, _ = run(backend, qn, k, v.nan_to_num(0.0, 0.0, 0.0), keep, True)
    assert yn[0, 1, 7].isnan().all() and yn.isnan().sum() == D, "a NaN query digit must reach its row only"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 5), (1, 2, 0, 5), (1, 2, 3, 0)], ids=["B0", "Tq0", "Tk0"])
def test_empty(shape, backend):
    need(backend)
    B, H, Tq, Tk = shape
    q = torch.rand(B, H, Tq, 3, device=DEVICE, requires_grad=True)
    k = torch.rand(B, H, Tk, 3, device=DEVICE, requires_grad=True)
    v = torch.randn(B, H, Tk, 4, device=DEVICE, requires_grad=True)
    y, lse = run(backend, q, k, v, None, Tk >= Tq)
    assert y.shape == (B, H, Tq, 4) and lse.shape == (B, H, Tq) and not y.isnan().any()
    grads = torch.autograd.grad(y.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def _args(**over):
    a = dict(q_digits=torch.rand(1, 2, 5, 3, device=DEVICE), k_digits=torch.rand(1, 1, 5, 3, device=DEVICE),
             v=torch.randn(1, 1, 5, 4, device=DEVICE))
    a.update(over)
    return a


BAD = {
    "int digits": (dict(q_digits=digits(1, 2, 5, 3, 2)), {}, TypeError, "q_digits"),
    "K mismatch": (dict(k_digits=torch.rand(1, 1, 5, 4, device=DEVICE)), {}, ValueError, "k_digits"),
    "dtype mismatch": (dict(k_digits=torch.rand(1, 1, 5, 3, device=DEVICE, dtype=torch.float16)), {}, TypeError,
                       "k_digits"),
    "v shape": (dict(v=torch.randn(1, 1, 6, 4, device=DEVICE)), {}, ValueError, "v"),
    "heads": (dict(k_digits=torch.rand(1, 3, 5, 3, device=DEVICE), v=torch.randn(1, 3, 5, 4, device=DEVICE)), {},
              ValueError, "heads"),
    "alpha 0": ({}, dict(alpha=0.0), ValueError, "alpha"),
    "lcp_beta negative": ({}, dict(lcp_beta=-1.0), ValueError, "lcp_beta"),
    "lcp_beta inf": ({}, dict(lcp_beta=float("inf")), ValueError, "lcp_beta"),
    "mask shape": ({}, dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool, device=DEVICE)), ValueError,
                   "key_padding_mask"),
    "causal Tk < Tq": (dict(k_digits=torch.rand(1, 1, 3, 3, device=DEVICE), v=torch.randn(1, 1, 3, 4, device=DEVICE)),
                       {}, ValueError, "Tk >= Tq"),
    "causal not bool": ({}, dict(causal=1), TypeError, "causal"),
    "q_soft in soft mode": ({}, dict(q_soft=torch.rand(1, 2, 5, 3, device=DEVICE)), ValueError, "q_soft"),
    "backend": ({}, dict(backend="gpu"), ValueError, "backend"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name, backend):
    need(backend)
    over, kw, exc, word = BAD[name]
    kw = {"backend": backend, "mode": "soft", **kw}
    with pytest.raises(exc, match=word):
        geokern.ultrametric_attention(**_args(**over), **kw)


def test_bad_mode_and_cuda_on_cpu():
    with pytest.raises(ValueError, match="mode must be 'hard' or 'soft'"):
        geokern.ultrametric_attention(**_args(), mode="kernel")
    cpu = {n: t.cpu() for n, t in _args().items()}
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors, v is on cpu"):
        geokern.ultrametric_attention(**cpu, mode="soft", backend="cuda")


@pytest.mark.parametrize("backend", KERNELS)
def test_float64_refused(backend):
    need(backend)
    a64 = {n: t.double() for n, t in _args().items()}
    with pytest.raises(ValueError, match="float64"):
        geokern.ultrametric_attention(**a64, mode="soft", backend=backend)
    assert geokern.ultrametric_attention(**a64, mode="soft", backend="torch").dtype == torch.float64


@pytest.mark.parametrize("over", [dict(q_digits=torch.rand(1, 2, 5, 17), k_digits=torch.rand(1, 1, 5, 17)),
                                  dict(v=torch.randn(1, 1, 5, 257))], ids=["K17", "D257"])
def test_cuda_register_limits(over):
    """The CUDA kernels hold K <= 16 digits and D <= 256 channels per row in registers: more is
    refused by name, pointing to the Triton backend (D <= 512) and the torch one."""
    need("cuda")
    with pytest.raises(ValueError, match="CUDA backend holds K <= 16 digits and D <= 256.*backend='triton'"):
        geokern.ultrametric_attention(**_args(**{n: t.to(DEVICE) for n, t in over.items()}), mode="soft",
                                      backend="cuda")


def test_triton_head_dim_limit():
    """The Triton kernels' tiles fit shared memory to D = 512 (kernels.ultrametric.SOFT_MAX_D): past
    it backend='triton' is refused by name, and auto computes on the torch backend instead."""
    need("triton")
    args = _args(v=torch.randn(1, 1, 5, 513, device=DEVICE))
    with pytest.raises(ValueError, match="Triton backend's tiles hold D <= 512 channels.*got D = 513.*'torch'"):
        geokern.ultrametric_attention(**args, mode="soft", backend="triton")
    got = geokern.ultrametric_attention(**args, mode="soft", backend="auto")
    want = geokern.ultrametric_attention(**args, mode="soft", backend="torch")
    assert torch.equal(got, want), "auto past the Triton limit is not the torch backend's result"


@pytest.mark.parametrize("case", [CPU_CASES[1], CPU_CASES[2], CPU_CASES[4]] + GPU_CASES[:1], ids=_id)
def test_cuda_backward_is_deterministic(case):
    """Under torch.use_deterministic_algorithms(True) the CUDA backward runs (each of dq, dk, dv is
    written once by its owner: no atomics) and repeats bit for bit; the Triton backward (dq:
    float32 atomics) raises there, naming the deterministic backends."""
    need("cuda")
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        q, k, v, keep, causal = make(case, grad=True)
        dy = torch.randn(*q.shape[:3], v.shape[3], device=DEVICE)
        grads = [torch.autograd.grad(run("cuda", q, k, v, keep, causal)[0], (q, k, v), dy) for _ in range(2)]
        for name, a, b in zip(("dq", "dk", "dv"), *grads):
            assert torch.equal(a, b), f"{name}: two deterministic runs differ"
        if _backend.why_unavailable("triton", torch.device(DEVICE)) is None:
            y, _ = run("triton", q, k, v, keep, causal)
            with pytest.raises(RuntimeError, match="deterministic.*backend='torch' or 'cuda'"):
                torch.autograd.grad(y, (q, k, v), dy)
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def _op_samples(qualname):
    q, k, v, keep, causal = make(CPU_CASES[1])
    q, k, v, keep = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), keep.to(DEVICE)
    fwd = (q, k, v, keep, ALPHA, BETA, causal)
    if "backward" not in qualname:
        return [fwd, (q, k, v, None, 2.0, 32.0, False)]
    y, lse = _custom_ops.op(qualname.replace("_backward", ""))(*fwd)  # the forward of the same backend
    return [(torch.randn_like(y), q, k, v, keep, y, lse, ALPHA, BETA, causal)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("ultrametric_soft_attention_", _op_samples)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public op with its kernels needs CUDA tensors")
@pytest.mark.parametrize("backend", KERNELS)
def test_public_op_compiles_with_backward(backend):
    need(backend)
    q, k, v, keep, causal = make(CPU_CASES[0], grad=True)
    f = torch.compile(lambda a, b, c: run(backend, a, b, c, keep, causal)[0].square().sum(), fullgraph=True)
    got = torch.autograd.grad(f(q, k, v), (q, k, v))
    want = torch.autograd.grad(run(backend, q, k, v, keep, causal)[0].square().sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(f"{name} compiled", a, b.double())


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_inputs_and_double_backward(backend):
    """Views with other strides give the contiguous inputs' result and gradients; a double backward
    through the Triton and CUDA kernels is refused by name (the torch backend has it)."""
    need(backend)
    B, H, T, K, D = 1, 2, 21, 4, 8
    qb = torch.rand(B, T, H, K, device=DEVICE).requires_grad_()
    kb = torch.rand(B, T, H, K, device=DEVICE).requires_grad_()
    vb = torch.randn(B, T, H, 2 * D, device=DEVICE).requires_grad_()
    views = (qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)[..., ::2])
    assert not any(t.is_contiguous() for t in views)
    y, _ = run(backend, *views, None, True)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (qb, kb, vb), dy)
    xs = [t.detach().contiguous().requires_grad_() for t in views]
    y0, _ = run(backend, *xs, None, True)
    want = torch.autograd.grad(y0, xs, dy)
    assert torch.equal(y, y0), "y from strided views"
    for name, a, b, t in zip(("dq", "dk", "dv"), got, want, views):
        ga = a.transpose(1, 2)[..., ::2] if name == "dv" else a.transpose(1, 2)
        assert torch.equal(ga, b), f"{name} from strided views"
    assert not got[2].transpose(1, 2)[..., 1::2].any(), "dv: the skipped columns got a gradient"
    y, _ = run(backend, *xs, None, True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), xs[0], create_graph=True)
