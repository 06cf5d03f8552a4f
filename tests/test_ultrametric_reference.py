"""The ultrametric reference (hard mode, decode state, soft kernel, digits, codes) against a
float64 brute-force O(T^2) evaluation of alpha ** LCP, written here from the spec (LCP by
comparing digits pair by pair, tests/_ultrametric.py) and used by no library code."""

import math

import pytest
import torch
from _ultrametric import brute, digits

from geokern.reference import ultrametric as ref


# (B, H, Hkv, Tq, Tk, K, p, causal, digit kind, padded): prefill, decode, chunked prefill, non-causal,
# GQA, p = 2 and 3, K = 1, T = 1, all-equal and all-distinct digits
CASES = [
    (2, 2, 2, 37, 37, 4, 2, True, "random", False),
    (1, 4, 2, 29, 29, 3, 3, True, "random", True),
    (2, 3, 1, 1, 40, 5, 2, True, "random", True),
    (1, 2, 2, 13, 50, 2, 3, True, "random", True),
    (2, 2, 1, 23, 31, 4, 2, False, "random", True),
    (1, 1, 1, 1, 1, 1, 2, True, "random", False),
    (1, 2, 2, 19, 19, 1, 3, True, "random", False),
    (1, 2, 1, 21, 21, 6, 2, True, "equal", True),
    (1, 2, 2, 30, 30, 6, 2, True, "distinct", False),
    (1, 1, 1, 17, 17, 3, 3, False, "distinct", False),
]


def _id(c):
    B, H, Hkv, Tq, Tk, K, p, causal, kind, pad = c
    return f"B{B}-H{H}-KV{Hkv}-Tq{Tq}-Tk{Tk}-K{K}-p{p}-{'causal' if causal else 'full'}-{kind}{'-pad' if pad else ''}"


def inputs(case, D=5):
    B, H, Hkv, Tq, Tk, K, p, causal, kind, pad = case
    # the reference's tests run on the CPU (tests/_ultrametric.digits makes DEVICE tensors)
    qd = digits(B, H, Tq, K, p, kind).cpu()
    kd = digits(B, Hkv, Tk, K, p, kind).cpu()
    if kind == "random" and Tq > 1:  # many deep matches: queries copy some keys' digits
        src = kd.repeat_interleave(H // Hkv, dim=1)[:, :, Tk - Tq:]
        take = torch.rand(B, H, Tq, 1) < 0.5
        qd = torch.where(take, src, qd)
    v = torch.randn(B, Hkv, Tk, D, dtype=torch.float64)
    keep = (torch.rand(B, Tk) < 0.7) if pad else None
    return qd, kd, v, keep


def close(name, got, want, rtol=1e-10):
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), f"{name}: non-finite positions differ"
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    scale = max(want[fin].abs().max().item() if fin.any() else 0.0, 1e-300)
    assert err <= rtol * scale, f"{name}: largest error {err:.3e} > {rtol:.0e} * {scale:.3e}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_hard_matches_brute_force(case):
    qd, kd, v, keep = inputs(case)
    alpha, p, causal = 2.0, case[6], case[7]
    want_y, want_lse = brute(qd, kd, v, alpha, causal, keep)
    for chunk in (1, 4, 64):
        y, lse = ref.ultrametric_attention(qd, kd, v, alpha, p=p, causal=causal, key_padding_mask=keep,
                                           return_lse=True, chunk=chunk)
        assert y.dtype == torch.float64 and lse.dtype == torch.float64
        close(f"output chunk={chunk}", y, want_y)
        close(f"lse chunk={chunk}", lse, want_lse)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 3.5])
def test_other_alphas_and_int32_digits(alpha):
    qd, kd, v, keep = inputs((2, 4, 2, 25, 33, 5, 2, True, "random", True))
    y, lse = ref.ultrametric_attention(qd.int(), kd.to(torch.int8), v, alpha, key_padding_mask=keep,
                                       return_lse=True, chunk=7)
    want_y, want_lse = brute(qd, kd, v, alpha, True, keep)
    close("output", y, want_y)
    close("lse", lse, want_lse)


def test_hand_computed():
    """p = 2, K = 2, alpha = 2: query 11 against keys 11, 10, 01, 11 (causal, last query sees all)."""
    kd = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]]).view(1, 1, 4, 2)
    qd = torch.tensor([1, 1]).view(1, 1, 1, 2)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 4, 1)
    y, lse = ref.ultrametric_attention(qd, kd, v, 2.0, return_lse=True)
    # lcp = 2, 1, 0, 2 -> weights 4, 2, 1, 4: (4 + 4 + 3 + 16) / 11
    assert y.item() == pytest.approx(27 / 11, rel=1e-14) and lse.item() == pytest.approx(math.log(11), rel=1e-14)


