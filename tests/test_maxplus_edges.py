"""Max-plus at the edges (issue 14): empty inputs, NaN, ties at infinity, exact 16-bit
rounding, integer range overflow, double backward, streams, CUDA graphs, dynamic shapes,
autocast, deterministic mode and tensors past 2**31 elements."""

import pytest
import torch
from _helpers import BACKENDS, capturable, dtype_id, need, run_isolated
from conftest import DEVICE, HAS_CUDA

import geokern
from geokern.reference import maxplus as ref

INF = float("inf")
SEMIRINGS = ["maxplus", "minplus"]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


# ---- empty inputs: outputs of the right shape, gradients zeros of the right shapes -------

EMPTY = [(0, 5, 3, ()), (4, 0, 3, ()), (4, 5, 0, ()), (4, 0, 0, ()), (3, 4, 2, (0,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,batch", EMPTY, ids=lambda x: str(x))
def test_empty_inputs_have_gradients(M, K, N, batch, backend):
    need(backend)
    A, B = rand(*batch, M, K).requires_grad_(), rand(K, N).requires_grad_()
    c = geokern.maxplus_matmul(A, B, backend=backend)
    assert c.shape == (*batch, M, N), f"{backend}: output shape"
    assert c.grad_fn is not None, f"{backend}: empty output lost autograd"
    c.sum().backward()
    assert A.grad.shape == A.shape and B.grad.shape == B.shape, f"{backend}: gradient shapes"
    assert (A.grad == 0).all() and (B.grad == 0).all(), f"{backend}: gradients of an empty output are zeros"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,batch", EMPTY, ids=lambda x: str(x))
def test_empty_int_inputs(M, K, N, batch, backend):
    need(backend)
    A = torch.randint(-9, 9, (*batch, M, K), device=DEVICE, dtype=torch.int16)
    B = torch.randint(-9, 9, (K, N), device=DEVICE, dtype=torch.int16)
    c, idx = geokern.maxplus_matmul(A, B, return_argmax=True, semiring="minplus", backend=backend)
    assert c.shape == idx.shape == (*batch, M, N), f"{backend}: output shapes"
    if K == 0:
        assert (c == ref.int_sentinel(torch.int16, "minplus")).all() and (idx == -1).all(), f"{backend}: empty K"


# ---- NaN: C[i, j] is NaN exactly when row i of A or column j of B holds a NaN -------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
def test_nan_rows_and_columns(dtype, semiring, backend):
    need(backend)
    M, K, N = 13, 70, 11
    A, B = rand(M, K, dtype=dtype), rand(K, N, dtype=dtype)
    A[3, 0] = A[8, K - 1] = float("nan")
    B[40, 2] = B[0, 9] = float("nan")
    A[10] = -INF if semiring == "maxplus" else INF  # the semiring zero row: no NaN from it
    expect = torch.zeros(M, N, dtype=torch.bool, device=DEVICE)
    expect[[3, 8]] = True
    expect[:, [2, 9]] = True
    for c in (geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend),  # value-only (packed on GPU)
              geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend, num_splits=2)):
        assert torch.equal(torch.isnan(c), expect), f"{backend} {semiring}: NaN positions of the output"
    c, idx, mg = geokern.maxplus_matmul(A, B, return_argmax=True, return_margin=True, semiring=semiring,
                                        backend=backend)
    assert torch.equal(torch.isnan(c), expect), f"{backend} {semiring}: NaN positions (with argmax, margin)"
    assert torch.equal(torch.isnan(mg), expect), f"{backend} {semiring}: margin is NaN exactly where C is"
    assert ((idx >= 0) & (idx < K)).all(), f"{backend} {semiring}: argmax of NaN entries stays in [0, K)"
    acc = A.dtype if backend == "torch" or dtype == torch.float64 else torch.float32  # the sums' precision
    rc, ri = ref.maxplus_matmul(A.to(acc), B.to(acc), True, semiring=semiring)
    assert torch.equal(idx[~expect], ri[~expect]), f"{backend} {semiring}: argmax away from the NaN"


# ---- margin: ties give 0, at infinity too -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_margin_of_a_tie_at_infinity_is_zero(semiring, backend):
    need(backend)
    big = INF if semiring == "maxplus" else -INF  # the winning infinity (not the semiring zero)
    A, B = rand(4, 6), rand(6, 5)
    A[1, 2] = A[1, 4] = big  # row 1: two k reach the winning infinity: a tie
    A[2, 3] = big  # row 2: one k at infinity, the runner-up finite: margin +inf
    c, idx, mg = geokern.maxplus_matmul(A, B, return_argmax=True, return_margin=True, semiring=semiring,
                                        backend=backend)
    assert (c[1] == big).all() and (idx[1] == 2).all(), f"{backend} {semiring}: tie at infinity, smallest k"
    assert (mg[1] == 0).all(), f"{backend} {semiring}: margin of a tie at infinity must be 0, got {mg[1]}"
    assert torch.isposinf(mg[2]).all(), f"{backend} {semiring}: infinite winner over a finite runner-up"
    _, rm = ref.maxplus_matmul(A.double(), B.double(), False, True, semiring)
    assert (rm[1] == 0).all(), "reference: margin of a tie at infinity"


# ---- 16-bit outputs are the float64 result rounded once, exactly --------------------------


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_16bit_output_is_the_exactly_rounded_max(dtype, semiring, backend):
    """Kernels sum 16-bit inputs exactly in float32, so C is the float64 max rounded to the
    dtype once, to nearest even: equal, not within an ulp (a truncating cast fails)."""
    need(backend)
    M, K, N = 23, 41, 19
    # random bits below the dtype's precision make most sums fall between two 16-bit values
    A, B = rand(M, K, dtype=dtype) * 1.37, rand(K, N, dtype=dtype) * 0.71
    expect = ref.maxplus_matmul(A.double(), B.double(), semiring=semiring).to(dtype)
    for kw in ({}, {"return_argmax": True}, {"return_margin": True}):
        out = geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend, **kw)
        c = out[0] if isinstance(out, tuple) else out
        bad = (c != expect).sum().item()
        assert bad == 0, f"{backend} {semiring} {kw}: {bad} of {c.numel()} outputs are not the rounded max"


