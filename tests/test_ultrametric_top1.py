"""Top-1 bucket retrieval (geokern.ultrametric_top1): the reference against a re-implementation of
their demo's `attend` (prefix buckets, deepest non-empty, best cosine, mean over heads); the
Triton backend against the reference (exact lcp; the pick equal, or within rounding of a cosine
tie), causal / padded / grouped heads / chunked prefill / decode, dtypes; the tie rule (lowest
index), NaN, the gradient to v, knobs, empty and bad input, custom-op checks."""

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import dtype_id, need
from _tolerance import assert_close
from _ultrametric import digits
from conftest import DEVICE

import geokern
from geokern.reference import ultrametric as ref

BACKENDS = ["torch", "triton"]
# (B, H, Hkv, Tq, Tk, D, Dv, K, p, causal, padded)
CASES = [
    (1, 2, 2, 37, 37, 16, 8, 4, 2, False, False),
    (2, 4, 2, 29, 29, 7, 5, 3, 2, True, True),
    (1, 3, 1, 1, 40, 16, 16, 5, 2, True, True),
    (1, 2, 2, 13, 50, 33, 4, 2, 3, True, False),
    (1, 2, 1, 23, 31, 16, 17, 6, 2, False, True),
    (1, 1, 1, 1, 1, 5, 3, 1, 2, False, False),
]
SIM_TOL = 1e-5  # float32 cosines (exact products, float32 sums) vs float64


def _id(c):
    if isinstance(c, torch.dtype):
        return dtype_id(c)
    B, H, Hkv, Tq, Tk, D, Dv, K, p, causal, pad = c
    return f"B{B}-H{H}-KV{Hkv}-Tq{Tq}-Tk{Tk}-D{D}-K{K}-p{p}-{'causal' if causal else 'full'}{'-pad' if pad else ''}"


def make(case, dtype=torch.float32):
    B, H, Hkv, Tq, Tk, D, Dv, K, p, causal, pad = case
    q = torch.randn(B, H, Tq, D, device=DEVICE).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Hkv, Tk, Dv, device=DEVICE).to(dtype)
    keep = (torch.rand(B, Tk, device=DEVICE) > 0.3) if pad else None
    return dict(q=q, k=k, v=v, q_digits=digits(B, H, Tq, K, p), k_digits=digits(B, Hkv, Tk, K, p), p=p,
                causal=causal, key_padding_mask=keep)


