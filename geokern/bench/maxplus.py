"""Benchmark cases: max-plus matmul, forward (value, with argmax) and backward.

Compute-bound on the fp32 lanes (no max-plus tensor cores): amount = 2 * M * N * K
operations (an add and a max per k step), ceiling = the fp32 lane rate, twice that for
the value-only 16-bit cases (packed half2 / bf16x2 / int16x2 instructions). Skinny shapes
time the CUDA kernel with its automatic split-K and without it ("cuda-nosplit":
num_splits=1). Peer:
torch.compile of the broadcast + amax a user would write (inductor fuses it into one
reduction, so it never materialises M x K x N). The backward is timed on the same
2 * M * N * K count so that its time reads directly against the forward's.
"""

import functools

import torch

from geokern import _backend
from geokern.bench.registry import Case
from geokern.ops import maxplus as ops
from geokern.reference import maxplus as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int32": torch.int32, "int16": torch.int16}
TOL = {"fp32": 1e-6, "bf16": 1e-2, "fp16": 2e-3, "int32": 0.0, "int16": 0.0}


@functools.lru_cache(None)
def _peer():
    return torch.compile(lambda a, b: (a.unsqueeze(-1) + b.unsqueeze(-3)).amax(-2), dynamic=False)


def _value(a, b, chunk=16):
    """The reference's value (C only) in float32, in K chunks: cheap enough at 8192^3."""
    a, b = a.float(), b.float()
    acc = torch.full((a.shape[0], b.shape[1]), float("-inf"), device=a.device)
    for k0 in range(0, a.shape[1], chunk):
        s = a[:, k0 : k0 + chunk, None] + b[None, k0 : k0 + chunk, :]
        acc = torch.maximum(acc, s.amax(1))
    return acc


def _kernel_backends():
    return [b for b in _backend.available(torch.device("cuda")) if b != "torch"]


def _rand(shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape, device="cuda", dtype=dtype)
    return torch.randint(-1000, 1001, shape, device="cuda", dtype=dtype)  # exact in the float32 check


def _fwd_case(M, K, N, dt, argmax=False, skinny=False):
    dtype = DTYPES[dt]

    def make():
        return _rand((M, K), dtype), _rand((K, N), dtype)

    impls = {
        b: functools.partial(ops.maxplus_matmul, return_argmax=argmax, backend=b) for b in _kernel_backends()
    }
    if skinny and "cuda" in impls:
        impls["cuda-nosplit"] = functools.partial(
            ops.maxplus_matmul, return_argmax=argmax, num_splits=1, backend="cuda"
        )
    packed = dtype.itemsize == 2 and not argmax
    return Case(
        op="maxplus_matmul" + ("+argmax" if argmax else ""), shape=f"{M}x{K}x{N}", dtype=dt, direction="fwd",
        make_inputs=make, impls=impls, peers={} if argmax or skinny else {"torch.compile": _peer()},
        reference=_value, amount=2 * M * N * K, metric="Tops/s",
        ceiling="packed16_lane_tops" if packed else "fp32_lane_tops", tol=TOL[dt],
        input_bytes=(M * K + K * N) * dtype.itemsize,
    )


def _bwd_case(M, K, N, dt):
    dtype = DTYPES[dt]

    def make():
        a, b = torch.randn(M, K, device="cuda", dtype=dtype), torch.randn(K, N, device="cuda", dtype=dtype)
        _, idx = ops.maxplus_matmul(a, b, return_argmax=True)
        return torch.randn(M, N, device="cuda", dtype=dtype), idx, [M, K], [K, N]

    impls = {b: ops._KERNELS[b][1] for b in _kernel_backends()}
    return Case(
        op="maxplus_matmul", shape=f"{M}x{K}x{N}", dtype=dt, direction="bwd", make_inputs=make,
        impls=impls, peers={"torch scatter_add": ref.maxplus_matmul_backward},
        reference=lambda g, idx, sa, sb: ref.maxplus_matmul_backward(g.float(), idx, sa, sb),
        # a scatter of dC along the route: bytes, not operations, bound it (grad and argmax
        # read once, dA and dB written once); judged against the copy ceiling
        amount=M * N * (dtype.itemsize + 8) + (M * K + K * N) * dtype.itemsize,
        metric="TB/s", ceiling="copy_tb_s", tol=TOL[dt],
        input_bytes=M * N * (dtype.itemsize + 8),
    )


def cases():
    out = [_fwd_case(n, n, n, "fp32") for n in (1024, 2048, 4096, 8192)]
    out += [_fwd_case(4096, 4096, 4096, "fp32", argmax=True)]
    out += [_fwd_case(4096, 4096, 4096, dt) for dt in ("bf16", "fp16", "int32", "int16")]
    out += [_fwd_case(8192, 8192, 8192, dt) for dt in ("bf16", "int16")]
    out += [_fwd_case(4096, 4096, 4096, dt, argmax=True) for dt in ("int32", "int16")]
    # skinny: few output tiles, long K (split-K against one pass)
    out += [_fwd_case(256, 4096, 4096, "fp32", skinny=True), _fwd_case(64, 16384, 16384, "fp32", skinny=True)]
    out += [_fwd_case(64, 65536, 64, "fp32", skinny=True), _fwd_case(64, 65536, 64, "fp32", argmax=True, skinny=True)]
    out += [_fwd_case(256, 8192, 8192, "int16", skinny=True)]
    out += [_bwd_case(4096, 4096, 4096, "fp32")]
    return out
