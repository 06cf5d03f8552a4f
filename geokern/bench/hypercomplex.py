"""Benchmark cases: quaternion / octonion products, forward and backward.

Memory-bound: the ceiling is the copy bandwidth; bytes = every input read once plus
every output written once. Peers: torch.compile of the reference (what a user would
write) and the reference in eager mode.
"""

import functools

import torch

from geokern import _backend
from geokern.bench.registry import Case
from geokern.ops import hypercomplex as ops
from geokern.reference import hypercomplex as ref

ROWS = {4: 1 << 26, 8: 1 << 25}  # 64M quaternions / 32M octonions: 1 GiB per fp32 operand
NAMES = {4: "quaternion_mul", 8: "octonion_mul"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "bf16": 1e-2}


@functools.lru_cache(None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _kernel_backends():
    return [b for b in _backend.available(torch.device("cuda")) if b != "torch"]


def _fwd_case(n, dt):
    dtype, rows = DTYPES[dt], ROWS[n]
    size = rows * n * dtype.itemsize

    def make():
        return tuple(torch.randn(rows, n, device="cuda", dtype=dtype) for _ in range(2))

    mul = functools.partial(ref.hypercomplex_mul, n=n)
    return Case(
        op=NAMES[n], shape=f"{rows}x{n}", dtype=dt, direction="fwd", make_inputs=make,
        impls={b: functools.partial(ops._mul, n=n, backend=b) for b in _kernel_backends()},
        peers={"torch.compile": _compiled(mul), "eager": mul},
        reference=lambda a, b: ref.hypercomplex_mul(a.float(), b.float(), n),
        amount=3 * size, metric="TB/s", ceiling="copy_tb_s", tol=TOL[dt], input_bytes=2 * size,
    )


def _bwd_case(n, dt):
    dtype, rows = DTYPES[dt], ROWS[n]
    size = rows * n * dtype.itemsize

    def make():
        return tuple(torch.randn(rows, n, device="cuda", dtype=dtype) for _ in range(3))

    bwd = functools.partial(ref.hypercomplex_mul_backward, n=n)
    return Case(
        op=NAMES[n], shape=f"{rows}x{n}", dtype=dt, direction="bwd", make_inputs=make,
        impls={b: functools.partial(ops._KERNELS[b][1], n=n) for b in _kernel_backends()},
        peers={"torch.compile": _compiled(bwd), "eager": bwd},
        reference=lambda g, a, b: ref.hypercomplex_mul_backward(g.float(), a.float(), b.float(), n),
        amount=5 * size, metric="TB/s", ceiling="copy_tb_s", tol=TOL[dt], input_bytes=3 * size,
    )


def cases():
    return [f(n, dt) for f in (_fwd_case, _bwd_case) for n in (4, 8) for dt in DTYPES]
