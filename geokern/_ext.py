"""The optional CUDA extension geokern._C: loaded once, absent without error."""

import torch  # noqa: F401  (loads libtorch before _C)

try:
    from geokern import _C  # noqa: F401  (registers the geokern::*_cuda ops)

    HAS_C = True
    LOAD_ERROR = None
except ImportError as e:  # built without CUDA, or for another torch
    _C = None
    HAS_C = False
    LOAD_ERROR = str(e)


def build_info():
    """{'archs', 'torch', 'cuda'} that _C was built with, or None without _C."""
    return dict(_C.build_info()) if HAS_C else None
