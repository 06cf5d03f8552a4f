"""Hard-mode ultrametric attention: every backend against the reference, a float64 dense brute
force and a per-query trie walk; causal / non-causal / chunked prefill / decode, padding, GQA,
lse, the gradient to v, straight-through soft digits, custom-op checks. Edge cases and bad input:
test_ultrametric_edges.py (with the decode state); the nn module: test_ultrametric_nn.py."""

import pytest
import torch
from _custom_ops import custom_op_tests, op
from _helpers import DTYPES, dtype_id, need
from _tolerance import assert_close
from _ultrametric import brute, digits, trie_walk
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.reference import ultrametric as ref

BACKENDS = ["torch", "triton", "cuda"]
KERNELS = ["triton", "cuda"]  # the table kernels (the knobs, chunked prefill, hidden non-finite values)

# (B, H, Hkv, Tq, Tk, K, p, causal, digit kind, padded)
CPU_CASES = [
    (1, 2, 2, 37, 37, 4, 2, True, "random", False),
    (2, 4, 2, 29, 29, 3, 3, True, "random", True),
    (1, 3, 1, 1, 40, 5, 2, True, "random", True),
    (1, 2, 2, 13, 50, 2, 3, True, "random", True),
    (1, 2, 1, 23, 31, 4, 2, False, "random", True),
    (1, 1, 1, 1, 1, 1, 2, True, "random", False),
    (1, 2, 2, 19, 19, 1, 3, True, "random", False),
    (1, 2, 1, 21, 21, 6, 2, True, "equal", True),
    (1, 2, 2, 33, 33, 7, 2, True, "distinct", False),
    (1, 2, 1, 31, 23, 4, 2, False, "random", True),  # non-causal, more queries than keys
]
GPU_CASES = [(2, 8, 2, 1000, 1000, 8, 2, True, "random", True), (1, 4, 4, 300, 700, 6, 3, True, "random", False),
             (1, 4, 2, 513, 513, 8, 2, False, "random", True)] if HAS_CUDA else []
D_OF = {37: 16, 29: 5, 1: 7, 13: 64, 23: 17, 19: 33, 21: 8, 33: 16, 31: 12, 1000: 64, 300: 128, 513: 65}


def _id(c):
    if not isinstance(c, tuple):
        return dtype_id(c)
    B, H, Hkv, Tq, Tk, K, p, causal, kind, pad = c
    return f"B{B}-H{H}-KV{Hkv}-Tq{Tq}-Tk{Tk}-K{K}-p{p}-{'causal' if causal else 'full'}-{kind}{'-pad' if pad else ''}"


def make(case, dtype=torch.float32):
    B, H, Hkv, Tq, Tk, K, p, causal, kind, pad = case
    qd = digits(B, H, Tq, K, p, kind)
    kd = digits(B, Hkv, Tk, K, p, kind)
    v = torch.randn(B, Hkv, Tk, D_OF[Tq], device=DEVICE, dtype=torch.float64).to(dtype)
    keep = (torch.rand(B, Tk, device=DEVICE) > 0.3) if pad else None
    return qd, kd, v, keep, p, causal


def run(backend, qd, kd, v, keep, p, causal, alpha=1.7, **kw):
    return geokern.ultrametric_attention(qd, kd, v, alpha=alpha, p=p, causal=causal, key_padding_mask=keep,
                                         return_lse=True, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CPU_CASES + GPU_CASES, ids=_id)
def test_matches_brute_force(case, backend):
    need(backend)
    qd, kd, v, keep, p, causal = make(case)
    y, lse = run(backend, qd, kd, v, keep, p, causal)
    y64, lse64 = brute(qd, kd, v, 1.7, causal, keep)
    assert_close("y", y, y64.float(), y64.float())
    assert torch.equal(lse.isinf(), lse64.isinf()), "lse: -inf (no visible key) at other queries than the brute force"
    fin = lse64.isfinite()
    assert_close("lse", lse[fin], lse64[fin].float(), lse64[fin].float())


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", [CPU_CASES[1], CPU_CASES[4], CPU_CASES[7]], ids=_id)
def test_trie_walk_agrees(case, backend):
    """The spec's own formula, one query at a time, against the kernels (and so the rest)."""
    need(backend)
    qd, kd, v, keep, p, causal = make(case)
    y, _ = run(backend, qd, kd, v, keep, p, causal)
    assert_close("y vs trie walk", y, trie_walk(qd, kd, v, 1.7, causal, keep).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(dtype, backend):
    need(backend)
    if backend in KERNELS and dtype == torch.float64:
        pytest.skip("float64 runs on backend='torch' (test_ultrametric_edges checks the error)")
    qd, kd, v, keep, p, causal = make(CPU_CASES[1], dtype)
    y, lse = run(backend, qd, kd, v, keep, p, causal)
    assert y.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    y64, _ = brute(qd, kd, v, 1.7, causal, keep)
    same = ref.ultrametric_attention(qd, kd, v, 1.7, p=p, causal=causal, key_padding_mask=keep)
    assert_close("y", y, y64.to(dtype), same)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CPU_CASES[0], CPU_CASES[1], CPU_CASES[3], CPU_CASES[4], CPU_CASES[9]], ids=_id)
