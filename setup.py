"""Build geokern and, when a CUDA toolkit and a CUDA build of torch are present, geokern._C.

Environment:
  GEOKERN_BUILD_CUDA=auto|0|1   auto (default): build _C if possible; 0: skip; 1: failure is an error
  TORCH_CUDA_ARCH_LIST          archs to compile for (default "8.0;9.0")
  MAX_JOBS                      parallel compile jobs (ninja)
  CUDA_HOME                     the toolkit; found by itself when unset (geokern/_toolkit.py)
  GEOKERN_LOCAL_VERSION=0       no +cuXY local version on the wheel
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
_VERSION_PY = open(os.path.join(ROOT, "geokern", "_version.py")).read()
VERSION = re.search(r'__version__ = "([^"]+)"', _VERSION_PY).group(1)
TORCH_MIN = re.search(r'TORCH_MIN = "([^"]+)"', _VERSION_PY).group(1)


def _load_toolkit():
    """geokern/_toolkit.py, by path: the package is not installed while it builds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_geokern_toolkit", os.path.join(ROOT, "geokern", "_toolkit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_TK = _load_toolkit()


def _nvcc_version(cuda_home):
    out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _want_cuda():
    mode = os.environ.get("GEOKERN_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"GEOKERN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _fail_or_skip(mode, why):
    if mode == "1":
        sys.exit(f"geokern: GEOKERN_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
    print(f"geokern: building without the CUDA extension ({why})", file=sys.stderr)
    return None


def _cuda_extension():
    mode = _want_cuda()
    if mode == "0":
        return None
    cuda_home = _TK.find_cuda_home()
    if cuda_home is None:
        return _fail_or_skip(mode, "no CUDA toolkit found (set CUDA_HOME)")
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils.cpp_extension import CUDAExtension
    except ImportError as e:
        return _fail_or_skip(mode, f"torch is not importable ({e})")
    if torch.version.cuda is None:
        return _fail_or_skip(mode, f"torch {torch.__version__} is a CPU-only build")
    if _TK.torch_release(torch.__version__) < _TK.torch_release(TORCH_MIN):
        return _fail_or_skip(mode, f"torch {torch.__version__} predates {TORCH_MIN}, the stable ABI _C targets")
    nvcc_ver = _nvcc_version(cuda_home)
    torch_ver = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
    if nvcc_ver is None or nvcc_ver[0] != torch_ver[0]:
        return _fail_or_skip(
            mode,
            f"nvcc {nvcc_ver} in {cuda_home} does not match the CUDA major version torch was "
            f"built with ({torch.version.cuda}); install a matching toolkit or set CUDA_HOME",
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    arch_label = archs.replace(" ", ";")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cu") + glob.glob("csrc/*/*.cpp"))
    ext = CUDAExtension(
        name="geokern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[
            # the stable ABI only (no ATen / c10 beyond the header-only parts), nothing newer than TORCH_MIN
            ("TORCH_STABLE_ONLY", None),
            ("TORCH_TARGET_VERSION", _TK.stable_target_macro(TORCH_MIN)),
            ("USE_CUDA", None),  # the C shim's CUDA stream call
            ("GEOKERN_ARCHS", f'"{arch_label}"'),
            ("GEOKERN_TORCH_VERSION", f'"{torch.__version__}"'),
            ("GEOKERN_CUDA_VERSION", f'"{nvcc_ver[0]}.{nvcc_ver[1]}"'),
            ("Py_LIMITED_API", "0x030A0000"),
        ],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        py_limited_api=True,
    )
    # The stable ABI needs only the C shim (torch_cpu, torch_cuda) and the CUDA runtime; no c10,
    # torch or torch_python. libstdc++ first, so our own message strings bind to it, not to the
    # copies libc10 exports.
    ext.libraries = ["stdc++", "torch_cpu", "torch_cuda", "cudart"]
    return ext


def _local_version():
    """+cu130: the CUDA the wheel was built with (only when _C is built). No torch in the name: on
    the stable ABI one _C serves every torch from TORCH_MIN on."""
    try:
        import torch

        if torch.version.cuda is None:
            return ""
        return "+cu" + "".join(torch.version.cuda.split(".")[:2])
    except ImportError:
        return ""


ext = _cuda_extension()
ext_modules, cmdclass, options = [], {}, {}
version = VERSION
if ext is not None:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
    options = {"bdist_wheel": {"py_limited_api": "cp310"}}
    if os.environ.get("GEOKERN_LOCAL_VERSION", "1") == "1":
        version = VERSION + _local_version()

setup(
    version=version,
    # kernels/ ships as geokern.kernels, its family folders (kernels/retrieval/) as its subpackages
    packages=find_packages(include=["geokern", "geokern.*"])
    + ["geokern.kernels"] + [f"geokern.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"geokern.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
