"""Retrieval on the GPU only (issue 14, items 1 and 13): tensors past 2^31 elements (marked huge,
each in its own process), non-default streams, CUDA graph capture, torch.compile(dynamic=True),
autocast and deterministic algorithms, for every op and kernel backend."""


import pytest
import torch
from _helpers import capturable, need, run_isolated
from conftest import DEVICE, HAS_CUDA

import geokern
import geokern.metric as gm

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
KERNELS = ["triton", "cuda"]

# ---- past 2^31 elements ---------------------------------------------------------------

_PRE = """
import torch, geokern, geokern.metric as gm
from geokern.reference import retrieval as ref
N = 2**25 + 7
lam = gm.diag(torch.ones(64, device="cuda"))
g = torch.Generator(device="cuda").manual_seed(0)
"""


@pytest.mark.huge
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("form", ["2d", "3d"])
def test_attention_output_past_2_31_elements(backend, form):
    """2^25 + 7 query rows of 64 features (one row broadcast) against 32 shared keys, bf16:
    the output has 2^31 + 448 elements."""
    run_isolated(_PRE + f"""
row = torch.randn(1, 64, device="cuda", generator=g).bfloat16()
k = torch.randn(32, 64, device="cuda", generator=g).bfloat16()
v = torch.randn(32, 64, device="cuda", generator=g).bfloat16()
q = row.expand(N, 64) if "{form}" == "2d" else row.expand(N, 64)[None]
out, lse = geokern.retrieval_attention(q, k, v, 1.0, lam, 0.1, return_lse=True, backend="{backend}")
torch.cuda.synchronize()
want, wl = ref.retrieval_attention(row, k, v, 1.0, lam, 0.1, return_lse=True)
out, lse = out.reshape(N, 64), lse.reshape(N)
for i in (0, N // 2, N - 1):
    torch.testing.assert_close(out[i].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse[i], wl[0].float(), rtol=1e-3, atol=1e-3)
assert torch.isfinite(out[-4096:]).all()
""")


@pytest.mark.huge
@pytest.mark.parametrize("backend", KERNELS)
def test_attention_keys_past_2_31_elements(backend):
    """2^25 + 7 keys of 64 features (2^31 + 448 elements): the last key equals the query, so a
    sharp softmax returns its value (an offset that wraps at 2^31 reads another)."""
    run_isolated(_PRE + f"""
k = torch.randn(N, 64, device="cuda", generator=g).bfloat16()
v = torch.zeros(N, 4, device="cuda").bfloat16()
v[-1] = 1
q = k[-1:].clone()
out = geokern.retrieval_attention(q, k, v, 1.0, lam, 50.0, backend="{backend}")
torch.cuda.synchronize()
torch.testing.assert_close(out.float(), torch.ones(1, 4, device="cuda"), rtol=1e-2, atol=1e-2)
""")


@pytest.mark.huge
@pytest.mark.parametrize("backend", KERNELS)
def test_cost_against_keys_past_2_31_elements(backend):
    """retrieval_cost of one query against 2^25 + 7 keys of 64 features (Triton's grid was
    "invalid argument": 2^20 key tiles on grid axis y)."""
    run_isolated(_PRE + f"""
k = torch.randn(N, 64, device="cuda", generator=g).bfloat16()
q = torch.randn(1, 64, device="cuda", generator=g).bfloat16()
cost = geokern.retrieval_cost(q, k, 1.0, lam, backend="{backend}")
torch.cuda.synchronize()
idx = torch.tensor([0, 1, N // 2, N - 2, N - 1], device="cuda")
want = ((k[idx].float() - q.float()) ** 2).sum(-1).add(1e-8).sqrt()
torch.testing.assert_close(cost[0, idx], want, rtol=1e-4, atol=1e-4)
""")


# ---- streams, graphs, compile, autocast, determinism ------------------------------------


def _inputs(dtype=torch.float32, grad=False):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(*s, device=DEVICE, generator=g).to(dtype) for s in ((2, 37, 16), (2, 53, 16), (2, 53, 24)))
    lam = torch.rand(16, device=DEVICE, generator=g) + 0.5
    if grad:
        q, k, v, lam = (t.requires_grad_() for t in (q, k, v, lam))
    return q, k, v, lam


