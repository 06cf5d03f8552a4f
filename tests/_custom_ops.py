"""The checks every family runs on its custom ops: opcheck and torch.compile(fullgraph).

A CUDA-backend op (geokern::<op>_cuda) runs the reference as its CPU implementation, so it is
checked on every machine. Where geokern._C is not built the op does not exist; its fake and CPU
implementation (recorded by geokern.ops._registry.cuda_op all the same) are then checked through
a mirror, geokern_mirror::<op>_cuda: an op with the schema of geokern::<op>_triton (the CUDA
op's too: tests/test_ext.py checks csrc/registration.cpp declares the same) and the same fake and
CPU implementation. A Triton-backend op traces its kernels for CUDA tensors only (the eager
kernels are checked under the interpreter by the family's other tests); without a GPU its
test_opcheck checks only that the samples bind to the op's schema (check_samples_bind), so a
sample that no longer matches the schema fails on CPU too, not first on the GPU. Its
test_fake_trace runs everywhere: what torch.compile traces of the op on fake tensors, the launches
stubbed (check_fake_trace)."""

import contextlib
import sys

import pytest
import torch
from conftest import HAS_CUDA
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from geokern import _ext
from geokern.ops import _registry

MIRROR = "geokern_mirror"
_mirror_lib = None


def triton_schema_of(cuda_qualname):
    """The arguments and returns, `(...) -> ...`, of the Triton op twin of geokern::<op>_cuda,
    with torch.library's inferred SymInt spelt int as in csrc/registration.cpp."""
    name = cuda_qualname.split("::")[1].removesuffix("_cuda") + "_triton"
    schema = str(getattr(torch.ops.geokern, name).default._schema)
    return schema[schema.index("("):].replace("SymInt", "int")


def _mirror(qualname):
    """geokern_mirror::<op>_cuda for geokern::<op>_cuda, defined on first use."""
    global _mirror_lib
    name = qualname.split("::")[1]
    mirrored = f"{MIRROR}::{name}"
    if _mirror_lib is None:
        _mirror_lib = torch.library.Library(MIRROR, "FRAGMENT")
    if not hasattr(torch.ops.geokern_mirror, name):
        fake, cpu_impl = _registry.CUDA_OPS[qualname]
        _mirror_lib.define(name + triton_schema_of(qualname))
        # the reference runs on any device: CUDA tensors too, on a GPU machine without _C
        _mirror_lib.impl(name, cpu_impl, "CPU")
        _mirror_lib.impl(name, cpu_impl, "CUDA")
        torch.library.register_fake(mirrored, fake, lib=_mirror_lib)
    return mirrored


def op(qualname):
    """The OpOverload of a qualified name, geokern::<op> or geokern_mirror::<op>."""
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def cuda_op(name):
    """geokern::<name> (a CUDA-backend op, `<op>_cuda`), or without geokern._C its mirror: what
    it runs on CPU tensors."""
    return op(f"geokern::{name}" if _ext.HAS_C else _mirror(f"geokern::{name}"))


def _named(qualname, prefix):
    return qualname.split("::")[1].startswith(prefix)


def triton_ops(prefix):
    """Qualified names of the Triton-backend ops named `<prefix>...` (a str or a tuple of them)."""
    return [q for backend, q in _registry.CUSTOM_OPS if backend == "triton" and _named(q, prefix)]


def ops_here(prefix, triton_everywhere=False):
    """Qualified names of the custom ops named `<prefix>...` (a str or a tuple of them) that can be
    checked on this machine: the CUDA-backend ops (or their mirrors, without geokern._C)
    everywhere, the Triton-backend ops with a GPU (everywhere with triton_everywhere)."""
    cuda = [q if _ext.HAS_C else _mirror(q) for q in _registry.CUDA_OPS if _named(q, prefix)]
    return cuda + (triton_ops(prefix) if HAS_CUDA or triton_everywhere else [])


def _runs_here(qualname):
    """Whether the op can run on this machine's tensors: a Triton op's traced kernels need CUDA."""
    return HAS_CUDA or not qualname.split("::")[1].endswith("_triton")


def check_samples_bind(qualname, samples):
    """Each sample binds to the op's schema, as the dispatcher parses a call (types, count,
    defaults), without running the op: what opcheck's test_schema hit first when the hypercomplex
    attention ops gained arguments their samples lacked."""
    schema = op(qualname)._schema
    for i, args in enumerate(samples):
        try:
            torch._C._check_schema_allow_fake_script_object(schema, *args)
        except RuntimeError as e:
            raise AssertionError(f"{qualname}: sample {i} does not match the schema {schema}: {e}") from None


def op_id(qualname):
    """Test id: the op's name, `-mirror` for a mirror (maxplus_cuda, maxplus_cuda-mirror)."""
    ns, name = qualname.split("::")
    return name + ("-mirror" if ns == MIRROR else "")


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def check_opcheck(qualname, samples):
    check_samples_bind(qualname, samples)
    for args in samples:
        torch.library.opcheck(op(qualname), args)


