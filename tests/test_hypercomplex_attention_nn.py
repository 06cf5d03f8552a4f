"""geokern.nn.Quaternion/OctonionCausalSelfAttention against a plain-PyTorch re-implementation of
their forward from the spec (geokern.bench.hypercomplex_attention.their_module_forward; their code
is neither copied nor run: its licence withholds every right from some parties, the authors of
this code among them), on the same weights."""

import types

import pytest
import torch
from _helpers import dtype_id, need
from _tolerance import assert_close
from conftest import DEVICE
from test_tropical_nn import KVCache

from geokern.bench.hypercomplex_attention import their_module_forward
from geokern.bench.tropical import rotary
from geokern.nn import OctonionCausalSelfAttention, QuaternionCausalSelfAttention

BACKENDS = ["torch", "triton"]
MODULES = {4: QuaternionCausalSelfAttention, 8: OctonionCausalSelfAttention}


def config(n_head=2, n_kv_head=2, n_embd=32):
    return types.SimpleNamespace(n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)


def module(n, cfg, backend, dtype, layer_idx=0):
    torch.manual_seed(0)  # the same weights in every module a test builds
    return MODULES[n](cfg, layer_idx, backend=backend).to(DEVICE, dtype)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kv", [2, 1], ids=["mha", "gqa"])
def test_same_output_as_theirs(kv, dtype, backend, n):
    need(backend)
    cfg = config(n_kv_head=kv)
    ours = module(n, cfg, backend, dtype)
    T, hd = 11, cfg.n_embd // cfg.n_head
    x = torch.randn(2, T, cfg.n_embd, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        y = ours(x, rotary(T, hd, DEVICE, dtype), None)
        same = their_module_forward(ours, x, rotary(T, hd, DEVICE, dtype))
        m64 = module(n, cfg, "torch", torch.float64)
        want = their_module_forward(m64, x.double(), rotary(T, hd, DEVICE, torch.float64))
    assert_close(f"n={n} {backend} module output", y, want, same)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_prefill_and_decode(backend, n):
    """Prefill, one-token decode and chunked decode through a two-layer cache: each step equals
    theirs and the same rows of the full-sequence forward."""
    need(backend)
    cfg = config(n_kv_head=1)
    layers = [module(n, cfg, backend, torch.float32, i) for i in range(2)]
    x = torch.randn(1, 10, cfg.n_embd, device=DEVICE)
    cos, sin = rotary(10, cfg.n_embd // cfg.n_head, DEVICE, torch.float32)
    ours_cache, their_cache = KVCache(2), KVCache(2)
    with torch.no_grad():
        full = [m(x, (cos, sin), None) for m in layers]
        for t0, t1 in ((0, 4), (4, 5), (5, 8), (8, 10)):
            cs = (cos[:, t0:t1], sin[:, t0:t1])
            for i, m in enumerate(layers):
                y = m(x[:, t0:t1], cs, ours_cache)
                want = their_module_forward(m, x[:, t0:t1], cs, their_cache)
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"layer {i} steps {t0}:{t1} vs theirs")
                torch.testing.assert_close(y, full[i][:, t0:t1], rtol=1e-5, atol=1e-5,
                                           msg=f"layer {i} steps {t0}:{t1} vs the full forward")


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_theirs(backend, n):
    need(backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    cfg = config(n_kv_head=1)
    ours = module(n, cfg, backend, dtype)
    x = torch.randn(2, 9, cfg.n_embd, device=DEVICE, dtype=dtype, requires_grad=True)
    cs = rotary(9, cfg.n_embd // cfg.n_head, DEVICE, dtype)
    gy = torch.randn(2, 9, cfg.n_embd, device=DEVICE, dtype=dtype)
    params = [x] + list(ours.parameters())
    got = torch.autograd.grad(ours(x, cs, None), params, gy)
    want = torch.autograd.grad(their_module_forward(ours, x, cs), params, gy)
    for name, a, b in zip(["x"] + [k for k, _ in ours.named_parameters()], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{backend} n={n} grad {name}")


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of 8"):
        OctonionCausalSelfAttention(config(n_head=8, n_embd=32), 0)  # head_dim 4
    with pytest.raises(ValueError, match="n_kv_head"):
        QuaternionCausalSelfAttention(config(n_head=2, n_kv_head=3), 0)
