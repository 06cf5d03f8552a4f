"""Retrieval cost and fused retrieval attention: every backend against the float64 reference."""

import math
import zlib

import pytest
import torch
from _custom_ops import check_opcheck, ops_here
from _tolerance import assert_close
from conftest import DEVICE, HAS_CUDA

import geokern
import geokern.metric as gm
from geokern import _backend, _ext
from geokern.reference import retrieval as ref

BACKENDS = ["torch", "triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _id(x):
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return str(x)


@pytest.fixture(autouse=True)
def _seed(request):
    # a fixed seed per test id: failures reproduce, runs do not depend on test order
    torch.manual_seed(zlib.crc32(request.node.name.encode()))


def need(backend):
    why = _backend.why_unavailable(backend, DEVICE)
    if why:
        pytest.skip(f"backend {backend} unavailable here: {why}")


def rnd(*shape, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE, dtype=torch.float64))


def metric_of(kind, n, gen_params=None):
    """A metric of the family `kind` with float64 parameters (list returned for grads)."""
    lam = torch.rand(n, device=DEVICE, dtype=torch.float64) + 0.5
    if kind == "diag":
        return [lam], lambda p: gm.diag(p[0])
    if kind == "rotor_diag":
        theta = rnd(3)
        pairs = [(0, 1), (2, n - 1), (1, 2)]
        return [lam, theta], lambda p: gm.rotor_diag(p[0], p[1], pairs)
    q, _ = torch.linalg.qr(rnd(n, n))
    u, d = rnd(n, 2, scale=0.3), torch.tensor([0.4, -0.3], device=DEVICE, dtype=torch.float64)
    om = torch.tensor(0.8, device=DEVICE, dtype=torch.float64)
    return [om, q, lam, u, d], lambda p: gm.lowrank(p[0], p[1], p[2], p[3], p[4])


# ---- the cost: reference semantics ----------------------------------------------


