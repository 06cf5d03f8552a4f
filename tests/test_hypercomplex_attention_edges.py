"""Quaternion and octonion attention at the edges: inf and NaN in v, and NaN / inf in causally
hidden keys (and query rows), every backend against the float64 reference
(geokern.reference.hypercomplex_attention), positions of +inf / -inf / NaN exactly, finite entries
within the suite's tolerance.

The Triton interpreter's tiles are 16 x 16 (kernels.hypercomplex_attention._blocks): the shapes
here put keys in one key block and in several."""

import pytest
import torch
from _helpers import dtype_id, need, run_isolated
from _tolerance import assert_close
from conftest import DEVICE

import geokern
from geokern.reference import hypercomplex_attention as ref

OPS = {4: geokern.quaternion_attention, 8: geokern.octonion_attention}
REFS = {4: ref.quaternion_attention, 8: ref.octonion_attention}
INF = float("inf")


def assert_same(name, got, want64, same=None):
    """+inf, -inf and NaN at exactly the reference's positions; the finite rest as assert_close."""
    for what, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = f(got), f(want64)
        assert torch.equal(a, b), (f"{name}: {what} at {(a & ~b).nonzero().tolist()} (not in the reference), "
                                   f"missing at {(b & ~a).nonzero().tolist()}")
    fin = torch.isfinite(want64)
    if fin.any():
        assert_close(f"{name} (finite entries)", got[fin], want64[fin], None if same is None else same[fin])


def _qkv(B, H, Hkv, Tq, Tk, D, dtype=torch.float32):
    return tuple(torch.randn(*s, device=DEVICE, dtype=torch.float64).to(dtype)
                 for s in ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)))


def _run(n, q, k, v, causal, backend):
    y = OPS[n](q, k, v, causal=causal, backend=backend)
    return y, REFS[n](q.double(), k.double(), v.double(), causal), REFS[n](q, k, v, causal)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_octonion_inf_in_v_is_signed_inf(backend):
    """The defect's repro: one inf in v reaches each output component through exactly one term of
    sum_j p_ij ((q^_i conj(k^_j)) v_j), so y is +-inf, never NaN (Triton gave all-NaN rows: its
    regrouped trilinear sum added infinite terms of both signs)."""
    need(backend)
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    v[0, 0, 1, 0] = INF
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    y, y64, _ = _run(8, q, k, v, False, backend)
    assert torch.isinf(y).all() and not torch.isnan(y).any(), f"{backend} y: {y}"
    assert_same(f"{backend} y", y, y64)
    torch.testing.assert_close(y, geokern.octonion_attention(q, k, v, causal=False, backend="torch"))


# (B, H, Hkv, Tq, Tk, D, causal, the key j and component d of the inf): every row sees key j
# (full), some rows are hidden from it (prefill, chunked decode: those rows stay finite), one-token
# decode; grouped heads
CASES = {
    "full": (1, 2, 1, 7, 9, 16, False, 3, 5),
    "prefill": (1, 2, 2, 9, 9, 16, True, 4, 11),
    "chunked": (1, 2, 1, 5, 13, 16, True, 10, 2),
    "decode": (2, 2, 1, 1, 9, 16, True, 8, 7),
}