def test_gradient_to_v(case, backend):
    """(CPU_CASES[9]: the backward's sources are the queries; non-causal with Tq > Tk, the kernels
    once placed them at positions Tk - Tq + i as the causal scan does and dropped the first Tq - Tk.)"""
    need(backend)
    qd, kd, v, keep, p, causal = make(case)
    v = v.requires_grad_()
    y, _ = run(backend, qd, kd, v, keep, p, causal)
    dy = torch.randn_like(y)
    (dv,) = torch.autograd.grad(y, v, dy)
    v64 = v.detach().double().requires_grad_()
    (dv64,) = torch.autograd.grad(brute(qd, kd, v64, 1.7, causal, keep)[0], v64, dy.double())
    assert_close("dv", dv, dv64.float())
    if keep is not None:
        assert not dv[~keep[:, None, :, None].expand_as(dv)].any(), "dv: a padded key got a gradient"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("num_segments", [1, 2, 3, 7])
@pytest.mark.parametrize("chunk", [5, 16, 32])
def test_knobs_do_not_change_the_result(chunk, num_segments, backend):
    """Chunk size and segment count change only the summation order (and the scan's parallelism).
    chunk=5: no power of two and under tl.dot's least size, so the Triton kernels hold it in a
    padded block of 16 rows (chunk_block) with the rows past the chunk masked off."""
    need(backend)
    qd, kd, v, keep, p, causal = make(CPU_CASES[3])
    v = v.requires_grad_()
    y, lse = run(backend, qd, kd, v, keep, p, causal, chunk=chunk, num_segments=num_segments)
    (dv,) = torch.autograd.grad(y.square().sum(), v)
    y0, lse0 = run("torch", qd, kd, v, keep, p, causal)
    (dv0,) = torch.autograd.grad(y0.square().sum(), v)
    assert_close("y", y, y0.double())
    assert_close("dv", dv, dv0.double())


@pytest.mark.parametrize("backend", KERNELS)
def test_chunked_prefill_equals_prefill_rows(backend):
    """Queries Tk - Tq .. Tk - 1 of a chunked prefill are the last rows of the full prefill."""
    need(backend)
    qd, kd, v, _, p, _ = make(CPU_CASES[0])
    full, lfull = run(backend, qd, kd, v, None, p, True)
    part, lpart = run(backend, qd[:, :, -9:], kd, v, None, p, True)
    assert_close("y", part, full[:, :, -9:].double())
    assert_close("lse", lpart, lfull[:, :, -9:].double())


def test_straight_through_gradient_is_the_soft_kernels():
    """y keeps the hard value; the soft digits get the soft LCP kernel's gradient, v the hard one."""
    need("triton")
    B, H, T, K, D, p = 1, 2, 12, 3, 8, 2
    x = torch.randn(B, H, T, D, device=DEVICE)
    w = torch.randn(K, D, device=DEVICE, requires_grad=True)
    v = torch.randn(B, H, T, D, device=DEVICE, requires_grad=True)
    soft = geokern.ultrametric_soft_digits(x, w, p=p)
    hard = geokern.ultrametric_hard_digits(soft, p=p)
    y = geokern.ultrametric_attention(hard, hard, v, alpha=2.0, p=p, q_soft=soft, k_soft=soft, backend="triton")
    assert torch.equal(y, geokern.ultrametric_attention(hard, hard, v, alpha=2.0, p=p, backend="triton"))
    dy = torch.randn_like(y)
    dw, dv = torch.autograd.grad(y, (w, v), dy, retain_graph=True)
    ys = ref.soft_lcp_attention(soft, soft, v.detach(), 2.0, 32.0)
    (dw_soft,) = torch.autograd.grad(ys, w, dy)
    (dv_hard,) = torch.autograd.grad(ref.ultrametric_attention(hard, hard, v, 2.0, p=p), v, dy)
    assert dw.abs().sum() > 0
    assert_close("d weight (straight-through)", dw, dw_soft.double())
    assert_close("dv", dv, dv_hard.double())


