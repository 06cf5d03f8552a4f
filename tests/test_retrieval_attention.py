"""Fused retrieval attention: every backend against the float64 reference, the bank segment, the
custom ops and bad input."""

import math

import pytest
import torch
from _custom_ops import cuda_op, custom_op_tests, op as custom_op
from _helpers import BACKENDS, dtype_id, need
from _retrieval import KERNEL_DTYPES, make_R, metric_of, rnd
from _tolerance import assert_close, rel_err
from conftest import DEVICE, HAS_CUDA

import geokern
import geokern.metric as gm
from geokern import _backend
from geokern.ops import retrieval as ops
from geokern.reference import retrieval as ref


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
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(case, dtype, backend):
    _check_attention(CASES[case], dtype, backend)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
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
    R = make_R(rkind, qs, ks)
    mask = _mask(mkind, qs, ks)
    params, make = metric_of("diag", qs[-1])
    params = [p.to(dtype).double() for p in params]
    beta = 2.0
    out64, lse64, g64 = _run("ref", torch.float64, tensors, R, mask, make, params, beta)
    outd, lsed, gd = _run("ref", dtype, tensors, R, mask, make, params, beta, compute_dtype=dtype)
    out, lse, g = _run(backend, dtype, tensors, R, mask, make, params, beta)
    assert out.dtype == dtype and lse.dtype == torch.float32
    judge = _judge(backend, dtype)
    judge("output", out, out64.to(dtype), outd)
    fin = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), fin), "lse: -inf exactly on the fully masked rows"
    judge("lse", lse[fin].float(), lse64[fin].float(), lsed[fin].float())
    if mask is not None:
        empty = ~mask.expand(out64.shape[:-1] + (mask.shape[-1],)).any(-1) if mask.dim() > 1 else None
        if empty is not None and empty.any():
            assert (out[empty] == 0).all(), "output: fully masked rows must be zeros"
    for name in g64:
        if backend == "triton" and dtype == torch.float32 and name.startswith("dmetric"):
            _check_expanded_dw(name, g[name], g64[name])
        else:
            judge(name, g[name].to(dtype), g64[name], gd[name])


# The Triton kernels expand the squared distance as |q|^2 + |k|^2 - 2 q.k (kernels/retrieval/README.md):
# an absolute error of about u (|q|^2 + |k|^2) in every distance, which the same-dtype reference
# (dv formed directly) does not make. Their results may be off by that much, relative, where that
# exceeds the usual bound (dR and the lse sum over keys, which amplifies it).
EXPANDED = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _judge(backend, dtype):
    """assert_close, allowing the Triton kernels their expanded distance's error."""
    if backend != "triton":
        return assert_close

    def judge(name, out, ref64, same):
        if out.shape != ref64.shape or not rel_err(out, ref64) <= EXPANDED[dtype]:  # NaN: not <=
            assert_close(name, out, ref64, same)

    return judge


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


def _bank_run(backend, dtype, tensors, R, bR, mask, lam, beta, union, compute_dtype=None, **knobs):
    """Output and gradients of retrieval_attention with a bank; union=True runs the reference on
    the definition instead: the bank expanded per row and concatenated to the row's keys."""
    q, k, v, bk, bv = (t.detach().to(dtype).requires_grad_() for t in tensors)
    Rt = R.detach().clone().requires_grad_() if isinstance(R, torch.Tensor) else R
    bRt = bR.detach().clone().requires_grad_() if isinstance(bR, torch.Tensor) else bR
    lamt = lam.detach().clone().requires_grad_()
    if union:
        qb, kb, _, squeeze = ref.as_batched(q, k)
        lead = kb.shape[:-2]
        c, m = bk.shape[-2], kb.shape[-2]
        keys = torch.cat([kb, bk.expand(lead + bk.shape[-2:])], -2)
        vals = torch.cat([v, bv.expand(lead + bv.shape[-2:])], -2)
        cost_lead = lead + (qb.shape[-2],)
        rr = Rt if isinstance(Rt, torch.Tensor) else torch.tensor(float(Rt), dtype=torch.float64, device=DEVICE)
        rb = rr if bRt is None else bRt
        per_row = lambda x: x.unsqueeze(-2) if squeeze and x.dim() >= 2 else x  # noqa: E731  [B, M] -> [B, 1, M]
        rr, rb = per_row(rr), per_row(rb)
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
                                               return_lse=True, backend=backend, **knobs)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", list(BANK_CASES))
