"""Benchmark cases: quaternion / octonion attention (issue #20), causal bf16, forward and
forward + backward.

Shapes: B4 H16 D64, T = 1k .. 16k, causal. TFLOP/s counts 2 T^2 (D + W) flops per head halved
for causal, with W = D (quaternion: the values conj(k^) v are D wide) or 8 D (octonion: the 8 x 8
outer product per channel), against the bf16 tensor-core ceiling; forward + backward counts 2.5x
that (the backward's five GEMM-shaped products to the forward's two).

Peers, measured in the same process:
- "sdpa": F.scaled_dot_product_attention on the same shape, as rows of op "sdpa (baseline)"
  (plain softmax attention: the speed a flash kernel of this shape reaches; the quaternion op
  does the same GEMM work; the runner times only outputs that pass their own check).
- "composition": what a user can write today: per-channel normalisation, the elementwise
  prologue conj(k^) v (octonions: the [T, 8 D] outer products, materialised), SDPA, and the
  elementwise epilogue (octonions: the structure-constant contraction).
- "theirs (re-implemented)": model_guided_research's forward (not copied nor run: its licence
  withholds every right from some parties, the authors of this code among them), re-implemented
  from the spec (section 4) the way it computes: the quaternion op materialises the T x T
  weights; the octonion op loops over queries in Python (O(T^2 D) products). Only where it fits.
`their_*` are also what tests/test_hypercomplex_attention_nn.py holds the modules to.
"""

import functools

import torch
import torch.nn.functional as F

from geokern import _backend
from geokern.bench.registry import Case
from geokern.kernels.hypercomplex_attention import flops
from geokern.nn.tropical import attention_heads
from geokern.ops import hypercomplex_attention as ops
from geokern.reference import hypercomplex as hc
from geokern.reference import hypercomplex_attention as ref
from geokern.reference.tropical import causal_visible, repeat_kv

B, H, D = 4, 16, 64
TS = (1024, 2048, 4096, 8192, 16384)
FWD_BWD_TS = (1024, 4096, 16384)
GRAD_TOL = 3e-2  # bf16 gradients summed over up to T keys, against float32
THEIRS_MAX_T = {4: 4096, 8: 1024}  # the T x T weights (quaternion) / the Python loop's time (octonion)
NAMES = {4: "quaternion_attention", 8: "octonion_attention"}


