"""geokern: fused Triton and CUDA kernels for geometric and exotic-algebra deep learning."""

from geokern import _ext  # noqa: F401  (loads geokern._C first: it declares the op schemas)
from geokern._info import info  # noqa: F401
from geokern._version import __version__  # noqa: F401
from geokern.ops import *  # noqa: F401,F403
from geokern.ops import __all__ as _ops_all
from geokern import metric, nn  # noqa: F401,E402  (after the ops they build on)

__all__ = ["info", "__version__", *_ops_all]
