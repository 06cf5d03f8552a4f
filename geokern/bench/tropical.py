"""Benchmark cases: fused tropical attention (op and module), and the peer it replaces.

Compute-bound on the fp32 lanes (no max-plus tensor cores): the work the op must do is
an add and a max per d in the score stage and per channel in the value stage for every
visible (query, key) pair, amount = 4 * D * B * H * pairs, pairs = T (T + 1) / 2 causal.
Ceiling: the fp32 lane rate. The backward is timed against the same count, so its
figure reads directly against the forward's.

Peer: model_guided_research's TropicalCausalSelfAttention, whose forward materialises
(B, H, T, T, D) logits. Its code is neither copied nor run here (its licence, MIT with
a rider, withholds every right from some parties, the authors of this code among
them); `their_attention` and `their_module_forward` re-implement its forward from the
spec (tropical_ultrametric_hypercomplex.md, section 2) the way it computes it,
materialising the same tensors, so their time and memory are what a user of it sees.
Where it runs out of memory the row records the error.
"""

import functools

import torch

from geokern import _backend
from geokern.bench.registry import Case
from geokern.nn.tropical import TropicalCausalSelfAttention, attention_heads
from geokern.reference import tropical as ref

from geokern.ops import tropical as ops

B, H, D = 4, 8, 64
TS = (256, 1024, 2048, 4096, 8192, 16384, 32768)
PEER_MAX_T = 4096  # theirs materialises B*H*T*T*D: out of memory from here on
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "bf16": 2e-2}


def their_attention(q, k, v, gauge_fix=True, score_center=True):
    """Their tropical_max_plus_attention (beta = None, no margins), computed their way:
    every step on full (B, H, Tq, Tk[, D]) tensors. k, v already have q's head count."""
    if gauge_fix:
        q, k, v = (t - t.amax(dim=-1, keepdim=True) for t in (q, k, v))
    s = torch.max(q.unsqueeze(3) + k.unsqueeze(2), dim=-1).values
    s = s.masked_fill(~ref.causal_visible(q.shape[2], k.shape[2], q.device), float("-inf"))
    if score_center:
        s = s - s.amax(dim=-1, keepdim=True)
    y = torch.max(s.unsqueeze(-1) + v.unsqueeze(2), dim=3).values
    return y - y.amax(dim=-1, keepdim=True) if gauge_fix else y


def their_module_forward(mod, x, cos_sin, kv_cache=None):
    """Their TropicalCausalSelfAttention.forward with `mod`'s weights and config."""
    Bx, T, _ = x.shape
    q, k, v = attention_heads(mod, x, cos_sin, kv_cache)
    k, v = ref.repeat_kv(k, mod.n_head), ref.repeat_kv(v, mod.n_head)
    y = their_attention(q, k, v, mod.tropical_gauge_fix, mod.tropical_score_center)
    y = mod.c_proj(y.transpose(1, 2).contiguous().view(Bx, T, -1))
    return y - y.amax(dim=-1, keepdim=True) if mod.tropical_gauge_fix else y


