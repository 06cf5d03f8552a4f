"""geokern's CUDA extension: without it geokern imports, and asking for the CUDA backend says
why not; its ops' schemas (csrc/registration.cpp) are their Triton twins'."""

import pathlib
import re
import pytest
import torch
from _custom_ops import triton_schema_of
from _helpers import run_isolated

from geokern import _ext
from geokern.ops import _registry

REGISTRATION = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "registration.cpp"
DEF = re.compile(r'm\.def\("(\w+)(\(.*\) -> .*)"\);')

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
