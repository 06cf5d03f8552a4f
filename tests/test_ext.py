"""geokern's CUDA extension: without it geokern imports, and asking for the CUDA backend says
why not; its ops' schemas (csrc/registration.cpp) are their Triton twins'."""

import pathlib
import re
import pytest
import torch
from _custom_ops import triton_schema_of
from _helpers import gpu, run_isolated

from geokern import _ext
from geokern.ops import _registry

REGISTRATION = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "registration.cpp"
DEF = re.compile(r'm\.def\("(\w+)(\(.*\) -> .*)"\);')

# The end of both scripts below: geokern imported without _C, asking for the CUDA backend says why.
_ASK_FOR_CUDA = """
import geokern
assert not geokern._ext.HAS_C and "geokern._C" not in sys.modules, "geokern._C was loaded"
try:
    geokern.quaternion_mul(torch.randn(4), torch.randn(4), backend="cuda")
except RuntimeError as e:
    print(e)
else:
    sys.exit("backend='cuda' without _C did not raise")
"""

_WITHOUT_C = """
import importlib.util, sys
import torch
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "geokern._C" else real(name, *a)
""" + _ASK_FOR_CUDA


def test_missing_extension_is_explained_not_a_circular_import():
    msg = run_isolated(_WITHOUT_C, timeout=300)
    assert "geokern._C is not built" in msg and "pip install" in msg, f"unhelpful message: {msg!r}"
    assert "circular" not in msg and "partially initialized" not in msg, f"import-machinery message leaked: {msg!r}"


def _declared():
    """{name: '(...) -> ...'} of every op csrc/registration.cpp declares."""
    return dict(DEF.findall(REGISTRATION.read_text()))


def test_every_declared_op_has_its_fake_and_cpu_implementation():
    """Each op of csrc/registration.cpp goes through geokern.ops._registry.cuda_op."""
    recorded = {q.split("::")[1] for q in _registry.CUDA_OPS}
    declared = set(_declared())
    assert declared, f"no m.def(...) found in {REGISTRATION}"
    assert declared == recorded, (f"declared in csrc/registration.cpp only: {sorted(declared - recorded)}; "
                                  f"through cuda_op only: {sorted(recorded - declared)}")


@pytest.mark.parametrize("qualname", sorted(_registry.CUDA_OPS), ids=lambda q: q.split("::")[1])
def test_one_schema_for_both_backends(qualname):
    """The CUDA op takes its Triton twin's arguments (the backends share one Function), which
    also makes the Triton schema the one the tests' mirror of the CUDA op uses without _C."""
    name, want = qualname.split("::")[1], triton_schema_of(qualname)
    declared = _declared().get(name)
    assert declared == want, f"{name}: csrc/registration.cpp declares {declared}, the Triton op takes {want}"
    if _ext.HAS_C:
        built = str(getattr(torch.ops.geokern, name).default._schema)
        assert built[built.index("("):] == want, f"{name}: geokern._C's schema {built} differs from {want}"


_OLD_TORCH = """
import importlib.util, sys
import torch
torch.__version__ = "2.10.1+cu128"  # what the loader compares, as on a torch older than TORCH_MIN
real = importlib.util.find_spec  # _C is found (built or not): the version check must come first
importlib.util.find_spec = lambda name, *a: real("geokern") if name == "geokern._C" else real(name, *a)
""" + _ASK_FOR_CUDA


def test_torch_older_than_the_stable_abi_target_is_refused_with_the_versions():
    msg = run_isolated(_OLD_TORCH, timeout=300)
    from geokern._version import TORCH_MIN
    assert f"needs torch >= {TORCH_MIN}" in msg and "2.10.1+cu128" in msg, f"unhelpful message: {msg!r}"


@pytest.mark.skipif(not _ext.HAS_C, reason="geokern._C is not built here")
def test_extension_uses_only_the_stable_abi():
    """No undefined at:: or c10:: symbol: nothing of torch's C++ ABI, so one build loads on every torch
    from TORCH_MIN on (the header-only c10 types are inline and leave no undefined symbol)."""
    import shutil
    import subprocess

    from geokern._version import TORCH_MIN
    info = _ext.build_info()
    assert info["abi"] == "stable" and info["min_torch"] == TORCH_MIN, info
    nm, filt = shutil.which("nm"), shutil.which("c++filt")
    assert nm and filt, "binutils (nm, c++filt) are needed to read the extension's symbols"
    so = _ext._C.__file__
    syms = subprocess.run([nm, "-D", "--undefined-only", so], capture_output=True, text=True, check=True).stdout
    names = subprocess.run([filt], input=syms, capture_output=True, text=True, check=True).stdout.splitlines()
    assert any("aoti_torch_" in s or "torch_" in s for s in names), f"no C shim symbol in {so}: is this _C?"
    bad = [s.split()[-1] for s in names if "at::" in s or "c10::" in s]
    assert not bad, f"{so} uses torch's unstable C++ ABI: {bad[:20]}"


@gpu
@pytest.mark.skipif(not _ext.HAS_C, reason="geokern._C is not built here")
def test_a_failing_check_in_the_extension_raises_its_message():
    """A check inside _C (here num_splits < 0, which the Python wrapper would refuse first) surfaces as
    a RuntimeError carrying its message, and the process goes on (no locale crash)."""
    a = torch.randn(8, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"maxplus_cuda: num_splits must be >= 0 \(0: choose\), got -3"):
        torch.ops.geokern.maxplus_cuda(a, a, False, False, False, -3)
    with pytest.raises(RuntimeError, match=r"hypercomplex_mul_cuda: a must have last dim 4, got shape \[8, 8\]"):
        torch.ops.geokern.hypercomplex_mul_cuda(a, a, 4)
    torch.cuda.synchronize()
    assert torch.ops.geokern.maxplus_cuda(a, a, False, False, False, 0)[0].shape == (8, 8)