@pytest.mark.parametrize("backend", KERNELS)
def test_nan_in_hidden_values_stays_hidden(backend):
    """A padded key or a later key (causal) with NaN / inf values reaches no query; a visible NaN
    reaches exactly the queries that see it."""
    need(backend)
    B, H, T, K, D, p = 1, 2, 37, 3, 16, 2
    qd, kd = digits(B, H, T, K, p), digits(B, H, T, K, p)
    v = torch.randn(B, H, T, D, device=DEVICE)
    keep = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    keep[0, 5] = False
    v[0, :, 5] = float("nan")  # padded
    v[0, :, 20, :3] = float("nan")  # visible from position 20 on
    v[0, :, 30, 3] = float("inf")
    v = v.requires_grad_()
    y, _ = run(backend, qd, kd, v, keep, p, True)
    assert not y[:, :, :20].isnan().any(), "NaN leaked to queries before the NaN key"
    assert y[:, :, 20:, :3].isnan().all(), "a visible NaN must reach every query that sees it"
    assert not y[:, :, :, 3:].isnan().any(), "NaN in channels without one"
    assert y[:, :, 30:, 3].isposinf().all() and y[:, :, :30, 3].isfinite().all(), "+inf reaches exactly its viewers"
    (dv,) = torch.autograd.grad(y[:, :, :20].sum(), v)
    assert dv.isfinite().all() and not dv[0, :, 5].any()


def _op_samples(qualname):
    """Both ops of a backend (the CUDA ops, or their mirrors, also on CPU tensors: the reference);
    the backward's lse from its own backend's forward."""
    qd, kd, v, keep, p, causal = make(CPU_CASES[1])
    fwd = (qd, kd, v, keep, 1.7, p, causal, 0, 0)
    if "backward" not in qualname:
        return [fwd, (qd, kd, v, None, 2.0, p, False, 16, 2), (qd, kd, v, keep, 0.5, p, causal, 4, 3)]
    _, lse = op(qualname.replace("_backward", ""))(*fwd)
    grad = torch.randn(qd.shape[:3] + (v.shape[3],), device=DEVICE)
    return [(grad, qd, kd, lse, keep, 1.7, p, causal, 0, 0), (grad, qd, kd, lse, None, 1.7, p, False, 16, 2)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("ultrametric_attention_", _op_samples)


def test_input_checks_trace_under_compile():
    """The public op's input checks (what runs before its kernels, the digit range check on) trace
    whole under torch.compile(fullgraph=True) on any machine. On the H100 the public op's compile
    broke on torch.cuda.is_current_stream_capturing, which those checks called (dynamo cannot put a
    bool-returning torch.* call in a graph), and the digits' host range check (int(d.min())) would
    break it next (a data-dependent guard): both are host reads, skipped while compiling
    (_checks.host_reads_allowed). The whole op compiles in test_public_op_compiles_with_backward
    (CUDA only)."""
    from geokern.ops.ultrametric import _check

    qd, kd, v, keep, p, causal = make(CPU_CASES[1])
    want = _check(qd, kd, v, 1.7, p, causal, keep, 0, 0, True)
    torch._dynamo.reset()
    got = torch.compile(lambda a: (_check(qd, kd, a, 1.7, p, causal, keep, 0, 0, True), a * 2)[0],
                        fullgraph=True, backend="eager")(v)
    assert got == want
    with pytest.raises(ValueError, match="q_digits must hold digits in"):  # eager: still checked
        _check(qd + p, kd, v, 1.7, p, causal, keep, 0, 0, True)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public op with its kernels needs CUDA tensors")
@pytest.mark.parametrize("backend", KERNELS)
def test_public_op_compiles_with_backward(backend):
    need(backend)
    qd, kd, v, keep, p, causal = make(CPU_CASES[0])
    v = v.requires_grad_()
    f = torch.compile(lambda a: run(backend, qd, kd, a, keep, p, causal)[0].square().sum(), fullgraph=True)
    (got,) = torch.autograd.grad(f(v), v)
    (want,) = torch.autograd.grad(run(backend, qd, kd, v, keep, p, causal)[0].square().sum(), v)
    assert_close("dv compiled", got, want.double())