# ---- integers: out-of-range inputs give the overflow marker, never a wrong distance -----


def _chain(n, w, dtype, semiring="minplus"):
    """The weight matrix of a chain 0 -> 1 -> ... -> n-1 with weights w (0 diagonal)."""
    zero = ref.int_sentinel(dtype, semiring)
    W = torch.full((n, n), zero, dtype=dtype, device=DEVICE)
    W.fill_diagonal_(0)
    idx = torch.arange(n - 1, device=DEVICE)
    W[idx, idx + 1] = w
    return W


@pytest.mark.parametrize("backend", BACKENDS)
def test_int16_shortest_paths_overflow_is_flagged(backend):
    """A chain of five nodes with weights 3000 (in range): the path 0 -> 4 (12000) leaves
    int16's exact range after a squaring; every entry that reads a distance out of range is
    the overflow marker, the others are exact: never "no path", never 12000 by luck."""
    need(backend)
    dt = torch.int16
    marker, nopath = ref.int_overflow(dt, "minplus"), ref.int_sentinel(dt, "minplus")
    D = _chain(5, 3000, dt)
    D1 = geokern.maxplus_matmul(D, D, semiring="minplus", backend=backend)
    assert D1[0, 2] == 6000 and D1[0, 4] == nopath, f"{backend}: one squaring is exact (inputs in range)"
    D2 = geokern.maxplus_matmul(D1, D1, semiring="minplus", backend=backend)
    assert D2[0, 4] == marker, f"{backend}: 0 -> 4 must be the overflow marker, got {D2[0, 4].item()}"
    # rows 3, 4 and columns 0, 1 of D1 read no out-of-range value: exact ("no path" here)
    assert (D2[3:, :2] == nopath).all(), f"{backend}: entries that read no out-of-range value are exact"
    assert torch.equal(D2, ref.maxplus_matmul(D1, D1, semiring="minplus")), f"{backend}: backends agree"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32], ids=dtype_id)
