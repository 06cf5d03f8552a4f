"""Retrieval at the edges (issue 14): NaN in, masked garbage, fp16 overflow, eps = 0, d_v = 0,
beta * R past float32, empty key sets, backend requests that cannot run, a module without host
syncs. Every backend where it runs; the CUDA rows run only on a GPU machine."""

import math

import pytest
import torch
from _helpers import BACKENDS, need
from conftest import DEVICE

import geokern
import geokern.metric as gm
from geokern import _backend
from geokern.reference import retrieval as ref


def _qkv(b=2, lq=5, m=40, n=8, dv=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)  # noqa: E731
    return mk(b, lq, n), mk(b, m, n), mk(b, m, dv)


def _attn(backend, q, k, v, R=1.0, lam=None, mask=None, beta=0.7, eps=1e-8, **kw):
    lam = torch.ones(q.shape[-1], device=DEVICE) if lam is None else lam
    return geokern.retrieval_attention(q, k, v, R, gm.diag(lam), beta, eps, mask, return_lse=True, backend=backend,
                                       **kw)


# ---- NaN in, NaN out exactly where the formula reads it ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["key", "query", "value", "R", "metric"])
def test_attention_nan_propagates_to_exactly_the_rows_it_touches(backend, where):
    need(backend)
    q, k, v = _qkv()
    lam = torch.ones(8, device=DEVICE)
    R = torch.ones(40, device=DEVICE)
    if where == "key":
        k[0, 3, 2] = math.nan
    elif where == "query":
        q[1, 2, 5] = math.nan
    elif where == "value":
        v[0, 3, 1] = math.nan
    elif where == "R":
        R[3] = math.nan
    else:
        lam[4] = math.nan
    out, lse = _attn(backend, q, k, v, R, lam)
    want = torch.zeros(out.shape, dtype=torch.bool, device=DEVICE)
    want_lse = torch.zeros(lse.shape, dtype=torch.bool, device=DEVICE)
    if where == "key":
        want[0], want_lse[0] = True, True
    elif where == "query":
        want[1, 2], want_lse[1, 2] = True, True
    elif where == "value":
        want[0, :, 1] = True
    else:
        want[:], want_lse[:] = True, True
    assert torch.equal(out.isnan(), want), out
    assert torch.equal(lse.isnan(), want_lse), lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["query", "key", "metric"])
def test_cost_nan_propagates(backend, where):
    need(backend)
    q, k, _ = _qkv(m=9)
    lam = torch.ones(8, device=DEVICE)
    if where == "query":
        q[1, 2, 5] = math.nan
    elif where == "key":
        k[0, 3, 2] = math.nan
    else:
        lam[0] = math.nan
    cost = geokern.retrieval_cost(q, k, 1.0, gm.diag(lam), backend=backend)
    want = torch.zeros(cost.shape, dtype=torch.bool, device=DEVICE)
    if where == "query":
        want[1, 2] = True
    elif where == "key":
        want[0, :, 3] = True
    else:
        want[:] = True
    assert torch.equal(cost.isnan(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["key", "pair"])
@pytest.mark.parametrize("garbage", [math.nan, math.inf])
def test_masked_keys_contribute_nothing_whatever_their_value(backend, mode, garbage):
    """Key 3 is masked (for every query, or for query 1 only): NaN / inf in its key, value and R
    change nothing. 40 keys: the masked key shares its tile with kept keys at every tile size."""
    need(backend)
    q, k, v = _qkv()
    R = torch.ones(2, 5, 40, device=DEVICE)
    mask = torch.ones(2, 5, 40, dtype=torch.bool, device=DEVICE)
    if mode == "key":
        mask[:, :, 3] = False
    else:
        mask[:, 1, 3] = False
    clean = _attn(backend, q, k, v, R, mask=mask)
    k2, v2, R2 = k.clone(), v.clone(), R.clone()
    if mode == "key":
        k2[:, 3], v2[:, 3], R2[:, :, 3] = garbage, garbage, garbage
    else:
        R2[:, 1, 3] = garbage  # the key itself is kept for other queries: only its pair R may be garbage
    dirty = _attn(backend, q, k2, v2, R2, mask=mask)
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[1], clean[1])


