"""geokern.nn.TropicalCausalSelfAttention against their module's forward, same weights.

Their module (model_guided_research, nanochat/tropical_attention_torch.py) is neither
copied nor run here: its licence (MIT with a rider) withholds every right from some
parties, the authors of this code among them. Its forward is re-implemented from the
spec in geokern.bench.tropical (the benchmark's peer), materialising what
theirs materialises; these tests hold our module to it.
"""

import types

import pytest
import torch
from _helpers import BACKENDS, dtype_id
from _tolerance import assert_close
from _tropical import need
from conftest import DEVICE, HAS_CUDA

from geokern.bench.tropical import rotary, their_module_forward
from geokern.nn import TropicalCausalSelfAttention


def config(n_head=4, n_kv_head=4, n_embd=32, **kw):
    return types.SimpleNamespace(n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, **kw)


def module(cfg, backend, dtype, layer_idx=0):
    torch.manual_seed(0)  # the same weights in every module a test builds (compared across dtypes)
    return TropicalCausalSelfAttention(cfg, layer_idx, backend=backend).to(DEVICE, dtype)


class KVCache:
    """nanochat's KV cache protocol: insert_kv(layer, k, v) appends (B, H, T, D) at the
    current position and returns everything cached so far; the position advances after
    the last layer."""

    def __init__(self, n_layers):
        self.n_layers, self.pos, self.k, self.v = n_layers, 0, [None] * n_layers, [None] * n_layers

    def insert_kv(self, layer, k, v):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        if layer == self.n_layers - 1:
            self.pos += k.shape[2]
        return self.k[layer], self.v[layer]


CONFIGS = {
    "mha": config(),
    "gqa": config(n_head=4, n_kv_head=2),
    "no-gauge": config(tropical_gauge_fix=False),
    "no-center": config(tropical_gauge_fix=False, tropical_score_center=False),
    "wide-head": config(n_head=2, n_kv_head=1, n_embd=128),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_output_as_theirs(name, dtype, backend):
    need(backend, dtype)
    cfg = CONFIGS[name]
    ours = module(cfg, backend, dtype)
    T = 37 if HAS_CUDA or backend != "triton" else 13
    x = torch.randn(3, T, cfg.n_embd, device=DEVICE, dtype=dtype)
    hd = cfg.n_embd // cfg.n_head
    with torch.no_grad():
        y = ours(x, rotary(T, hd, DEVICE, dtype), None)
        same = their_module_forward(ours, x, rotary(T, hd, DEVICE, dtype))
        m64 = module(cfg, backend, torch.float64)
        want = their_module_forward(m64, x.double(), rotary(T, hd, DEVICE, torch.float64))
    assert_close(f"{name} {backend} module output", y, want, same)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_prefill_and_decode(backend):
    """Prefill, one-token decode and chunked decode through a two-layer cache: each step
    equals theirs and the same rows of the full-sequence forward."""
    need(backend)
    cfg = config(n_head=4, n_kv_head=2)
    layers = [module(cfg, backend, torch.float32, i) for i in range(2)]
    hd = cfg.n_embd // cfg.n_head
    x = torch.randn(2, 12, cfg.n_embd, device=DEVICE)
    cos, sin = rotary(12, hd, DEVICE, torch.float32)
    ours_cache, their_cache = KVCache(2), KVCache(2)
    with torch.no_grad():
        full = [m(x, (cos, sin), None) for m in layers]
        for t0, t1 in ((0, 5), (5, 6), (6, 9), (9, 10), (10, 12)):
            cs = (cos[:, t0:t1], sin[:, t0:t1])
            for i, m in enumerate(layers):
                y = m(x[:, t0:t1], cs, ours_cache)
                want = their_module_forward(m, x[:, t0:t1], cs, their_cache)
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"layer {i} steps {t0}:{t1} vs theirs")
                torch.testing.assert_close(y, full[i][:, t0:t1], rtol=1e-5, atol=1e-5,
                                           msg=f"layer {i} steps {t0}:{t1} vs the full forward")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_theirs(backend):
    """Parameter and input gradients equal autograd of their forward (float64 where the
    backend takes it; the gauge fixes cancel the gradient of exactly tied zeros)."""
    dtype = torch.float32 if backend == "cuda" else torch.float64
    need(backend, dtype)
    cfg = config(n_head=4, n_kv_head=2)
    ours = module(cfg, backend, dtype)
    x = torch.randn(2, 11, cfg.n_embd, device=DEVICE, dtype=dtype, requires_grad=True)
    cs = rotary(11, cfg.n_embd // cfg.n_head, DEVICE, dtype)
    gy = torch.randn(2, 11, cfg.n_embd, device=DEVICE, dtype=dtype)
    params = [x] + list(ours.parameters())
    got = torch.autograd.grad(ours(x, cs, None), params, gy)
    want = torch.autograd.grad(their_module_forward(ours, x, cs), params, gy)
    for name, a, b in zip(["x"] + [n for n, _ in ours.named_parameters()], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{backend} grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_records_margins(backend):
    need(backend)
    cfg = config(tropical_record_margins=True)
    ours = module(cfg, backend, torch.float32)
    x = torch.randn(2, 9, cfg.n_embd, device=DEVICE)
    with torch.no_grad():
        ours(x, rotary(9, 8, DEVICE, torch.float32), None)
    assert torch.isfinite(ours.tropical_gamma_head_mean).all()
    assert (ours.tropical_gamma_head_min >= 0).all() and ours.tropical_gamma_min == ours.tropical_gamma_head_min.min()


def test_state_dict_and_unsupported_options():
    cfg = config()
    a, b = module(cfg, "torch", torch.float32), TropicalCausalSelfAttention(cfg, 0)
    b.load_state_dict(a.state_dict())
    assert sorted(a.state_dict()) == ["c_k.weight", "c_proj.weight", "c_q.weight", "c_v.weight"]
    with pytest.raises(NotImplementedError, match="semiring_beta"):
        TropicalCausalSelfAttention(config(semiring_beta=4.0), 0)
    with pytest.raises(NotImplementedError, match="parameterization"):
        TropicalCausalSelfAttention(config(parameterization="nsa"), 0)
    with pytest.raises(ValueError, match="n_kv_head"):
        TropicalCausalSelfAttention(config(n_head=4, n_kv_head=3), 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margins", [False, True], ids=["plain", "margins"])
def test_module_compiles_fullgraph_without_host_sync(margins, backend):
    """No host sync in forward (issue 14, item 12): torch.compile(fullgraph=True) traces it
    whole (a data-dependent branch or .item() would break the graph), and on the GPU the
    eager forward runs under torch.cuda's sync debug mode set to error."""
    need(backend)
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("compiling Triton kernels needs CUDA tensors (the interpreter runs eager only)")
    cfg = config(n_head=4, n_kv_head=2, tropical_record_margins=margins)
    ours = module(cfg, backend, torch.float32)
    x = torch.randn(2, 11, cfg.n_embd, device=DEVICE)
    cs = rotary(11, cfg.n_embd // cfg.n_head, DEVICE, torch.float32)
    want = ours(x, cs, None)
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours(x, cs, None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    got = compiled(x, cs, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{backend} compiled module")