def test_int_out_of_range_is_flagged(dtype, semiring, backend):
    need(backend)
    q = ref.int_bound(dtype)
    marker, sent = ref.int_overflow(dtype, semiring), ref.int_sentinel(dtype, semiring)
    M, K, N = 9, 37, 8
    A = torch.randint(-q, q + 1, (M, K), device=DEVICE).to(dtype)
    B = torch.randint(-q, q + 1, (K, N), device=DEVICE).to(dtype)
    A[1, 5] = q + 1  # just past the range
    A[2, 0] = -q - 1
    A[4, 3] = sent  # the sentinel is in range
    B[7, 3] = marker  # the marker itself is out of range: it propagates
    B[0, 6] = torch.iinfo(dtype).max if semiring == "maxplus" else torch.iinfo(dtype).min
    expect = torch.zeros(M, N, dtype=torch.bool, device=DEVICE)
    expect[[1, 2]] = True
    expect[:, [3, 6]] = True
    for kw in ({}, {"return_argmax": True}, {"num_splits": 2}):
        out = geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend, **kw)
        c = out[0] if isinstance(out, tuple) else out
        assert torch.equal(c == marker, expect), f"{backend} {semiring} {kw}: overflow marker positions"
        rc = ref.maxplus_matmul(A, B, semiring=semiring)
        assert torch.equal(c, rc), f"{backend} {semiring} {kw}: differs from the reference"
        if "return_argmax" in kw:
            assert (out[1][expect] == 0).all(), f"{backend} {semiring}: argmax of a marked entry is 0"
    # in range again: no marker anywhere
    A[1, 5], A[2, 0], B[7, 3], B[0, 6] = 0, 0, 0, 0
    c1 = geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend)
    assert torch.equal(c1, ref.maxplus_matmul(A, B, semiring=semiring)) and not (c1 == marker).any(), backend


def _shortest_paths(W, backend):
    """The README's all-pairs shortest paths (W: float64 integer weights >= 0, 0 diagonal, inf
    for no edge): the dtype picked by the longest possible shortest path, exact for any W."""
    n = W.shape[0]
    longest = (n - 1) * W[W.isfinite()].max().item()  # no shortest path is longer
    dtype = next((d for d in (torch.int16, torch.int32) if longest <= ref.int_bound(d)), torch.float64)
    if dtype.is_floating_point:
        assert longest < 2**53  # float64 sums of integers are exact below 2**53
        nopath, D = float("inf"), W.to(DEVICE)
    else:
        nopath = ref.int_sentinel(dtype, "minplus")  # the dtype's maximum: "no edge" / "no path"
        D = torch.where(W.isinf(), nopath, W).to(dtype).to(DEVICE)
    for _ in range((n - 1).bit_length()):  # repeated min-plus squaring
        D, mid = geokern.maxplus_matmul(D, D, semiring="minplus", return_argmax=True, backend=backend)
    if not dtype.is_floating_point:
        assert not (D == ref.int_overflow(dtype, "minplus")).any()  # never fires for the dtype picked
    return dtype, torch.where(D == nopath, INF, D.double()).cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w,dtype", [(3000, torch.int32), (1000, torch.int16), (2**30, torch.float64)],
                         ids=["w3000-i32", "w1000-i16", "w2e30-f64"])
