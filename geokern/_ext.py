"""The optional CUDA extension geokern._C: loaded once, absent without error."""

import importlib.util

import torch  # noqa: F401  (loads libtorch before _C)

_HOW = ("build it with `pip install --no-build-isolation --no-deps -e .` on a machine with nvcc and a CUDA "
        "build of torch (GEOKERN_BUILD_CUDA=1 makes a failed build an error)")

if importlib.util.find_spec("geokern._C") is None:
    _C = None
    HAS_C = False
    LOAD_ERROR = f"geokern._C is not built (no compiled extension beside geokern/__init__.py); {_HOW}"
else:
    try:
        from geokern import _C  # noqa: F401  (registers the geokern::*_cuda ops)

        HAS_C = True
        LOAD_ERROR = None
    except ImportError as e:  # built for another torch, CUDA or Python
        _C = None
        HAS_C = False
        LOAD_ERROR = f"geokern._C is built but does not load ({e}); it was likely built for another torch: {_HOW}"


def build_info():
    """{'archs', 'torch', 'cuda'} that _C was built with, or None without _C."""
    return dict(_C.build_info()) if HAS_C else None
