"""geokern.nn.UltrametricCausalSelfAttention against a plain-torch re-implementation of the spec
(section 3) on the module's own weights: projections, learned digits, the dense float64 alpha^LCP
brute force, output projection. Backends, gradients (v path; digit map with straight-through),
decode through the constant-cost cache, no host sync, bad configuration."""

import pytest
import torch
from _helpers import need
from _tolerance import rel_err
from _ultrametric import brute
from conftest import DEVICE, HAS_CUDA

from geokern.nn import UltrametricCausalSelfAttention

BACKENDS = ["torch", "triton", "cuda"]


def module(backend, *, d_model=24, n_heads=4, n_kv_heads=2, K=4, p=3, alpha=1.7, **kw):
    m = UltrametricCausalSelfAttention(d_model, n_heads, n_kv_heads=n_kv_heads, K=K, p=p, alpha=alpha,
                                       backend=backend, device=DEVICE, **kw)
    with torch.no_grad():  # spread the soft digits so every digit value occurs, not only the middle one
        m.to_digits.weight.mul_(4.0)
    return m


def plain(m, x, keep=None, straight_through=False):
    """The spec in float64 on m's weights, written out densely (O(T^2 K)); m.mode's kernel."""
    B, T, _ = x.shape
    heads = lambda t: t.reshape(B, T, -1, m.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = (heads(x.double() @ c.weight.double().T) for c in (m.c_q, m.c_k, m.c_v))
    soft = lambda t: torch.sigmoid(t @ m.to_digits.weight.double().T) * (m.p - 1)  # noqa: E731
    qs, ks = soft(q), soft(k)
    if m.mode == "soft":  # their kernel mode: the soft LCP kernel on the soft digits, every input differentiable
        y = soft_lcp(qs, ks, v, m.alpha, m.lcp_beta, keep)
        return y.transpose(1, 2).reshape(B, T, -1) @ m.c_proj.weight.double().T
    y, _ = brute(torch.round(qs).clamp(0, m.p - 1).long(), torch.round(ks).clamp(0, m.p - 1).long(), v, m.alpha,
                 True, keep)
    if straight_through:  # hard value, the soft LCP kernel's gradient to the digits (v held fixed)
        ys = soft_lcp(qs, ks, v.detach(), m.alpha, m.lcp_beta, keep)
        y = y + (ys - ys.detach())
    return y.transpose(1, 2).reshape(B, T, -1) @ m.c_proj.weight.double().T


def soft_lcp(qs, ks, v, alpha, beta, keep):
    """The spec's soft kernel: match = exp(-beta (qd - kd)^2), lcp = sum_l prod_{m<=l} match, w = alpha^lcp."""
    R = qs.shape[1] // ks.shape[1]
    ks, v = ks.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
    lcp = torch.exp(-beta * (qs[:, :, :, None] - ks[:, :, None]).square()).cumprod(-1).sum(-1)
    T = qs.shape[2]
    vis = torch.ones(T, T, dtype=torch.bool, device=qs.device).tril()[None, None]
    if keep is not None:
        vis = vis & keep[:, None, None, :]
    w = torch.where(vis, alpha ** lcp, torch.zeros((), dtype=lcp.dtype, device=lcp.device))
    return (w @ v) / w.sum(-1, keepdim=True).clamp_min(1e-9)


def inputs(B=2, T=19, d_model=24, pad=True):
    x = torch.randn(B, T, d_model, device=DEVICE)
    keep = torch.rand(B, T, device=DEVICE) > 0.25 if pad else None
    return x, keep


# (n_heads, n_kv_heads, K, p, padded)
CASES = [(4, 2, 4, 3, True), (4, 4, 6, 2, False), (2, 1, 1, 2, True), (4, 1, 3, 5, True)]


def _id(c):
    H, Hkv, K, p, pad = c
    return f"H{H}-KV{Hkv}-K{K}-p{p}{'-pad' if pad else ''}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_plain_torch(case, backend):
    need(backend)
    H, Hkv, K, p, pad = case
    m = module(backend, n_heads=H, n_kv_heads=Hkv, K=K, p=p)
    x, keep = inputs(pad=pad)
    want = plain(m, x, keep)
    got = m(x, keep)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, want) < 1e-5, f"{backend} output: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("straight_through", [False, True], ids=["hard", "straight-through"])