def test_cost_hand_computed():
    q = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    c = geokern.retrieval_cost(q, k, 2.0, gm.diag(torch.tensor([1.0, 1.0], dtype=torch.float64)), eps=0.0)
    torch.testing.assert_close(c, torch.tensor([[10.0, 0.0, 2.0]], dtype=torch.float64))
    # lam weights each coordinate; eps sits inside the sqrt
    c = geokern.retrieval_cost(q, k, 1.0, gm.diag(torch.tensor([4.0, 0.25], dtype=torch.float64)), eps=1.0)
    torch.testing.assert_close(c, torch.tensor([[math.sqrt(36 + 4 + 1), 1.0, math.sqrt(5.0)]], dtype=torch.float64))
    # a quarter turn in the (0, 1) plane swaps which coordinate lam weights
    rot = gm.rotor_diag(torch.tensor([4.0, 0.25], dtype=torch.float64), torch.tensor([math.pi / 2], dtype=torch.float64), [(0, 1)])
    c = geokern.retrieval_cost(q, k[:1], 1.0, rot, eps=0.0)
    torch.testing.assert_close(c, torch.tensor([[math.sqrt(4 * 16 + 0.25 * 9)]], dtype=torch.float64))
    # an indefinite lowrank metric: g < 0 is clamped, cost = R sqrt(eps)
    eye = torch.eye(2, dtype=torch.float64)
    lr = gm.lowrank(1.0, eye, torch.ones(2, dtype=torch.float64), eye[:, :1], torch.tensor([-10.0], dtype=torch.float64))
    c = geokern.retrieval_cost(q, k[2:], 3.0, lr, eps=1e-8)
    torch.testing.assert_close(c, torch.tensor([[3e-4]], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["diag", "rotor_diag", "lowrank"])
def test_metric_features_reproduce_the_quadratic_form(kind):
    params, make = metric_of(kind, 6)
    m = make(params)
    dv = rnd(50, 6)
    phi, w = m.features(dv)
    torch.testing.assert_close(m.quad(dv), (phi * phi * w).sum(-1))
    # linear: phi(k - q) = phi(k) - phi(q), which the fused path relies on
    a, b = rnd(50, 6), rnd(50, 6)
    torch.testing.assert_close(m.features(a - b)[0], m.features(a)[0] - m.features(b)[0])


def test_rotor_is_out_of_place_and_ordered():
    lam = torch.ones(3, dtype=torch.float64)
    th = torch.tensor([0.3, -1.1], dtype=torch.float64)
    m = gm.rotor_diag(lam, th, [(0, 1), (1, 2)])
    x = rnd(4, 3)
    x0 = x.clone()
    r = m.rotate(x)
    assert torch.equal(x, x0), "rotate must not modify its input"
    c0, s0, c1, s1 = math.cos(0.3), math.sin(0.3), math.cos(-1.1), math.sin(-1.1)
    a = c0 * x0[:, 0] - s0 * x0[:, 1]
    b = s0 * x0[:, 0] + c0 * x0[:, 1]
    torch.testing.assert_close(r, torch.stack([a, c1 * b - s1 * x0[:, 2], s1 * b + c1 * x0[:, 2]], -1))


@pytest.mark.parametrize("rshape", ["scalar", "query", "key", "pair"])
def test_cost_shapes_and_R_broadcast(rshape):
    B, M, n = 4, 9, 5
    q, k = rnd(B, n), rnd(M, n)
    R = {"scalar": 1.5, "query": rnd(B, 1).abs(), "key": rnd(M).abs(), "pair": rnd(B, M).abs()}[rshape]
    lam = torch.rand(n, dtype=torch.float64, device=DEVICE) + 0.1
    c = geokern.retrieval_cost(q, k, R, gm.diag(lam))
    want = (torch.as_tensor(R, dtype=torch.float64, device=DEVICE)
            * torch.sqrt(((k[None] - q[:, None]) ** 2 * lam).sum(-1) + 1e-8))
    torch.testing.assert_close(c, want)
    # the same rows as a [B, Lq=1, n] query against per-row keys
    c3 = geokern.retrieval_cost(q[:, None], k.expand(B, M, n), R if rshape in ("scalar", "key") else R.unsqueeze(-2), gm.diag(lam))
    torch.testing.assert_close(c3[:, 0], want)


@pytest.mark.parametrize("kind", ["diag", "rotor_diag", "lowrank"])
def test_metric_gradients_by_finite_differences(kind):
    params, make = metric_of(kind, 5)
    params = [p.requires_grad_() for p in params]
    q, k, v = rnd(2, 3, 5), rnd(2, 7, 5), rnd(2, 7, 4)
    R = (rnd(2, 3, 1).abs() + 0.5).requires_grad_()

    def f(*p):
        return ref.retrieval_attention(q, k, v, R, make(p), 1.3), ref.retrieval_cost(q, k, R, make(p))

    assert torch.autograd.gradcheck(f, params)


# ---- the cost: every backend vs the float64 reference -------------------------------

# (query shape, keys shape, R kind)
COST_CASES = {
    "decode-B5-M37-shared-bank": ((5, 8), (37, 8), "query"),
    "3d-B2-L9-M13-per-row": ((2, 9, 6), (2, 13, 6), "pair"),
    "4d-headshared-L7-M20-D16": ((2, 3, 7, 16), (2, 1, 20, 16), "key"),
    "2d-B3-M7-scalar": ((3, 4), (7, 4), "scalar"),
}


def _run_cost(backend, dtype, q, k, R, make, params, compute_dtype=None):
    q, k = (t.detach().to(dtype).requires_grad_() for t in (q, k))
    ps = [p.detach().clone().requires_grad_() for p in params]
    Rt = R.detach().clone().requires_grad_() if isinstance(R, torch.Tensor) else R
    if backend == "ref":
        cost = ref.retrieval_cost(q, k, Rt, make(ps), 1e-8, compute_dtype)
    else:
        cost = geokern.retrieval_cost(q, k, Rt, make(ps), 1e-8, backend=backend)
    g = torch.randn(cost.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(cost.device, cost.dtype)
    (cost * g).sum().backward()
    grads = {"dquery": q.grad, "dkeys": k.grad, **{f"dmetric[{i}]": p.grad for i, p in enumerate(ps)}}
    if isinstance(Rt, torch.Tensor):
        grads["dR"] = Rt.grad
    return cost, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["diag", "rotor_diag", "lowrank"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(COST_CASES))
def test_cost_matches_reference(case, dtype, kind, backend):
    """Output and every gradient; one key equals one query (g = 0: the clamp and the eps)."""
    need(backend)
    qs, ks, rkind = COST_CASES[case]
    q, k = rnd(*qs), rnd(*ks)
    if kind != "lowrank" or backend == "torch":
        # lowrank features are GEMMs over the whole query / key tensor (geokern.metric): two equal
        # rows may round differently there, and d cost / d dv at g = 0 scales that by 1 / sqrt(eps)
        k[(0,) * (k.dim() - 1)] = q[(0,) * (q.dim() - 1)]
    q, k = q.to(dtype).double(), k.to(dtype).double()
    R = _R(rkind, qs, ks)
    params, make = metric_of(kind, qs[-1])
    params = [p.to(dtype).double() for p in params]
    c64, g64 = _run_cost("ref", torch.float64, q, k, R, make, params)
    # eps = 1e-8 underflows in float16: that reference divides by zero at g = 0, so float16 is
    # judged by the float32 reference's error (plus the float16 floor)
    cd, gd = _run_cost("ref", dtype, q, k, R, make, params, compute_dtype=torch.float32 if dtype == torch.float16 else dtype)
    c, g = _run_cost(backend, dtype, q, k, R, make, params)
    assert c.dtype == torch.float32 and c.shape == c64.shape
    # judged at the inputs' precision: the kernels see rotor / lowrank features in that dtype
    assert_close("cost", c.to(dtype), c64.float(), cd.float())
    for name in g64:
        assert torch.isfinite(g[name]).all(), f"{name}: non-finite ({backend}, {dtype})"
        assert_close(name, g[name].to(dtype), g64[name], gd[name])


# ---- attention: every backend vs the float64 reference -----------------------------

# (query shape, keys shape, values shape, R kind, mask kind)
CASES = {
    "4d-B2H3-L19-M23-D16": ((2, 3, 19, 16), (2, 3, 23, 16), (2, 3, 23, 12), "key", None),
    "3d-B2-L33-M17-D8-pair-mask": ((2, 33, 8), (2, 17, 8), (2, 17, 20), "pair", "pair"),
    "decode-B5-M37-shared-bank": ((5, 8), (37, 8), (37, 24), "query", "key"),
    "headshared-keys-L7-M40-D32": ((2, 2, 7, 32), (2, 1, 40, 32), (2, 1, 40, 16), "scalar", "key"),
    "4d-L1-M3": ((1, 2, 1, 16), (1, 2, 3, 16), (1, 2, 3, 16), "query", None),
}

# More than 64 keys: the CUDA kernel splits them over blocks and merges the splits by their lse
# (a shared bank read for several rows at once; per-row keys one row a block; d_v % 4 != 0).
SPLIT_CASES = {
    "decode-B3-M700-shared-bank-splits": ((3, 8), (700, 8), (700, 24), "key", "key"),
    "decode-B4-M200-per-row-splits": ((4, 8), (4, 200, 8), (4, 200, 16), "query", "key"),
    "3d-B2-L3-M300-splits-dv37": ((2, 3, 8), (2, 300, 8), (2, 300, 37), "pair", None),
}


def _R(kind, qshape, kshape):
    m = kshape[-2]
    if kind == "scalar":
        return 0.8
    lead = qshape[:-1] if len(qshape) > 2 else qshape[:-1]
    if kind == "query":
        return rnd(*lead, 1).abs() + 0.3
    if kind == "key":
        return rnd(m).abs() + 0.3
    return rnd(*lead, m).abs() + 0.3


def _mask(kind, qshape, kshape):
    m = kshape[-2]
    if kind is None:
        return None
    if kind == "key":
        lead = qshape[:-1] if len(qshape) == 2 else qshape[:-2] + (1,)
        mk = torch.rand(*lead, m, device=DEVICE) > 0.3
    else:
        mk = torch.rand(*qshape[:-1], m, device=DEVICE) > 0.3
    mk[..., 0] = False  # and one fully masked row
    mk.view(-1, m)[0] = False
    return mk


def _run(backend, dtype, tensors, R, mask, make, params, beta, compute_dtype=None):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in tensors)
    ps = [p.detach().clone().requires_grad_() for p in params]
    Rt = R.detach().clone().requires_grad_() if isinstance(R, torch.Tensor) else R
    if backend == "ref":
        out, lse = ref.retrieval_attention(q, k, v, Rt, make(ps), beta, 1e-8, mask, True, compute_dtype)
    else:
        out, lse = geokern.retrieval_attention(q, k, v, Rt, make(ps), beta, 1e-8, mask, return_lse=True, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.device, dtype)
    (out * g).sum().backward()
    grads = {"dquery": q.grad, "dkeys": k.grad, "dvalues": v.grad}
    for i, p in enumerate(ps):
        grads[f"dmetric[{i}]"] = p.grad
    if isinstance(Rt, torch.Tensor):
        grads["dR"] = Rt.grad
    return out, lse, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(case, dtype, backend):
    _check_attention(CASES[case], dtype, backend)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_attention_key_splits_match_reference(case, dtype, backend):
    """The CUDA kernel's split / merge path (the Triton kernels have no such path: their key
    tiling is covered by CASES)."""
    _check_attention(SPLIT_CASES[case], dtype, backend)


def _check_attention(spec, dtype, backend):
    need(backend)
    qs, ks, vs, rkind, mkind = spec
    tensors = (rnd(*qs), rnd(*ks), rnd(*vs))
    # round the inputs to dtype first, so every run sees the same numbers
    tensors = tuple(t.to(dtype).double() for t in tensors)
    R = _R(rkind, qs, ks)
    mask = _mask(mkind, qs, ks)
    params, make = metric_of("diag", qs[-1])
    params = [p.to(dtype).double() for p in params]
    beta = 2.0
    out64, lse64, g64 = _run("ref", torch.float64, tensors, R, mask, make, params, beta)
    outd, lsed, gd = _run("ref", dtype, tensors, R, mask, make, params, beta, compute_dtype=dtype)
    out, lse, g = _run(backend, dtype, tensors, R, mask, make, params, beta)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("output", out, out64.to(dtype), outd)
    fin = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), fin), "lse: -inf exactly on the fully masked rows"
    assert_close("lse", lse[fin].float(), lse64[fin].float(), lsed[fin].float())
    if mask is not None:
        empty = ~mask.expand(out64.shape[:-1] + (mask.shape[-1],)).any(-1) if mask.dim() > 1 else None
        if empty is not None and empty.any():
            assert (out[empty] == 0).all(), "output: fully masked rows must be zeros"
    for name in g64:
        if backend == "triton" and dtype == torch.float32 and name.startswith("dmetric"):
            _check_expanded_dw(name, g[name], g64[name])
        else:
            assert_close(name, g[name].to(dtype), g64[name], gd[name])