def test_no_visible_key_gives_zero_and_minus_inf():
    qd, kd, v, _ = inputs((1, 2, 2, 6, 6, 3, 2, True, "random", False))
    keep = torch.zeros(1, 6, dtype=torch.bool)
    keep[0, 4] = True
    y, lse = ref.ultrametric_attention(qd, kd, v, key_padding_mask=keep, return_lse=True)
    assert (y[:, :, :4] == 0).all() and (lse[:, :, :4] == -math.inf).all(), "queries before key 4 see nothing"
    assert torch.isfinite(lse[:, :, 4:]).all() and (y[:, :, 4:] != 0).any()
    y0, lse0 = ref.ultrametric_attention(qd[:, :, :1], kd[:, :, :0], v[:, :, :0], return_lse=True)
    assert y0.shape == (1, 2, 1, 5) and (y0 == 0).all() and (lse0 == -math.inf).all(), "decode with no cache"


def test_hidden_keys_never_enter():
    """A NaN value in a padded key, or in a key later than every query that would see it, changes nothing."""
    qd, kd, v, keep = inputs((1, 2, 2, 16, 16, 3, 2, True, "random", True))
    keep[0, 3] = False
    # the random mask depends on which generator the digits drew from (the CUDA one on a GPU
    # machine): key 15 must be visible to its own query whatever was drawn
    keep[0, 15] = True
    want = ref.ultrametric_attention(qd, kd, v, key_padding_mask=keep, chunk=8)
    v2 = v.clone()
    v2[0, :, 3] = math.nan
    v2[0, :, 15] = math.nan  # seen only by the last query
    got = ref.ultrametric_attention(qd, kd, v2, key_padding_mask=keep, chunk=8)
    assert torch.isnan(got[:, :, 15]).all() and not torch.isnan(got[:, :, :15]).any(), "NaN reached a hidden query"
    torch.testing.assert_close(got[:, :, :15], want[:, :, :15], rtol=0, atol=0)


def test_gradient_to_v_matches_brute_force():
    qd, kd, v, keep = inputs((2, 4, 2, 19, 27, 4, 2, True, "random", True))
    g = torch.randn(2, 4, 19, 5, dtype=torch.float64)
    a = v.clone().requires_grad_()
    y = ref.ultrametric_attention(qd, kd, a, 1.7, key_padding_mask=keep, chunk=5)
    (got,) = torch.autograd.grad((y * g).sum(), a)
    b = v.clone().requires_grad_()
    (want,) = torch.autograd.grad((brute(qd, kd, b, 1.7, True, keep)[0] * g).sum(), b)
    close("dv", got, want)
    assert (got[~keep[:, None, :, None].expand_as(got)] == 0).all(), "dv of a padded key"


def test_float32_accumulates_in_float32():
    qd, kd, v, keep = inputs((1, 2, 2, 40, 40, 4, 2, True, "random", True))
    y, lse = ref.ultrametric_attention(qd, kd, v.float(), key_padding_mask=keep, return_lse=True)
    assert y.dtype == torch.float32 and lse.dtype == torch.float32
    want_y, want_lse = brute(qd, kd, v, 2.0, True, keep)
    close("float32 output", y.double(), want_y, rtol=1e-5)
    close("float32 lse", lse.double(), want_lse, rtol=1e-5)


def test_decode_state_matches_full_recomputation():
    B, H, Hkv, T, K, p, D = 2, 4, 2, 300, 4, 3, 6
    qd, kd = torch.randint(0, p, (B, H, T, K)), torch.randint(0, p, (B, Hkv, T, K))
    qd[:, :, :, :2] = kd.repeat_interleave(2, dim=1)[:, :, :, :2]  # shared prefixes: deep buckets
    v = torch.randn(B, Hkv, T, D, dtype=torch.float64)
    keep = torch.rand(B, T) < 0.8
    full, full_lse = ref.ultrametric_attention(qd, kd, v, 1.5, p=p, key_padding_mask=keep, return_lse=True)
    state = ref.UltrametricDecodeState(B, Hkv, D, K, p=p, alpha=1.5, dtype=torch.float64)
    P = 40  # a prefill appended at once, then one token at a time
    state.append(kd[:, :, :P], v[:, :, :P], keep[:, :P])
    for t in range(P, T):
        y, lse = state.step(qd[:, :, t:t + 1], kd[:, :, t:t + 1], v[:, :, t:t + 1], keep[:, t:t + 1], return_lse=True)
        close(f"decode output at step {t}", y, full[:, :, t:t + 1], rtol=1e-12)
        close(f"decode lse at step {t}", lse, full_lse[:, :, t:t + 1], rtol=1e-12)
    assert state.length == T
    one = ref.ultrametric_attention(qd[:, :, -1:], kd, v, 1.5, p=p, key_padding_mask=keep)
    close("decode vs one-token recomputation", state.query(qd[:, :, -1:]), one, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_hard_equals_soft_with_hard_digits(causal):
    qd, kd, v, keep = inputs((2, 4, 2, 17, 23, 4, 3, causal, "random", True))
    hard = ref.ultrametric_attention(qd, kd, v, 2.0, p=3, causal=causal, key_padding_mask=keep, return_lse=True)
    for beta, rtol in ((1e4, 1e-12), (32.0, 1e-10)):  # exp(-1e4) == 0; exp(-32) ~ 1e-14 stands for 0
        soft = ref.soft_lcp_attention(qd.double(), kd.double(), v, 2.0, beta, causal=causal, key_padding_mask=keep,
                                      return_lse=True)
        close(f"soft output beta={beta}", soft[0], hard[0], rtol)
        close(f"soft lse beta={beta}", soft[1], hard[1], rtol)


def test_soft_kernel_is_chunked_and_differentiable(monkeypatch):
    q, k, v = torch.rand(1, 2, 9, 3).double() * 2, torch.rand(1, 1, 9, 3).double() * 2, torch.randn(1, 1, 9, 4).double()
    want = ref.soft_lcp_attention(q, k, v, 2.0, 3.0)
    monkeypatch.setattr(ref, "CHUNK_ELEMS", 50)
    torch.testing.assert_close(ref.soft_lcp_attention(q, k, v, 2.0, 3.0), want, rtol=0, atol=0)
    args = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ref.soft_lcp_attention(a, b, c, 2.0, 3.0), args)