def test_bank_segment_equals_one_softmax_over_the_union(case, dtype, backend, **knobs):
    """retrieval_attention(..., bank=(keys, values[, R])) in one launch vs the reference on the
    union (the bank expanded per row and concatenated): output, lse (differentiated too) and
    every gradient, the bank's summed over the batch. ("torch" checks the reference's own bank=,
    two segments merged by their lse, against the union.)"""
    need(backend)
    qs, ks, vs, rkind, mkind, c, bkind = BANK_CASES[case]
    tensors = tuple(t.to(dtype).double() for t in (rnd(*qs), rnd(*ks), rnd(*vs), rnd(c, qs[-1]), rnd(c, vs[-1])))
    R = make_R(rkind, qs, ks)
    bR = {None: None, "key": rnd(c).abs() + 0.3, "pair": rnd(*qs[:-1], c).abs() + 0.3}[bkind]
    mask = _mask(mkind, qs, ks) if ks[-2] > 0 else None
    if mask is not None:
        mask.view(-1, ks[-2])[0] = False  # a row that sees only the bank
    lam = (torch.rand(qs[-1], device=DEVICE, dtype=torch.float64) + 0.5).to(dtype).double()
    args = (tensors, R, bR, mask, lam, 1.5)
    out64, lse64, g64 = _bank_run("ref", torch.float64, *args, union=True)
    outd, lsed, gd = _bank_run("ref", dtype, *args, union=True, compute_dtype=dtype)
    out, lse, g = _bank_run(backend, dtype, *args, union=False, **knobs)
    judge = _judge(backend, dtype)
    judge("output", out, out64.to(dtype), outd)
    judge("lse", lse.float(), lse64.float(), lsed.float())
    assert set(g) == set(g64)
    for name in g64:
        if backend == "triton" and dtype == torch.float32 and name == "dlam":
            _check_expanded_dw(name, g[name], g64[name])
        else:
            judge(name, g[name].to(dtype), g64[name], gd[name])


@pytest.mark.parametrize("knob", ["pipeline=0", "pipeline=1", "norm_mma=0"])
@pytest.mark.parametrize("case", ["4d-even-L32-M48-C64-D16", "4d-no-own-keys", "decode-B5-T6-C37-n8"])
def test_triton_forward_knobs(case, knob):
    """The Triton forward issues the next key tile's GEMM early or not by the head dim (pipeline=-1)
    and adds 16-bit norms on tensor cores (norm_mma=-1); every loop stays correct at every dim:
    bfloat16 with an even row segment and a bank, an empty row segment, and (decode) a masked row
    segment (a masked launch keeps float32 norms; that segment unpipelined) beside an unmasked bank."""
    name, value = knob.split("=")
    test_bank_segment_equals_one_softmax_over_the_union(case, torch.bfloat16, "triton", **{name: int(value)})


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