def _check_expanded_dw(name, got, want):
    # dw = sum ds (q - k)^2 is accumulated expanded (q^2, q k, k^2 terms, added atomically) in
    # the kernels, which cancels: float32 keeps about 1e-6 of it, not 1e-7
    err = (got.double() - want).norm() / want.norm()
    assert err < 1e-5, f"{name}: relative error {err:.2e} (triton, float32)"


# (query, keys, values, R kind, mask kind, bank C, bank R kind): the bank is [C, n] / [C, d_v]
BANK_CASES = {
    "4d-B2H2-L19-M23-C29-D16": ((2, 2, 19, 16), (2, 2, 23, 16), (2, 2, 23, 12), "query", "key", 29, "key"),
    "decode-B5-T6-C37-n8": ((5, 8), (5, 6, 8), (5, 6, 24), "query", "key", 37, None),
    "4d-even-L32-M48-C64-D16": ((1, 2, 32, 16), (1, 2, 48, 16), (1, 2, 48, 16), "scalar", None, 64, None),
    "4d-no-own-keys": ((2, 1, 5, 16), (2, 1, 0, 16), (2, 1, 0, 8), "query", None, 21, None),
    "3d-pair-R-and-bank-R": ((2, 9, 8), (2, 7, 8), (2, 7, 8), "pair", "pair", 11, "pair"),
}


def _bank_run(backend, dtype, tensors, R, bR, mask, lam, beta, union, compute_dtype=None):
    """Output and gradients of retrieval_attention with a bank; union=True runs the reference on
    the definition instead: the bank expanded per row and concatenated to the row's keys."""
    q, k, v, bk, bv = (t.detach().to(dtype).requires_grad_() for t in tensors)
    Rt = R.detach().clone().requires_grad_() if isinstance(R, torch.Tensor) else R
    bRt = bR.detach().clone().requires_grad_() if isinstance(bR, torch.Tensor) else bR
    lamt = lam.detach().clone().requires_grad_()
    if union:
        qb, kb, _ = ref.as_batched(q, k)
        lead = kb.shape[:-2]
        c, m = bk.shape[-2], kb.shape[-2]
        keys = torch.cat([kb, bk.expand(lead + bk.shape[-2:])], -2)
        vals = torch.cat([v, bv.expand(lead + bv.shape[-2:])], -2)
        cost_lead = lead + (qb.shape[-2],)
        rr = Rt if isinstance(Rt, torch.Tensor) else torch.tensor(float(Rt), dtype=torch.float64, device=DEVICE)
        rb = rr if bRt is None else bRt
        rr = ref._r_batched(rr, q.dim() == 2) if rr.dim() > 0 else rr
        rb = ref._r_batched(rb, q.dim() == 2) if isinstance(rb, torch.Tensor) and rb.dim() > 0 else rb
        ru = torch.cat([torch.as_tensor(rr).expand(cost_lead + (m,)), torch.as_tensor(rb).expand(cost_lead + (c,))], -1)
        keep = torch.ones(cost_lead + (m + c,), dtype=torch.bool, device=DEVICE)
        if mask is not None:
            mk = mask.unsqueeze(-2) if q.dim() == 2 else mask
            keep[..., :m] = mk.expand(cost_lead + (m,))
        if q.dim() == 2:
            ru, keep = ru.squeeze(-2), keep.squeeze(-2)
        out, lse = ref.retrieval_attention(q, keys, vals, ru, gm.diag(lamt), beta, 1e-8, keep, True, compute_dtype)
    else:
        bank = (bk, bv) if bRt is None else (bk, bv, bRt)
        out, lse = geokern.retrieval_attention(q, k, v, Rt, gm.diag(lamt), beta, 1e-8, mask, bank=bank,
                                               return_lse=True, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.device, dtype)
    gl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(out.device)
    ((out * g).sum() + (lse * gl.to(lse.dtype)).sum()).backward()
    # an empty tensor (no own keys) may get no gradient at all: that is its zeros
    grads = {name: t.grad if t.grad is not None or t.numel() else torch.zeros_like(t) for name, t in
             [("dquery", q), ("dkeys", k), ("dvalues", v), ("dbank_keys", bk), ("dbank_values", bv), ("dlam", lamt)]}
    if isinstance(Rt, torch.Tensor):
        grads["dR"] = Rt.grad
    if isinstance(bRt, torch.Tensor):
        grads["dbank_R"] = bRt.grad
    return out, lse, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("case", list(BANK_CASES))
