"""Probe of the open GPU failure of the octonion attention second pass (README, "At the edges"):
on the H100, tests/test_hypercomplex_attention_edges.py::test_inf_in_v_matches_reference[full-f32-+inf-8]
gave no +inf where the float64 reference has one. Prints, per case, whether the Triton output has
the reference's NaN / +inf / -inf positions (and the last row of both when not), then whether the
second pass's key test (badk: a key whose value tile is non-finite) sees the inf key on the GPU.

    python scripts/probe_octonion_inf.py   (a CUDA device; about 30 s, most of it compiling)
"""
import torch, geokern
from geokern.reference import hypercomplex_attention as ref
torch.manual_seed(0)
INF = float("inf")
for case, (B, H, Hkv, Tq, Tk, D, causal, j, d) in {"full": (1, 2, 1, 7, 9, 16, False, 3, 5), "chunked": (1, 2, 1, 5, 13, 16, True, 10, 2)}.items():
    for dt in (torch.float32, torch.bfloat16):
        for sign in (1, -1):
            q, k, v = (torch.randn(*s, dtype=torch.float64).to(dt).cuda() for s in ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)))
            v[0, 0, j, d] = sign * INF
            y = geokern.octonion_attention(q, k, v, causal=causal, backend="triton")
            y64 = ref.octonion_attention(q.double(), k.double(), v.double(), causal)
            ok = all(torch.equal(f(y), f(y64)) for f in (torch.isnan, torch.isposinf, torch.isneginf))
            print(case, dt, sign, "OK" if ok else "BAD")
            if not ok:
                print(" triton row0:", y[0, 0, -1, :8].tolist()); print(" ref    row0:", y64[0, 0, -1, :8].tolist())

# the second pass's key test on the GPU: does badk see the inf key?
import triton, triton.language as tl
from geokern.kernels.hypercomplex_attention.common import value_tile
from geokern.kernels.hypercomplex_attention.attention_fwd import _finite

@triton.jit
def probe(kn_ptr, v_ptr, out_ptr, cnt_ptr, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    kn = tl.load(kn_ptr + r[:, None] * BLOCK_D + c[None, :]).to(tl.float32)
    v = tl.load(v_ptr + r[:, None] * BLOCK_D + c[None, :]).to(tl.float32)
    vt = value_tile(kn, v, N, BLOCK_N, BLOCK_D).to(tl.float32)
    badk = tl.max(tl.where(_finite(vt), 0, 1), axis=1) > 0
    tl.store(out_ptr + r, badk.to(tl.int32))
    tl.store(cnt_ptr, tl.max(tl.where(badk, 1, 0)))

for n in (4, 8):
    kn = torch.randn(64, 16, device="cuda"); v = torch.randn(64, 16, device="cuda"); v[3, 5] = INF
    out = torch.zeros(64, dtype=torch.int32, device="cuda"); cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    probe[(1,)](kn, v, out, cnt, N=n, BLOCK_N=64, BLOCK_D=16)
    print("probe n", n, "badk rows", out.nonzero().flatten().tolist(), "max", cnt.item())