def their_attention(n, q, k, v):
    """Their rotor-gate attention, computed their way (k, v with q's heads; causal): the full
    T x T softmax, then per query either q^ (P @ conj(k^) v) (quaternion) or a Python loop over
    queries forming sum_j p_ij ((q^_i conj(k^_j)) v_j) (octonion)."""
    T, Dh = q.shape[2], q.shape[3]
    s = (q @ k.transpose(-1, -2)) / Dh ** 0.5
    s = s.masked_fill(~causal_visible(T, k.shape[2], q.device), float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    qn, kn = ref.normalize_channels(q, n), ref.normalize_channels(k, n)
    qc, kb, vc = ref.channels(qn, n), hc.hypercomplex_conj(ref.channels(kn, n), n), ref.channels(v, n)
    if n == 4:
        return hc.quaternion_mul(qc, ref.channels(p @ hc.quaternion_mul(kb, vc).flatten(-2), 4)).flatten(-2)
    rows = []
    for i in range(T):
        prod = hc.octonion_mul(hc.octonion_mul(qc[:, :, i:i + 1], kb), vc).flatten(-2)  # (B, H, Tk, D)
        rows.append((p[:, :, i, :, None] * prod).sum(2))
    return torch.stack(rows, dim=2)


def their_module_forward(mod, x, cos_sin, kv_cache=None):
    """Their Quaternion/OctonionCausalSelfAttention.forward with `mod`'s weights and config."""
    Bx, T, _ = x.shape
    q, k, v = attention_heads(mod, x, cos_sin, kv_cache)
    y = their_attention(mod.N, q, repeat_kv(k, mod.n_head), repeat_kv(v, mod.n_head))
    return mod.c_proj(y.transpose(1, 2).contiguous().view(Bx, T, -1))


def composition(n, q, k, v):
    """Normalisation + elementwise prologue + SDPA + elementwise epilogue, in PyTorch."""
    qn, kn = ref.normalize_channels(q, n), ref.normalize_channels(k, n)
    kb, vc = hc.hypercomplex_conj(ref.channels(kn, n), n), ref.channels(v, n)
    if n == 4:
        a = F.scaled_dot_product_attention(q, k, hc.quaternion_mul(kb, vc).flatten(-2), is_causal=True)
        return hc.quaternion_mul(ref.channels(qn, 4), ref.channels(a, 4)).flatten(-2)
    w = (kb.unsqueeze(-1) * vc.unsqueeze(-2)).flatten(-3)  # (B, H, T, 8 D): the outer products
    m = F.scaled_dot_product_attention(q, k, w, is_causal=True)
    e = ref.epilogue_matrix(8).to(q.device, q.dtype)
    z = (m.unflatten(-1, (q.shape[-1] // 8, 64)) @ e).unflatten(-1, (8, 8))  # [.., C, s, r]
    return (ref.channels(qn, 8).unsqueeze(-1) * z).sum(-2).flatten(-2)


def _value(n, q, k, v, chunk_elems=1 << 27):
    """The op's output in float32 without materialising T x T (query chunks): the correctness
    check at every T."""
    q, k, v = q.float(), k.float(), v.float()
    T = q.shape[2]
    step = max(1, chunk_elems // (q.shape[0] * q.shape[1] * T))
    qn, kn = ref.normalize_channels(q, n), ref.normalize_channels(k, n)
    kb, vc = hc.hypercomplex_conj(ref.channels(kn, n), n), ref.channels(v, n)
    val = hc.quaternion_mul(kb, vc).flatten(-2) if n == 4 else (kb.unsqueeze(-1) * vc.unsqueeze(-2)).flatten(-3)
    e = ref.epilogue_matrix(8).to(q.device, torch.float32)
    out = []
    for i0 in range(0, T, step):
        i1 = min(T, i0 + step)
        s = (q[:, :, i0:i1] @ k[:, :, :i1].transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~causal_visible(T, T, q.device)[i0:i1, :i1], float("-inf"))
        a = torch.softmax(s, -1) @ val[:, :, :i1]
        qc = ref.channels(qn[:, :, i0:i1], n)
        if n == 4:
            out.append(hc.quaternion_mul(qc, ref.channels(a, 4)).flatten(-2))
        else:
            z = (a.unflatten(-1, (q.shape[-1] // 8, 64)) @ e).unflatten(-1, (8, 8))
            out.append((qc.unsqueeze(-1) * z).sum(-2).flatten(-2))
    return torch.cat(out, dim=2)


def _make(T, grad=False):
    """q, k, v [B, H, T, D] bf16 (leaves requiring grad for the forward + backward rows)."""
    def make():
        return tuple(torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)
                     for _ in range(3))

    return make


def _case(n, T):
    kernels = [b for b in _backend.available(torch.device("cuda")) if b == "triton"]
    impls = {b: functools.partial(ops._attention, n, causal=True, scale=None, normalize=True, backend=b)
             for b in kernels}
    peers = {"composition": functools.partial(composition, n)}
    if T <= THEIRS_MAX_T[n]:
        peers["theirs (re-implemented)"] = functools.partial(their_attention, n)
    return Case(
        op=NAMES[n], shape=f"B{B}H{H}T{T}D{D}", dtype="bf16", direction="fwd", make_inputs=_make(T), impls=impls,
        peers=peers, reference=functools.partial(_value, n), amount=flops(B, H, T, T, D, n, True),
        metric="TFLOP/s", ceiling="bf16_gemm_tflop_s", tol=2e-2, input_bytes=3 * B * H * T * D * 2,
    )


def _plain(q, k, v, chunk_elems=1 << 27):
    """Causal softmax attention in float32 by query chunks: the check of the SDPA rows."""
    q, k, v = q.float(), k.float(), v.float()
    T = q.shape[2]
    step = max(1, chunk_elems // (q.shape[0] * q.shape[1] * T))
    out = []
    for i0 in range(0, T, step):
        i1 = min(T, i0 + step)
        s = (q[:, :, i0:i1] @ k[:, :, :i1].transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~causal_visible(T, T, q.device)[i0:i1, :i1], float("-inf"))
        out.append(torch.softmax(s, -1) @ v[:, :, :i1])
    return torch.cat(out, dim=2)


def _sdpa_case(T):
    """SDPA itself at the same shape (the runner times only what passes its own check, so plain
    attention is a row of its own): the flash-attention speed the quaternion op is read against."""
    return Case(
        op="sdpa (baseline)", shape=f"B{B}H{H}T{T}D{D}", dtype="bf16", direction="fwd", make_inputs=_make(T),
        impls={}, peers={"sdpa": functools.partial(F.scaled_dot_product_attention, is_causal=True)},
        reference=_plain, amount=flops(B, H, T, T, D, 4, True), metric="TFLOP/s", ceiling="bf16_gemm_tflop_s",
        tol=2e-2, input_bytes=3 * B * H * T * D * 2,
    )


def _grads(fn):
    """fn's forward and backward over every head (timed, dy = 1); returns dq, dk, dv of batch 0,
    head 0 (views: nothing added to the timed call)."""

    def run(q, k, v):
        y = fn(q, k, v)
        return tuple(g[:1, :1] for g in torch.autograd.grad(y, (q, k, v), torch.ones_like(y)))

    return run


def _grad_value(value):
    """The float32 check's dq, dk, dv on batch 0, head 0 for dy = 1 (query-chunked: O(T^2) memory
    for one head only)."""

    def run(q, k, v):
        ins = tuple(t[:1, :1].detach().float().requires_grad_() for t in (q, k, v))
        y = value(*ins)
        return torch.autograd.grad(y, ins, torch.ones_like(y))

    return run


def _fwd_bwd_case(n, T):
    kernels = [b for b in _backend.available(torch.device("cuda")) if b == "triton"]
    impls = {b: _grads(functools.partial(ops._attention, n, causal=True, scale=None, normalize=True, backend=b))
             for b in kernels}
    return Case(
        op=NAMES[n], shape=f"B{B}H{H}T{T}D{D}", dtype="bf16", direction="fwd+bwd", make_inputs=_make(T, grad=True),
        impls=impls, peers={"composition": _grads(functools.partial(composition, n))},
        reference=_grad_value(functools.partial(_value, n)), amount=2.5 * flops(B, H, T, T, D, n, True),
        metric="TFLOP/s", ceiling="bf16_gemm_tflop_s", tol=GRAD_TOL, input_bytes=3 * B * H * T * D * 2,
    )


def _sdpa_fwd_bwd_case(T):
    return Case(
        op="sdpa (baseline)", shape=f"B{B}H{H}T{T}D{D}", dtype="bf16", direction="fwd+bwd",
        make_inputs=_make(T, grad=True),
        impls={}, peers={"sdpa": _grads(functools.partial(F.scaled_dot_product_attention, is_causal=True))},
        reference=_grad_value(_plain), amount=2.5 * flops(B, H, T, T, D, 4, True), metric="TFLOP/s",
        ceiling="bf16_gemm_tflop_s", tol=GRAD_TOL, input_bytes=3 * B * H * T * D * 2,
    )


def cases():
    return ([_case(n, T) for n in (4, 8) for T in TS] + [_sdpa_case(T) for T in TS]
            + [_fwd_bwd_case(n, T) for n in (4, 8) for T in FWD_BWD_TS] + [_sdpa_fwd_bwd_case(T) for T in FWD_BWD_TS])