def demo_attend(x_q, x_k, V, planes):
    """Their demo's UltrametricAttention.attend, per query, float64: per head, the deepest prefix of
    the query's signature that a key's signature shares (all keys if none), the best cosine in that
    bucket (first strictly better in insertion order), then the mean of V over the heads' picks."""
    sig = lambda P, x: [int(b) for b in (P @ x > 0)]  # noqa: E731
    out = []
    for qv in x_q.double():
        picks = []
        for P in planes.double():
            qs = sig(P, qv)
            ks = [sig(P, kv) for kv in x_k.double()]
            cand = list(range(len(ks)))
            for d in range(len(qs), 0, -1):
                bucket = [j for j, s in enumerate(ks) if s[:d] == qs[:d]]
                if bucket:
                    cand = bucket
                    break
            qn = qv.norm() + 1e-12
            best_j, best = None, -float("inf")
            for j in cand:
                s = float((x_k[j].double() @ qv) / ((x_k[j].double().norm() + 1e-12) * qn))
                if s > best:
                    best_j, best = j, s
            picks.append(best_j)
        out.append(torch.stack([V[j].double() for j in picks]).mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_their_demo(backend):
    """Shared vectors, per-head hyperplanes (their setting): digits from ultrametric_signatures."""
    need(backend)
    H, Tq, Tk, D, K = 3, 11, 40, 8, 6
    xq, xk, V = torch.randn(Tq, D, device=DEVICE), torch.randn(Tk, D, device=DEVICE), torch.randn(Tk, 5, device=DEVICE)
    planes = torch.randn(H, K, D, device=DEVICE)
    q, k, v = (t[None, None].expand(1, H, *t.shape) for t in (xq, xk, V))
    qd, kd = (ref.hyperplane_signatures(t, planes) for t in (q, k))
    y = geokern.ultrametric_top1(q, k, v, qd, kd, backend=backend)
    assert_close("y vs their attend", y[0], demo_attend(xq, xk, V, planes).float())


def check_picks(index, lcp, sim, want_index, want_lcp, want_sim, sim64):
    """lcp exact; the pick the reference's, or (rarely) another key of the same bucket whose float64
    cosine is within SIM_TOL of the best; the reported cosine that of the pick."""
    assert torch.equal(lcp, want_lcp), "lcp: differs from the reference"
    assert torch.equal(index < 0, want_index < 0), "index: -1 (no visible key) at other queries"
    other = index != want_index
    assert other.float().mean() <= 0.02, f"index: {int(other.sum())} of {index.numel()} picks differ"
    got64 = torch.gather(sim64, -1, index.clamp_min(0)[..., None]).squeeze(-1)
    near = (got64 - want_sim).abs() <= SIM_TOL
    assert (near | ~other).all(), "index: a pick that is not within rounding of the best cosine"
    found = index >= 0
    torch.testing.assert_close(sim[found].double(), want_sim[found], atol=SIM_TOL, rtol=0, msg="sim")


def sims64(a):
    """[B, H, Tq, Tk] float64 cosines of the test inputs (the query's key head)."""
    H = a["q"].shape[1]
    k = a["k"].double().repeat_interleave(H // a["k"].shape[1], dim=1)
    q = a["q"].double()
    return (q @ k.transpose(-1, -2)) / ((q.norm(dim=-1) + 1e-12)[..., None] * (k.norm(dim=-1) + 1e-12)[:, :, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_triton_matches_reference(case, dtype):
    need("triton")
    a = make(case, dtype)
    y, index, lcp, sim = geokern.ultrametric_top1(**a, return_details=True, backend="triton")
    y0, index0, lcp0, sim0 = ref.ultrametric_top1(**a, return_details=True)
    assert y.dtype == dtype and index.dtype == torch.int64 and lcp.dtype == torch.int64 and sim.dtype == torch.float32
    check_picks(index, lcp, sim, index0, lcp0, sim0, sims64(a))
    assert torch.equal(y, ref.top1_values(a["v"], index, sim)), "y: not the mean of v at the picks"
    assert_close("y", y, y0.double() if torch.equal(index, index0) else ref.top1_values(a["v"].double(), index, sim))


def test_reference_is_the_lexicographic_maximum():
    """A per-query brute force: max over visible keys of (lcp, cos, -j)."""
    a = make(CASES[1])
    y, index, lcp, sim = ref.ultrametric_top1(**a, return_details=True)
    S = sims64(a)
    B, H, Tq, _ = a["q"].shape
    Hkv, Tk = a["k"].shape[1], a["k"].shape[2]
    keep = a["key_padding_mask"]
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                best = None
                for j in range(Tk):
                    if not keep[b, j] or j > i + Tk - Tq:
                        continue
                    qd, kd = a["q_digits"][b, h, i].tolist(), a["k_digits"][b, h // (H // Hkv), j].tolist()
                    n = 0
                    while n < len(qd) and qd[n] == kd[n]:
                        n += 1
                    key = (n, float(S[b, h, i, j]), -j)
                    best = key if best is None or key > best else best
                assert (int(lcp[b, h, i]), int(index[b, h, i])) == ((best[0], -best[2]) if best else (-1, -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_index(backend):
    """Exact copies of a key (vector and digits) tie exactly: the first visible copy wins; a zero
    query ties every key of its bucket (cosine 0): the first key of the deepest bucket wins."""
    need(backend)
    a = make(CASES[0])
    k, kd, q, qd = a["k"], a["k_digits"], a["q"], a["q_digits"]
    for j in (10, 20):
        k[:, :, j], kd[:, :, j] = k[:, :, 3], kd[:, :, 3]
    q[:, :, 5], qd[:, :, 5] = k[:, :, 3], kd[:, :, 3]
    q[:, :, 6] = 0.0
    _, index, lcp, _ = geokern.ultrametric_top1(**a, return_details=True, backend=backend)
    assert (index[:, :, 5] == 3).all(), "ties: not the lowest index among exact copies"
    a["key_padding_mask"] = torch.ones(1, 37, dtype=torch.bool, device=DEVICE)
    a["key_padding_mask"][0, 3] = False
    _, index, _, _ = geokern.ultrametric_top1(**a, return_details=True, backend=backend)
    assert (index[:, :, 5] == 10).all(), "ties: the padded copy won, or not the next copy"
    match = (kd[:, :, :, None, :] == qd[:, :, None, 6:7, :]).long().cumprod(-1).sum(-1)[..., 0]  # [B, H, Tk]
    want = (match == lcp[:, :, 6:7]).long().argmax(-1)
    assert torch.equal(index[:, :, 6], want), "zero query: not the first key of its deepest bucket"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan(backend):
    """A visible NaN key wins the buckets it competes in (NaN ranks first) and makes their y NaN,
    sim NaN; a padded NaN key reaches no query; other queries stay finite."""
    need(backend)
    a = make(CASES[4])  # non-causal: every kept key is visible to every query
    a["key_padding_mask"][0, 7], a["key_padding_mask"][0, 9] = True, False
    a["k"][0, :, 7, 0] = float("nan")
    a["k"][0, :, 9] = float("nan")
    # Key 7 shares every digit with query 0 of head 0 (lcp K, the deepest bucket there), so it wins
    # at least that query whatever the random draw: on the H100 CUDA's RNG gave key 7 no deepest
    # bucket and the check below failed. Padded key 9 shares every digit with query 1 of head 1: it
    # would win there if the mask were ignored.
    a["k_digits"][0, 0, 7] = a["q_digits"][0, 0, 0]
    a["k_digits"][0, 0, 9] = a["q_digits"][0, 1, 1]
    y, index, _, sim = geokern.ultrametric_top1(**a, return_details=True, backend=backend)
    index0 = ref.ultrametric_top1(**a, return_details=True)[1]
    assert (index != 9).all(), "a padded NaN key was picked"
    assert torch.equal(index == 7, index0 == 7) and torch.equal(sim.isnan(), index == 7), "NaN key: winners"
    assert (index == 7).any(), "test inputs: the NaN key wins nowhere"
    assert torch.equal(y.isnan().any(-1), (index == 7).any(1)), "y: NaN rows are not those of the NaN picks"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_to_v(backend):
    need(backend)
    a = make(CASES[1])
    a["v"].requires_grad_()
    a["q"].requires_grad_()
    y, index, _, sim = geokern.ultrametric_top1(**a, return_details=True, backend=backend)
    dy = torch.randn_like(y)
    (dv,) = torch.autograd.grad(y, a["v"], dy)
    v64 = a["v"].detach().double().requires_grad_()
    (dv64,) = torch.autograd.grad(ref.top1_values(v64, index, sim), v64, dy.double())
    assert_close("dv", dv, dv64.float())
    assert y.grad_fn is not None and not index.requires_grad


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (64, 64)], ids=str)
def test_blocks_do_not_change_the_result(blocks):
    """The picks (and so y) do not depend on the tiles, away from cosine ties."""
    need("triton")
    a = make(CASES[3])
    got = geokern.ultrametric_top1(**a, return_details=True, block_m=blocks[0], block_n=blocks[1], backend="triton")
    want = geokern.ultrametric_top1(**a, return_details=True, backend="triton")
    for name, g, w in zip(("y", "index", "lcp"), got, want):
        assert torch.equal(g, w), f"{name}: block_m, block_n = {blocks}"
    # the tile shape may change the dot's summation order: the cosine's last bits
    torch.testing.assert_close(got[3], want[3], atol=1e-6, rtol=0, msg=f"sim: block_m, block_n = {blocks}")


def test_chunked_prefill_and_decode_are_the_last_rows():
    need("triton")
    a = make(CASES[0])
    a["causal"] = True
    full = geokern.ultrametric_top1(**a, return_details=True, backend="triton")
    for n in (9, 1):
        part = geokern.ultrametric_top1(**{**a, "q": a["q"][:, :, -n:], "q_digits": a["q_digits"][:, :, -n:]},
                                        return_details=True, backend="triton")
        assert torch.equal(part[0], full[0][:, -n:]) and torch.equal(part[1], full[1][:, :, -n:]), f"last {n} rows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 5), (1, 0, 5), (1, 3, 0), (1, 1, 0)], ids=["B0", "Tq0", "Tk0", "decode-Tk0"])
def test_empty(shape, backend):
    need(backend)
    B, Tq, Tk = shape
    a = make((B, 2, 1, Tq, Tk, 8, 4, 3, 2, False, False))
    a["v"].requires_grad_()
    y, index, lcp, sim = geokern.ultrametric_top1(**a, return_details=True, backend=backend)
    assert y.shape == (B, Tq, 4) and index.shape == lcp.shape == sim.shape == (B, 2, Tq)
    assert not y.isnan().any() and (y == 0).all() == (Tk == 0 or y.numel() == 0)
    if Tk == 0:
        assert (index == -1).all() and (lcp == -1).all() and (sim == float("-inf")).all()
    (dv,) = torch.autograd.grad(y.sum(), a["v"], allow_unused=True, materialize_grads=True)
    assert dv.shape == a["v"].shape


def _bad():
    a = make(CASES[0])
    return {
        "int q": (dict(q=a["q"].long()), TypeError, "q"),
        "q shape": (dict(q=a["q"][:, :, :5]), ValueError, "q must"),
        "k D": (dict(k=a["k"][..., :5]), ValueError, "k must"),
        "q k dtypes": (dict(k=a["k"].half()), TypeError, "k"),
        "float digits": (dict(q_digits=a["q_digits"].float()), TypeError, "q_digits"),
        "digit range": (dict(k_digits=a["k_digits"] + 2), ValueError, "k_digits"),
        "v shape": (dict(v=a["v"][:, :, :5]), ValueError, "v"),
        "causal type": (dict(causal=1), TypeError, "causal"),
        "mask": (dict(key_padding_mask=torch.ones(1, 3, dtype=torch.bool, device=DEVICE)), ValueError,
                 "key_padding_mask"),
        "block_m": (dict(block_m=20), ValueError, "block_m"),
        "block_n": (dict(block_n=8), ValueError, "block_n"),
        "backend": (dict(backend="gpu"), ValueError, "backend"),
    }, a


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_bad()[0]))
def test_bad_input(name, backend):
    need(backend)
    bad, a = _bad()
    over, exc, word = bad[name]
    with pytest.raises(exc, match=word):
        geokern.ultrametric_top1(**{**a, "backend": backend, **over})


def test_triton_refusals_and_cuda():
    need("triton")
    a = make(CASES[0])
    with pytest.raises(ValueError, match="float64"):
        geokern.ultrametric_top1(**{**a, "q": a["q"].double(), "k": a["k"].double()}, backend="triton")
    with pytest.raises(RuntimeError, match="cuda"):
        geokern.ultrametric_top1(**a, backend="cuda")


def _op_samples(qualname):
    a = make(CASES[1])
    c = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in a.items()}
    return [(c["q"], c["k"], c["q_digits"], c["k_digits"], c["key_padding_mask"], True, 0, 0),
            (c["q"], c["k"], c["q_digits"], c["k_digits"], None, False, 16, 32)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("ultrametric_top1_", _op_samples)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bench_dense_peer_passes_the_runners_check(causal):
    """The benchmark's dense torch peer (geokern.bench.ultrametric_retrieval) against the reference,
    as the runner checks it before timing, on bf16 inputs whose deepest buckets hold ~128 keys (only
    the first two of K digits vary): their best cosines are often within bf16 rounding of each
    other. The peer once ranked by bf16 cosines and failed this check on the H100 at T = 8192
    (1.1e-1 > 5e-2; here 1.2e-1 to 1.5e-1 on the CPU over three seeds, either causality); ranking by
    float32 cosines, as the kernel does, it picks the reference's keys (0 error on those seeds)."""
    from geokern.bench import ultrametric_retrieval as bench
    from geokern.bench.runner import _rel_err

    q, k, v, qd, kd = bench._top1_make(512, DEVICE)()
    qd[..., 2:], kd[..., 2:] = 0, 0
    got = bench._top1_dense(causal)(q, k, v, qd, kd)
    want = ref.ultrametric_top1(q, k, v, qd, kd, causal=causal)
    err = _rel_err(got, want)
    tol = bench._top1_case(512, causal).tol
    assert err <= tol, f"bench dense peer: relative error {err:.2e} > {tol}"
