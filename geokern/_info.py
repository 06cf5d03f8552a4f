"""geokern.info(): what is built and usable on this machine."""

import torch

from geokern import _backend, _ext
from geokern._version import __version__


def info():
    """A dict: versions, the CUDA extension's build facts, the device, usable backends."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "geokern": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _backend.TRITON_VERSION,
        "triton_interpret": _backend.interpret_mode(),
        "cuda_extension": _ext.build_info(),
        "cuda_extension_error": _ext.LOAD_ERROR,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "backends": _backend.available(dev),
    }
