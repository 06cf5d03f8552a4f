"""geokern without its CUDA extension: it imports, and asking for the CUDA backend says why not."""

import subprocess
import sys

_WITHOUT_C = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "geokern._C" else real(name, *a)
import torch, geokern
assert not geokern._ext.HAS_C
try:
    geokern.quaternion_mul(torch.randn(4), torch.randn(4), backend="cuda")
except RuntimeError as e:
    print(e)
else:
    sys.exit("backend='cuda' without _C did not raise")
"""


def test_missing_extension_is_explained_not_a_circular_import():
    run = subprocess.run([sys.executable, "-c", _WITHOUT_C], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    msg = run.stdout
    assert "geokern._C is not built" in msg and "pip install" in msg, f"unhelpful message: {msg!r}"
    assert "circular" not in msg and "partially initialized" not in msg, f"import-machinery message leaked: {msg!r}"