def rotary(T, head_dim, device, dtype, base=10000.0):
    """(cos, sin) of shape (1, T, 1, head_dim / 2), as nanochat precomputes them."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    f = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv)
    return f.cos().to(dtype)[None, :, None, :], f.sin().to(dtype)[None, :, None, :]


def _value(q, k, v, chunk_elems=1 << 28):
    """The op's output in float32 without materialising T x T: query chunks against
    their visible keys only (the bench's correctness check at every T)."""
    q, k, v = (ref.gauge(t.float()) for t in (q, k, v))
    T = q.shape[2]
    step = max(1, chunk_elems // (q.shape[0] * q.shape[1] * T * q.shape[3]))
    out = []
    for i0 in range(0, T, step):
        i1 = min(T, i0 + step)
        kc, vc = k[:, :, :i1], v[:, :, :i1]
        s = (q[:, :, i0:i1, None, :] + kc[:, :, None]).amax(-1)
        s = s.masked_fill(~ref.causal_visible(T, T, q.device)[i0:i1, :i1], float("-inf"))
        s = s - s.amax(-1, keepdim=True)
        out.append((s[..., None] + vc[:, :, None]).amax(3))
    return ref.gauge(torch.cat(out, dim=2))


def _kernel_backends():
    return [b for b in _backend.available(torch.device("cuda")) if b != "torch"]


def _amount(T):
    return 4 * D * B * H * T * (T + 1) // 2


def _fwd_case(T, dt):
    dtype = DTYPES[dt]

    def make():
        return tuple(torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(3))

    impls = {b: functools.partial(ops.tropical_attention, backend=b) for b in _kernel_backends()}
    return Case(
        op="tropical_attention", shape=f"B{B}H{H}T{T}D{D}", dtype=dt, direction="fwd", make_inputs=make,
        impls=impls, peers={"theirs (materialised)": their_attention} if T <= PEER_MAX_T else {},
        reference=_value, amount=_amount(T), metric="Tops/s", ceiling="fp32_lane_tops", tol=TOL[dt],
        input_bytes=3 * B * H * T * D * dtype.itemsize,
    )


def _routes_case(T):
    """The forward as training runs it: recording the routes the backward needs."""

    def make():
        return tuple(ref.gauge(torch.randn(B, H, T, D, device="cuda")) for _ in range(3))

    impls = {b: (lambda f: lambda q, k, v: f(q, k, v, True, True, True, False)[0])(ops._KERNELS[b][0])
             for b in _kernel_backends()}
    return Case(
        op="tropical_attention+routes", shape=f"B{B}H{H}T{T}D{D}", dtype="fp32", direction="fwd",
        make_inputs=make, impls=impls, peers={},
        reference=lambda q, k, v: ref.core(q, k, v, True, True, False)[0], amount=_amount(T), metric="Tops/s",
        ceiling="fp32_lane_tops", tol=TOL["fp32"], input_bytes=3 * B * H * T * D * 4,
    )


def _bwd_case(T):
    def make():
        q, k, v = (ref.gauge(torch.randn(B, H, T, D, device="cuda")) for _ in range(3))
        _, idx, jm, _ = ops._KERNELS[_kernel_backends()[0]][0](q, k, v, True, True, True, False)
        return torch.randn(B, H, T, D, device="cuda"), q, k, idx, jm, True

    impls = {b: ops._KERNELS[b][1] for b in _kernel_backends()}
    return Case(
        op="tropical_attention", shape=f"B{B}H{H}T{T}D{D}", dtype="fp32", direction="bwd", make_inputs=make,
        impls=impls, peers={}, reference=ref.core_backward, amount=_amount(T), metric="Tops/s",
        ceiling="fp32_lane_tops", tol=TOL["fp32"], input_bytes=B * H * T * D * 16,
    )


class _Config:
    n_head = H
    n_kv_head = H
    n_embd = H * D


def _module_case(T):
    """Their module's forward against ours with the same weights, bf16 as they train.
    The module and the rotary tables are built on first use, on the GPU (listing the
    cases needs no CUDA)."""

    @functools.cache
    def built():
        torch.manual_seed(0)
        return TropicalCausalSelfAttention(_Config(), 0).cuda().to(torch.bfloat16), rotary(T, D, "cuda", torch.bfloat16)

    def make():
        built()
        return (torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16),)

    @torch.no_grad()
    def reference(x):
        ours, cos_sin = built()
        ours.backend = "torch"
        try:
            return ours(x, cos_sin, None).float()
        finally:
            ours.backend = None

    @torch.no_grad()
    def geokern_forward(x):
        ours, cos_sin = built()
        return ours(x, cos_sin, None)

    @torch.no_grad()
    def their_forward(x):
        ours, cos_sin = built()
        return their_module_forward(ours, x, cos_sin)

    # inference forwards (no autograd graph) on both sides
    return Case(
        op="TropicalCausalSelfAttention", shape=f"B{B}T{T}C{H * D}H{H}", dtype="bf16", direction="fwd",
        make_inputs=make, impls={"geokern": geokern_forward}, peers={"theirs": their_forward},
        reference=reference, amount=_amount(T), metric="Tops/s", ceiling="fp32_lane_tops", tol=TOL["bf16"],
        input_bytes=B * T * H * D * 2,
    )


def cases():
    out = [_fwd_case(T, "fp32") for T in TS] + [_fwd_case(4096, "bf16"), _routes_case(4096), _bwd_case(4096)]
    out += [_module_case(T) for T in (256, 1024, 2048, 4096)]
    return out
