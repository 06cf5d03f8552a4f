"""Ultrametric attention at the edges: empty inputs, bad input (errors name the argument), the
Triton and CUDA backends' limits, the CUDA backend's refusals; and the constant-cost decode state against
full recomputation."""

import math

import pytest
import torch
from _helpers import capturable, gpu, need
from _tolerance import rel_err
from _ultrametric import brute, digits
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern import _backend
from geokern.reference import ultrametric as ref

BACKENDS = ["torch", "triton", "cuda"]
DECODE_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 5), (1, 2, 0, 5), (1, 2, 3, 0)], ids=["B0", "Tq0", "Tk0"])
def test_empty(shape, backend):
    need(backend)
    B, H, Tq, Tk = shape
    qd, kd = digits(B, H, Tq, 3, 2), digits(B, H, Tk, 3, 2)
    v = torch.randn(B, H, Tk, 4, device=DEVICE, requires_grad=True)
    y, lse = geokern.ultrametric_attention(qd, kd, v, causal=Tk >= Tq, return_lse=True, backend=backend)
    assert y.shape == (B, H, Tq, 4) and lse.shape == (B, H, Tq)
    assert not y.isnan().any() and (lse == float("-inf")).all() == (Tk == 0 or y.numel() == 0 or lse.numel() == 0)
    (dv,) = torch.autograd.grad(y.sum(), v, allow_unused=True, materialize_grads=True)
    assert dv.shape == v.shape



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_head_dim(causal, backend):
    """D = 0 (v.shape[-1] == 0): y [B, H, Tq, 0], the lse of the weights all the same (it does not
    read v), dv of v's shape; hard and the reference decode state (the tables once failed to
    reshape 0 elements into [-1, 0])."""
    need(backend)
    qd, kd = digits(1, 2, 5, 3, 2), digits(1, 1, 5, 3, 2)
    v = torch.randn(1, 1, 5, 0, device=DEVICE, requires_grad=True)
    y, lse = geokern.ultrametric_attention(qd, kd, v, causal=causal, return_lse=True, backend=backend)
    _, lwant = brute(qd, kd, torch.zeros(1, 1, 5, 1, device=DEVICE), 2.0, causal)
    assert y.shape == (1, 2, 5, 0), "y"
    assert rel_err(lse, lwant) < 1e-6, "lse"
    (dv,) = torch.autograd.grad(y.sum(), v, allow_unused=True, materialize_grads=True)
    assert dv.shape == v.shape, "dv"
    state = ref.UltrametricDecodeState(1, 1, 0, 3, device=DEVICE)
    state.append(kd, v.detach())
    ys, ls = state.query(qd, return_lse=True)
    assert ys.shape == (1, 2, 5, 0), "decode y"
    assert rel_err(ls, brute(qd, kd, torch.zeros(1, 1, 5, 1, device=DEVICE), 2.0, False)[1]) < 1e-6, "decode lse"

def _args(**over):
    a = dict(q_digits=digits(1, 2, 5, 3, 2), k_digits=digits(1, 1, 5, 3, 2), v=torch.randn(1, 1, 5, 4, device=DEVICE))
    a.update(over)
    return a