def attention_op_samples(qualname):
    """Argument tuples of retrieval_attention_<backend> / retrieval_attention_backward_<backend>
    (one schema): keys shared by the batch, R per key, a key mask; then R per pair and no mask;
    then a bank shared by the batch with R per query; the knobs at other values than "choose"."""
    q, k, v = torch.randn(2, 1, 17, 16, device=DEVICE), torch.randn(1, 1, 20, 16, device=DEVICE), torch.randn(2, 1, 20, 8, device=DEVICE)
    w = torch.rand(16, device=DEVICE) + 0.5
    r = torch.rand(1, 1, 1, 20, device=DEVICE) + 0.5
    mask = torch.rand(2, 1, 1, 20, device=DEVICE) > 0.2
    bk, bv, br = torch.randn(1, 1, 9, 16, device=DEVICE), torch.randn(1, 1, 9, 8, device=DEVICE), torch.rand(2, 1, 17, 1, device=DEVICE) + 0.5
    fwd = [(q, k, v, w, r, mask, None, None, None, 1.5, 1e-8, 0, 0, -1, -1),
           (q, k, v, w, r.expand(1, 1, 17, 20).contiguous(), None, None, None, None, 0.5, 1e-6, 8, 1, 1, 0),
           (q, k, v, w, r, mask, bk, bv, br, 1.5, 1e-8, 0, 16, 0, 1)]
    if "backward" not in qualname:
        return fwd
    forward = custom_op(qualname.replace("_backward", ""))
    out = []
    for args, dlse, need_dr, chunk in zip(fwd, (False, True, True), (True, False, True), (0, 60, 0)):
        o, lse = forward(*args)
        out.append((torch.randn_like(o), *args[:9], o, lse, torch.randn_like(lse) if dlse else None, *args[9:11],
                    need_dr, chunk))
    return out


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("retrieval_attention_", attention_op_samples)

def test_no_bank_gradient_convention():
    """Without a bank, every backend's backward returns empty float32 [0] tensors as the bank's gradients."""
    for op in [cuda_op("retrieval_attention_backward_cuda")] + (
            [torch.ops.geokern.retrieval_attention_backward_triton.default] if HAS_CUDA else []):
        grads = op(*attention_op_samples(op._schema.name)[0])
        for name, g in zip(("dbank_k", "dbank_v", "dbank_r"), grads[4:7]):
            assert g.shape == (0,) and g.dtype == torch.float32, f"{op._schema.name} {name}: {tuple(g.shape)} {g.dtype}"


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


# ---- the CUDA ops against the reference (their CPU implementation without a GPU) ----------


def _union4(q, k, v, r, mask, bank):
    """4-D operands of the attention ops as one key set: the bank expanded per row and
    concatenated to the row's keys (the definition the bank segment must equal)."""
    segs = [(k, v, r, mask)] + ([] if bank is None else [(*bank, None)])
    lead = tuple(torch.broadcast_shapes(q.shape[:2], *[s[0].shape[:2] for s in segs], *[s[1].shape[:2] for s in segs]))
    lq = q.shape[2]
    kc = torch.cat([k_.expand(lead + k_.shape[2:]) for k_, _, _, _ in segs], 2)
    vc = torch.cat([v_.expand(lead + v_.shape[2:]) for _, v_, _, _ in segs], 2)
    rc = torch.cat([r_.expand(lead + (lq, k_.shape[2])) for k_, _, r_, _ in segs], 3)
    mc = None
    if mask is not None:
        keep = torch.ones((), dtype=torch.bool, device=q.device)
        mc = torch.cat([(keep if m_ is None else m_).expand(lead + (lq, k_.shape[2])) for k_, _, _, m_ in segs], 3)
    return kc, vc, rc, mc


# the bank of the CUDA ops' check (keys, values, R), as shapes: none; shared by the batch with R
# per key; one per batch dim 1 (shared across dim 0) with R per query
BANKS = {"no-bank": None, "bank-shared": ((1, 1, 40, 8), (1, 1, 40, 12), (1, 1, 1, 40)),
         "bank-per-dim1": ((1, 3, 6, 8), (1, 3, 6, 12), (2, 3, 5, 1))}


