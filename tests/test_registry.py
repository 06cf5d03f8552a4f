"""geokern.ops._registry.triton_op: plain eager calls run the op's body without the dispatcher,
every other call (fake tensors, functorch transforms, tensor subclasses, torch.compile) goes
through the custom op."""

import pytest
import torch
from torch._library.triton import is_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensorMode

from geokern.ops import _registry


@pytest.fixture(scope="module")
def probe():
    """A triton_op whose body and whose dispatcher route record which ran."""
    ran, wrapping = [], []

    def body(x: torch.Tensor) -> torch.Tensor:
        ran.append("body")
        wrapping.append(is_wrap_triton_enabled())
        return x.clone()

    call = _registry.triton_op("registry_probe_triton", body)
    call.wrapping = wrapping
    yield call, ran
    _registry.CUSTOM_OPS.remove(("triton", "geokern::registry_probe_triton"))


class _Seen(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_eager_runs_the_body_directly(probe, monkeypatch):
    call, ran = probe
    x = torch.randn(3)
    op = call.op
    monkeypatch.setattr(call, "op", lambda *a, **k: ran.append("op") or op(*a, **k))
    ran.clear()
    assert torch.equal(call(x), x) and ran == ["body"]
    assert _registry._plain_eager((x, [x, 1]), {"y": x})
    with _Seen():  # a dispatch mode: through the op, which runs the body
        call(x)
    assert ran == ["body", "op", "body"]


def test_modes_transforms_and_subclasses_go_through_the_op(probe):
    call, ran = probe
    x = torch.randn(3)
    with _Seen() as seen:  # any dispatch mode: the op, so the mode sees geokern's op
        call(x)
    assert any("registry_probe_triton" in o for o in seen.ops), seen.ops
    with FakeTensorMode() as mode:
        assert not _registry._plain_eager((mode.from_tensor(x),), {})
    seen_levels = []
    torch.func.vmap(lambda t: seen_levels.append(_registry._plain_eager((t,), {})) or t)(torch.ones(2, 3))
    assert seen_levels == [False]

    class Sub(torch.Tensor):
        pass

    assert not _registry._plain_eager((x.as_subclass(Sub),), {})
    assert not _registry._plain_eager(([x, x.as_subclass(Sub)],), {})


def test_eager_bodies_launch_kernels_directly(probe):
    """In an eager call, plain (the shortcut) or through the op (triton_op's own eager kernel),
    the body runs with wrap_triton off, so launch()'s kernels start directly: on, each launch
    went through the triton_kernel_wrapper_mutation higher-order op, and a Triton op's call cost
    hundreds of microseconds of host time on the H100 (quaternion_mul: 295 us, its CUDA
    backend 37). Under a dispatch mode the op still traces (wrap_triton is on there again after)."""
    call, _ = probe
    x = torch.randn(3)
    call.wrapping.clear()
    call(x)
    with _Seen():
        call(x)
    assert call.wrapping == [False, False], call.wrapping
    assert is_wrap_triton_enabled(), "an eager call left wrap_triton off"


def test_opaque_ops_launch_directly_through_the_dispatcher_too():
    """An op made with opaque_fake is a plain custom op whose kernel is the body itself (no
    triton_op kernel to turn wrap_triton off): run through the dispatcher (any call that is not
    plain eager, e.g. under a dispatch mode or from a compiled graph) it must still launch directly."""
    wrapping = []

    def body(x: torch.Tensor) -> torch.Tensor:
        wrapping.append(is_wrap_triton_enabled())
        return x.clone()

    call = _registry.triton_op("registry_opaque_probe_triton", body, opaque_fake=lambda x: torch.empty_like(x))
    try:
        x = torch.randn(3)
        call(x)
        call.op(x)
        with _Seen():
            call(x)
        assert wrapping == [False, False, False], wrapping
    finally:
        _registry.CUSTOM_OPS.remove(("triton", "geokern::registry_opaque_probe_triton"))
        _registry.TRITON_OPS.pop("geokern::registry_opaque_probe_triton")


def test_plain_eager_writes_bump_version_counters():
    """The direct call skips the dispatcher, which bumps the version counter of each argument the
    op declares written: without the bump, a backward through a value saved before the write would
    silently use the new value. The body writes through .data, as a kernel writes through a
    pointer: invisibly to autograd."""

    def body(x: torch.Tensor, y: torch.Tensor) -> None:
        y.data.add_(x)

    call = _registry.triton_op("registry_write_probe_triton", body, mutates_args=("y",))
    try:
        for pass_y in (lambda x, y: call(x, y), lambda x, y: call(x, y=y)):
            a = torch.ones(3, requires_grad=True)
            y = torch.zeros(3)
            saved = (a * y).sum()  # saves y for the backward
            before = y._version
            pass_y(torch.ones(3), y)
            assert y._version > before and torch.equal(y, torch.ones(3))
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                saved.backward()
    finally:
        _registry.CUSTOM_OPS.remove(("triton", "geokern::registry_write_probe_triton"))
        _registry.TRITON_OPS.pop("geokern::registry_write_probe_triton")


def test_plain_eager_writes_bump_each_tensor_of_a_list_argument():
    def body(x: torch.Tensor, ys: list[torch.Tensor]) -> None:
        for y in ys:
            y.data.add_(x)

    call = _registry.triton_op("registry_list_write_probe_triton", body, mutates_args=("ys",))
    try:
        ys = [torch.zeros(2), torch.zeros(2)]
        before = [y._version for y in ys]
        call(torch.ones(2), ys)
        assert all(y._version > b for y, b in zip(ys, before))
    finally:
        _registry.CUSTOM_OPS.remove(("triton", "geokern::registry_list_write_probe_triton"))
        _registry.TRITON_OPS.pop("geokern::registry_list_write_probe_triton")


def test_mutates_args_must_name_parameters_of_the_body():
    def body(x: torch.Tensor) -> None:
        pass

    with pytest.raises(ValueError, match=r"mutates_args \['z'\]"):
        _registry.triton_op("registry_bad_probe_triton", body, mutates_args=("z",))


def test_constant_is_made_once_per_value_shape_dtype_and_device():
    c = _registry.constant
    _registry._CONSTANTS.clear()
    a = c(2.5, (1, 1), torch.float32, "cpu")
    assert c(2.5, (1, 1), torch.float32, torch.device("cpu")) is a and a.tolist() == [[2.5]]
    assert c(2.5, (), torch.float32, "cpu") is not a and c(2.5, (1, 1), torch.float64, "cpu") is not a
    pos, neg = c(0.0, (), torch.float32, "cpu"), c(-0.0, (), torch.float32, "cpu")
    assert not torch.signbit(pos) and torch.signbit(neg)  # keyed by the float's bits, not its value
    assert c(1e39, (), torch.float32, "cpu").item() == float("inf")  # rounded to the dtype, as torch.full does
    with _Seen():  # a dispatch mode: made fresh, not cached
        assert c(2.5, (1, 1), torch.float32, "cpu") is not a
    for i in range(2 * _registry._MAX_CONSTANTS):  # a schedule of values: the cache stays bounded
        c(float(i), (), torch.float32, "cpu")
    assert len(_registry._CONSTANTS) == _registry._MAX_CONSTANTS
    assert c(2.5, (1, 1), torch.float32, "cpu") is not a  # evicted, made again
    with torch.inference_mode():  # first made under inference mode, later saved for a backward
        k = c(7.0, (), torch.float32, "cpu")
    x = torch.ones(2, requires_grad=True)
    (x * c(7.0, (), torch.float32, "cpu")).sum().backward()
    assert c(7.0, (), torch.float32, "cpu") is k and x.grad.tolist() == [7.0, 7.0]


def test_number_arguments_reuse_one_device_constant():
    """retrieval's and LIoR's number R: no tensor made (no fill launched) per call."""
    from geokern.ops import retrieval

    r = retrieval._r4(3.0, (), False, torch.device("cpu"))
    assert retrieval._r4(3.0, (), False, torch.device("cpu")) is r and r.shape == (1, 1, 1, 1)