BAD = {
    "float digits": (dict(q_digits=torch.zeros(1, 2, 5, 3, device=DEVICE)), {}, TypeError, "q_digits"),
    "digit out of range": (dict(k_digits=torch.full((1, 1, 5, 3), 2, device=DEVICE)), {}, ValueError, "k_digits"),
    "negative digit": (dict(q_digits=torch.full((1, 2, 5, 3), -1, device=DEVICE)), {}, ValueError, "q_digits"),
    "K mismatch": (dict(k_digits=digits(1, 1, 5, 4, 2)), {}, ValueError, "k_digits"),
    "v shape": (dict(v=torch.randn(1, 1, 6, 4, device=DEVICE)), {}, ValueError, "v"),
    "heads": (dict(k_digits=digits(1, 3, 5, 3, 2), v=torch.randn(1, 3, 5, 4, device=DEVICE)), {}, ValueError, "heads"),
    "3-D v": (dict(v=torch.randn(1, 5, 4, device=DEVICE)), {}, ValueError, "v"),
    "int v": (dict(v=torch.ones(1, 1, 5, 4, dtype=torch.int32, device=DEVICE)), {}, TypeError, "v"),
    "alpha 0": ({}, dict(alpha=0.0), ValueError, "alpha"),
    "alpha nan": ({}, dict(alpha=float("nan")), ValueError, "alpha"),
    "p 1": ({}, dict(p=1), ValueError, "p"),
    "p float": ({}, dict(p=2.0), TypeError, "p"),
    "mask shape": ({}, dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool, device=DEVICE)), ValueError,
                   "key_padding_mask"),
    "causal Tk < Tq": (dict(k_digits=digits(1, 1, 3, 3, 2), v=torch.randn(1, 1, 3, 4, device=DEVICE)), {},
                       ValueError, "Tk >= Tq"),
    "chunk": ({}, dict(chunk=-1), ValueError, "chunk"),
    "soft alone": ({}, dict(q_soft=torch.rand(1, 2, 5, 3, device=DEVICE)), ValueError, "k_soft"),
    "backend": ({}, dict(backend="gpu"), ValueError, "backend"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name, backend):
    need(backend)
    over, kw, exc, word = BAD[name]
    kw = {"backend": backend, **kw}
    with pytest.raises(exc, match=word):
        geokern.ultrametric_attention(**_args(**over), **kw)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_check_digits_false_skips_only_the_range_check(backend):
    """check_digits=False: no host read of the digits' range. An out-of-range digit is then not
    refused; the Triton and CUDA kernels keep every table access in bounds (the result is
    unspecified, but finite); the type and shape checks stay, and the torch backend (the reference)
    still checks."""
    need(backend)
    a = _args(k_digits=torch.tensor([0, 1, 2, 1, 0], device=DEVICE).view(1, 1, 5, 1).expand(1, 1, 5, 3).contiguous())
    y = geokern.ultrametric_attention(**a, check_digits=False, backend=backend)
    assert y.shape == (1, 2, 5, 4) and y.isfinite().all()
    with pytest.raises(ValueError, match="k_digits"):
        geokern.ultrametric_attention(**a, check_digits=False, backend="torch")
    with pytest.raises(TypeError, match="q_digits"):
        geokern.ultrametric_attention(**_args(q_digits=torch.zeros(1, 2, 5, 3, device=DEVICE)), check_digits=False,
                                      backend=backend)


