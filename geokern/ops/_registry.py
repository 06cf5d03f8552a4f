"""Custom-op plumbing shared by every op family.

CUDA-backend ops are declared in csrc/registration.cpp (geokern::<op>_cuda); here they
get fake implementations and the reference as their CPU implementation, so that
opcheck and torch.compile run on machines without a GPU. Triton-backend ops are
torch.library.triton_op (geokern::<op>_triton), so torch.compile sees into them.
"""

import contextlib
import functools
import inspect
import warnings

import torch
from torch._C._functorch import peek_interpreter_stack as _functorch_level
from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode

from geokern import _ext

try:
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # a private helper (torch 2.11-2.14 have it): without it launches stay correct, only slower
    def set_wrap_triton_enabled(enabled):
        return contextlib.nullcontext()

CUSTOM_OPS = []  # (backend, qualified name): every op geokern defines, for tests and docs
# qualified name -> (fake, cpu_impl) of every CUDA-backend op, recorded with or without _C: the
# tests check the fake and CPU implementations everywhere (tests/_custom_ops.py)
CUDA_OPS = {}
# qualified name -> (body, opaque_fake) of every Triton-backend op: torch.compile traces the body
# on fake tensors (the opaque_fake instead, where not None), so nothing there may depend on tensor
# data; the tests trace it on any machine with the launches stubbed (tests/_custom_ops.py)
TRITON_OPS = {}


def cuda_op(name, fake, cpu_impl):
    """torch.ops.geokern.<name> from _C with its fake and CPU implementations, or None.

    Without _C nothing is registered, but (fake, cpu_impl) is still recorded in CUDA_OPS."""
    qualname = f"geokern::{name}"
    CUDA_OPS[qualname] = (fake, cpu_impl)
    if not _ext.HAS_C:
        return None
    if not hasattr(torch.ops.geokern, name):
        raise ImportError(f"geokern._C has no op {qualname}: the extension was built from older sources; "
                          "rebuild it (pip install --no-build-isolation --no-deps -e .)")
    torch.library.register_fake(qualname)(fake)
    torch.library.register_kernel(qualname, "cpu")(cpu_impl)
    CUSTOM_OPS.append(("cuda", qualname))
    return getattr(torch.ops.geokern, name).default


def triton_op(name, impl, mutates_args=(), opaque_fake=None):
    """torch.library.triton_op geokern::<name> with `impl` as its body, as a callable that runs
    `impl` directly in plain eager calls (see _plain_eager) and the op otherwise.

    `impl` launches its kernels through geokern.kernels._common.launch, so torch.compile
    traces into them on the GPU; on CPU tensors under TRITON_INTERPRET=1 the kernels run
    directly (eager only: tracing CPU Triton ops is unsupported). `mutates_args` names the
    arguments written in place (a decode state). The op itself is the callable's `.op`. A plain
    eager call bumps the autograd version counter of each tensor it writes, as the dispatcher
    does for the op, so a backward through a value saved before the write raises instead of
    silently using the new value.

    `opaque_fake` (a fake implementation) makes the op a plain torch.library.custom_op instead:
    torch.compile calls it as one opaque kernel and does not trace into its launches. For an op
    whose traced launches inductor cannot compile (see the call site for which and why)."""
    qualname = f"geokern::{name}"
    written = _mutated_positions(impl, mutates_args)
    direct = launching_directly(impl)
    if opaque_fake is None:
        op = torch.library.triton_op(qualname, impl, mutates_args=mutates_args)
    else:  # the custom op's kernel is the body itself: it must turn wrap_triton off on its own
        op = torch.library.custom_op(qualname, direct, mutates_args=mutates_args)
        op.register_fake(opaque_fake)
    CUSTOM_OPS.append(("triton", qualname))
    TRITON_OPS[qualname] = (impl, opaque_fake)

    def call(*args, **kwargs):
        if _plain_eager(args, kwargs):
            out = direct(*args, **kwargs)
            for i, n in written:
                t = args[i] if i < len(args) else kwargs.get(n)
                for w in (t if isinstance(t, (list, tuple)) else (t,)):  # a Tensor[] argument: each
                    if isinstance(w, torch.Tensor):
                        torch.autograd.graph.increment_version(w)
            return out
        return call.op(*args, **kwargs)

    call.op = op
    call.__name__ = call.__qualname__ = name
    return call


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _mutated_positions(impl, mutates_args):
    """(position, name) of each argument of `impl` named in mutates_args: the direct call skips
    the dispatcher, which is what bumps a written tensor's version counter."""
    names = list(inspect.signature(impl).parameters)
    missing = [n for n in mutates_args if n not in names]
    if missing:
        raise ValueError(f"triton_op {impl.__name__}: mutates_args {missing} are not parameters of the body {names}")
    return tuple((names.index(n), n) for n in mutates_args)