def _ops(backend):
    """name -> f(q, k, v, lam): every retrieval op (the attention, with a mask and with a bank, and the cost)."""
    mask = torch.rand(2, 37, 53, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1)) > 0.3
    return {
        "attention": lambda q, k, v, lam: geokern.retrieval_attention(q, k, v, 0.8, gm.diag(lam), 0.9,
                                                                      backend=backend),
        "attention-mask": lambda q, k, v, lam: geokern.retrieval_attention(q, k, v, 0.8, gm.diag(lam), 0.9,
                                                                           mask=mask, backend=backend),
        "attention-bank": lambda q, k, v, lam: geokern.retrieval_attention(q, k, v, 0.8, gm.diag(lam), 0.9,
                                                                           bank=(k[0, :9], v[0, :9]),
                                                                           backend=backend),
        "cost": lambda q, k, v, lam: geokern.retrieval_cost(q, k, 0.8, gm.diag(lam), backend=backend),
    }


OPS = ["attention", "attention-mask", "attention-bank", "cost"]


def _grads(out, inputs):
    """d sum(out^2) / d inputs, zeros for an input the op does not read (the cost has no values)."""
    gs = torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_non_default_stream(backend, op):
    need(backend)
    f = _ops(backend)[op]
    q, k, v, lam = _inputs(grad=True)
    want = f(q, k, v, lam)
    want_g = _grads(want, (q, k, v, lam))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = f(q, k, v, lam)
        got_g = _grads(got, (q, k, v, lam))
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@capturable
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_capture(backend, op):
    need(backend)
    f = _ops(backend)[op]
    static = [t.clone() for t in _inputs()]
    f(*static)  # warm-up (autotuning, compilation) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(*static)
    fresh = _inputs()
    for s, t in zip(static, fresh):
        s.copy_(t * 1.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, f(*static))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_compile_dynamic(backend, op):
    need(backend)
    torch._dynamo.reset()
    f = _ops(backend)[op]
    cf = torch.compile(f, dynamic=True)
    for lq in (37, 21):
        q, k, v, lam = _inputs()
        q = q[:, :lq] if op != "attention-mask" else q
        torch.testing.assert_close(cf(q, k, v, lam), f(q, k, v, lam), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_autocast_attention_runs_in_the_autocast_dtype_cost_in_float32(backend):
    """As torch's own ops: scaled_dot_product_attention runs in the autocast dtype, cdist in float32."""
    need(backend)
    f = _ops(backend)
    q, k, v, lam = _inputs()
    with torch.autocast("cuda", torch.bfloat16):
        out = f["attention"](q, k, v, lam)
        cost = f["cost"](q, k, v, lam)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.dtype == sdpa.dtype == torch.bfloat16 and cost.dtype == torch.float32
    torch.testing.assert_close(out, f["attention"](q.bfloat16(), k.bfloat16(), v.bfloat16(), lam))
    torch.testing.assert_close(cost, f["cost"](q, k, v, lam))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_deterministic_algorithms(backend, op):
    """The Triton attention backward adds with float32 atomics: it raises (as torch's own
    nondeterministic ops do); the CUDA attention backward's GEMMs are at::bmm, so torch's cuBLAS
    rule applies (raises unless CUBLAS_WORKSPACE_CONFIG is set); every other path gives bitwise
    equal results twice."""
    need(backend)
    f = _ops(backend)[op]
    torch.use_deterministic_algorithms(True)
    try:
        def run():
            q, k, v, lam = _inputs(grad=True)
            out = f(q, k, v, lam)
            return [out, *_grads(out, (q, k, v, lam))]

        if backend == "triton" and op.startswith("attention"):
            with pytest.raises(RuntimeError, match="deterministic"):
                run()
        else:
            # the CUDA attention backward's GEMMs are torch's (at::bmm): where torch's cuBLAS rule
            # raises (CUBLAS_WORKSPACE_CONFIG unset on a CUDA that needs it), that error is the
            # answer; otherwise two runs must agree to the bit
            try:
                first = run()
            except RuntimeError as e:
                assert backend == "cuda" and op.startswith("attention") and "CUBLAS_WORKSPACE_CONFIG" in str(e), e
            else:
                for a, b in zip(first, run()):
                    assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