def test_cuda_backend_refusals():
    """The CUDA backend, hard and soft mode, refuses CPU tensors naming v and the way out (runs on
    every machine)."""
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors, v is on cpu.*backend='torch'"):
        geokern.ultrametric_attention(torch.rand(1, 2, 5, 3), torch.rand(1, 1, 5, 3), torch.randn(1, 1, 5, 4),
                                      mode="soft", backend="cuda")
    cpu = {k: t.cpu() for k, t in _args().items()}
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors, v is on cpu.*backend='torch'"):
        geokern.ultrametric_attention(**cpu, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors, v is on cpu"):
        geokern.ultrametric_attention(**cpu, backend="cuda", q_soft=cpu["q_digits"].float(),
                                      k_soft=cpu["k_digits"].float())


def test_auto_does_not_pick_cuda():
    """auto keeps Triton for CUDA tensors (the CUDA kernels are not yet measured), the reference
    for CPU tensors."""
    from geokern.ops import ultrametric as um
    assert um._backend_for("auto", DEVICE) == ("triton" if DEVICE.type == "cuda" else "torch")


def test_cuda_ops_check_their_arguments():
    """The CUDA ops check what reaches them past the op layer (devices, layouts, dtypes, the
    backward's lse), naming the op and the argument."""
    need("cuda")
    qd, kd, v = _args().values()
    fwd = torch.ops.geokern.ultrametric_attention_cuda.default
    bwd = torch.ops.geokern.ultrametric_attention_backward_cuda.default
    with pytest.raises(RuntimeError, match="ultrametric_attention_cuda: q_digits is on cpu"):
        fwd(qd.cpu(), kd, v, None, 2.0, 2, True, 0, 0)
    with pytest.raises(RuntimeError, match="ultrametric_attention_cuda: keep must be contiguous bool"):
        fwd(qd, kd, v, torch.ones(1, 4, dtype=torch.bool, device=DEVICE), 2.0, 2, True, 0, 0)
    with pytest.raises(RuntimeError, match="ultrametric_attention_cuda: dtype must be float32, float16 or bfloat16"):
        fwd(qd, kd, v.double(), None, 2.0, 2, True, 0, 0)
    with pytest.raises(RuntimeError, match="ultrametric_attention_cuda: k_digits must have an integer dtype"):
        fwd(qd, kd.float(), v, None, 2.0, 2, True, 0, 0)
    grad = torch.randn(1, 2, 5, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="ultrametric_attention_backward_cuda: lse must be contiguous float32"):
        bwd(grad, qd, kd, torch.zeros(1, 2, 5, dtype=torch.float64, device=DEVICE), None, 2.0, 2, True, 0, 0)
    with pytest.raises(RuntimeError, match="ultrametric_attention_backward_cuda: grad must be contiguous"):
        bwd(grad[:, :1], qd, kd, torch.zeros(1, 2, 5, device=DEVICE), None, 2.0, 2, True, 0, 0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backend_limits(backend):
    need(backend)
    name = "Triton" if backend == "triton" else "CUDA"
    with pytest.raises(ValueError, match=f"the {name} backend keeps dense bucket tables.*2\\*\\*16"):
        geokern.ultrametric_attention(digits(1, 1, 3, 16, 2), digits(1, 1, 3, 16, 2), torch.randn(1, 1, 3, 4,
                                      device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=f"the {name} backend takes .*float64"):
        geokern.ultrametric_attention(**_args(v=torch.randn(1, 1, 5, 4, device=DEVICE, dtype=torch.float64)),
                                      backend=backend)
    # the reference takes what the Triton backend refuses
    y = geokern.ultrametric_attention(digits(1, 1, 3, 16, 2), digits(1, 1, 3, 16, 2), torch.randn(1, 1, 3, 4,
                                      device=DEVICE), backend="torch")
    assert y.isfinite().all()


def test_codes_past_63_bits_are_refused():
    with pytest.raises(ValueError, match="63 bits"):
        geokern.ultrametric_attention(digits(1, 1, 2, 64, 2), digits(1, 1, 2, 64, 2), torch.randn(1, 1, 2, 4,
                                      device=DEVICE), backend="torch")


# ---- decode --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_equals_full_recomputation(backend):
    """Prefill 5 tokens, then one token at a time (with padding): each step's output equals the
    causal op's row over everything so far; after 2000 steps too (float32, relative 1e-5). The
    Triton kernels under the CPU interpreter take 150 steps (CI time), 2000 on a GPU."""
    need(backend)
    T = 150 if backend == "triton" and not HAS_CUDA else 2000
    B, H, Hkv, K, D, p = 2, 4, 2, 4, 8, 3
    qd, kd = digits(B, H, T, K, p), digits(B, Hkv, T, K, p)
    v = torch.randn(B, Hkv, T, D, device=DEVICE)
    keep = torch.rand(B, T, device=DEVICE) > 0.1
    cache = geokern.UltrametricCache(B, Hkv, D, K, p=p, alpha=1.3, device=DEVICE, backend=backend)
    cache.append(kd[:, :, :5], v[:, :, :5], keep[:, :5])
    out = (torch.empty(B, H, 1, D, device=DEVICE), torch.empty(B, H, 1, device=DEVICE))
    ys, lses = [], []
    for t in range(5, T):
        y, lse = geokern.ultrametric_decode_step_(cache, qd[:, :, t:t + 1], kd[:, :, t:t + 1], v[:, :, t:t + 1],
                                                  key_padding_mask=keep[:, t:t + 1], out=out, return_lse=True)
        assert y.data_ptr() == out[0].data_ptr()
        ys.append(y.clone())
        lses.append(lse.clone())
    want, lwant = ref.ultrametric_attention(qd, kd, v.double(), 1.3, p=p, key_padding_mask=keep, return_lse=True)
    got, lgot = torch.cat(ys, 2), torch.cat(lses, 2)
    assert rel_err(got[:, :, -1], want[:, :, -1]) < 1e-5, "y at the last step"
    assert rel_err(got, want[:, :, 5:]) < 1e-5, "y over all steps"
    assert rel_err(lgot, lwant[:, :, 5:]) < 1e-5, "lse"
    assert cache.length == T


def test_decode_cache_errors():
    with pytest.raises(ValueError, match="2\\*\\*16"):
        geokern.UltrametricCache(1, 1, 4, 16, device=DEVICE)
    cache = geokern.UltrametricCache(1, 1, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="k_digits"):
        geokern.ultrametric_decode_step_(cache, digits(1, 1, 1, 3, 2), digits(1, 1, 2, 3, 2),
                                         torch.randn(1, 1, 2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="v must"):
        cache.append(digits(1, 1, 1, 3, 2), torch.randn(1, 1, 1, 5, device=DEVICE))
    # an out-of-range digit: refused on request (the host read); by default NaN, tested below
    with pytest.raises(ValueError, match="k_digits must hold digits in \\[0, p - 1\\] = \\[0, 1\\]"):
        cache.append(torch.full((1, 1, 1, 3), 2, device=DEVICE), torch.randn(1, 1, 1, 4, device=DEVICE),
                     check_digits=True)
    with pytest.raises(ValueError, match="q_digits must hold digits in \\[0, p - 1\\]"):
        geokern.ultrametric_decode_step_(cache, torch.full((1, 1, 1, 3), -1, device=DEVICE),
                                         digits(1, 1, 1, 3, 2), torch.randn(1, 1, 1, 4, device=DEVICE),
                                         check_digits=True)
    with pytest.raises(TypeError, match="check_digits must be a bool"):
        cache.query(digits(1, 1, 1, 3, 2), check_digits=1)
    assert cache.length == 0 and cache.cnt.sum() == 0, "a refused step appended its key"


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("alpha", [2.0, 0.5], ids=["prefix", "siblings"])
def test_decode_bad_digits_are_nan(backend, alpha):
    """Unchecked digits outside [0, p - 1] (the default: no host read) are never a silently wrong
    answer: a bad query row gets y and lse NaN, the other rows their right value; a kept bad key
    turns every later query of its group NaN (both read paths: alpha > 1 reads the prefix buckets,
    alpha <= 1 the disjoint siblings); a padded bad key adds nothing; a uint8 digit >= p counts."""
    need(backend)
    B, H, Hkv, K, D, p = 2, 2, 1, 3, 4, 3
    kd, v = digits(B, Hkv, 6, K, p), torch.randn(B, Hkv, 6, D, device=DEVICE)
    cache = geokern.UltrametricCache(B, Hkv, D, K, p=p, alpha=alpha, device=DEVICE, backend=backend)
    cache.append(kd, v)
    qd = digits(B, H, 3, K, p)
    qd[0, 1, 1, 2] = p
    qd[1, 0, 2, 0] = -1
    y, lse = cache.query(qd, return_lse=True)
    bad = torch.zeros(B, H, 3, dtype=torch.bool, device=DEVICE)
    bad[0, 1, 1] = bad[1, 0, 2] = True
    assert y[bad].isnan().all() and lse[bad].isnan().all(), "a bad query row is not NaN"
    want, lwant = brute(qd.clamp(0, p - 1), kd, v, alpha, causal=False)
    assert rel_err(y[~bad], want[~bad]) < 1e-5 and rel_err(lse[~bad], lwant[~bad]) < 1e-5, "the good rows"
    cache.append(digits(B, Hkv, 1, K, p).to(torch.uint8).fill_(p), v[:, :, :1],
                 torch.tensor([[False], [True]], device=DEVICE))  # batch 0 padded, batch 1 kept
    y = cache.query(digits(B, H, 3, K, p))
    assert y[1].isnan().all(), "a kept bad key did not poison its group"
    assert y[0].isfinite().all(), "a padded bad key (or another group's) entered"
    out = (torch.empty(B, H, 1, D, device=DEVICE), torch.empty(B, H, 1, device=DEVICE))
    geokern.ultrametric_decode_step_(cache, digits(B, H, 1, K, p), digits(B, Hkv, 1, K, p), v[:, :, :1], out=out,
                                     return_lse=True)
    assert out[0][1].isnan().all() and out[0][0].isfinite().all() and out[1].isfinite().all(), "the step after"


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_step_reads_nothing_back(backend):
    """Issue #16: a decode step launches no digit-range reduction (min / max / aminmax) and reads
    no scalar back (item: a device-to-host copy and a stream sync per call on a GPU, 226 us of an
    8.8 us CUDA step on the H100), nor fills a buffer. Recorded by the profiler (no dispatch mode,
    which would route the Triton op through the dispatcher) after a warm-up step."""
    need(backend)
    B, H, K, D = 1, 2, 8, 16
    cache = geokern.UltrametricCache(B, H, D, K, device=DEVICE, backend=backend)
    qd, kd, v = digits(B, H, 1, K, 2), digits(B, H, 1, K, 2), torch.randn(B, H, 1, D, device=DEVICE)
    out = (torch.empty(B, H, 1, D, device=DEVICE), torch.empty(B, H, 1, device=DEVICE))
    geokern.ultrametric_decode_step_(cache, qd, kd, v, out=out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            geokern.ultrametric_decode_step_(cache, qd, kd, v, out=out)
    ops = {e.name for e in prof.events()}
    # not aten::fill_: the Triton interpreter's copies of the arguments (new_empty) fill under the
    # test suite's deterministic mode; a fill of the op's own shows as ones / zeros / zero_
    banned = {"aten::item", "aten::_local_scalar_dense", "aten::min", "aten::max", "aten::aminmax", "aten::amin",
              "aten::amax", "aten::zero_", "aten::zeros", "aten::ones", "aten::full"}
    if backend == "torch":  # its gathers and index_add_ build index and scratch tensors, but read nothing back
        banned -= {"aten::zero_", "aten::zeros", "aten::ones", "aten::full"}
    assert not ops & banned, sorted(ops & banned)
    assert ops, "the profiler saw no op"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        geokern.ultrametric_decode_step_(cache, qd, kd, v, out=out, check_digits=True)
    # the check reduces the digits (aminmax) and reads the bounds back (tolist: no aten op on CPU)
    assert {e.name for e in prof.events()} & {"aten::_local_scalar_dense", "aten::aminmax"}, \
        "check_digits=True read nothing: the probe is blind"


@gpu
@capturable
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_step_in_a_cuda_graph(backend):
    """The step replays from a CUDA graph: in place, no host sync, the same result as eager."""
    need(backend)
    B, H, K, D = 4, 8, 8, 64
    cache = geokern.UltrametricCache(B, H, D, K, device="cuda", backend=backend)
    eager = geokern.UltrametricCache(B, H, D, K, device="cuda", backend=backend)
    qd, kd, v = digits(B, H, 1, K, 2), digits(B, H, 1, K, 2), torch.randn(B, H, 1, D, device="cuda")
    out = (torch.empty(B, H, 1, D, device="cuda"), torch.empty(B, H, 1, device="cuda"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        geokern.ultrametric_decode_step_(cache, qd, kd, v, out=out)  # compiles the kernels
    torch.cuda.current_stream().wait_stream(s)
    cache.reset()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        geokern.ultrametric_decode_step_(cache, qd, kd, v, out=out)
    for _ in range(3):
        qd.copy_(digits(B, H, 1, K, 2))
        kd.copy_(digits(B, H, 1, K, 2))
        v.normal_()
        g.replay()
        want = geokern.ultrametric_decode_step_(eager, qd, kd, v)
        torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-6)


# ---- alpha < 1: the weights are no difference of large level sums ---------------------


def _deep_keys(Tk=40, K=8, p=2):
    """One query row of zeros; most keys equal to it in every digit (lcp K), a few diverging at
    each level: with alpha < 1 the answer is tiny next to the level sums of a regrouped formula."""
    qd = torch.zeros(1, 2, 3, K, dtype=torch.int64, device=DEVICE)
    kd = torch.zeros(1, 1, Tk, K, dtype=torch.int64, device=DEVICE)
    for j in range(K):  # key 3 j + 1 first differs at digit j
        kd[0, 0, 3 * j + 1, j] = p - 1
    return qd, kd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("p", [2, 3])
def test_alpha_below_one_is_exact(p, alpha, causal, backend):
    """alpha <= 1 against the float64 brute force: y, lse and dv to float32 rounding (the bucket
    tables once gave y = -9.48 and lse NaN for y = 1e-7, lse = 8 log 0.01: w_l = alpha^l - alpha^(l-1)
    cancelled). chunk=4 sends most keys through the tables, not the dense in-chunk block."""
    need(backend)
    qd, kd = _deep_keys(p=p)
    v = (torch.rand(1, 1, kd.shape[2], 3, device=DEVICE) + 0.5).requires_grad_()
    y, lse = geokern.ultrametric_attention(qd, kd, v, alpha=alpha, p=p, causal=causal, chunk=4, return_lse=True,
                                           backend=backend)
    v64 = v.detach().double().requires_grad_()
    want, lwant = brute(qd, kd, v64, alpha, causal)
    g = torch.randn_like(want)
    (dv,) = torch.autograd.grad(y, v, g.float())
    (dv64,) = torch.autograd.grad(want, v64, g)
    assert rel_err(y, want) < 1e-5, "y"
    assert rel_err(lse, lwant) < 1e-5, "lse"
    assert rel_err(dv, dv64) < 1e-5, "dv"


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_below_one_one_key(backend):
    """The review's case: one key equal to the query, alpha = 0.01, K = 8: the weight 1e-16 is
    below the 1e-9 clamp, so y = 1e-16 / 1e-9 = 1e-7 (not v), lse = log(1e-16)."""
    need(backend)
    d = torch.zeros(1, 1, 1, 8, dtype=torch.int64, device=DEVICE)
    for dt in [torch.float32] + ([torch.float64] if backend == "torch" else []):
        y, lse = geokern.ultrametric_attention(d, d, torch.ones(1, 1, 1, 1, dtype=dt, device=DEVICE), alpha=0.01,
                                               causal=False, return_lse=True, backend=backend)
        assert abs(y.item() / 1e-7 - 1) < 1e-5, f"y {dt}"
        assert abs(lse.item() / (8 * math.log(0.01)) - 1) < 1e-6, f"lse {dt}"


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_alpha_below_one_decode(backend):
    """The decode tables read the same disjoint buckets: UltrametricCache and the reference's
    decode state against the brute force at alpha = 0.01."""
    need(backend)
    qd, kd = _deep_keys()
    v = torch.rand(1, 1, kd.shape[2], 3, device=DEVICE) + 0.5
    want, lwant = brute(qd, kd, v, 0.01, causal=False)
    cache = geokern.UltrametricCache(1, 1, 3, 8, alpha=0.01, device=DEVICE, backend=backend)
    cache.append(kd, v)
    y, lse = cache.query(qd, return_lse=True)
    state = ref.UltrametricDecodeState(1, 1, 3, 8, alpha=0.01, device=DEVICE)
    state.append(kd, v)
    ys, lses = state.query(qd, return_lse=True)
    for name, got, w in (("cache y", y, want), ("cache lse", lse, lwant), ("state y", ys, want),
                         ("state lse", lses, lwant)):
        assert rel_err(got, w) < 1e-5, name


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test (warn_only off), restored after."""
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=warn)


def test_deterministic_mode_triton_raises(deterministic):
    """Triton's float32 atomics (hard-mode tables, the soft backward's dq, the decode cache's
    append; the CUDA hard mode's tables too) raise as torch's nondeterministic ops do, naming the
    op and backend='torch'; the
    torch backend and the atomic-free Triton soft forward and cache query run."""
    need("triton")
    qd, kd, v = digits(1, 2, 6, 3, 2), digits(1, 1, 6, 3, 2), torch.randn(1, 1, 6, 4, device=DEVICE)
    match = "ultrametric_attention.*backend='triton'.*deterministic.*backend='torch' is deterministic"
    with pytest.raises(RuntimeError, match=match):
        geokern.ultrametric_attention(qd, kd, v, backend="triton")
    geokern.ultrametric_attention(qd, kd, v, backend="torch")
    if _backend.why_unavailable("cuda", DEVICE) is None:
        with pytest.raises(RuntimeError, match="ultrametric_attention.*backend='cuda'.*backend='torch'"):
            geokern.ultrametric_attention(qd, kd, v, backend="cuda")
    qs, ks = (d.float().requires_grad_() for d in (qd, kd))
    y = geokern.ultrametric_attention(qs, ks, v, mode="soft", backend="triton")
    with pytest.raises(RuntimeError, match="mode='soft', backend='triton'.*backend='torch'"):
        y.sum().backward()
    geokern.ultrametric_attention(qs, ks, v, mode="soft", backend="torch").sum().backward()
    cache = geokern.UltrametricCache(1, 1, 4, 3, device=DEVICE, backend="triton")
    with pytest.raises(RuntimeError, match="UltrametricCache.append \\(backend='triton'\\)"):
        cache.append(kd, v)
    cache.query(qd)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="ultrametric_attention"):
        geokern.ultrametric_attention(qd, kd, v, backend="triton")
