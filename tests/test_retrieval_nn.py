"""geokern.nn.GeodesicRetrieval: two fused segments merged by log-sum-exp equal one
softmax over the union; the bank is a ring buffer."""

import pytest
import torch
from _helpers import BACKENDS, need
from conftest import DEVICE, HAS_CUDA

import geokern.metric as gm
from geokern.nn import GeodesicRetrieval
from geokern.reference import retrieval as ref


def _module(n=8, dv=16, bank=12):
    m = GeodesicRetrieval(n, dv, bank, beta=0.7, init_lam=0.8, device=DEVICE)
    with torch.no_grad():
        m.raw_lam.add_(0.3 * torch.randn_like(m.raw_lam))
    return m


def _union_reference(m, q, k, v, R, mask):
    """One softmax over [own keys, bank]: the bank expanded per row and concatenated."""
    B, L = k.shape[0], k.shape[1]
    cnt = int(m.bank_count)
    bk = m.bank_keys[:cnt].expand(B, cnt, -1)
    bv = m.bank_values[:cnt].expand(B, cnt, -1)
    keep = torch.cat([mask, torch.ones(B, cnt, dtype=torch.bool, device=DEVICE)], 1)
    metric = gm.diag(torch.nn.functional.softplus(m.raw_lam))
    return ref.retrieval_attention(q, torch.cat([k, bk], 1), torch.cat([v, bv], 1), R, metric, m.beta, m.eps, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_merge_to_one_softmax(backend):
    need(backend)
    m = _module()
    B, L, n, dv = 5, 9, 8, 16
    m.write(torch.randn(7, n, device=DEVICE), torch.randn(7, dv, device=DEVICE))
    q = torch.randn(B, n, device=DEVICE)
    k, v = torch.randn(B, L, n, device=DEVICE), torch.randn(B, L, dv, device=DEVICE)
    R = torch.rand(B, 1, device=DEVICE) + 0.5
    mask = torch.rand(B, L, device=DEVICE) > 0.3
    mask[0] = False  # a row that sees only the bank
    out = m(q, k, v, R, mask, backend=backend)
    want = _union_reference(m, q, k, v, R, mask)
    torch.testing.assert_close(out, want, rtol=2e-4, atol=2e-5, msg=f"{backend} merged output")
    # the learned metric gets the same gradient as through the union
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad((out * g).sum(), m.raw_lam)
    (exp,) = torch.autograd.grad((_union_reference(m, q, k, v, R, mask) * g).sum(), m.raw_lam)
    torch.testing.assert_close(got, exp, rtol=2e-3, atol=1e-5, msg=f"{backend} grad raw_lam")


def test_ring_buffer_keeps_the_latest():
    m = GeodesicRetrieval(2, 1, 5, device=DEVICE)
    for start, count in ((0, 3), (3, 4), (7, 9)):  # the last write is larger than the bank
        ids = torch.arange(start, start + count, dtype=torch.float32, device=DEVICE)
        m.write(ids[:, None].repeat(1, 2), ids[:, None])
    assert int(m.bank_count) == 5
    assert sorted(m.bank_values[:, 0].tolist()) == [11.0, 12.0, 13.0, 14.0, 15.0]
    assert torch.equal(m.bank_keys[:, 0], m.bank_values[:, 0])


def test_bank_only_and_own_keys_only():
    m = _module()
    q = torch.randn(3, 8, device=DEVICE)
    # an empty bank and no keys: every row sees no key, zeros (checking it would sync with the GPU)
    assert (m(q) == 0).all()
    with pytest.raises(ValueError, match="bank has no slots"):
        GeodesicRetrieval(8, 16, 0, device=DEVICE)(q)
    k, v = torch.randn(3, 4, 8, device=DEVICE), torch.randn(3, 4, 16, device=DEVICE)
    own = m(q, k, v, backend="torch")
    metric = gm.diag(torch.nn.functional.softplus(m.raw_lam))
    torch.testing.assert_close(own, ref.retrieval_attention(q, k, v, 1.0, metric, m.beta, m.eps), msg="own keys only")
    bk, bv = torch.randn(6, 8, device=DEVICE), torch.randn(6, 16, device=DEVICE)
    m.write(bk, bv)
    torch.testing.assert_close(m(q, backend="torch"), ref.retrieval_attention(q, bk, bv, 1.0, metric, m.beta, m.eps),
                               msg="bank only")


def test_bad_input():
    m = _module()
    q = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="keys and values together"):
        m(q, torch.randn(3, 4, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"keys must be \[N, 8\]"):
        m.write(torch.randn(4, 7, device=DEVICE), torch.randn(4, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"values must be \[4, 16\]"):
        m.write(torch.randn(4, 8, device=DEVICE), torch.randn(4, 15, device=DEVICE))
    with pytest.raises(ValueError, match="init_lam must be > 0"):
        GeodesicRetrieval(8, 16, 4, init_lam=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("own", ["none", "keys", "masked keys"])
def test_forward_never_syncs_and_compiles_fullgraph(backend, own, monkeypatch):
    """forward reads no tensor on the host (issue 14, item 12): torch.compile(fullgraph=True)
    traces it, and eager results equal the union reference for a partly filled bank."""
    need(backend)
    torch._dynamo.reset()
    m = _module()
    m.write(torch.randn(5, 8, device=DEVICE), torch.randn(5, 16, device=DEVICE))
    q = torch.randn(3, 8, device=DEVICE)
    k, v = torch.randn(3, 4, 8, device=DEVICE), torch.randn(3, 4, 16, device=DEVICE)
    mask = torch.rand(3, 4, device=DEVICE) > 0.3
    args = {"none": (q,), "keys": (q, k, v), "masked keys": (q, k, v, 1.0, mask)}[own]
    calls = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    eager = m(*args, backend=backend)
    monkeypatch.undo()
    assert not calls
    # (the kernel backends compile only with CUDA tensors: their CPU interpreter runs eagerly)
    compiled = torch.compile(lambda *a: m(*a, backend=backend), fullgraph=True)(*args) \
        if backend == "torch" or HAS_CUDA else eager
    keep = mask if own == "masked keys" else torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    if own == "none":
        metric = gm.diag(torch.nn.functional.softplus(m.raw_lam))
        want = ref.retrieval_attention(q, m.bank_keys[:5], m.bank_values[:5], 1.0, metric, m.beta, m.eps)
    else:
        want = _union_reference(m, q, k, v, 1.0, keep)
    tol = {"rtol": 2e-5, "atol": 2e-5}
    torch.testing.assert_close(eager, want.float(), **tol)
    torch.testing.assert_close(compiled, want.float(), **tol)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_triton_launchers_trace_the_bank_mask_without_a_dtype_view(direction, monkeypatch):
    """torch.compile traces the Triton ops' launchers into the graph inductor lowers; inductor
    (torch 2.11, H100) failed on a uint8 view of the bank's fill mask, a bool computed in the
    graph. The launchers, traced here with their kernel launches stubbed out (a CPU interpreter
    kernel cannot be traced), must hand the bool mask to the kernels as it is."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from geokern.kernels import retrieval as tk

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tk, "launch", lambda kernel: _NoLaunch())
    q, k, v = torch.randn(1, 3, 1, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 16)
    w, r, count = torch.rand(8) + 0.5, torch.ones(1, 1, 1, 1), torch.tensor(5)

    def launchers(q, k, v, w, r, count):
        filled = (torch.arange(12) < count).view(1, 1, 1, 12)
        out, lse = tk.retrieval_attention_fwd(q, k, v, w, r, filled, None, None, None, 0.7, 1e-8)
        if direction == "forward":
            return out, lse
        shapes = (((1, 3, 1, 8), (1, 1, 12, 8), (1, 1, 12, 16), (1, 1, 1, 1)), None)
        return tk.retrieval_attention_bwd(torch.ones_like(out), q, k, v, w, r, filled, None, None, None, out, lse,
                                          None, 0.7, 1e-8, True, shapes)

    graph = make_fx(launchers, tracing_mode="fake")(q, k, v, w, r, count).graph
    views = [n for n in graph.nodes if n.target is torch.ops.aten.view.dtype]
    assert not views, f"dtype views in the traced launchers: {[str(n) for n in views]}"
