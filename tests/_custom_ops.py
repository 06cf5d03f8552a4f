"""The checks every family runs on its custom ops: opcheck and torch.compile(fullgraph)."""

import pytest
import torch
from conftest import HAS_CUDA

from geokern.ops import _registry


def ops_here(family):
    """Qualified names of the family's custom ops that can be checked on this machine.

    CUDA-backend ops run their reference as the CPU implementation, so they are checked
    everywhere; triton_op traces its kernels for CUDA tensors only (the eager kernels are
    checked under the interpreter by the family's other tests)."""
    return [name for backend, name in _registry.CUSTOM_OPS if family in name and (backend != "triton" or HAS_CUDA)]


def _op(qualname):
    return getattr(torch.ops.geokern, qualname.split("::")[1]).default


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def check_opcheck(qualname, samples):
    for args in samples:
        torch.library.opcheck(_op(qualname), args)


def check_compile(qualname, samples):
    op = _op(qualname)
    # Every op compiles through the same OpOverload.__call__ code object: without a reset
    # the checks of one session run into dynamo's recompile limit (8), not into a bug.
    torch._dynamo.reset()
    compiled = torch.compile(op, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    for args in samples:
        for got, want in zip(_as_tuple(compiled(*args)), _as_tuple(op(*args))):
            torch.testing.assert_close(got, want, equal_nan=True, msg=f"{qualname} compiled vs eager")


def custom_op_tests(family, samples):
    """(test_opcheck, test_compile_fullgraph) over every custom op of `family` here, for a
    test module to bind at module level in one line:

        test_opcheck, test_compile_fullgraph = custom_op_tests("maxplus", op_samples)

    samples(qualname) -> a list of argument tuples for that op."""
    names = ops_here(family)

    @pytest.mark.parametrize("qualname", names)
    def test_opcheck(qualname):
        check_opcheck(qualname, samples(qualname))

    @pytest.mark.parametrize("qualname", names)
    def test_compile_fullgraph(qualname):
        check_compile(qualname, samples(qualname))

    return test_opcheck, test_compile_fullgraph