@contextlib.contextmanager
def _launches_stubbed():
    """Every launch() of the kernel modules (geokern.kernels.*, each bound `launch` from
    geokern.kernels._common) returns a stub meanwhile, whose `[grid](...)` does nothing (the
    kernels do not run) but count itself in the list yielded. Every Triton op's body launches
    through launch(); kernels/contrastive.py's contrastive_many starts its kernel directly, but
    no op's body calls it (ContrastiveGroup does, outside any op)."""
    launched = []

    class Stub:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.kernel)

    with pytest.MonkeyPatch.context() as patch:
        replace_launch(patch, Stub)
        yield launched


def replace_launch(patch, replacement):
    """`replacement` as launch() in every kernel module (geokern.kernels.*, each binds
    geokern.kernels._common.launch by name), through `patch`, a pytest MonkeyPatch."""
    from geokern.kernels._common import launch

    for name, module in list(sys.modules.items()):
        if name.startswith("geokern.kernels") and getattr(module, "launch", None) is launch:
            patch.setattr(module, "launch", replacement)


def _clear_reference_caches():
    """Empty the lru caches of geokern.reference's helpers: warm (any earlier test), a cached helper
    returns without running the tensor ops a body would trace through it (left_mul_blocks did)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("geokern.reference"):
            for f in vars(module).values():
                if callable(getattr(f, "cache_clear", None)):
                    f.cache_clear()


def check_fake_trace(qualname, samples):
    """What torch.compile traces of the Triton op on fake tensors, traced by make_fx on each
    sample, fake and with symbolic shapes, the launches stubbed: nothing there may depend on
    tensor data (.item(), bool(tensor), a table computed with tensor ops), or fullgraph compile
    fails with "Could not guard on data-dependent expression" (the hypercomplex linear ops' sign
    table, 0d5bac9). That is the op's body, up to its launches, which the samples must reach;
    for an op registered with an opaque_fake, torch.compile calls the op as one opaque kernel
    and traces that fake instead, never the body. The samples' tensors are the traced inputs,
    their other arguments constants (as dynamo's first compile takes them). Outputs are not
    compared: the kernels did not run."""
    body, opaque_fake = _registry.TRITON_OPS[qualname]
    traced = body if opaque_fake is None else opaque_fake
    _clear_reference_caches()
    with _launches_stubbed() as launched:
        for i, args in enumerate(samples):
            leaves, spec = tree_flatten(args)
            at = [j for j, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

            def call(*tensors):
                filled = list(leaves)
                for j, t in zip(at, tensors):
                    filled[j] = t
                return traced(*tree_unflatten(filled, spec))

            for mode in ("fake", "symbolic"):
                try:
                    make_fx(call, tracing_mode=mode)(*(leaves[j] for j in at))
                except Exception as e:
                    raise AssertionError(f"{qualname}: sample {i} does not trace on fake tensors "
                                         f"(tracing_mode={mode!r}): {type(e).__name__}: {e}") from e
    assert launched or opaque_fake is not None, f"{qualname}: no sample's trace reached a kernel launch"


def check_compile(qualname, samples):
    eager = op(qualname)
    # Every op compiles through the same OpOverload.__call__ code object: without a reset
    # the checks of one session run into dynamo's recompile limit (8), not into a bug.
    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    for args in samples:
        for i, (got, want) in enumerate(zip(_as_tuple(compiled(*args)), _as_tuple(eager(*args)))):
            torch.testing.assert_close(got, want, equal_nan=True, msg=f"{qualname} output {i}: compiled vs eager")


def custom_op_tests(prefix, samples):
    """(test_opcheck, test_compile_fullgraph, test_fake_trace) over every custom op named
    `<prefix>...` here (test_fake_trace: the Triton ops, on every machine), for a test module to
    bind at module level in one line:

        test_opcheck, test_compile_fullgraph, test_fake_trace = custom_op_tests("maxplus_", op_samples)

    samples(qualname) -> a list of argument tuples for that op (qualname may be a mirror's:
    an op the samples call, say the forward of a backward's op, is op(<qualname without
    _backward>)). prefix may be a tuple of prefixes. Without a GPU test_opcheck covers the
    Triton ops too, checking only that their samples bind to their schemas (the samples are
    built on CPU tensors: a backward's sample may run its forward under the interpreter)."""
    names = ops_here(prefix)

    @pytest.mark.parametrize("qualname", ops_here(prefix, triton_everywhere=True), ids=op_id)
    def test_opcheck(qualname):
        if _runs_here(qualname):
            check_opcheck(qualname, samples(qualname))
            return
        try:
            built = samples(qualname)
        except (RuntimeError, AssertionError) as e:  # torch's "no NVIDIA driver" / "not compiled with CUDA"
            if "NVIDIA" not in str(e) and "CUDA" not in str(e):
                raise
            pytest.skip(f"{op_id(qualname)}: its samples are built on CUDA tensors (build them on conftest.DEVICE "
                        "to check them against the schema without a GPU)")
        check_samples_bind(qualname, built)

    @pytest.mark.parametrize("qualname", names, ids=op_id)
    def test_compile_fullgraph(qualname):
        check_compile(qualname, samples(qualname))

    @pytest.mark.parametrize("qualname", triton_ops(prefix), ids=op_id)
    def test_fake_trace(qualname):
        check_fake_trace(qualname, samples(qualname))

    return test_opcheck, test_compile_fullgraph, test_fake_trace