def launching_directly(impl):
    """`impl` run with torch's wrap_triton off, as triton_op's own eager kernel runs a body: its
    launch() kernels then start directly. On, each launch goes through the
    triton_kernel_wrapper_mutation higher-order op's Python dispatch (quaternion_mul's Triton call
    cost 295 us of host time on the H100 that way, its CUDA backend's 37; benchmarks/results,
    af39454). Keeps impl's signature (custom_op reads the schema from it)."""

    @functools.wraps(impl)
    def run(*args, **kwargs):
        with set_wrap_triton_enabled(False):
            return impl(*args, **kwargs)

    return run


def _plain_eager(args, kwargs):
    """Whether a Triton op's body may run without the dispatcher: eager (not traced by
    torch.compile), no dispatch mode (fake tensors, functionalization, a debug mode), no
    functorch transform, and only plain tensors. The dispatcher's Python custom-op layer costs
    about 20 us a call there (scripts/profile_calls.py on the H100: the empty custom op's floor)
    and does nothing the body needs: autograd lives in each op's autograd.Function."""
    if torch.compiler.is_compiling() or _dispatch_mode() is not None or _functorch_level() is not None:
        return False
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor) and type(t) not in _PLAIN:
                return False
    return True


_CONSTANTS = {}  # (value's hex, shape, dtype, device, CUDA stream) -> tensor, oldest first
_MAX_CONSTANTS = 64


def constant(value, shape, dtype, device):
    """A tensor of `shape` filled with the number `value` (rounded to dtype), for a number argument a
    kernel reads from memory (retrieval's and LIoR's R): made once per value, shape, dtype, device
    and CUDA stream in plain eager calls, so a call launches no fill and copies nothing from the
    host. Keyed by the float's hex, so -0.0 and 0.0 stay apart. Per stream, because the allocator
    ties a block to the stream that made it: an entry read on another stream could be evicted and
    its block reused while that stream still reads it. Under tracing, a dispatch mode or stream
    capture it is made fresh (a traced graph or a captured one must own what it reads). The oldest
    entry goes past _MAX_CONSTANTS (a schedule of values must not grow the cache)."""
    v = float(value)
    device = torch.device(device)
    cuda = device.type == "cuda"
    if (torch.compiler.is_compiling() or _dispatch_mode() is not None
            or (cuda and torch.cuda.is_current_stream_capturing())):
        return torch.full(shape, v, dtype=dtype, device=device)
    key = (v.hex(), tuple(shape), dtype, device, torch.cuda.current_stream(device).cuda_stream if cuda else 0)
    t = _CONSTANTS.get(key)
    if t is None:
        # rounded to dtype on the host first (past float32's range torch.full raises where a number
        # rounds to inf), filled on this stream; never an inference tensor (a later call with
        # autograd may save it for its backward)
        with torch.inference_mode(False):
            t = torch.full(shape, torch.tensor(v, dtype=torch.float64).to(dtype).item(), dtype=dtype, device=device)
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            del _CONSTANTS[next(iter(_CONSTANTS))]
        _CONSTANTS[key] = t
    return t


def bound_once(cls):
    """Class decorator for a torch.autograd.Function with setup_context: its forward's
    signature computed once.

    Function.apply binds its arguments to forward's signature on every call (to fill in
    defaults for setup_context), and inspect.signature rebuilds that signature each time:
    about 40-70 us a call, a large part of an op's host overhead on small inputs (the
    decode regime). inspect.signature returns a function's __signature__ when it is set,
    so setting it once keeps the binding (defaults, keyword arguments) and drops the cost.
    """
    forward = cls.forward
    forward.__signature__ = inspect.signature(forward)
    return cls


def alert_nondeterministic(what, alternative):
    """torch's rule for an op without a deterministic implementation (what its C++ alert does):
    under torch.use_deterministic_algorithms(True) raise (warn with warn_only=True), naming the
    op (`what`, with its backend) and the deterministic `alternative` (e.g. "backend='torch'")."""
    if torch.are_deterministic_algorithms_enabled():
        msg = (f"{what} does not have a deterministic implementation, but you set "
               f"'torch.use_deterministic_algorithms(True)'; {alternative} is deterministic")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(msg)
        warnings.warn(msg)


def refuse_double_backward(op):
    """Called first in a Function's backward whose kernels have no derivative of their own:
    a backward run with create_graph=True (grad mode on) raises here, naming the op, instead
    of torch's "no autograd formula was registered" at the raw custom op. AOTAutograd traces
    backwards with grad mode on too, so compiling is let through."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{op}: double backward (create_graph=True) through the Triton and CUDA kernels is not "
                           "supported; backend='torch' (the reference) supports it")