@pytest.mark.parametrize("chunks", ["bwd-whole", "bwd-chunked"])
@pytest.mark.parametrize("layout", list(BANKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cuda_ops_match_reference(dtype, layout, chunks):
    """The CUDA ops with the row's keys (R and mask per pair) and a bank in one call, and the lse's
    gradient: against autograd through the float64 reference over the concatenated keys;
    without a bank one row is fully masked. "bwd-chunked" makes the CUDA backward take one
    query at a time (as it does when dP would be large). Without a GPU this checks their CPU
    implementation (the reference's backward formulas)."""
    q = rnd(2, 3, 5, 8).to(dtype)
    k, v = rnd(2, 3, 7, 8).to(dtype), rnd(2, 3, 7, 12).to(dtype)
    r = (rnd(2, 3, 5, 7).abs() + 0.3).float()
    mask = torch.rand(2, 3, 5, 7, device=DEVICE) > 0.3
    mask[0, 0, 0] = False  # row (0, 0, 0) sees no key of its own
    bank = None
    if BANKS[layout] is not None:
        ks, vs, rs = BANKS[layout]
        bank = (rnd(*ks).to(dtype), rnd(*vs).to(dtype), (rnd(*rs).abs() + 0.3).float())
    w = (torch.rand(8, device=DEVICE) + 0.5).float()
    beta, eps = 0.7, 1e-8
    b3 = bank or (None, None, None)
    out, lse = cuda_op("retrieval_attention_cuda")(q, k, v, w, r, mask, *b3, beta, eps, 0, 0, -1, -1)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    dlse[0, 0, 0] = 0.0
    got = cuda_op("retrieval_attention_backward_cuda")(dout, q, k, v, w, r, mask, *b3, out, lse, dlse, beta, eps, True,
                                                   60 if chunks == "bwd-chunked" else 0)

    def reference(prec):
        (dq_s, *seg), bank_s = ops._attention_grad_shapes(dout, q, k, v, r, *b3)
        leaf = lambda t, s: t.detach().to(prec).expand(s).clone().requires_grad_()  # noqa: E731
        qx, wx = leaf(q, dq_s), leaf(w, w.shape)
        kx, vx, rx = (leaf(t, s) for t, s in zip((k, v, r), seg))
        bx = None if bank is None else tuple(leaf(t, s) for t, s in zip(bank, bank_s[1:]))
        kc, vc, rc, mc = _union4(qx, kx, vx, rx, mask, bx)
        o, l = ref.retrieval_attention(qx, kc, vc, rc, gm.diag(wx), beta, eps, mc, True, compute_dtype=prec)
        fin = torch.isfinite(l)
        loss = (o * dout.to(prec)).sum() + (torch.where(fin, l, 0.0) * dlse.to(prec)).sum()
        leaves = [qx, kx, vx, rx] + ([] if bx is None else list(bx)) + [wx]
        return o, l, torch.autograd.grad(loss, leaves)

    o64, l64, g64 = reference(torch.float64)
    od, ld, gd = reference(torch.float32 if dtype == torch.float32 else dtype)
    assert_close("output", out, o64.to(dtype), od)
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin), "lse: -inf exactly on the fully masked row"
    if bank is None:
        assert (out[0, 0, 0] == 0).all(), "output: the fully masked row must be zeros"
    assert_close("lse", lse[fin], l64[fin].float(), ld[fin].float())
    names = ["dq", "dk", "dv", "dr"] + ([] if bank is None else ["dbank_k", "dbank_v", "dbank_r"]) + ["dw"]
    flat = list(got[:4]) + ([] if bank is None else list(got[4:7])) + [got[7]]
    for name, a, b, c in zip(names, flat, g64, gd, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)} vs {tuple(b.shape)}"
        assert_close(name, a.to(dtype) if dtype != torch.float32 else a, b, c)


