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


def _case(n, dt, direction):
    """fwd: c = a b (reads 2, writes 1); bwd: (dA, dB) from (dC, a, b) (reads 3, writes 2)."""
    dtype, rows = DTYPES[dt], ROWS[n]
    size = rows * n * dtype.itemsize
    if direction == "fwd":
        n_in, n_out, ref_fn = 2, 1, ref.hypercomplex_mul
        impls = {b: functools.partial(ops._mul, n=n, backend=b) for b in _kernel_backends()}
    else:
        n_in, n_out, ref_fn = 3, 2, ref.hypercomplex_mul_backward
        impls = {b: functools.partial(ops._KERNELS[b][1], n=n) for b in _kernel_backends()}
    peer = functools.partial(ref_fn, n=n)

    def make():
        return tuple(torch.randn(rows, n, device="cuda", dtype=dtype) for _ in range(n_in))

    return Case(
        op=NAMES[n], shape=f"{rows}x{n}", dtype=dt, direction=direction, make_inputs=make, impls=impls,
        peers={"torch.compile": _compiled(peer), "eager": peer},
        reference=lambda *t: ref_fn(*(x.float() for x in t), n),
        amount=(n_in + n_out) * size, metric="TB/s", ceiling="copy_tb_s", tol=TOL[dt], input_bytes=n_in * size,
    )


def cases():
    return [_case(n, dt, d) for d in ("fwd", "bwd") for n in (4, 8) for dt in DTYPES]