def test_digits_and_codes():
    x, wgt = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    soft = ref.soft_digits(x, wgt, 3)
    torch.testing.assert_close(soft, 2 / (1 + torch.exp(-(x @ wgt.T))))
    hard = ref.hard_digits(soft, 3)
    assert hard.dtype == torch.int64 and torch.equal(hard, torch.round(soft).long())
    assert torch.equal(ref.hard_digits(torch.tensor([-0.7, 0.5, 1.5, 2.6, 9.0]), 3), torch.tensor([0, 0, 2, 2, 2]))
    d = torch.tensor([[1, 0, 2], [1, 0, 1], [2, 2, 2]])
    # trie node ids: root 0; level 1 at 1 + d0; level 2 at 1 + 3 + 3 d0 + d1; level 3 at 13 + 9 d0 + 3 d1 + d2
    want = torch.tensor([[0, 2, 7, 24], [0, 2, 7, 23], [0, 3, 12, 39]])
    assert torch.equal(ref.prefix_codes(d, 3), want)
    every = torch.cartesian_prod(*[torch.arange(3)] * 4)  # all 81 strings of K = 4: codes unique across levels
    codes = ref.prefix_codes(every, 3)
    assert codes.unique().numel() == ref.num_codes(3, 4) == 121 and codes.max().item() == 120
    big = ref.prefix_codes(torch.ones(1, 62, dtype=torch.int64), 2)  # 62 binary digits: the largest codes fit int64
    assert big[0, -1].item() == 2 ** 63 - 2


def test_bad_input():
    qd, kd, v, _ = inputs((1, 2, 2, 5, 5, 3, 2, True, "random", False))
    f = ref.ultrametric_attention
    cases = [
        (lambda: f(qd + 2, kd, v), ValueError, r"q_digits must hold digits in \[0, p - 1\]"),
        (lambda: f(qd, kd - 1, v), ValueError, "k_digits must hold digits"),
        (lambda: f(qd, kd, v, p=1), ValueError, "p must be >= 2"),
        (lambda: f(qd.double(), kd, v), TypeError, "q_digits must have an integer dtype"),
        (lambda: f(qd, kd.bool(), v), TypeError, "k_digits must have an integer dtype"),
        (lambda: f(qd, kd[..., :2], v), ValueError, "k_digits must have K = 3"),
        (lambda: f(qd, kd, v[:, :, :4]), ValueError, "v must have shape"),
        (lambda: f(qd, kd, v.long()), TypeError, "v must be a floating-point"),
        (lambda: f(torch.zeros(1, 3, 5, 3, dtype=torch.long), kd, v), ValueError, "must divide"),
        (lambda: f(qd, kd[:, :, :3], v[:, :, :3]), ValueError, "Tk >= Tq"),
        (lambda: f(qd, kd, v, key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (lambda: f(qd, kd, v, 0.0), ValueError, "alpha must be a finite number > 0"),
        (lambda: f(qd, kd, v, chunk=0), ValueError, "chunk"),
        (lambda: f(torch.zeros(1, 1, 2, 64, dtype=torch.long), torch.zeros(1, 1, 2, 64, dtype=torch.long),
                   v[:1, :1, :2]), ValueError, "K=64 digits in base p=2 need prefix codes of more than 63 bits"),
        (lambda: ref.prefix_codes(torch.zeros(2, 40, dtype=torch.long), 3), ValueError, "more than 63 bits"),
        (lambda: ref.prefix_codes(torch.zeros(2, 3), 3), TypeError, "digits must have an integer dtype"),
        (lambda: ref.hard_digits(torch.tensor([math.nan]), 2), ValueError, "NaN"),
        (lambda: ref.soft_lcp_attention(qd, kd, v), TypeError, "q_soft must be a floating-point"),
        (lambda: ref.UltrametricDecodeState(1, 2, 4, 3).append(kd, v), ValueError, r"v must have shape \(1, 2, T, 4\)"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