def test_bank_segment_equals_one_softmax_over_the_union(case, dtype, backend):
    """retrieval_attention(..., bank=(keys, values[, R])) in one launch vs the reference on the
    union (the bank expanded per row and concatenated): output, lse (differentiated too) and
    every gradient, the bank's summed over the batch."""
    need(backend)
    qs, ks, vs, rkind, mkind, c, bkind = BANK_CASES[case]
    tensors = tuple(t.to(dtype).double() for t in (rnd(*qs), rnd(*ks), rnd(*vs), rnd(c, qs[-1]), rnd(c, vs[-1])))
    R = _R(rkind, qs, ks)
    bR = {None: None, "key": rnd(c).abs() + 0.3, "pair": rnd(*qs[:-1], c).abs() + 0.3}[bkind]
    mask = _mask(mkind, qs, ks) if ks[-2] > 0 else None
    if mask is not None:
        mask.view(-1, ks[-2])[0] = False  # a row that sees only the bank
    lam = (torch.rand(qs[-1], device=DEVICE, dtype=torch.float64) + 0.5).to(dtype).double()
    args = (tensors, R, bR, mask, lam, 1.5)
    out64, lse64, g64 = _bank_run("ref", torch.float64, *args, union=True)
    outd, lsed, gd = _bank_run("ref", dtype, *args, union=True, compute_dtype=dtype)
    out, lse, g = _bank_run(backend, dtype, *args, union=False)
    assert_close("output", out, out64.to(dtype), outd)
    assert_close("lse", lse.float(), lse64.float(), lsed.float())
    assert set(g) == set(g64)
    for name in g64:
        if backend == "triton" and dtype == torch.float32 and name == "dlam":
            _check_expanded_dw(name, g[name], g64[name])
        else:
            assert_close(name, g[name].to(dtype), g64[name], gd[name])


@pytest.mark.parametrize("pipe", ["0", "1"])
@pytest.mark.parametrize("case", ["4d-even-L32-M48-C64-D16", "4d-no-own-keys", "decode-B5-T6-C37-n8"])
def test_triton_forward_with_and_without_pipelining(case, pipe, monkeypatch):
    """The Triton forward issues the next key tile's GEMM early or not by the head dim
    (kernels.retrieval._pipelined); both loops stay correct at every dim: bfloat16 with an even
    row segment and a bank, an empty row segment, and (decode) a masked row segment (a masked
    launch keeps float32 norms; that segment unpipelined) beside an unmasked bank (pipelined)."""
    monkeypatch.setenv("GEOKERN_RETRIEVAL_PIPE", pipe)
    test_bank_segment_equals_one_softmax_over_the_union(case, torch.bfloat16, "triton")


@pytest.mark.parametrize("kind", ["rotor_diag", "lowrank"])
def test_bank_with_general_metrics(kind):
    """A non-diagonal metric maps the bank's keys through the same features: triton with a
    bank against the torch backend (two reference calls merged by their lse)."""
    need("triton")
    params, make = metric_of(kind, 8)
    q, k, v, bk, bv = rnd(2, 5, 8), rnd(2, 6, 8), rnd(2, 6, 4), rnd(9, 8), rnd(9, 4)
    R = rnd(2, 5, 1).abs() + 0.5
    res = {}
    for backend in ("torch", "triton"):
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v, bk, bv, R)]
        ps = [p.detach().float().requires_grad_() for p in params]
        out = geokern.retrieval_attention(*leaves[:3], leaves[5], make(ps), 1.2, bank=tuple(leaves[3:5]),
                                          backend=backend)
        g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum(),
                                leaves + ps)
        res[backend] = (out, g)
    torch.testing.assert_close(res["triton"][0], res["torch"][0], rtol=2e-5, atol=2e-6)
    for i, (a, b) in enumerate(zip(res["triton"][1], res["torch"][1])):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=f"{kind}: gradient {i}")


def test_bank_needs_its_own_R_when_R_depends_on_the_key():
    q, k, v = rnd(2, 3, 8), rnd(2, 5, 8), rnd(2, 5, 4)
    bank = (rnd(7, 8), rnd(7, 4))
    one = torch.ones(8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="pass the bank's own R"):
        geokern.retrieval_attention(q, k, v, rnd(5).abs(), gm.diag(one), 1.0,
                                    bank=bank)
    with pytest.raises(ValueError, match="bank keys must be"):
        geokern.retrieval_attention(q, k, v, 1.0, gm.diag(one), 1.0,
                                    bank=(rnd(7, 6), rnd(7, 4)))
    with pytest.raises(TypeError, match="bank must be a tuple"):
        geokern.retrieval_attention(q, k, v, 1.0, gm.diag(one), 1.0, bank=rnd(7, 8))
    with pytest.raises(ValueError, match="must broadcast to the batch shape"):
        geokern.retrieval_attention(q, k, v, 1.0, gm.diag(one), 1.0,
                                    bank=(rnd(3, 7, 8), rnd(3, 7, 4)))