def test_reference_masked_value_nan_contributes_nothing_per_pair():
    """Per-pair mask: a NaN value of a key masked for query 1 only gives NaN in the other queries."""
    q, k, v = _qkv(b=1, lq=3, m=6)
    v[0, 2, 0] = math.nan
    mask = torch.ones(1, 3, 6, dtype=torch.bool, device=DEVICE)
    mask[0, 1, 2] = False
    out = ref.retrieval_attention(q, k, v, 1.0, gm.diag(torch.ones(8, device=DEVICE)), 0.7, 1e-8, mask)
    assert out[0, 1].isfinite().all()
    assert out[0, [0, 2], 0].isnan().all() and out[0, [0, 2], 1:].isfinite().all()


# ---- fp16: coordinates past 32.7k ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_fp16_large_coordinates_match_float32(backend, lam):
    need(backend)
    q, k, v = _qkv(b=1, lq=20, m=24, n=16)
    q, k = (4e4 + 3e3 * q).clamp(max=6e4), (4e4 + 3e3 * k).clamp(max=6e4)
    q16, k16, v16 = q.half(), k.half(), v.half()
    lamt = torch.full((16,), lam, device=DEVICE)
    out16, lse16 = _attn(backend, q16, k16, v16, lam=lamt, beta=2e-3)
    out32, lse32 = _attn(backend, q16.float(), k16.float(), v16.float(), lam=lamt, beta=2e-3)  # the float32 path
    assert out16.isfinite().all()
    err = (out16.float() - out32).norm() / out32.norm()
    assert err < 1e-2, err
    torch.testing.assert_close(lse16, lse32, rtol=1e-3, atol=1e-2)
    # not a uniform softmax: the weights are far from equal here
    assert (out32 - v16.float().mean(1, keepdim=True)).norm() / out32.norm() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_fp16_large_coordinates_gradients_match_float32(backend, lam):
    """The backward too: d loss / d s (~ beta R / spd) fell below float16's subnormals and w q
    overflowed float16 (lam > 1): gradients were off by 8x, or NaN."""
    need(backend)
    q, k, v = _qkv(b=1, lq=20, m=24, n=16)
    q, k = (4e4 + 3e3 * q).clamp(max=6e4), (4e4 + 3e3 * k).clamp(max=6e4)
    lamt = torch.full((16,), lam, device=DEVICE)
    res = []
    for dt in (torch.float16, torch.float32):
        ts = [t.half().to(dt).requires_grad_() for t in (q, k, v)]
        out, _ = _attn(backend, *ts, lam=lamt, beta=2e-3)
        out.float().square().sum().backward()
        res.append([t.grad.float() for t in ts])
    for name, a, b in zip("qkv", *res):
        assert a.isfinite().all(), name
        assert (a - b).norm() / b.norm() < 2e-2, (name, ((a - b).norm() / b.norm()).item())