@pytest.mark.parametrize("knobs", ["default", "ctas8", "ctas528", "bank1", "bank16"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_cuda_forward_layouts(dtype, knobs):
    """The CUDA forward's paths against the float64 reference: 40 rows (a full group of 32 and a
    partial one) of which each sees its own keys (the per-row path) and a bank shared by all (the
    shared path), d_v = 200 (a partial column chunk); the queries of one batch sharing their keys
    (shared) and one key set per batch dim 0 (rows of a group span two key sets: per-row) with
    d_v = 13 and values whose rows are not 16-byte aligned (element loads); under the split
    heuristic's knobs (few CTAs: one split; many: many splits merged; the bank in 1 or 16 splits).
    Without a GPU this checks the CPU implementation."""
    num_ctas, bank_splits = {"ctas8": (8, 0), "ctas528": (528, 0), "bank1": (0, 1), "bank16": (0, 16)}.get(knobs, (0, 0))

    def check(q, k, v, r, m, bank=None, beta=0.6, eps=1e-8):
        w = (torch.rand(q.shape[3], device=DEVICE) * 0.3 + 0.05).float()
        out, lse = cuda_op("retrieval_attention_cuda")(q, k, v, w, r, m, *(bank or (None, None, None)), beta, eps,
                                                   num_ctas, bank_splits, -1, -1)
        c = lambda t: None if t is None else t.double()  # noqa: E731
        kc, vc, rc, mc = _union4(q.double(), c(k), c(v), c(r), m, None if bank is None else tuple(map(c, bank)))
        o64, l64 = ref.retrieval_attention(q.double(), kc, vc, rc, gm.diag(w.double()), beta, eps, mc, True)
        kd, vd, rd, md = _union4(q, k, v, r, m, bank)
        od, _ = ref.retrieval_attention(q, kd, vd, rd, gm.diag(w), beta, eps, md, True)
        assert_close("output", out, o64.to(dtype), od)
        assert_close("lse", lse, l64.float(), l64.float())

    # decode: 40 rows, per-row keys (masked in part) + a shared bank
    B, T, C, DV = 40, 37, 300, 200
    q = rnd(1, B, 1, 8).to(dtype)
    r = (torch.rand(1, B, 1, 1, device=DEVICE) + 0.5).float()
    m = torch.rand(1, B, 1, T, device=DEVICE) > 0.3
    m[0, 3] = False  # row 3 sees the bank only
    check(q, rnd(1, B, T, 8).to(dtype), rnd(1, B, T, DV).to(dtype), r, m,
          (rnd(1, 1, C, 8).to(dtype), rnd(1, 1, C, DV).to(dtype), r))
    # a long bank (2600 keys: 41 splits by default, so the merge runs its batched loads and a
    # remainder) beside short per-row key sets
    C2, T2 = 2600, 5
    q = rnd(1, B, 1, 8).to(dtype)
    check(q, rnd(1, B, T2, 8).to(dtype), rnd(1, B, T2, DV).to(dtype), r, None,
          (rnd(1, 1, C2, 8).to(dtype), rnd(1, 1, C2, DV).to(dtype), r))
    # queries of a batch share their keys; values' rows 14 elements apart (not 16-byte aligned)
    q = rnd(2, 3, 45, 8).to(dtype)
    vbig = rnd(2, 3, 50, 14).to(dtype)
    check(q, rnd(2, 3, 50, 8).to(dtype), vbig[..., :13], (torch.rand(2, 3, 45, 50, device=DEVICE) + 0.5).float(), None)
    # keys per batch dim 0 only: a group of 32 consecutive rows spans both key sets
    q = rnd(2, 3, 7, 8).to(dtype)
    check(q, rnd(2, 1, 60, 8).to(dtype), rnd(2, 1, 60, 24).to(dtype),
          (torch.rand(1, 1, 1, 1, device=DEVICE) + 0.5).float(), None)


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
    with pytest.raises(ValueError, match="pipeline must be -1 \\(choose\\), 0 or 1, got 2"):
        att(q, k, v, 1.0, m, 1.0, pipeline=2)
    with pytest.raises(ValueError, match="num_ctas must be 0 \\(choose\\) or positive, got -1"):
        att(q, k, v, 1.0, m, 1.0, num_ctas=-1)
    with pytest.raises(TypeError, match="bwd_chunk must be an int, got float"):
        att(q, k, v, 1.0, m, 1.0, bwd_chunk=1.5)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_is_differentiable(backend):
    """Merging segments by their log-sum-exp (geokern.nn.GeodesicRetrieval) needs d lse."""
    need(backend)
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
