"""The decode state's CUDA backend (csrc/ultrametric) against the torch backend on the same tables,
over the paths its kernels branch on (v dtype, digit dtype, D with and without float4, alpha above
and below 1, p, grouped heads, padding, non-finite v, an empty cache); its bad input; and the
custom ops' checks (opcheck, torch.compile) of the append and query ops. The decode tests shared
with the other backends (full recomputation, CUDA graph, alpha < 1, determinism) are in
test_ultrametric_edges.py."""

import pytest
import torch
from _custom_ops import custom_op_tests
from _helpers import dtype_id, need
from _tolerance import rel_err
from _ultrametric import digits
from conftest import DEVICE

import geokern

# (B, H, Hkv, T, Tq, K, D, p, alpha): D = 64 and 160 take float4 (160: lanes loop over channels), 5 not
CASES = [
    (2, 4, 2, 300, 3, 6, 64, 2, 2.0),
    (1, 3, 1, 200, 2, 4, 5, 3, 1.5),
    (2, 2, 2, 100, 1, 8, 160, 2, 0.3),
    (1, 4, 1, 150, 4, 3, 12, 5, 1.0),
    (3, 2, 1, 50, 1, 15, 8, 2, 1.2),
]


def _fill(case, vdtype, ddtype, backend, padded=True):
    B, H, Hkv, T, Tq, K, D, p, alpha = case
    kd, qd = digits(B, Hkv, T, K, p).to(ddtype), digits(B, H, Tq, K, p).to(ddtype)
    v = torch.randn(B, Hkv, T, D, device=DEVICE).to(vdtype)
    keep = torch.rand(B, T, device=DEVICE) > 0.2 if padded else None
    cache = geokern.UltrametricCache(B, Hkv, D, K, p=p, alpha=alpha, device=DEVICE, backend=backend)
    cache.append(kd[:, :, : T // 2], v[:, :, : T // 2], None if keep is None else keep[:, : T // 2])
    cache.append(kd[:, :, T // 2:], v[:, :, T // 2:], None if keep is None else keep[:, T // 2:])
    return cache, qd


@pytest.mark.parametrize("ddtype", [torch.int64, torch.int8, torch.uint8, torch.int32], ids=dtype_id)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}T{}Tq{}K{}D{}p{}a{}".format(*c))
def test_cuda_decode_equals_the_torch_backend(case, vdtype, ddtype):
    """The tables the CUDA append fills and the (y, lse) its query reads, against the torch
    backend's on the same keys (counts exact, sums to float32 rounding)."""
    need("cuda")
    torch.manual_seed(1)
    got, qd = _fill(case, vdtype, ddtype, "cuda")
    torch.manual_seed(1)
    want, _ = _fill(case, vdtype, ddtype, "torch")
    assert torch.equal(got.cnt, want.cnt), "cnt"
    assert rel_err(got.tab, want.tab) < 1e-5, "tab"
    y, lse = got.query(qd, return_lse=True)
    yw, lw = want.query(qd, return_lse=True)
    assert rel_err(y, yw) < 1e-5, "y"
    assert rel_err(lse, lw) < 1e-5, "lse"


@pytest.mark.parametrize("alpha", [2.0, 0.5])
def test_cuda_decode_nonfinite_and_empty(alpha):
    """An empty cache reads y 0, lse -inf; a NaN / +inf / -inf v reaches the channel of every query
    that reads it as the torch backend's sums do (NaN where +inf and -inf meet); a padded key's NaN
    reaches nothing."""
    need("cuda")
    B, Hkv, H, K, D, p = 1, 1, 2, 3, 8, 2
    caches = {be: geokern.UltrametricCache(B, Hkv, D, K, p=p, alpha=alpha, device=DEVICE, backend=be)
              for be in ("cuda", "torch")}
    qd = digits(B, H, 4, K, p)
    y, lse = caches["cuda"].query(qd, return_lse=True)
    assert (y == 0).all() and (lse == float("-inf")).all(), "empty cache"
    kd = digits(B, Hkv, 6, K, p)
    v = torch.randn(B, Hkv, 6, D, device=DEVICE)
    v[0, 0, 1, 0], v[0, 0, 2, 1], v[0, 0, 3, 1], v[0, 0, 4, 2] = float("nan"), float("inf"), -float("inf"), float("inf")
    v[0, 0, 5] = float("nan")
    keep = torch.tensor([[True] * 5 + [False]], device=DEVICE)
    out = {}
    for be, cache in caches.items():
        cache.append(kd, v, keep)
        out[be] = cache.query(qd, return_lse=True)
    torch.testing.assert_close(out["cuda"][0], out["torch"][0], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(out["cuda"][1], out["torch"][1], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert out["cuda"][0][..., 3:].isfinite().all(), "a padded key's NaN entered"


def test_cuda_decode_bad_input():
    """backend='cuda' with CPU tables names device=; float64 v is refused naming v (the tables are
    float32: the CUDA append does not convert float64); CPU tensors into a CUDA cache name the
    argument."""
    with pytest.raises(RuntimeError, match="backend='cuda' needs a CUDA device="):
        geokern.UltrametricCache(1, 1, 4, 3, device="cpu", backend="cuda")
    need("cuda")
    cache = geokern.UltrametricCache(1, 1, 4, 3, device=DEVICE, backend="cuda")
    kd = digits(1, 1, 2, 3, 2)
    with pytest.raises(ValueError, match="v.*float64"):
        cache.append(kd, torch.randn(1, 1, 2, 4, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="k_digits is on cpu"):
        cache.append(kd.cpu(), torch.randn(1, 1, 2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="v must"):
        cache.append(kd, torch.randn(1, 1, 2, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        cache.append(kd, torch.randn(1, 1, 2, 4, device=DEVICE), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="out must"):
        cache.query(kd, out=(torch.empty(1, 1, 2, 4), torch.empty(1, 1, 2)))
    assert cache.length == 0 and cache.cnt.sum() == 0


def test_auto_does_not_pick_cuda():
    """auto takes Triton for CUDA tensors until the CUDA kernels are measured faster."""
    need("triton")
    assert geokern.UltrametricCache(1, 1, 4, 3, device=DEVICE, backend="auto").backend == \
        ("triton" if DEVICE.type == "cuda" else "torch")


def test_deterministic_mode_cuda_append_raises():
    """The CUDA append adds with float32 atomics: it raises under deterministic algorithms, as
    the Triton one does, naming backend='torch'; the query (no atomics) runs."""
    need("cuda")
    cache = geokern.UltrametricCache(1, 1, 4, 3, device=DEVICE, backend="cuda")
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="UltrametricCache.append \\(backend='cuda'\\).*backend='torch'"):
            cache.append(digits(1, 1, 2, 3, 2), torch.randn(1, 1, 2, 4, device=DEVICE))
        cache.query(digits(1, 2, 1, 3, 2))
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def _op_samples(qualname):
    """Argument tuples of the append and query ops: tables of p = 3, K = 2 (N = 13), two groups
    (B = 2, Hkv = 1), grouped query heads, with and without padding."""
    N, D = 13, 6
    tab = torch.randn(2, N, D, device=DEVICE)
    cnt = torch.randint(0, 4, (2, N), dtype=torch.int32, device=DEVICE)
    if "append" in qualname:
        kd, v = digits(2, 1, 5, 2, 3), torch.randn(2, 1, 5, D, device=DEVICE)
        keep = torch.rand(2, 5, device=DEVICE) > 0.3
        return [(tab, cnt, kd, v, keep, 3), (tab.clone(), cnt.clone(), kd, v.half(), None, 3)]
    qd = digits(2, 2, 3, 2, 3)
    y, lse = torch.empty(2, 2, 3, D, device=DEVICE), torch.empty(2, 2, 3, device=DEVICE)
    return [(tab, cnt, qd, y, lse, 2.0, 3), (tab, cnt, qd, y.clone(), lse.clone(), 0.5, 3)]


test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("ultrametric_cache_", _op_samples)