def test_readme_shortest_paths_is_exact(w, dtype, backend):
    need(backend)
    W = torch.full((5, 5), INF, dtype=torch.float64, device=DEVICE)
    W.fill_diagonal_(0)
    i = torch.arange(4, device=DEVICE)
    W[i, i + 1] = float(w)
    got_dtype, D = _shortest_paths(W.cpu(), backend)
    assert got_dtype == dtype, f"{backend}: picked {got_dtype}"
    assert D[0, 4] == 4 * w and D[1, 3] == 2 * w and D[4, 0] == INF, f"{backend}: chain distances {D}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_int_out_of_range_flags_follow_broadcast_batches(semiring, backend):
    """Flags of a broadcast operand reach every batch entry that reads it, and only those."""
    need(backend)
    dt = torch.int16
    q = ref.int_bound(dt)
    A = torch.randint(-q, q + 1, (2, 1, 5, 19), device=DEVICE).to(dt)
    B = torch.randint(-q, q + 1, (3, 19, 6), device=DEVICE).to(dt)
    A[1, 0, 2, 7] = q + 1  # row 2 of batch 1 (every B batch reads it)
    B[2, 4, 5] = -q - 1  # column 5 of B's batch 2
    for kw in ({}, {"return_argmax": True}):
        out = geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend, **kw)
        c = out[0] if isinstance(out, tuple) else out
        assert torch.equal(c, ref.maxplus_matmul(A, B, semiring=semiring)), f"{backend} {semiring} {kw}"
        marked = c == ref.int_overflow(dt, semiring)
        assert marked[1, :, 2].all() and marked[:, 2, :, 5].all() and marked.sum() == 3 * 6 + 2 * 5 - 1


