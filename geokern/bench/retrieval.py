"""Benchmark cases: the fused retrieval attention at the attention shape (spec section 2).

softmax(-beta * R_j * sqrt(|q_i - k_j|^2_lam + eps)) @ V, bf16, B4 H16 N4096 and B1 H4
N16384 (the same FLOPs), D = 64 and 128, forward and forward + backward; FLOPs 4 B H N^2 D
forward, 3.5x that for forward + backward; ceiling: the bf16 cuBLAS GEMM rate.

Peers, measured in the same run: FlexAttention with a score_mod computing the same
cost from captured norms (|q|^2_lam, |k|^2_lam, R; q pre-scaled by lam), and SDPA
(flash) on the same shapes as the dot-product ceiling (its own case: it computes a
different function, so it is checked against itself). FlexAttention's backward does not
differentiate its captured norms, so the fwd+bwd check compares the output and dV only
(both correct for every implementation); the timing covers the whole backward of each.
"""

import functools
import math

import torch

from geokern import _backend
from geokern.bench.registry import Case
from geokern.metric import diag
from geokern.ops import retrieval as ops

# (B, H, N, D)
SHAPES = [(4, 16, 4096, 64), (4, 16, 4096, 128), (1, 4, 16384, 64), (1, 4, 16384, 128)]
EPS = 1e-8


def _kernel_backends():
    return [b for b in _backend.available(torch.device("cuda")) if b == "triton"]


def _make(b, h, n, d, grad):
    B, H = b, h

    def make():
        q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
        lam = torch.rand(d, device="cuda") + 0.5
        r = torch.rand(n, device="cuda") + 0.5
        return q, k, v, lam, r

    return make


def _beta(d):
    return 1.0 / math.sqrt(d)


@functools.lru_cache(None)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    def attn(q, k, v, lam, r, beta):
        qf, kf = q.float(), k.float()
        qn = (qf * qf * lam).sum(-1)
        kn = (kf * kf * lam).sum(-1)
        qw = q * lam.to(q.dtype)

        def score_mod(score, b, h, i, j):
            s = qn[b, h, i] + kn[b, h, j] - 2.0 * score
            return -beta * r[j] * torch.sqrt(torch.clamp(s, min=0.0) + EPS)

        return flex_attention(qw, k, v, score_mod=score_mod, scale=1.0)

    return torch.compile(attn, dynamic=False)


def _ours(backend, d):
    def f(q, k, v, lam, r):
        return ops.retrieval_attention(q, k, v, r, diag(lam), _beta(d), EPS, backend=backend)

    return f


def _flex_fn(d):
    def f(q, k, v, lam, r):
        return _flex()(q, k, v, lam, r, _beta(d))

    return f


def _reference(d):
    """Per-head float32 reference (the expanded distance, as every contender uses)."""

    def ref(q, k, v, lam, r, want_dv=False):
        outs, dvs = [], []
        gfull = _grad_out(torch.empty(v.shape, device=v.device, dtype=v.dtype)).float() if want_dv else None
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                qf, kf = q[b, h].detach().float(), k[b, h].detach().float()
                vf = v[b, h].detach().float().requires_grad_(want_dv)
                s = (qf * qf * lam).sum(-1)[:, None] + (kf * kf * lam).sum(-1)[None, :] - 2.0 * (qf * lam) @ kf.T
                logit = -_beta(d) * r * torch.sqrt(torch.clamp(s, min=0.0) + EPS)
                o = torch.softmax(logit, -1) @ vf
                outs.append(o.detach())
                if want_dv:
                    (gv,) = torch.autograd.grad(o, vf, gfull[b, h])
                    dvs.append(gv)
        out = torch.stack(outs).view(q.shape[0], q.shape[1], *outs[0].shape)
        if want_dv:
            return out, torch.stack(dvs).view(v.shape)
        return out

    return ref


def _grad_out(o):
    g = torch.Generator(device=o.device).manual_seed(0)
    return torch.randn(o.shape, device=o.device, dtype=torch.float32, generator=g).to(o.dtype)


def _fwd_bwd(fn):
    def f(q, k, v, lam, r):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, lam, r)
        out.backward(_grad_out(out))
        return out, v.grad

    return f


def _case(B, H, n, d, direction):
    grad = direction == "fwd+bwd"
    flops = 4 * B * H * n * n * d * (3.5 if grad else 1.0)
    impls = {b: _ours(b, d) for b in _kernel_backends()}
    peers = {"flex_attention": _flex_fn(d)}
    ref = _reference(d)
    if grad:
        impls = {b: _fwd_bwd(f) for b, f in impls.items()}
        peers = {name: _fwd_bwd(f) for name, f in peers.items()}

        def reference(q, k, v, lam, r):
            return ref(q, k, v, lam, r, want_dv=True)
    else:
        reference = ref
    return Case(
        op="retrieval_attention", shape=f"B{B}-H{H}-N{n}-D{d}", dtype="bf16", direction=direction,
        make_inputs=_make(B, H, n, d, grad), impls=impls, peers=peers, reference=reference,
        amount=flops, metric="TFLOP/s", ceiling="bf16_gemm_tflop_s", tol=2e-2, input_bytes=3 * B * H * n * d * 2,
    )


def _sdpa_case(B, H, n, d, direction):
    """SDPA (dot-product attention) on the same shapes: the ceiling the targets name."""
    grad = direction == "fwd+bwd"
    flops = 4 * B * H * n * n * d * (3.5 if grad else 1.0)

    def sdpa(q, k, v, lam, r):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    fn = _fwd_bwd(sdpa) if grad else sdpa
    return Case(
        op="sdpa_same_shape", shape=f"B{B}-H{H}-N{n}-D{d}", dtype="bf16", direction=direction,
        make_inputs=_make(B, H, n, d, grad), impls={}, peers={"sdpa": fn}, reference=fn,
        amount=flops, metric="TFLOP/s", ceiling="bf16_gemm_tflop_s", tol=1e-2, input_bytes=3 * B * H * n * d * 2,
    )


def cases():
    from geokern.bench import _retrieval_decode  # the decode regime (trainer shape), same family

    return ([f(*shape, direction) for shape in SHAPES for direction in ("fwd", "fwd+bwd") for f in (_case, _sdpa_case)]
            + _retrieval_decode.cases())
