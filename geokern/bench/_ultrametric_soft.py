"""Benchmark cases: soft-mode ultrametric attention (the soft LCP kernel, issue #18), part of the
ultrametric family (geokern/bench/ultrametric.py lists them).

B = 4, H = 16, D = 64, K = 8, bf16, causal, T = 1k .. 16k; soft digits sigmoid(randn) in [0, 1]
(p = 2), alpha = 2, lcp_beta = 32. The op is bound by the special-function unit (MUFU), not by
bytes or tensor cores: the metric counts exponentials, the kernels' own count per visible pair
(forward K + 1, backward 2K + 1, so fwd+bwd 3K + 2; kernels/ultrametric/README.md), against the
device's MUFU rate (ceilings "sfu_tops", 16 per clock per SM): fraction_of_ceiling is the fraction
of the special-function floor reached. Peers: SDPA causal at the same B, H, T, D (a timing
baseline: other weights, not checked), and the dense soft kernel as their module computes it
(the [B, H, T, T, K] match tensor, materialised: 2 GiB of float32 per tensor at T = 1024, 32 GiB
at 4096, 512 GiB at 16384), which runs out of memory from about T = 4096 on (fwd+bwd earlier) and
is skipped there with the error.

Implementations: "triton" and, where geokern._C is built, "cuda" (csrc/ultrametric/soft.cu, a warp
per row). The amount is the Triton count for both; the CUDA backward has no atomics and pays for it
with a second recomputation (2K + 1 more exponentials per pair: fwd+bwd 5K + 3), so its fraction
of the ceiling understates its special-function work by that ratio.

Correctness before timing: the forward against the query-chunked reference on batch 0, heads 0-1
(the whole batch would take minutes at 16k); the fwd+bwd rows against the reference's gradients
on batch 0, head 0, computed by query chunks (each chunk's keys end where its queries end, so the
reference's causal offset places it; O(chunk T K) memory).
"""

import functools

import torch
import torch.nn.functional as F

from geokern import _backend

from geokern.bench.registry import Case
from geokern.ops import ultrametric as ops
from geokern.reference import ultrametric as ref

B, H, D, K, ALPHA, BETA = 4, 16, 64, 8, 2.0, 32.0
TS = (1024, 2048, 4096, 8192, 16384)
FWD_BWD_TS = (1024, 4096, 16384)
TOL = 2e-2
CHECK_HEADS = 2
GRAD_CHUNK = 256


def _pairs(T):
    return B * H * T * (T + 1) // 2  # causal: query i sees keys 0..i


def _make(T, grad=False):
    def make():
        qs, ks = (torch.sigmoid(torch.randn(B, H, T, K, device="cuda")).to(torch.bfloat16) for _ in range(2))
        v, q, k = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ts = (qs, ks, v, q, k)
        return tuple(t.requires_grad_() for t in ts) if grad else ts

    return make


def _ours(qs, ks, v, *_, backend="triton"):
    return ops.ultrametric_attention(qs, ks, v, alpha=ALPHA, mode="soft", lcp_beta=BETA, backend=backend)


def _backends():
    """The kernel backends of the soft mode that can run here: triton, and cuda where _C is built."""
    return [b for b in _backend.available(torch.device("cuda")) if b in ("triton", "cuda")]


def _impls(wrap):
    return {b: wrap(functools.partial(_ours, backend=b)) for b in _backends()}


def _sdpa(qs, ks, v, q, k):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _dense(qs, ks, v, *_):
    """Their kernel mode: the match tensor [B, H, T, T, K] materialised, cumprod, alpha^lcp, mask."""
    T = qs.shape[2]
    match = torch.exp(-BETA * (qs.float()[:, :, :, None] - ks.float()[:, :, None]).square())
    w = torch.pow(ALPHA, torch.cumprod(match, -1).sum(-1))
    w = w.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=qs.device).tril(), 0.0)
    return ((w @ v.float()) / w.sum(-1, keepdim=True).clamp_min(1e-9)).to(v.dtype)


def _head_slice(y):
    return y[:1, :CHECK_HEADS]  # a view: nothing added to the timed call


def _value(qs, ks, v, *_):
    return ref.soft_lcp_attention(*(t[:1, :CHECK_HEADS].detach() for t in (qs, ks, v)), ALPHA, BETA).float()


def _checked(fn):
    def run(*inputs):
        return _head_slice(fn(*inputs))

    return run


def _grads(fn):
    """fn's forward and backward over every head (timed); returns dq, dk, dv of batch 0, head 0."""

    def run(qs, ks, v, q, k):
        y = fn(qs, ks, v, q, k)
        ins = (q, k, v) if fn is _sdpa else (qs, ks, v)
        g = torch.autograd.grad(y, ins, torch.ones_like(y))
        return tuple(t[:1, :1] for t in g)  # views

    return run


def _grad_value(qs, ks, v, *_):
    """The reference's dq, dk, dv on batch 0, head 0 for dy = 1, by query chunks (float32)."""
    q0, k0, v0 = (t[:1, :1].detach().float().requires_grad_() for t in (qs, ks, v))
    T = q0.shape[2]
    for i0 in range(0, T, GRAD_CHUNK):
        i1 = min(i0 + GRAD_CHUNK, T)  # keys 0..i1-1: the reference puts query i0 + r at position i0 + r
        y = ref.soft_lcp_attention(q0[:, :, i0:i1], k0[:, :, :i1], v0[:, :, :i1], ALPHA, BETA)
        y.backward(torch.ones_like(y))
    return q0.grad, k0.grad, v0.grad


def _fwd_case(T):
    return Case(op="ultrametric_attention soft", shape=f"B{B}H{H}T{T}K{K}D{D}", dtype="bf16", direction="fwd",
                make_inputs=_make(T), impls=_impls(_checked),
                peers={"sdpa causal": _sdpa, "dense soft (theirs)": _checked(_dense)}, reference=_value,
                amount=_pairs(T) * (K + 1), metric="Tops/s", ceiling="sfu_tops", tol=TOL,
                input_bytes=B * H * T * (2 * K + 3 * D) * 2, baselines=("sdpa causal",))


def _fwd_bwd_case(T):
    return Case(op="ultrametric_attention soft", shape=f"B{B}H{H}T{T}K{K}D{D}", dtype="bf16", direction="fwd+bwd",
                make_inputs=_make(T, grad=True), impls=_impls(_grads),
                peers={"sdpa causal": _grads(_sdpa), "dense soft (theirs)": _grads(_dense)}, reference=_grad_value,
                amount=_pairs(T) * (3 * K + 2), metric="Tops/s", ceiling="sfu_tops", tol=TOL,
                input_bytes=B * H * T * (2 * K + 3 * D) * 2, baselines=("sdpa causal",))


def soft_cases():
    return [_fwd_case(T) for T in TS] + [_fwd_bwd_case(T) for T in FWD_BWD_TS]