def test_trainer_case_mask_reproduces_the_1e4_offset():
    """The trainer: diag metric, n = 8, one query per row, per-query R, beta = 5, eps = 1e-8;
    it masks a key by adding 1e4 to its cost. A boolean mask must give the same output."""
    B, T, C, n, dv = 3, 12, 20, 8, 16
    q = rnd(B, n)
    seq, bank = rnd(B, T, n), rnd(C, n)
    vseq, vbank = rnd(B, T, dv), rnd(C, dv)
    keys = torch.cat([seq, bank.expand(B, C, n)], 1)
    values = torch.cat([vseq, vbank.expand(B, C, dv)], 1)
    lam = torch.rand(n, dtype=torch.float64, device=DEVICE) + 0.1
    R = rnd(B).abs() + 0.5  # one R_sc per row
    keep = torch.rand(B, T + C, device=DEVICE) > 0.4
    keep[:, 0] = True
    dvv = keys - q[:, None]
    cost = R[:, None] * torch.sqrt(torch.clamp((dvv * dvv * lam).sum(-1), min=0) + 1e-8)
    cost = cost + 1e4 * (~keep)
    want = (torch.softmax(-5.0 * cost, -1)[:, None] @ values)[:, 0]
    for backend in BACKENDS:
        if _backend.why_unavailable(backend, DEVICE):
            continue
        for dtype in (torch.float64, torch.float32):
            if backend != "torch" and dtype == torch.float64:
                continue
            got = geokern.retrieval_attention(q.to(dtype), keys.to(dtype), values.to(dtype), R[:, None].to(dtype),
                                              gm.diag(lam.to(dtype)), 5.0, 1e-8, keep, backend=backend)
            torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                       atol=1e-5 if dtype == torch.float32 else 1e-10,
                                       msg=f"trainer case, {backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_equal_to_key_is_finite_and_clamped(backend):
    """q == k: g = 0 exactly in the reference (cost = R sqrt(eps)); the kernels expand the
    distance, so g comes out as rounding noise of either sign and the clamp keeps it real.
    Values, lse and gradients stay finite, and the coincident key dominates."""
    need(backend)
    B, L, n = 2, 9, 16
    k = rnd(B, L, n)
    q = k.clone()  # every query sits on a key
    v = rnd(B, L, 8)
    lam = torch.rand(n, dtype=torch.float64, device=DEVICE) + 0.5
    for dtype in ([torch.float64] if backend == "torch" else []) + [torch.float32, torch.bfloat16]:
        out, lse, g = _run(backend, dtype, (q, k, v), 1.0, None, lambda p: gm.diag(p[0]), [lam], 4.0)
        for name, t in [("output", out), ("lse", lse), *g.items()]:
            assert torch.isfinite(t).all(), f"{name}: non-finite with q == k ({backend}, {dtype})"
        out64, lse64, g64 = _run("ref", torch.float64, (q, k, v), 1.0, None, lambda p: gm.diag(p[0]), [lam], 4.0)
        # the expanded distance's error at q == k is about sqrt(u) |q|: judge by that
        tol = {torch.float64: 1e-10, torch.float32: 2e-3, torch.bfloat16: 3e-2}[dtype]
        err = ((out.double() - out64).norm() / out64.norm()).item()
        assert err < tol, f"output: relative error {err:.2e} with q == k ({backend}, {dtype})"
    # the reference's cost is exactly R sqrt(eps) on the diagonal
    c = ref.retrieval_cost(q, k, 2.0, gm.diag(lam))
    torch.testing.assert_close(torch.diagonal(c, dim1=-2, dim2=-1), torch.full((B, L), 2e-4, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rotor_diag", "lowrank"])
def test_general_metrics_and_their_gradients(kind, backend):
    need(backend)
    params, make = metric_of(kind, 8)
    tensors = (rnd(2, 11, 8), rnd(2, 13, 8), rnd(2, 13, 8))
    R = rnd(13).abs() + 0.5
    out64, _, g64 = _run("ref", torch.float64, tensors, R, None, make, params, 1.5)
    out, _, g = _run(backend, torch.float32, tensors, R, None, make, params, 1.5)
    outd, _, gd = _run("ref", torch.float32, tensors, R, None, make, params, 1.5)
    assert_close("output", out, out64.float(), outd)
    for name in g64:
        if backend == "triton" and name.startswith("dmetric"):
            _check_expanded_dw(name, g[name], g64[name])
        else:
            assert_close(name, g[name].float(), g64[name], gd[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    need(backend)
    lam = torch.ones(8, device=DEVICE)
    f = lambda q, k, v: geokern.retrieval_attention(q, k, v, 1.0, gm.diag(lam), 1.0, return_lse=True, backend=backend)  # noqa: E731
    out, lse = f(torch.randn(2, 0, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 5, 3, device=DEVICE))
    assert out.shape == (2, 0, 3) and lse.shape == (2, 0)
    out, lse = f(torch.randn(2, 4, 8, device=DEVICE), torch.randn(2, 0, 8, device=DEVICE), torch.randn(2, 0, 3, device=DEVICE))
    assert out.shape == (2, 4, 3) and (out == 0).all() and (lse == -math.inf).all()


# ---- custom ops ------------------------------------------------------------------


def _cuda_op_samples(name):
    q, k, v = torch.randn(2, 1, 5, 8, device=DEVICE), torch.randn(1, 1, 9, 8, device=DEVICE), torch.randn(2, 1, 9, 6, device=DEVICE)
    k2, v2 = torch.randn(2, 1, 4, 8, device=DEVICE), torch.randn(2, 1, 4, 6, device=DEVICE)
    w = torch.rand(8, device=DEVICE) + 0.5
    r, rq = torch.rand(1, 1, 1, 9, device=DEVICE) + 0.5, torch.rand(2, 1, 5, 1, device=DEVICE) + 0.5
    rp = torch.rand(2, 1, 5, 4, device=DEVICE) + 0.5
    mask, mask2 = torch.rand(2, 1, 1, 9, device=DEVICE) > 0.2, torch.rand(2, 1, 5, 4, device=DEVICE) > 0.2
    if name == "retrieval_cost_cuda":
        return [(q, k, w, r, 1e-8), (q, k2, w, rq, 1e-6)]
    if name == "retrieval_cost_backward_cuda":
        return [(torch.randn(2, 1, 5, 9, device=DEVICE), q, k, w, r, 1e-8),
                (torch.randn(2, 1, 5, 4, device=DEVICE), q, k2, w, rp, 1e-8)]
    segs = [([k], [v], [r], [mask], 1.5), ([k, k2], [v, v2], [rq, rp], [None, mask2], 0.7)]
    if name == "retrieval_attention_cuda":
        return [(q, ks, vs, w, rs, ms, beta, 1e-8) for ks, vs, rs, ms, beta in segs]
    out = []
    for (ks, vs, rs, ms, beta), dl in zip(segs, (False, True)):
        o, lse = torch.ops.geokern.retrieval_attention_cuda(q, ks, vs, w, rs, ms, beta, 1e-8)
        out.append((torch.randn_like(o), q, ks, vs, w, rs, ms, o, lse, torch.randn_like(lse) if dl else None, beta, 1e-8))
    return out


def _op_samples(qualname):
    name = qualname.split("::")[1]
    if name.endswith("_cuda") or name.startswith("retrieval_cost"):  # the cost's Triton ops share the schema
        return _cuda_op_samples(name.replace("_triton", "_cuda"))
    q, k, v = torch.randn(2, 1, 17, 16, device=DEVICE), torch.randn(1, 1, 20, 16, device=DEVICE), torch.randn(2, 1, 20, 8, device=DEVICE)
    w = torch.rand(16, device=DEVICE) + 0.5
    r = torch.rand(1, 1, 1, 20, device=DEVICE) + 0.5
    mask = torch.rand(2, 1, 1, 20, device=DEVICE) > 0.2
    bk, bv, br = torch.randn(1, 1, 9, 16, device=DEVICE), torch.randn(1, 1, 9, 8, device=DEVICE), torch.rand(1, 1, 17, 1, device=DEVICE)
    if "bwd" in qualname:
        out, lse = torch.ops.geokern.retrieval_attention_fwd_triton(q, k, v, w, r, mask, None, None, None, 1.5, 1e-8)
        out2, lse2 = torch.ops.geokern.retrieval_attention_fwd_triton(q, k, v, w, r, mask, bk, bv, br, 1.5, 1e-8)
        return [(torch.randn_like(out), q, k, v, w, r, mask, None, None, None, out, lse, None, 1.5, 1e-8, True),
                (torch.randn_like(out), q, k, v, w, r, mask, None, None, None, out, lse, torch.randn_like(lse), 1.5,
                 1e-8, False),
                (torch.randn_like(out), q, k, v, w, r, mask, bk, bv, br, out2, lse2, torch.randn_like(lse), 1.5, 1e-8,
                 True)]
    return [(q, k, v, w, r, mask, None, None, None, 1.5, 1e-8),
            (q, k, v, w, r.expand(1, 1, 17, 20).contiguous(), None, None, None, None, 0.5, 1e-6),
            (q, k, v, w, r, mask, bk, bv, br, 1.5, 1e-8)]


@pytest.mark.parametrize("qualname", ops_here("retrieval"))
def test_opcheck(qualname):
    # without CUDA, ops_here lists only the CUDA ops (their CPU implementation is the reference)
    check_opcheck(qualname, _op_samples(qualname))


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public op with its kernels needs CUDA tensors")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_public_op_compiles_with_backward(backend):
    need(backend)
    q, k, v = (torch.randn(2, 2, 33, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    lam = (torch.rand(16, device=DEVICE) + 0.5).requires_grad_()
    R = (torch.rand(33, device=DEVICE) + 0.5).requires_grad_()
    f = torch.compile(lambda q, k, v, lam, R: geokern.retrieval_attention(q, k, v, R, gm.diag(lam), 1.5, backend=backend).sum(),
                      fullgraph=True)
    got = torch.autograd.grad(f(q, k, v, lam, R), (q, k, v, lam, R))
    want = torch.autograd.grad(ref.retrieval_attention(q, k, v, R, gm.diag(lam), 1.5).sum(), (q, k, v, lam, R))
    for name, a, b in zip(["dquery", "dkeys", "dvalues", "dlam", "dR"], got, want):
        assert_close(name, a, b.double(), b)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the public op with its kernels needs CUDA tensors")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_public_op_compiles_when_one_tensor_fills_two_arguments(backend):
    """keys that are the values, and a bank sharing the row's R: the wrapper must hand the
    autograd Function distinct tensor objects (dynamo's fullgraph rejects a duplicate input)."""
    need(backend)
    q, x, bx = (torch.randn(2, 2, 33, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    lam = torch.rand(16, device=DEVICE) + 0.5
    R = torch.rand(2, 2, 33, 1, device=DEVICE) + 0.5

    def run(q, x, bx):
        return geokern.retrieval_attention(q, x, x, R, gm.diag(lam), 1.5, bank=(bx, bx), backend=backend)

    got = torch.autograd.grad(torch.compile(lambda *a: run(*a).sum(), fullgraph=True)(q, x, bx), (q, x, bx))
    want = torch.autograd.grad(run(q, x, bx).sum(), (q, x, bx))
    for name, a, b in zip(["dquery", "dkeys=values", "dbank"], got, want):
        assert_close(name, a, b.double(), b)


@pytest.mark.skipif(not _ext.HAS_C, reason="the CUDA extension geokern._C is not built")
@pytest.mark.parametrize("chunks", ["bwd-whole", "bwd-chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_cuda_segments_op_matches_reference(dtype, chunks, monkeypatch):
    """The CUDA ops with three key segments (per row, a shared bank, shared across dim 0) in one
    call, every R form and mask form, a row masked in every segment, and the lse's gradient:
    against autograd through the float64 reference over the concatenated keys. "bwd-chunked"
    makes the CUDA backward take one query at a time (as it does when dP would be large).
    Without a GPU this checks their CPU implementation (the spec's backward formulas)."""
    from geokern.ops import retrieval as ops

    if chunks == "bwd-chunked":
        monkeypatch.setenv("GEOKERN_RETRIEVAL_BWD_CHUNK", "60")

    shapes = [((2, 3, 7, 8), (2, 3, 7, 12), (2, 3, 5, 7), (2, 3, 5, 7)),  # k, v, r, mask
              ((1, 1, 40, 8), (1, 1, 40, 12), (1, 1, 1, 40), (2, 3, 1, 40)),
              ((1, 3, 6, 8), (1, 3, 6, 12), (2, 3, 5, 1), None)]
    q = rnd(2, 3, 5, 8).to(dtype)
    ks = [rnd(*k).to(dtype) for k, _, _, _ in shapes]
    vs = [rnd(*v).to(dtype) for _, v, _, _ in shapes]
    rs = [(rnd(*r).abs() + 0.3).float() for _, _, r, _ in shapes]
    ms = [None if m is None else torch.rand(*m, device=DEVICE) > 0.3 for _, _, _, m in shapes]
    ms[0][0, 0, 0] = False
    ms[1][0, 0] = False
    ms[2] = torch.ones(2, 3, 5, 6, dtype=torch.bool, device=DEVICE)
    ms[2][0, 0, 0] = False  # row (0, 0, 0) sees no key at all
    w = (torch.rand(8, device=DEVICE) + 0.5).float()
    beta, eps = 0.7, 1e-8
    out, lse = torch.ops.geokern.retrieval_attention_cuda(q, ks, vs, w, rs, ms, beta, eps)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    dlse[0, 0, 0] = 0.0
    got = torch.ops.geokern.retrieval_attention_backward_cuda(dout, q, ks, vs, w, rs, ms, out, lse, dlse, beta, eps)

    def reference(prec):
        lead = (2, 3)
        grad_shapes = [ops._grad_shapes(lead, q, k, v, r) for k, v, r in zip(ks, vs, rs)]
        leaf = lambda t, s: t.detach().to(prec).expand(s).clone().requires_grad_()  # noqa: E731
        qx = leaf(q, grad_shapes[0][0])
        kx = [leaf(k, g[1]) for k, g in zip(ks, grad_shapes)]
        vx = [leaf(v, g[2]) for v, g in zip(vs, grad_shapes)]
        rx = [leaf(r, g[3]) for r, g in zip(rs, grad_shapes)]
        wx = leaf(w, w.shape)
        _, kc, vc, rc, mc = ops._segs_cat(qx, kx, vx, rx, ms)
        o, l = ref.retrieval_attention(qx, kc, vc, rc, gm.diag(wx), beta, eps, mc, True, compute_dtype=prec)
        fin = torch.isfinite(l)
        loss = (o * dout.to(prec)).sum() + (torch.where(fin, l, 0.0) * dlse.to(prec)).sum()
        g = torch.autograd.grad(loss, [qx, *kx, *vx, *rx, wx])
        return o, l, g

    o64, l64, g64 = reference(torch.float64)
    od, ld, gd = reference(torch.float32 if dtype == torch.float32 else dtype)
    assert_close("output", out, o64.to(dtype), od)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(l64)), "lse: -inf exactly on the fully masked row"
    assert (out[0, 0, 0] == 0).all(), "output: the fully masked row must be zeros"
    fin = torch.isfinite(l64)
    assert_close("lse", lse[fin], l64[fin].float(), ld[fin].float())
    n = len(ks)
    flat = [got[0], *got[1], *got[2], *got[3], got[4]]
    names = ["dq"] + [f"{x}[{i}]" for x in ("dk", "dv", "dr") for i in range(n)] + ["dw"]
    for name, a, b, c in zip(names, flat, g64, gd):
        assert a.dtype == torch.float32 and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)} vs {tuple(b.shape)}"
        assert_close(name, a.to(dtype) if dtype != torch.float32 else a, b, c)


@pytest.mark.skipif(not _ext.HAS_C, reason="the CUDA extension geokern._C is not built")
@pytest.mark.parametrize("knobs", ["default", "ctas8", "ctas528", "bank1", "bank16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cuda_forward_layouts(dtype, knobs, monkeypatch):
    """The CUDA forward's paths against the float64 reference: 40 rows (a full group of 32 and a
    partial one) of which each sees its own keys (the per-row path) and a bank shared by all (the
    shared path), d_v = 200 (a partial column chunk); the queries of one batch sharing their keys
    (shared) and one key set per batch dim 0 (rows of a group span two key sets: per-row) with
    d_v = 13 and values whose rows are not 16-byte aligned (element loads); under the split
    heuristic's knobs (few CTAs: one split; many: many splits merged; the bank in 1 or 16 splits).
    Without a GPU this checks the CPU implementation."""
    env = {"ctas8": ("GEOKERN_RETRIEVAL_CTAS", "8"), "ctas528": ("GEOKERN_RETRIEVAL_CTAS", "528"),
           "bank1": ("GEOKERN_RETRIEVAL_BANK_SPLITS", "1"), "bank16": ("GEOKERN_RETRIEVAL_BANK_SPLITS", "16")}.get(knobs)
    if env:
        monkeypatch.setenv(*env)
    from geokern.ops import retrieval as ops

    def check(q, ks, vs, rs, ms, beta=0.6, eps=1e-8):
        w = (torch.rand(q.shape[3], device=DEVICE) * 0.3 + 0.05).float()
        out, lse = torch.ops.geokern.retrieval_attention_cuda(q, ks, vs, w, rs, ms, beta, eps)
        c = lambda t: None if t is None else t.double()  # noqa: E731
        _, kc, vc, rc, mc = ops._segs_cat(q.double(), [c(k) for k in ks], [c(v) for v in vs], [c(r) for r in rs], ms)
        o64, l64 = ref.retrieval_attention(q.double(), kc, vc, rc, gm.diag(w.double()), beta, eps, mc, True)
        _, kd, vd, rd, md = ops._segs_cat(q, ks, vs, rs, ms)
        od, _ = ref.retrieval_attention(q, kd, vd, rd, gm.diag(w), beta, eps, md, True)
        assert_close("output", out, o64.to(dtype), od)
        assert_close("lse", lse, l64.float(), l64.float())

    # decode: 40 rows, per-row keys (masked in part) + a shared bank
    B, T, C, DV = 40, 37, 300, 200
    q = rnd(1, B, 1, 8).to(dtype)
    ks = [rnd(1, B, T, 8).to(dtype), rnd(1, 1, C, 8).to(dtype)]
    vs = [rnd(1, B, T, DV).to(dtype), rnd(1, 1, C, DV).to(dtype)]
    r = (torch.rand(1, B, 1, 1, device=DEVICE) + 0.5).float()
    m = torch.rand(1, B, 1, T, device=DEVICE) > 0.3
    m[0, 3] = False  # row 3 sees the bank only
    check(q, ks, vs, [r, r], [m, None])
    # a long bank (2600 keys: 41 splits by default, so the merge runs its batched loads and a
    # remainder) beside short per-row key sets
    C2, T2 = 2600, 5
    q = rnd(1, B, 1, 8).to(dtype)
    ks = [rnd(1, B, T2, 8).to(dtype), rnd(1, 1, C2, 8).to(dtype)]
    vs = [rnd(1, B, T2, DV).to(dtype), rnd(1, 1, C2, DV).to(dtype)]
    check(q, ks, vs, [r, r], [None, None])
    # queries of a batch share their keys; values' rows 14 elements apart (not 16-byte aligned)
    q = rnd(2, 3, 45, 8).to(dtype)
    vbig = rnd(2, 3, 50, 14).to(dtype)
    ks, vs = [rnd(2, 3, 50, 8).to(dtype)], [vbig[..., :13]]
    check(q, ks, vs, [(torch.rand(2, 3, 45, 50, device=DEVICE) + 0.5).float()], [None])
    # keys per batch dim 0 only: a group of 32 consecutive rows spans both key sets
    q = rnd(2, 3, 7, 8).to(dtype)
    ks, vs = [rnd(2, 1, 60, 8).to(dtype)], [rnd(2, 1, 60, 24).to(dtype)]
    check(q, ks, vs, [(torch.rand(1, 1, 1, 1, device=DEVICE) + 0.5).float()], [None])


# ---- bad input -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    need(backend)
    q, k, v = torch.randn(3, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE), torch.randn(10, 4, device=DEVICE)
    m = gm.diag(torch.ones(8, device=DEVICE))
    att = lambda *a, **kw: geokern.retrieval_attention(*a, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="share the coordinate dim"):
        att(q, torch.randn(10, 7, device=DEVICE), v, 1.0, m, 1.0)
    with pytest.raises(ValueError, match="values must have as many rows as keys"):
        att(q, k, v[:9], 1.0, m, 1.0)
    with pytest.raises(TypeError, match="keys has dtype torch.float64 but query has torch.float32"):
        att(q, k.double(), v, 1.0, m, 1.0)
    with pytest.raises(TypeError, match="metric must be a geokern.metric"):
        att(q, k, v, 1.0, torch.ones(8), 1.0)
    with pytest.raises(ValueError, match="R of shape \\(3,\\) must broadcast .* \\[B, 1\\]"):
        att(q, k, v, torch.ones(3, device=DEVICE), m, 1.0)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        att(q, k, v, 1.0, m, 1.0, mask=torch.ones(10, device=DEVICE))
    with pytest.raises(ValueError, match="mask of shape \\(11,\\)"):
        att(q, k, v, 1.0, m, 1.0, mask=torch.ones(11, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="beta must be finite"):
        att(q, k, v, 1.0, m, float("nan"))
    with pytest.raises(TypeError, match="R must be a tensor or a real number"):
        att(q, k, v, "1", m, 1.0)
    with pytest.raises(ValueError, match="query must have at least 2 dim"):
        att(torch.randn(8, device=DEVICE), k, v, 1.0, m, 1.0)
    with pytest.raises(ValueError, match="do not broadcast"):
        att(torch.randn(3, 2, 8, device=DEVICE), torch.randn(4, 10, 8, device=DEVICE), torch.randn(4, 10, 4, device=DEVICE), 1.0, m, 1.0)
    with pytest.raises(ValueError, match="metric: rotor_diag pairs"):
        gm.rotor_diag(torch.ones(8), torch.ones(1), [(0, 8)])
    with pytest.raises(ValueError, match="backend must be one of"):
        geokern.retrieval_attention(q, k, v, 1.0, m, 1.0, backend="numpy")


def test_unavailable_backends_are_errors_not_fallbacks():
    q, k, v = torch.randn(3, 8), torch.randn(10, 8), torch.randn(10, 4)
    m = gm.diag(torch.ones(8))
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        geokern.retrieval_attention(q, k, v, 1.0, m, 1.0, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        geokern.retrieval_cost(q, k, 1.0, m, backend="cuda")
    if _backend.why_unavailable("triton", DEVICE) is None:
        with pytest.raises(TypeError, match="backend='triton' supports query dtypes"):
            geokern.retrieval_attention(q.double().to(DEVICE), k.double().to(DEVICE), v.double().to(DEVICE), 1.0,
                                        gm.diag(torch.ones(8, dtype=torch.float64, device=DEVICE)), 1.0, backend="triton")


# ---- curvature scalar ----------------------------------------------------------------


def _explicit_curvature(R4, g, eps):
    """The double trace written out index by index (float64, one row)."""
    n = R4.shape[-1]
    total = 0.0
    for mu in range(n):
        for nu in range(n):
            for rho in range(n):
                for sigma in range(n):
                    total += float(R4[mu, nu, rho, sigma]) * float(g[mu, rho]) * float(g[nu, sigma])
    return math.sqrt(abs(total / n**2) + eps)


def test_curvature_scalar_matches_explicit_sum():
    torch.manual_seed(11)
    n, B = 3, 4
    R4 = torch.randn(B, n, n, n, n, dtype=torch.float64, device=DEVICE)
    a = torch.randn(B, n, n, dtype=torch.float64, device=DEVICE)
    g = a @ a.transpose(-1, -2) + n * torch.eye(n, dtype=torch.float64, device=DEVICE)
    out = geokern.curvature_scalar(R4, g, 1e-8)
    assert out.shape == (B,)
    for b in range(B):
        assert out[b].item() == pytest.approx(_explicit_curvature(R4[b].cpu(), g[b].cpu(), 1e-8), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_id)
def test_curvature_scalar_dtypes_and_shared_metric(dtype):
    torch.manual_seed(12)
    n = 8
    R4 = torch.randn(5, n, n, n, n, device=DEVICE).to(dtype)
    g = (torch.eye(n, device=DEVICE) + 0.1 * torch.randn(n, n, device=DEVICE)).to(dtype)  # shared by all rows
    out = geokern.curvature_scalar(R4, g)
    assert out.shape == (5,) and out.dtype == (torch.float32 if dtype != torch.float64 else dtype)
    want = ref.curvature_scalar(R4.double(), g.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6, msg="curvature_scalar output")


def test_curvature_scalar_gradcheck_and_eps():
    torch.manual_seed(13)
    n = 2
    R4 = torch.randn(3, n, n, n, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = torch.randn(3, n, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, m: geokern.curvature_scalar(r, m, 1e-6), (R4, g))
    zero = geokern.curvature_scalar(torch.zeros(n, n, n, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64), 1e-8)
    assert zero.item() == pytest.approx(1e-4), "a vanishing trace gives sqrt(eps)"


def test_curvature_scalar_bad_input():
    R4, g = torch.randn(2, 3, 3, 3, 3), torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="R4 must end in four equal dims"):
        geokern.curvature_scalar(torch.randn(2, 3, 3, 3, 4), g)
    with pytest.raises(ValueError, match=r"g_inv must end in \(3, 3\)"):
        geokern.curvature_scalar(R4, torch.randn(2, 4, 4))
    with pytest.raises(TypeError, match="g_inv has dtype torch.float64 but R4 has torch.float32"):
        geokern.curvature_scalar(R4, g.double())
    with pytest.raises(ValueError, match="leading dims of R4"):
        geokern.curvature_scalar(R4, torch.randn(5, 3, 3))
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        geokern.curvature_scalar(R4, g, backend="triton")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        geokern.curvature_scalar(R4, g, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_is_differentiable(backend):
    """Merging segments by their log-sum-exp (geokern.nn.GeodesicRetrieval) needs d lse."""
    if _backend.why_unavailable(backend, DEVICE):
        pytest.skip(f"backend {backend} unavailable here")
    torch.manual_seed(21)
    B, L, n, dv = 3, 11, 8, 5
    q = torch.randn(B, n, device=DEVICE, requires_grad=True)
    k = torch.randn(B, L, n, device=DEVICE, requires_grad=True)
    v = torch.randn(B, L, dv, device=DEVICE, requires_grad=True)
    lam = (torch.rand(n, device=DEVICE) + 0.5).requires_grad_()
    R = (torch.rand(B, 1, device=DEVICE) + 0.5).requires_grad_()
    mask = torch.rand(B, L, device=DEVICE) > 0.3
    mask[1] = False  # fully masked: lse = -inf, no gradient from it
    go, gl = torch.randn(B, dv, device=DEVICE), torch.randn(B, device=DEVICE)
    leaves = (q, k, v, lam, R)

    def grads(be):
        out, lse = geokern.retrieval_attention(q, k, v, R, gm.diag(lam), 0.9, 1e-8, mask, return_lse=True, backend=be)
        finite = torch.isfinite(lse)
        loss = (out * go).sum() + (torch.where(finite, lse, 0.0) * gl).sum()
        return torch.autograd.grad(loss, leaves)

    want = grads("torch") if backend != "torch" else None
    got = grads(backend)
    for name, g in zip(("query", "keys", "values", "lam", "R"), got):
        assert torch.isfinite(g).all(), f"{backend} grad {name} through lse is not finite"
    if want is not None:
        for name, g, w in zip(("query", "keys", "values", "lam", "R"), got, want):
            torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-4, msg=f"{backend} grad {name} through lse")
