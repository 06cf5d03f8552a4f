"""The optional CUDA extension geokern._C: loaded once, absent without error.

_C is built on the LibTorch stable ABI for torch TORCH_MIN and later (geokern/_version.py), so one
build serves every such torch; an older torch is refused here, before the library is loaded."""

import importlib.util

import torch  # noqa: F401  (loads libtorch before _C)

from geokern._toolkit import torch_release
from geokern._version import TORCH_MIN

_HOW = ("build it with `pip install --no-build-isolation --no-deps -e .` on a machine with nvcc and a CUDA "
        "build of torch (GEOKERN_BUILD_CUDA=1 makes a failed build an error)")


def _load():
    """(module or None, error message or None)."""
    if importlib.util.find_spec("geokern._C") is None:
        return None, f"geokern._C is not built (no compiled extension beside geokern/__init__.py); {_HOW}"
    if torch_release(torch.__version__) < torch_release(TORCH_MIN):
        return None, (f"geokern._C needs torch >= {TORCH_MIN} (it is built on the stable ABI of {TORCH_MIN}), "
                      f"this is torch {torch.__version__}: upgrade torch, or use backend='triton' / 'torch'")
    try:
        from geokern import _C  # noqa: F401  (registers the geokern::*_cuda ops)
    except ImportError as e:  # built for another CUDA major or platform
        return None, f"geokern._C is built but does not load ({e}): {_HOW}"
    return _C, None


_C, LOAD_ERROR = _load()
HAS_C = _C is not None


def build_info():
    """What _C was built with: {'archs', 'torch' (built against), 'cuda', 'abi': 'stable',
    'min_torch'}, or None without _C."""
    return dict(_C.build_info()) if HAS_C else None