# ---- eps = 0: gradients of sqrt at 0 -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_gradients_are_finite_and_match_the_reference(backend):
    need(backend)
    q, k, v = _qkv(lq=19, m=23)
    R = torch.rand(23, device=DEVICE, dtype=torch.float64) + 0.5

    def run(be, dt):
        ts = [t.detach().to(dt).requires_grad_() for t in (q, k, v, R)]
        out, lse = _attn(be, *ts[:3], ts[3], eps=0.0)
        (out.sum() + lse.sum()).backward()
        return [t.grad for t in ts]

    got, want = run(backend, torch.float32), run("torch", torch.float64)
    for g, w in zip(got, want):
        assert g.isfinite().all()
        torch.testing.assert_close(g.double(), w, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_key_equal_to_query_has_zero_subgradient(backend):
    need(backend)
    q, k, v = _qkv(b=1, lq=3, m=5)
    k[0, 2] = q[0, 1]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, _ = _attn(backend, q, k, v, eps=0.0)
    out.sum().backward()
    assert out.isfinite().all() and q.grad.isfinite().all() and k.grad.isfinite().all()
    q2, k2 = (t.detach().requires_grad_() for t in (q, k))
    cost = geokern.retrieval_cost(q2, k2, 1.0, gm.diag(torch.ones(8, device=DEVICE)), 0.0, backend=backend)
    assert cost[0, 1, 2] == 0
    cost.sum().backward()
    assert q2.grad.isfinite().all() and k2.grad.isfinite().all()


# ---- d_v = 0, no keys ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_value_width_still_gives_the_lse(backend):
    need(backend)
    q, k, _ = _qkv()
    v = torch.zeros(2, 40, 0, device=DEVICE)
    out, lse = _attn(backend, q, k, v)
    _, want = ref.retrieval_attention(q, k, v, 1.0, gm.diag(torch.ones(8, device=DEVICE)), 0.7, 1e-8, None, True)
    assert out.shape == (2, 5, 0)
    torch.testing.assert_close(lse, want.float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["keys", "bank"])
def test_empty_key_segment_has_zero_gradients(backend, empty):
    need(backend)
    q, k, v = _qkv()
    if empty == "keys":
        k, v, bank = k[:, :0], v[:, :0], None
    else:
        bank = (torch.randn(0, 8, device=DEVICE, requires_grad=True), torch.randn(0, 4, device=DEVICE,
                                                                                     requires_grad=True))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = _attn(backend, q, k, v, bank=bank)
    (out.sum() + lse[lse.isfinite()].sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    if empty == "keys":
        assert (q.grad == 0).all()
    else:
        assert bank[0].grad.shape == (0, 8) and bank[1].grad.shape == (0, 4)


# ---- beta * R past float32: the hard-min limit -------------------------------------------


def test_non_finite_R_number_is_refused():
    q, k, v = _qkv()
    lam = gm.diag(torch.ones(8, device=DEVICE))
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="R must be finite"):
            geokern.retrieval_cost(q, k, bad, lam)
        with pytest.raises(ValueError, match="R must be finite"):
            geokern.retrieval_attention(q, k, v, bad, lam, 1.0)
        with pytest.raises(ValueError, match="bank R must be finite"):
            geokern.retrieval_attention(q, k, v, 1.0, lam, 1.0, bank=(k[0], v[0], bad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tie", [False, True])
def test_beta_R_past_float32_gives_the_hard_min(backend, tie):
    need(backend)
    q, k, v = _qkv(m=20)
    if tie:
        k[:, 7] = k[:, 4]
    mask = torch.ones(2, 5, 20, dtype=torch.bool, device=DEVICE)
    mask[1, 3] = False  # and one fully masked row: still zeros
    out, lse = _attn(backend, q, k, v, R=1e30, beta=1e10, mask=mask)
    d = ((k[:, None] - q[:, :, None]) ** 2).sum(-1)  # [2, 5, 20]
    best = d == d.min(-1, keepdim=True).values
    want = (best.float() @ v) / best.sum(-1, keepdim=True)
    want[1, 3] = 0
    assert out.isfinite().all()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert lse[1, 3] == -math.inf and (lse.isinf().sum() == 1 or (lse[lse.isinf()] < 0).all())


# ---- backend requests -------------------------------------------------------------------


def test_default_backend_request_that_cannot_run_raises(monkeypatch):
    q, k, v = (t.double() for t in _qkv())
    lam = gm.diag(torch.ones(8, device=DEVICE, dtype=torch.float64))
    monkeypatch.setattr(_backend, "DEFAULT_BACKEND", "triton")
    with pytest.raises(TypeError, match="float64"):
        geokern.retrieval_attention(q, k, v, 1.0, lam, 1.0)
    with pytest.raises(TypeError, match="float64"):
        geokern.retrieval_cost(q, k, 1.0, lam)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_curvature_scalar_kernel_backends_say_what_works(backend):
    with pytest.raises(RuntimeError) as e:
        geokern.curvature_scalar(torch.randn(3, 3, 3, 3), torch.eye(3), backend=backend)
    msg = str(e.value)
    assert "backend='torch'" in msg and "backend='auto'" in msg
    assert "triton" not in msg.replace(f"backend={backend!r}", "") or backend == "triton"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [math.nan, math.inf])
def test_masked_keys_garbage_leaves_the_gradients_alone(backend, garbage):
    """The backward too: NaN / inf in a masked key, its value and R change no gradient of the
    query, the other keys, values and R (the masked key's own gradients are 0 or garbage-free)."""
    need(backend)
    q, k, v = _qkv()
    R = torch.ones(2, 5, 40, device=DEVICE)
    mask = torch.ones(2, 5, 40, dtype=torch.bool, device=DEVICE)
    mask[:, :, 3] = False

    def grads(k, v, R):
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v, R)]
        out, lse = _attn(backend, *ts[:3], ts[3], mask=mask)
        (out.square().sum() + lse.sum()).backward()
        return [t.grad for t in ts]

    k2, v2, R2 = k.clone(), v.clone(), R.clone()
    k2[:, 3], v2[:, 3], R2[:, :, 3] = garbage, garbage, garbage
    keep = torch.arange(40, device=DEVICE) != 3
    for name, a, b in zip(["q", "k", "v", "R"], grads(k, v, R), grads(k2, v2, R2)):
        if name != "q":
            a, b = a[..., keep, :] if name != "R" else a[..., keep], b[..., keep, :] if name != "R" else b[..., keep]
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["keys", "queries"])
def test_empty_cost_has_zero_gradients(backend, empty):
    need(backend)
    q, k, _ = _qkv()
    q, k = (q[:, :0], k) if empty == "queries" else (q, k[:, :0])
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    R = torch.ones(1, device=DEVICE, requires_grad=True)
    cost = geokern.retrieval_cost(q, k, R, gm.diag(torch.ones(8, device=DEVICE)), backend=backend)
    cost.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and R.grad.shape == R.shape
    assert (q.grad == 0).all() and (k.grad == 0).all() and (R.grad == 0).all()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_double_backward_is_refused_by_name(backend):
    """The kernels have no derivative of their own: a second derivative raises geokern's
    error naming the op (before: torch's 'no autograd formula was registered')."""
    need(backend)
    from geokern import metric

    g = metric.diag(torch.rand(8, device=DEVICE) + 0.5)
    q = torch.randn(1, 2, 5, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 7, 4, device=DEVICE, requires_grad=True)
    R = torch.rand(1, 2, 1, 7, device=DEVICE)
    out = geokern.retrieval_attention(q, k, v, R, g, beta=1.0, backend=backend)
    with pytest.raises(RuntimeError, match="retrieval_attention: double backward"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    cost = geokern.retrieval_cost(q, k, R, g, backend=backend)
    with pytest.raises(RuntimeError, match="retrieval_cost: double backward"):
        torch.autograd.grad(cost.square().sum(), q, create_graph=True)
    # a plain backward still works
    (gq,) = torch.autograd.grad(geokern.retrieval_attention(q, k, v, R, g, beta=1.0, backend=backend).sum(), q)
    assert gq.shape == q.shape and torch.isfinite(gq).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_gives_the_plain_mean_of_the_kept_values(backend):
    """beta = 0: equal weights on the kept keys; a row with none kept gives zeros, lse -inf.
    (Found in review: CUDA read -inf * 0 in its first tile and gave NaN everywhere; Triton's
    hard-min pass re-read fully masked rows and gave NaN.)"""
    need(backend)
    q, k, v = _qkv(b=2, lq=5, m=40)
    mask = torch.rand(2, 5, 40, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.4
    mask[1, 2] = False  # nothing kept in this row
    out, lse = _attn(backend, q, k, v, mask=mask, beta=0.0)
    kept = mask.double()
    want = (kept @ v.double()) / kept.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert lse[1, 2] == float("-inf") and torch.isfinite(lse[mask.any(-1)]).all()
    torch.testing.assert_close(lse[mask.any(-1)].double(), kept.sum(-1)[mask.any(-1)].log(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inf_query_coordinate_leaves_the_other_rows_alone(backend):
    """An infinite float16 query coordinate rescaled its whole tile (the scale was taken over
    every entry, inf included): the tile's other rows came out NaN (found in review)."""
    need(backend)
    q, k, v = _qkv(b=1, lq=20, m=24, n=16)
    q16, k16, v16 = q.half(), k.half(), v.half()
    q16[0, 3, 5] = float("inf")
    out, _ = _attn(backend, q16, k16, v16, beta=0.5)
    ref_out, _ = _attn("torch", q16.float(), k16.float(), v16.float(), beta=0.5)
    others = torch.arange(20, device=DEVICE) != 3
    assert out[0, others].isfinite().all(), "rows without an inf coordinate must stay finite"
    err = (out[0, others].float() - ref_out[0, others]).norm() / ref_out[0, others].norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r_shape", [(2, 5, 20), (20,)], ids=["per_pair", "per_key"])
def test_beta_R_past_float32_backward_is_finite(backend, r_shape):
    """The hard-min limit's gradients: d out / d (q, k, R) is 0 there (the weights are constant
    near the limit), as the reference's; never NaN from 0 * inf in the chain rule (per key, the
    Triton backward's bound on beta R fails and it takes its guarded loop)."""
    need(backend)
    q, k, v = _qkv(m=20)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    R = torch.full(r_shape, 1e30, device=DEVICE, requires_grad=True)
    out, lse = _attn(backend, q, k, v, R=R, beta=1e10)
    out.square().sum().backward()
    for name, g in (("q", q.grad), ("k", k.grad), ("R", R.grad)):
        assert g.isfinite().all() and (g == 0).all(), f"d out / d {name} in the hard-min limit: {g}"
    assert v.grad.isfinite().all()
