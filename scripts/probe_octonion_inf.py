"""Probe of the open GPU failure of the octonion attention second pass (README, "At the edges"):
on the H100, tests/test_hypercomplex_attention_edges.py::test_inf_in_v_matches_reference[full-f32-+inf-8]
gave no +inf where the float64 reference has one. Prints, per case, whether the Triton output has
the reference's NaN / +inf / -inf positions (and the last row of both when not), then whether the
second pass's key test (badk: a key whose value tile is non-finite) sees the inf key on the GPU.

    python scripts/probe_octonion_inf.py   (a CUDA device; about 40 s, most of it compiling)
"""
import os, subprocess, sys, tempfile
import torch, triton, geokern
from geokern.reference import hypercomplex_attention as ref
torch.manual_seed(0)
INF = float("inf")
# PROBE_INLINE=1 (a child process with its own Triton cache): the second passes compiled inline
# instead of noinline, to see whether the noinline call is what loses the per-key terms
INLINE = os.environ.get("PROBE_INLINE") == "1"
if INLINE:
    from geokern.kernels.hypercomplex_attention import attention_fwd, attention_bwd
    for f in (attention_fwd.nonfinite_fwd, attention_bwd.nonfinite_dq, attention_bwd.nonfinite_dkdv):
        f.noinline = False
print("triton", triton.__version__, "inline" if INLINE else "noinline")
for n in (8, 4):
    q, k, v = (torch.randn(1, 2, 7, 16, device="cuda") for _ in range(3))
    v[0, 0, 3, 5] = INF
    f = geokern.octonion_attention if n == 8 else geokern.quaternion_attention
    fr = ref.octonion_attention if n == 8 else ref.quaternion_attention
    y = f(q, k, v, causal=False, backend="triton"); y64 = fr(q.double(), k.double(), v.double(), False)
    fin = torch.isfinite(y64)
    print(f"n={n} f32: nonfinite pattern equal:", torch.equal(torch.isfinite(y), fin),
          "finite max err:", (y.double() - y64)[fin & torch.isfinite(y)].abs().max().item())
if INLINE:
    sys.exit(0)
with tempfile.TemporaryDirectory() as d:
    r = subprocess.run([sys.executable, __file__], env={**os.environ, "PROBE_INLINE": "1", "TRITON_CACHE_DIR": d},
                       capture_output=True, text=True, timeout=100)
    print("child (inline):", r.stdout[-1500:], r.stderr[-1500:])
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
