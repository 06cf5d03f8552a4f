__version__ = "0.1.0"
# The oldest torch geokern._C serves: it is built on the LibTorch stable ABI with
# TORCH_TARGET_VERSION set to this release (setup.py reads it from here, geokern._ext checks it).
TORCH_MIN = "2.11"
