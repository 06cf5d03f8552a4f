"""Benchmark cases: hard-mode ultrametric attention (issue #17) against SDPA and FlexAttention.

bf16, B = 1, H = 16, D = 64, p = 2, K = 8, T = 1k .. 64k, digits given: every timing includes the
bucketing (codes, tables) since it is part of the op. Metric: bytes-based, against copy
bandwidth: the minimal bytes of the forward are digits (int8, K per token, q and k) + v + y;
fwd+bwd adds dy read and dv written (and v once more, conservatively not counted). Peers at the
same shape in the same run: SDPA causal (flash), and FlexAttention with the dense score_mod
lcp * ln(alpha) (exactly this attention, O(T^2)) where its T^2 LCP table fits. Decode: one step of
UltrametricCache at contexts 4k / 64k / 1M against SDPA decode (one query over the whole
KV cache), both in a CUDA graph; these rows are timed by their own loop in `measure_decode` and
reported through Case with a peer like the others. A row whose tensors do not fit is skipped by
the runner with the error it raised (out of memory), never a crash. SDPA computes other weights:
it is a timing baseline (Case.baselines), not checked against the ultrametric reference.
Soft mode (issue #18): geokern/bench/_ultrametric_soft.py.
"""

import math

import torch
import torch.nn.functional as F

from geokern.bench.registry import Case
from geokern.bench._ultrametric_soft import soft_cases
from geokern.ops import ultrametric as ops
from geokern.reference import ultrametric as ref

B, H, D, P, K, ALPHA = 1, 16, 64, 2, 8, 2.0
TS = (1024, 4096, 16384, 32768, 65536)
FLEX_MAX_T = 16384  # the dense score_mod's [H, T, T] int8 LCP table: 4 GiB at 16k
DECODE_CONTEXTS = (4096, 65536, 1 << 20)
DECODE_B = 32
TOL = 2e-2


def _digits(T, heads=H):
    return torch.randint(0, P, (B, heads, T, K), device="cuda", dtype=torch.int8)


def _fwd_bytes(T):
    return B * H * T * (2 * K + 2 * D * 2)  # q, k digits (int8), v and y (bf16)


def _value(qd, kd, v, *_):
    return ref.ultrametric_attention(qd, kd, v, ALPHA, p=P, chunk=256).float()


def _sdpa(qd, kd, v, q, k):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _flex(T):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    cache = {}

    def run(qd, kd, v, q, k):
        key = (qd.data_ptr(), kd.data_ptr())
        if key not in cache:  # the LCP table and the block mask, per input set (part of its cost is not timed)
            lcp = torch.empty(H, T, T, dtype=torch.int8, device="cuda")
            for i0 in range(0, T, 1024):  # in row blocks: the [H, rows, T, K] comparison stays small
                eq = qd[0, :, i0:i0 + 1024, None, :] == kd[0, :, None, :, :]
                lcp[:, i0:i0 + 1024] = eq.to(torch.int8).cumprod(-1).sum(-1)
            cache.clear()
            cache[key] = (lcp, create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T))
        lcp, mask = cache[key]
        ln_a = math.log(ALPHA)

        def score_mod(s, b, h, i, j):  # q = k = 0: the score is lcp * ln(alpha) alone
            return lcp[h, i, j].to(torch.float32) * ln_a

        return compiled(torch.zeros_like(v), torch.zeros_like(v), v, score_mod=score_mod, block_mask=mask, scale=1.0)

    return run


def _make(T, grad=False):
    def make():
        qd, kd = _digits(T), _digits(T)
        v = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        k = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        return qd, kd, v, q, k

    return make


def _ours(qd, kd, v, *_):
    return ops.ultrametric_attention(qd, kd, v, alpha=ALPHA, p=P, backend="triton")


def _fwd_case(T):
    peers = {"sdpa causal": _sdpa}
    if T <= FLEX_MAX_T:
        peers["flex (dense lcp score_mod)"] = _flex(T)
    return Case(op="ultrametric_attention", shape=f"B{B}H{H}T{T}K{K}D{D}", dtype="bf16", direction="fwd",
                make_inputs=_make(T), impls={"triton": _ours}, peers=peers, reference=_value, amount=_fwd_bytes(T),
                metric="TB/s", ceiling="copy_tb_s", tol=TOL, input_bytes=_fwd_bytes(T), baselines=("sdpa causal",))


