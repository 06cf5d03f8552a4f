"""Backend selection: backend= "auto" | "cuda" | "triton" | "torch", or $GEOKERN_BACKEND.

An explicitly requested backend that cannot run is an error saying why, never a
silent fallback. "auto" takes the family's measured preference order for CUDA
tensors and the reference ("torch") for CPU tensors.
"""

import os

import torch

from geokern import _ext

BACKENDS = ("auto", "cuda", "triton", "torch")


# The process-wide switches, read here once at import and nowhere else (a test greps the package):
# the default backend= of every op, and whether Triton kernels autotune (0: one fixed config each,
# what the tests use).
DEFAULT_BACKEND = os.environ.get("GEOKERN_BACKEND", "auto")
AUTOTUNE = os.environ.get("GEOKERN_AUTOTUNE", "1") != "0"


# read once: triton.jit reads TRITON_INTERPRET when it decorates, at import, so a later change would
# not reach the kernels anyway, and every launch asks (an environment read is ~1 us of host time)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpret_mode():
    """Triton's CPU interpreter is on (as it was when geokern was imported)."""
    return _INTERPRET


def _find_triton():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


TRITON_VERSION = _find_triton()  # once, at import: torch.compile traces the checks below


def why_unavailable(backend, device):
    """None if `backend` can run on tensors on `device`, else the reason."""
    if backend == "torch":
        return None
    if backend == "cuda":
        if not _ext.HAS_C:
            return _ext.LOAD_ERROR
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got device {device}"
        return None
    if backend == "triton":
        if TRITON_VERSION is None:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and interpret_mode()):
            return None
        return f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def requested(backend):
    """The backend a call asked for: `backend`, or GEOKERN_BACKEND's default where it is None
    (where "auto" alone may fall back to another backend than the one it resolved to)."""
    return DEFAULT_BACKEND if backend is None else backend


def resolve(op, backend, device, prefer=("cuda", "triton")):
    """The backend to run `op` with for tensors on `device`."""
    backend = requested(backend)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for b in prefer:
            if why_unavailable(b, device) is None:
                return b
        return "torch"
    why = why_unavailable(backend, device)
    if why is not None:
        raise RuntimeError(f"{op}: backend={backend!r} is unavailable: {why}")
    return backend


def available(device=None):
    """The explicit backends usable for tensors on `device` (default: cuda if present)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [b for b in BACKENDS[1:] if why_unavailable(b, torch.device(device)) is None]