def test_backends_agree(straight_through, backend):
    need(backend)
    ms = {be: module(be, straight_through=straight_through) for be in ("torch", backend)}
    ms[backend].load_state_dict(ms["torch"].state_dict())
    x, keep = inputs()
    g = torch.randn_like(x)
    out = {}
    for be, m in ms.items():
        y = m(x, keep)
        out[be] = (y, *torch.autograd.grad((y * g).sum(), list(m.parameters()), allow_unused=True))
    names = ["output"] + [f"grad {n}" for n, _ in ms["torch"].named_parameters()]
    for name, a, b in zip(names, out["torch"], out[backend]):
        assert (a is None) == (b is None), f"{name}: one backend gives none"
        if a is not None:
            assert rel_err(b, a) < 1e-5, f"{backend} vs torch {name}: {rel_err(b, a):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("straight_through", [False, True], ids=["hard", "straight-through"])
def test_gradients(straight_through, backend):
    """Hard mode: gradient reaches v (c_v, c_proj, x) and nothing reaches the digits (c_q, c_k,
    to_digits: None). Straight-through: every parameter, equal to the plain re-implementation's."""
    need(backend)
    m = module(backend, straight_through=straight_through)
    x, keep = inputs()
    x.requires_grad_()
    g = torch.randn_like(x)
    names, params = zip(*([("x", x)] + list(m.named_parameters())))
    got = torch.autograd.grad((m(x, keep) * g).sum(), params, allow_unused=True)
    want = torch.autograd.grad((plain(m, x, keep, straight_through) * g.double()).sum(), params, allow_unused=True)
    digit_path = {"c_q.weight", "c_k.weight", "to_digits.weight"}
    for name, a, b in zip(names, got, want):
        if name in digit_path and not straight_through:
            assert a is None, f"{backend} hard mode: {name} got a gradient"
            continue
        assert a is not None and b is not None, f"{backend} grad {name} missing"
        assert a.abs().sum() > 0, f"{backend} grad {name} is zero"
        assert rel_err(a, b) < 1e-4, f"{backend} grad {name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_equals_full(backend):
    """A 7-token prefill into an empty cache, 200 one-token steps, then a 6-token chunk into the
    full cache, with padding: equal to one forward over the whole sequence (float32 tables). The
    Triton kernels under the CPU interpreter take 40 steps (about 0.5 s a step), 200 on a GPU."""
    need(backend)
    T = 53 if backend == "triton" and not HAS_CUDA else 213
    m = module(backend, n_heads=4, n_kv_heads=2, K=4, p=3)
    x, keep = inputs(T=T)
    cache = m.new_cache(2)
    with torch.no_grad():
        full = m(x, keep)
        outs = [m(x[:, :7], keep[:, :7], cache=cache)]
        for t in range(7, T - 6):
            outs.append(m(x[:, t:t + 1], keep[:, t:t + 1], cache=cache))
        outs.append(m(x[:, T - 6:], keep[:, T - 6:], cache=cache))
    got = torch.cat(outs, 1)
    assert cache.length == T
    assert rel_err(got[:, -7], full[:, -7]) < 1e-5, "the last one-token step"
    assert rel_err(got, full) < 1e-5, "every step"


@pytest.mark.parametrize("mode, backend", [("hard", "triton"), ("soft", "triton"), ("hard", "cuda"), ("soft", "cuda")])
def test_forward_reads_nothing_on_the_host(monkeypatch, mode, backend):
    """No .item(), int(tensor), bool(tensor) in forward (Triton or CUDA backend, straight-through
    on in hard mode): the digits are in range by construction, so the op's host check is skipped."""
    need(backend)
    m = module(backend, straight_through=mode == "hard", mode=mode)
    x, keep = inputs()
    want = m(x, keep)
    calls = []
    for name in ("item", "__int__", "__bool__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name: calls.append(_n) or 1 / 0)
    y = m(x, keep)
    monkeypatch.undo()
    assert not calls, f"host reads: {calls}"
    assert torch.equal(y, want)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling the Triton kernels needs CUDA tensors (the interpreter runs eager)")
@pytest.mark.parametrize("straight_through, mode, backend",
                         [(False, "hard", "triton"), (True, "hard", "triton"), (False, "soft", "triton"),
                          (False, "hard", "cuda"), (True, "hard", "cuda"), (False, "soft", "cuda")],
                         ids=["hard", "straight-through", "soft", "hard-cuda", "straight-through-cuda", "soft-cuda"])
def test_compiles_fullgraph_without_host_sync(straight_through, mode, backend):
    """torch.compile(fullgraph=True) traces forward whole, and the eager forward runs under
    torch.cuda's sync debug mode set to error. (The torch backend, the reference, compresses
    codes with torch.unique, a data-dependent size: not compiled here.)"""
    need(backend)
    m = module(backend, straight_through=straight_through, mode=mode)
    x, keep = inputs()
    want = m(x, keep)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x, keep)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch._dynamo.reset()
    got = torch.compile(m, fullgraph=True)(x, keep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg="compiled module output")