def _fwd_bwd(fn):
    def run(qd, kd, v, q, k):
        y = fn(qd, kd, v, q, k)
        (dv,) = torch.autograd.grad(y, v, torch.ones_like(y))
        return dv

    return run


def _dv_value(qd, kd, v, *_):
    vv = v.detach().float().requires_grad_()
    y = ref.ultrametric_attention(qd, kd, vv, ALPHA, p=P, chunk=256)
    return torch.autograd.grad(y, vv, torch.ones_like(y))[0]


def _fwd_bwd_case(T):
    return Case(op="ultrametric_attention", shape=f"B{B}H{H}T{T}K{K}D{D}", dtype="bf16", direction="fwd+bwd",
                make_inputs=_make(T, grad=True), impls={"triton": _fwd_bwd(_ours)},
                peers={"sdpa causal": _fwd_bwd(_sdpa)}, reference=_dv_value,
                amount=_fwd_bytes(T) + 2 * B * H * T * D * 2, metric="TB/s", ceiling="copy_tb_s", tol=TOL,
                input_bytes=_fwd_bytes(T), baselines=("sdpa causal",))


def _decode_case(ctx):
    """One decode step (append + query) in a CUDA graph, cache of `ctx` tokens, vs SDPA decode
    over a bf16 KV cache of ctx tokens (B = 32), also in a graph."""

    def make():
        cache = ops.UltrametricCache(DECODE_B, H, D, K, p=P, alpha=ALPHA, device="cuda", backend="triton")
        chunk = 1 << 14
        for t0 in range(0, ctx, chunk):  # a context of ctx random keys, without holding them
            n = min(chunk, ctx - t0)
            cache.append(torch.randint(0, P, (DECODE_B, H, n, K), device="cuda", dtype=torch.int8),
                         torch.randn(DECODE_B, H, n, D, device="cuda", dtype=torch.bfloat16))
        qd = torch.randint(0, P, (DECODE_B, H, 1, K), device="cuda", dtype=torch.int8)
        kd = torch.randint(0, P, (DECODE_B, H, 1, K), device="cuda", dtype=torch.int8)
        v = torch.randn(DECODE_B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        out = (torch.empty(DECODE_B, H, 1, D, device="cuda"), torch.empty(DECODE_B, H, 1, device="cuda"))
        kv = None
        if DECODE_B * H * ctx * D * 2 * 2 <= 40 << 30:  # SDPA's KV cache must fit
            kv = tuple(torch.randn(DECODE_B, H, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return cache, qd, kd, v, out, kv

    def graphed(step):
        state = {}

        def run(*inputs):
            key = id(inputs[0])
            if key not in state:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    step(*inputs)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    res = step(*inputs)
                state[key] = (g, res)
            g, res = state[key]
            g.replay()
            return res

        return run

    def ours(cache, qd, kd, v, out, kv):
        return ops.ultrametric_decode_step_(cache, qd, kd, v, out=out)

    def sdpa(cache, qd, kd, v, out, kv):
        if kv is None:
            raise MemoryError(f"SDPA decode: a bf16 KV cache of {ctx} tokens at B={DECODE_B} does not fit")
        return F.scaled_dot_product_attention(v, kv[0], kv[1]).float()

    def reference(cache, qd, kd, v, out, kv):
        # the step mutates its cache, and SDPA's keys are others: no value to compare here (tol inf
        # catches NaN only); tests/test_ultrametric_edges checks the step against recomputation
        return torch.zeros_like(out[0])

    return Case(op="ultrametric_decode_step_", shape=f"B{DECODE_B}H{H}ctx{ctx}K{K}D{D}", dtype="bf16",
                direction="fwd", make_inputs=make, impls={"triton": graphed(ours)}, peers={"sdpa decode": graphed(sdpa)},
                reference=reference, amount=DECODE_B * H * (K + 1) * D * 4 * 3, metric="TB/s", ceiling="copy_tb_s",
                tol=math.inf)


def cases():
    return [_fwd_case(T) for T in TS] + [_fwd_bwd_case(T) for T in (4096, 16384, 65536)] + \
        [_decode_case(c) for c in DECODE_CONTEXTS] + soft_cases()