@pytest.mark.parametrize("semiring", ["maxplus", "minplus"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_int_out_of_range_flags_in_every_chunk_of_k(semiring, backend):
    """The range pass splits K into chunks (and rows / columns into blocks) over many programs: an
    out-of-range value in the last, a middle or the first chunk flags its row of A or column of B,
    and nothing else."""
    need(backend)
    dt = torch.int16
    q = ref.int_bound(dt)
    A = torch.randint(-q, q + 1, (41, 300), device=DEVICE).to(dt)
    B = torch.randint(-q, q + 1, (300, 37), device=DEVICE).to(dt)
    A[33, 299], A[5, 150], A[40, 0] = q + 1, -q - 1, q + 7
    B[299, 36], B[131, 17], B[0, 2] = -q - 1, q + 1, -q - 9
    c = geokern.maxplus_matmul(A, B, semiring=semiring, backend=backend)
    assert torch.equal(c, ref.maxplus_matmul(A, B, semiring=semiring)), f"{backend} {semiring}"
    marked = c == ref.int_overflow(dt, semiring)
    rows, cols = [33, 5, 40], [36, 17, 2]
    assert marked[rows].all() and marked[:, cols].all()
    assert marked.sum() == 3 * 37 + 3 * 41 - 9


# ---- double backward ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward(backend):
    """The backward is linear in dC (a scatter along the route): its own gradient is the
    gather along the route, and the second derivative in A and B is zero."""
    need(backend)
    A = rand(2, 5, 7, dtype=torch.float64).requires_grad_()
    B = rand(7, 4, dtype=torch.float64).requires_grad_()
    torch.autograd.gradgradcheck(lambda a, b: geokern.maxplus_matmul(a, b, backend=backend), (A, B))
    c = geokern.maxplus_matmul(A, B, backend=backend)
    g = torch.randn_like(c, requires_grad=True)
    dA, dB = torch.autograd.grad(c, (A, B), g, create_graph=True)
    (gg,) = torch.autograd.grad((dA * dA.detach()).sum() + (dB * dB.detach()).sum(), g)
    r = ref.maxplus_matmul(A, B)
    eA, eB = torch.autograd.grad(r, (A, B), g, create_graph=True)
    (eg,) = torch.autograd.grad((eA * eA.detach()).sum() + (eB * eB.detach()).sum(), g)
    torch.testing.assert_close(gg, eg, msg=f"{backend}: gradient of the backward in dC")


# ---- autocast, deterministic mode ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_the_input_dtype(backend):
    """Max-plus is not a matmul that autocast casts: like torch.maximum, it runs in the
    inputs' dtype under autocast."""
    need(backend)
    A, B = rand(5, 9), rand(9, 4)
    plain = geokern.maxplus_matmul(A, B, backend=backend)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        c = geokern.maxplus_matmul(A, B, backend=backend)
    assert c.dtype == torch.float32 and torch.equal(c, plain), f"{backend}: autocast changed the op"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic_mode_backward(backend, monkeypatch):
    """With torch.use_deterministic_algorithms(True) the backward does not use the kernels'
    atomic adds (their order varies): it scatters in a fixed order, bit for bit repeatable."""
    need(backend)
    from geokern.kernels import maxplus as tk

    A, B = rand(3, 40, 30).requires_grad_(), rand(30, 20).requires_grad_()
    g = rand(3, 40, 20)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        monkeypatch.setattr(tk, "maxplus_bwd", lambda *a, **k: pytest.fail("atomic backward in deterministic mode"))
        runs = [torch.autograd.grad(geokern.maxplus_matmul(A, B, backend=backend), (A, B), g) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    eA, eB = torch.autograd.grad(ref.maxplus_matmul(A, B), (A, B), g)
    for dA, dB in runs:
        torch.testing.assert_close(dA, eA, msg="dA")
        torch.testing.assert_close(dB, eB, msg="dB")
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), "not repeatable"


# ---- GPU only: streams, CUDA graphs, dynamic shapes ------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA streams need a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16], ids=dtype_id)
def test_runs_on_a_side_stream(dtype, backend):
    need(backend)
    A = (rand(300, 200) * 100).to(dtype)
    B = (rand(200, 250) * 100).to(dtype)
    expect = ref.maxplus_matmul(A, B)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            c = geokern.maxplus_matmul(A, B, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(c, expect), f"{backend} {dtype}: side stream result"


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@capturable
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16], ids=dtype_id)
def test_cuda_graph_capture(dtype, backend):
    need(backend)
    A = (rand(200, 150) * 100).to(dtype)
    B = (rand(150, 170) * 100).to(dtype)
    fp = dtype.is_floating_point
    if fp:
        A.requires_grad_()
        B.requires_grad_()

    def step():
        c, idx = geokern.maxplus_matmul(A, B, return_argmax=True, backend=backend)
        if fp:
            return (c,) + torch.autograd.grad(c.float().sum(), (A, B))
        return (c, idx)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (autotuning) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    with torch.no_grad():  # new inputs in place: the replay must read them
        A.copy_(A * 0.5 if fp else A // 2)
    graph.replay()
    torch.cuda.synchronize()
    expect = ref.maxplus_matmul(A.detach(), B.detach())
    assert torch.equal(out[0], expect), f"{backend} {dtype}: replayed graph output"


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the kernels needs CUDA tensors")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_dynamic(backend):
    need(backend)
    f = torch.compile(lambda x, y: geokern.maxplus_matmul(x, y, backend=backend) * 2, dynamic=True, fullgraph=True)
    for M, K, N in ((5, 7, 3), (33, 20, 17), (64, 9, 100)):
        A, B = rand(M, K), rand(K, N)
        assert torch.equal(f(A, B), ref.maxplus_matmul(A, B) * 2), f"{backend} dynamic M{M} K{K} N{N}"


# ---- GPU only: past 2**31 elements -------------------------------------------------------

_HUGE = """
import torch, geokern
from geokern.reference import maxplus as ref
be, dt = {backend!r}, getattr(torch, {dtype!r})
torch.manual_seed(0)
batch = (1 << 19) + 7  # output (batch, 64, 64): 2**31 + 28672 elements
A = (torch.randn(batch, 64, 8, device="cuda") * 50).to(dt)
B = (torch.randn(8, 64, device="cuda") * 50).to(dt)
fp = dt.is_floating_point
if fp:
    A.requires_grad_()
    B.requires_grad_()
c, idx = geokern.maxplus_matmul(A, B, return_argmax=True, backend=be)
assert c.numel() > 2**31
acc = torch.float32 if fp else dt  # the kernels' sums: exact in float32 for these inputs
for b in (0, batch // 2, batch - 1):  # the last matrix sits past 2**31 elements
    rc, ri = ref.maxplus_matmul(A[b].detach().to(acc), B.detach().to(acc), True)
    assert torch.equal(c[b], rc.to(dt)), b
    assert torch.equal(idx[b], ri), b
if fp:
    del idx
    dA, dB = torch.autograd.grad(c, (A, B), torch.ones_like(c))
    for b in (0, batch - 1):
        e = torch.zeros(64, 8, device="cuda")
        e.scatter_add_(1, ref.maxplus_matmul(A[b].detach().float(), B.detach().float(), True)[1],
                       torch.ones(64, 64, device="cuda"))
        assert torch.equal(dA[b].float(), e), b  # counts up to 64: exact in bf16
    # dB holds counts up to batch * 64, rounded to bf16: their total within rounding
    assert abs(dB.double().sum().item() - c.numel()) <= 1e-2 * c.numel()
v = geokern.maxplus_matmul(A.detach(), B.detach(), backend=be)  # value-only (the packed path for 16 bits)
assert torch.equal(v[-1], c[-1].detach())
torch.cuda.synchronize()
print("ok")
"""


@pytest.mark.huge
@pytest.mark.skipif(not HAS_CUDA, reason="tensors past 2**31 elements need a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", ["bfloat16", "int16"])
def test_output_past_2_31_elements(dtype, backend):
    need(backend)
    assert "ok" in run_isolated(_HUGE.format(backend=backend, dtype=dtype))


@pytest.mark.huge
@pytest.mark.skipif(not HAS_CUDA, reason="tensors past 2**31 elements need a GPU")
def test_triton_refuses_a_grid_past_its_limit():
    """2**31 one-element products: one Triton program each would pass grid axis 0's limit."""
    need("triton")
    run_isolated('''
import torch, geokern, pytest
A = torch.zeros(1, 1, 1, dtype=torch.int16, device="cuda").expand(2**31, 1, 1)
B = torch.zeros(1, 1, dtype=torch.int16, device="cuda")
with pytest.raises(ValueError, match="programs, more than the grid"):
    geokern.maxplus_matmul(A, B, backend="triton")
torch.cuda.synchronize()
''')


def test_triton_backward_counts_past_float32_in_float64(monkeypatch):
    """A gradient entry that gathers more than EXACT_FAN_IN terms accumulates in float64: here (the
    threshold lowered so a small case shows it) one dB entry sums 2^24 and seven ones, which a
    float32 running sum loses (x + 1 == x past 2^24) and float64 keeps."""
    need("triton")
    from geokern.ops import maxplus as mp
    monkeypatch.setattr(mp, "EXACT_FAN_IN", 1)
    a = torch.full((8, 4), -100.0, device=DEVICE)
    a[:, 0] = 0.0  # every (i, j) routes through k = 0
    a.requires_grad_()
    b = torch.zeros(4, 3, device=DEVICE, requires_grad=True)
    g = torch.ones(8, 3, device=DEVICE)
    g[0] = 2.0**24
    da, db = torch.autograd.grad(geokern.maxplus_matmul(a, b, backend="triton"), (a, b), g)
    want = g.double().sum(0).float()  # 2^24 + 7, rounded once: 2^24 + 8
    assert torch.equal(db[0], want), (db[0], want)
    assert (db[1:] == 0).all() and torch.equal(da[:, 0], g.sum(1)) and (da[:, 1:] == 0).all()