@pytest.mark.parametrize("n", [8, 4])
@pytest.mark.parametrize("sign", [1, -1], ids=["+inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES))
def test_inf_in_v_matches_reference(case, dtype, sign, n):
    need("triton")
    B, H, Hkv, Tq, Tk, D, causal, j, d = CASES[case]
    q, k, v = _qkv(B, H, Hkv, Tq, Tk, D, dtype)
    v[0, 0, j, d] = sign * INF
    y, y64, same = _run(n, q, k, v, causal, "triton")
    assert y.dtype == dtype
    assert_same(f"triton n={n} {case} y", y, y64, same)
    first = max(0, j - (Tk - Tq)) if causal and Tq > 1 else 0  # the first row that sees key j
    c = d // n * n
    assert not torch.isfinite(y[0, :H // Hkv, first:, c:c + n]).any(), "a row missed the inf"
    assert torch.isfinite(y[:, :, :first]).all(), "a row the key is hidden from"


@pytest.mark.parametrize("n", [8, 4])
def test_several_non_finite_in_one_block(n):
    """In one key block: two infinities in one key's channel, opposite infinities in two keys of a
    channel, like infinities in two keys, a NaN; grouped heads."""
    need("triton")
    q, k, v = _qkv(1, 2, 1, 11, 13, 32, torch.float32)
    for j, d, x in ((2, 0, INF), (2, 5, -INF), (6, 9, INF), (7, 9, -INF), (10, 19, INF), (11, 19, INF),
                    (4, 28, float("nan"))):
        v[0, 0, j, d] = x
    for causal in (False, True):
        y, y64, same = _run(n, q, k, v, causal, "triton")
        assert_same(f"triton n={n} causal={causal} y", y, y64, same)
        first = 4 - 2 if causal else 0  # the first row that sees key 4 (off = Tk - Tq = 2)
        assert torch.isnan(y[..., first:, 28 // n * n:28 // n * n + n]).all(), "a NaN in v: its channel of every row"


def test_octonion_inf_across_key_and_query_blocks():
    """Keys in three interpreter key blocks, queries in two: infinities of both signs in different
    blocks, the finite channels unchanged."""
    need("triton")
    q, k, v = _qkv(1, 1, 1, 20, 37, 24, torch.float32)
    v[0, 0, 30, 3], v[0, 0, 5, 12], v[0, 0, 33, 12] = INF, -INF, -INF
    for causal in (False, True):
        y, y64, same = _run(8, q, k, v, causal, "triton")
        assert_same(f"triton causal={causal} y", y, y64, same)
    assert torch.isfinite(y[..., 16:]).all(), "a channel with no inf came out non-finite"


def test_octonion_inf_in_hidden_key_within_its_block():
    """A causally hidden key contributes nothing: an inf in the v of a key hidden from rows 0-4 (in
    the key block Triton visits for them) leaves those rows finite and exact; rows 5-6 see it: +-inf."""
    need("triton")
    q, k, v = _qkv(1, 1, 1, 7, 7, 16, torch.float32)
    v[0, 0, 5, 3] = INF
    y, y64, same = _run(8, q, k, v, True, "triton")
    assert_same("triton y", y, y64, same)
    assert torch.isfinite(y[0, 0, :5]).all() and torch.isinf(y[0, 0, 5:, :8]).all()
    assert torch.isfinite(y[..., 8:]).all()


# Garbage in causally hidden keys: (B, H, Hkv, Tq, Tk, D, the keys given NaN / +inf / -inf in turn).
# Each key is hidden from the rows before j - (Tk - Tq); those rows must equal the clean problem's.
# Tq = Tk = 20: key 9 in query block 0's diagonal key block, key 18 past query block 0 (the
# reference made rows 0-17 NaN, Triton only 16-17); chunked decode with an offset that is no
# multiple of the tile; 33 rows: three query blocks.
HIDDEN = {
    "square20": (1, 2, 1, 20, 20, 16, (9, 18)),
    "chunked": (1, 2, 2, 20, 27, 24, (12, 22, 25)),
    "square33": (1, 1, 1, 33, 33, 8, (15, 16, 31)),
}
GARBAGE = (float("nan"), INF, -INF)


def _hidden_problem(case, dtype, what):
    """(q, k, v) with garbage at HIDDEN[case]'s keys (what = "k" / "v") or at the query rows
    min(keys) - off.. (what = "q"), the same with the garbage replaced by 0, and the clean rows:
    for k / v the rows before the first garbage key's first row, for q the keys after the last
    garbage row's last key."""
    B, H, Hkv, Tq, Tk, D, keys = HIDDEN[case]
    q, k, v = _qkv(B, H, Hkv, Tq, Tk, D, dtype)
    bad = [t.clone() for t in (q, k, v)]
    clean = [t.clone() for t in (q, k, v)]
    off = Tk - Tq
    pos = keys if what != "q" else tuple(j - off for j in keys[:1])
    t, c = {"q": (bad[0], clean[0]), "k": (bad[1], clean[1]), "v": (bad[2], clean[2])}[what]
    for m, j in enumerate(pos):
        t[:, :, j, (5 * j + 3) % D] = GARBAGE[m % 3]
        c[:, :, j, (5 * j + 3) % D] = 0
    hidden = min(pos) - off if what != "q" else max(pos) + off + 1
    return bad, clean, hidden


@pytest.mark.parametrize("n", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("what", ["v", "k"])
@pytest.mark.parametrize("case", list(HIDDEN))
def test_hidden_key_garbage_forward(case, what, dtype, n):
    """NaN / +inf / -inf in the k or v of causally hidden keys: the rows they are hidden from equal
    the clean problem (garbage replaced by 0; bitwise in the reference), whatever the tile size;
    the rows that see them match the float64 reference's +inf / -inf / NaN exactly."""
    need("triton")
    (q, k, v), clean, first = _hidden_problem(case, dtype, what)
    y, y64, same = _run(n, q, k, v, True, "triton")
    assert_same(f"triton n={n} y", y, y64, same)
    yc64 = REFS[n](*(t.double() for t in clean), True)
    assert torch.equal(y64[:, :, :first], yc64[:, :, :first]), "reference: a hidden key reached a row"
    assert torch.isfinite(y[:, :, :first]).all(), f"triton: hidden garbage reached rows {first} rows"
    assert_close(f"triton n={n} rows hidden from the garbage", y[:, :, :first], yc64[:, :, :first],
                 REFS[n](*clean, True)[:, :, :first])
    assert not torch.isfinite(y[:, :, first]).all(), "the first row that sees a garbage key"


def _grads(n, args, dy, backend, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in args]
    OPS[n](*leaves, causal=True, backend=backend).backward(dy.to(dtype))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("n", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("what", ["v", "k", "q"])
@pytest.mark.parametrize("case", ["square20", "chunked"])
def test_hidden_garbage_backward(case, what, dtype, n):
    """The backward: garbage in hidden keys' k / v leaves dq of the rows they are hidden from equal
    to the clean problem's; garbage in a query row's q leaves dk, dv of the keys hidden from it
    equal to the clean problem's. Everything else: non-finite exactly where the float64
    reference's autograd is, the finite entries within tolerance."""
    need("triton")
    bad, clean, cut = _hidden_problem(case, dtype, what)
    dy = torch.randn_like(bad[0])
    got = _grads(n, bad, dy, "triton", dtype)
    want = _grads(n, bad, dy, "torch", torch.float64)
    same = _grads(n, bad, dy, "torch", dtype)
    for name, g, w, sm in zip(("dq", "dk", "dv"), got, want, same):
        assert torch.equal(torch.isfinite(g), torch.isfinite(w)), \
            f"{name}: non-finite at {(~torch.isfinite(g) & torch.isfinite(w)).nonzero().tolist()[:8]}, " \
            f"finite at {(torch.isfinite(g) & ~torch.isfinite(w)).nonzero().tolist()[:8]}"
        fin = torch.isfinite(w)
        if fin.any():
            sm = sm[fin] if torch.isfinite(sm[fin]).all() else None  # the same-dtype torch bound, where it has one
            assert_close(f"triton {name} (finite entries)", g[fin], w[fin], sm)
    cwant = _grads(n, clean, dy, "torch", torch.float64)
    csame = _grads(n, clean, dy, "torch", dtype)
    if what == "q":  # the keys hidden from every garbage row
        for name, i in (("dk", 1), ("dv", 2)):
            assert torch.equal(want[i][:, :, cut:], cwant[i][:, :, cut:]), f"reference {name}"
            assert_close(f"triton {name} of keys hidden from the garbage", got[i][:, :, cut:], cwant[i][:, :, cut:],
                         csame[i][:, :, cut:])
    else:  # the rows every garbage key is hidden from
        assert torch.equal(want[0][:, :, :cut], cwant[0][:, :, :cut]), "reference dq"
        assert_close("triton dq of rows hidden from the garbage", got[0][:, :, :cut], cwant[0][:, :, :cut],
                     csame[0][:, :, :cut])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_octonion_inf_in_v_backward(causal):
    """The backward with an inf in a visited v (both backends): dv is finite and exact (its formula
    never reads v); dq and dk are non-finite exactly where the reference's autograd is."""
    need("triton")
    q, k, v = _qkv(1, 2, 1, 6, 6, 16, torch.float32)
    v[0, 0, 4, 9] = INF
    dy = torch.randn_like(q)
    grads = {}
    for backend, dt in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        OPS[8](*leaves, causal=causal, backend=backend).backward(dy.to(dt))
        grads[backend] = [t.grad for t in leaves]
    for name, got, want in zip(("dq", "dk", "dv"), grads["triton"], grads["torch"]):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{name}: non-finite pattern"
        fin = torch.isfinite(want)
        if fin.any():
            assert_close(f"triton {name} (finite entries)", got[fin], want[fin])
    assert torch.isfinite(grads["triton"][2]).all(), "dv"


def test_octonion_epilogue_split_is_exact():
    """The octonion epilogue GEMMs (common._emm) run on bfloat16 tensor cores from a float32
    operand split as a = hi + mid + lo, three bfloat16 (common._split3, by truncation): the three
    sum back to a bit for bit (float64 sums) over magnitudes 1e-30 .. 3.4e38, near float32's
    largest (where hi rounded to nearest would be inf), negative and zero; below 2^-110 the pieces
    under float32's normal range can be lost (absolute error < 2^-126). Runs the kernel code under
    the interpreter."""
    run_isolated("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton
    import triton.language as tl
    from geokern.kernels.hypercomplex_attention.common import _split3

    @triton.jit
    def split(a_ptr, h_ptr, m_ptr, l_ptr, n: tl.constexpr):
        i = tl.arange(0, n)
        hi, mid, lo = _split3(tl.load(a_ptr + i))
        tl.store(h_ptr + i, hi.to(tl.float32))
        tl.store(m_ptr + i, mid.to(tl.float32))
        tl.store(l_ptr + i, lo.to(tl.float32))

    g = torch.Generator().manual_seed(0)
    n = 1 << 14
    mant = torch.rand(n, generator=g, dtype=torch.float64) + 1
    expo = torch.randint(-99, 128, (n,), generator=g).double()
    a = (mant * 2.0 ** expo).float()  # 2^-99 (1.6e-30) .. 2^128 (finite: float32's top binade)
    a[:64] = torch.finfo(torch.float32).max * (1 - torch.arange(64) * 2.0 ** -24)  # within 0.4% of max
    a[64:128] = torch.tensor(3.4e38) * (1 - torch.rand(64, generator=g, dtype=torch.float64) * 0.004).float()
    a[128:192] = 0.0
    a = torch.where(torch.rand(n, generator=g) < 0.5, -a, a).contiguous()
    assert torch.isfinite(a).all()
    h, m, l = (torch.empty_like(a) for _ in range(3))
    split[(1,)](a, h, m, l, n)
    for name, x in (("hi", h), ("mid", m), ("lo", l)):
        assert torch.equal(x, x.bfloat16().float()), (name, "not a bfloat16")
        assert torch.isfinite(x).all(), name
    s = h.double() + m.double() + l.double()
    bad = (s != a.double()).nonzero().flatten()
    assert not len(bad), [(a[i].item(), h[i].item(), m[i].item(), l[i].item()) for i in bad[:5]]
    tiny = torch.tensor([1e-33, -1e-36, 3e-38, -1e-40, 1e-44, 2.0 ** -110 * 1.999, 2.0 ** -126, -2.0 ** -149])
    ht, mt, lt = (torch.empty_like(tiny) for _ in range(3))
    split[(1,)](tiny, ht, mt, lt, 8)
    err = (ht.double() + mt.double() + lt.double() - tiny.double()).abs()
    assert (err < 2.0 ** -126).all(), err  # subnormal pieces may be flushed (the interpreter's casts)
    """, timeout=120)
