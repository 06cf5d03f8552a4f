"""csrc/stable.cuh's ops:: (the torch surface of _C's host code, on the stable ABI) checked against
torch on CPU tensors: tests/_stable_probe.cpp is compiled here with the host compiler (seconds, no
nvcc) into a library whose one op returns what each helper makes. Runs wherever torch's headers,
a C++ compiler and the CUDA runtime's headers are (stable.cuh includes cuda_runtime.h)."""

import pathlib
import shutil
import subprocess

import pytest
import torch
from _helpers import run_isolated

from geokern._toolkit import find_cuda_home, stable_target_macro
from geokern._version import TORCH_MIN

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe_library(tmp_path_factory):
    cxx, cuda_home = shutil.which("g++") or shutil.which("c++"), find_cuda_home()
    if cxx is None or cuda_home is None:
        pytest.skip("needs a C++ compiler and a CUDA toolkit's headers (cuda_runtime.h)")
    from torch.utils.cpp_extension import include_paths, library_paths
    out = tmp_path_factory.mktemp("stable") / "probe.so"
    cmd = [cxx, "-shared", "-fPIC", "-O1", "-std=c++17", "-o", str(out), str(ROOT / "tests" / "_stable_probe.cpp"),
           f"-I{ROOT / 'csrc'}", f"-I{pathlib.Path(cuda_home) / 'include'}", *(f"-I{p}" for p in include_paths()),
           f"-DTORCH_TARGET_VERSION={stable_target_macro(TORCH_MIN)}", "-DTORCH_STABLE_ONLY", "-DUSE_CUDA",
           *(f"-L{p}" for p in library_paths()), "-ltorch_cpu"]
    if torch.version.cuda:
        cmd.append("-ltorch_cuda")
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, f"the probe does not compile:\n{run.stderr[-4000:]}"
    return out


def test_stable_ops_match_torch(probe_library):
    assert "ok" in run_isolated(f"""
import torch
torch.ops.load_library({str(probe_library)!r})
x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
e, z, pm, ss, acc, sd, bm, h = torch.ops.geokern_probe.probe(x)
assert e.shape == (2, 0, 5) and e.dtype == torch.int64 and e.stride() == (5, 5, 1), (e.shape, e.stride())
assert z.shape == (4, 1, 3) and z.stride() == (3, 3, 1) and z.dtype == x.dtype and (z == 0).all(), z
ex = x.reshape(2, 1, 3).expand(2, 4, 3)
assert torch.equal(pm, ex.permute(2, 0, 1)), pm
assert torch.equal(ss, ex.sum_to_size(2, 1, 3)), ss
want = x.clone()
want[:, 0:1] += x[:, 2:3]
assert torch.equal(acc, want), (acc, want)
assert torch.equal(sd, (x * x).sum(-1)), sd
assert torch.allclose(bm, x.reshape(1, 2, 3) @ x.reshape(1, 3, 2)), bm
assert h.dtype == torch.float16 and torch.equal(h, x.half()), h
print("ok")
""")