@pytest.mark.parametrize("kwargs, match", [
    ({"d_model": 30, "n_heads": 4}, "d_model=30 must be divisible by n_heads=4"),
    ({"n_kv_heads": 3}, "n_kv_heads=3 must divide n_heads=4"),
    ({"p": 1}, "p must be >= 2"),
    ({"K": 0}, "K must be an int >= 1"),
    ({"alpha": 0.0}, "alpha must be a finite number > 0"),
    ({"alpha": -2.0}, "alpha must be a finite number > 0"),
    ({"lcp_beta": -1.0}, "lcp_beta must be a finite number >= 0"),
    ({"lcp_beta": float("inf")}, "lcp_beta must be a finite number >= 0"),
    ({"mode": "kernel"}, "mode must be 'hard' or 'soft'"),
    ({"mode": "soft", "straight_through": True}, "straight_through is for mode='hard'"),
], ids=["d_model", "n_kv_heads", "p", "K", "alpha0", "alpha-neg", "lcp_beta", "lcp_beta-inf", "mode", "soft-st"])
def test_bad_config(kwargs, match):
    args = {"d_model": 32, "n_heads": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        UltrametricCausalSelfAttention(args.pop("d_model"), args.pop("n_heads"), **args)


def test_bad_input_and_repr():
    m = module("torch")
    with pytest.raises(ValueError, match=r"x must be \(B, T, 24\)"):
        m(torch.randn(2, 5, 23, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 5, 24, device=DEVICE), torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    assert "K=4, p=3, alpha=1.7, mode=hard" in repr(m)
    assert sorted(m.state_dict()) == ["c_k.weight", "c_proj.weight", "c_q.weight", "c_v.weight", "to_digits.weight"]


# ---- soft mode (their kernel mode) ---------------------------------------------------


SOFT_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.parametrize("backend", SOFT_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_soft_mode_matches_plain_torch(case, backend):
    """mode='soft': output and every parameter's gradient (and x's) against the spec's soft kernel
    re-implemented densely in float64 on the same weights; lcp_beta 4 so partial matches count."""
    need(backend)
    H, Hkv, K, p, pad = case
    m = module(backend, n_heads=H, n_kv_heads=Hkv, K=K, p=p, mode="soft", lcp_beta=4.0)
    x, keep = inputs(pad=pad)
    x.requires_grad_()
    got = m(x, keep)
    want = plain(m, x, keep)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, want) < 1e-5, f"{backend} soft output: {rel_err(got, want):.2e}"
    g = torch.randn_like(x)
    names, params = zip(*([("x", x)] + list(m.named_parameters())))
    ga = torch.autograd.grad((got * g).sum(), params)
    gb = torch.autograd.grad((want * g.double()).sum(), params)
    for name, a, b in zip(names, ga, gb):
        assert a.abs().sum() > 0, f"{backend} soft grad {name} is zero"
        assert rel_err(a, b) < 1e-4, f"{backend} soft grad {name}: {rel_err(a, b):.2e}"


def test_soft_mode_cuda_backend_refuses_cpu_tensors():
    """The module in soft mode passes backend='cuda' through to the op, which refuses CPU tensors
    naming v and the way out (the op's refusal: test_ultrametric_edges.py::test_cuda_backend_refusals;
    on a GPU SOFT_BACKENDS runs it). Runs on every machine."""
    m = module("cuda", mode="soft").cpu()
    x, keep = inputs()
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors, v is on cpu"):
        m(x.cpu(), keep.cpu())


def test_soft_mode_has_no_cache():
    m = module("torch", mode="soft")
    with pytest.raises(ValueError, match="no decode cache"):
        m.new_cache(2)
    with pytest.raises(ValueError, match="no decode cache"):
        m(torch.randn(2, 3, 24, device=DEVICE), cache=object())
