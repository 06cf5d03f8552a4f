"""What every test module shares: the backends and dtypes it runs over, skipping a backend
this machine lacks, and readable parametrize ids."""

import os

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

from geokern import _backend

BACKENDS = ["torch", "triton", "cuda"]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# CUDA-graph capture needs the caching allocator (cudaMalloc is illegal while capturing): memcheck
# runs with PYTORCH_NO_CUDA_MEMORY_CACHING=1, where no graph of any op can be captured
capturable = pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1",
                                reason="graph capture needs the CUDA caching allocator")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def need(backend, device=DEVICE):
    """Skip the test when `backend` cannot run on `device` here (no GPU, _C not built), except
    where GEOKERN_REQUIRE_C=1 (make gpu sets it): there a CUDA backend that cannot run on a GPU
    machine (a _C that failed to build or load) fails the test instead of skipping it unseen."""
    why = _backend.why_unavailable(backend, device)
    if why:
        if backend == "cuda" and torch.device(device).type == "cuda" and os.environ.get("GEOKERN_REQUIRE_C") == "1":
            pytest.fail(f"backend cuda unavailable on this GPU machine: {why}")
        pytest.skip(f"backend {backend} unavailable here: {why}")


def dtype_id(x):
    """'bf16' for torch.bfloat16 and so on; str(x) for anything else."""
    short = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
             torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
    return short.get(x, str(x)) if isinstance(x, torch.dtype) else str(x)


def run_isolated(code, timeout=600):
    """Run `code` in a fresh Python process and fail with its stderr if it fails.

    For tests that may corrupt the CUDA context (an illegal memory access poisons every later
    CUDA call of the process) or need most of the GPU's memory: the rest of the suite is
    unaffected either way."""
    import subprocess
    import sys
    import textwrap

    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"isolated run failed (exit {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run.stdout


# The start of a child process that asks inductor which tensors a Triton kernel writes (the analysis
# compile leans on: a tensor it counts as written is copied back, a leaf input included): the
# jitted kernels, and a CUDA target when there is no GPU (the analysis only builds TTIR).
WRITES_PRELUDE = """
import os
os.environ.pop("TRITON_INTERPRET", None)  # the jitted kernels, not the interpreter's
import torch, triton
from torch._higher_order_ops import triton_kernel_wrap as tkw
if not torch.cuda.is_available():  # the analysis only builds TTIR: any CUDA target will do
    from triton.backends.compiler import GPUTarget
    class Target:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
    triton.runtime.driver.set_active(Target())
"""
