"""The host-overhead benchmark family (geokern/bench/overhead.py): a case for every public op,
and the arithmetic of its timing on a fake clock; the measurement itself on a GPU."""

import io
import math

import pytest
import torch
from _custom_ops import replace_launch
from _helpers import capturable, gpu

import geokern
import geokern.ops
from geokern.bench import overhead, registry


def test_every_public_op_has_a_host_overhead_case():
    """A new public op fails here until it has a Call in overhead.CALLS (or a reason in NO_CASE)."""
    public = set(geokern.ops.__all__)
    covered = {c.op for c in overhead.CALLS}
    assert covered <= public, f"cases for ops that are not public: {sorted(covered - public)}"
    assert set(overhead.NO_CASE) <= public, f"NO_CASE names ops that are not public: {sorted(set(overhead.NO_CASE) - public)}"
    assert not covered & set(overhead.NO_CASE), "an op both has a case and is excused from one"
    missing = public - covered - set(overhead.NO_CASE)
    assert not missing, f"public ops without a host-overhead case in geokern/bench/overhead.py: {sorted(missing)}"
    assert set(geokern.__all__) >= public


def test_the_decode_case_is_the_trainers_shape():
    from geokern.bench import _retrieval_decode as decode

    shapes = [c.shape for c in overhead.CALLS if c.op == "retrieval_attention"]
    assert any(s.startswith("decode-") and f"B{decode.B}-" in s and f"bank{decode.C}" in s for s in shapes)


def test_the_runner_finds_the_family_and_its_own_timing():
    assert "overhead" in registry.families()
    assert registry.own_timing("overhead") is overhead
    assert registry.cases("overhead") == []  # nothing for do_bench, benchmarks/ or headline.py
    assert registry.own_timing("maxplus") is None


class FakeClock:
    """Time moves only when the fake work says so: each call costs `call`, a sync `drain`."""

    def __init__(self, call, drain):
        self.t, self.call, self.drain = 100.0, call, drain

    def __call__(self):
        return self.t

    def fn(self):
        self.t += self.call

    def sync(self):
        self.t += self.drain


def test_loop_time_divides_by_the_calls_and_counts_one_sync():
    clock = FakeClock(call=3.0, drain=5.0)
    eager, host = overhead.loop_time(clock.fn, 10, clock=clock, sync=clock.sync)
    assert host == pytest.approx(3.0)  # 10 calls of 3, the sync before the loop not counted
    assert eager == pytest.approx((10 * 3.0 + 5.0) / 10)


def test_median_loop_time_keeps_the_median_run(monkeypatch):
    runs = iter([(1.0, 0.5), (9.0, 8.0), (2.0, 1.0)])
    monkeypatch.setattr(overhead, "loop_time", lambda fn, n, **timer: next(runs))
    assert overhead.median_loop_time(lambda: None, 4, 3) == (2.0, 1.0)


def test_summarize_subtracts_the_graph_then_the_floor():
    row = overhead.summarize(eager_s=30e-6, host_s=28e-6, graph_s=8e-6, floor_s=5e-6, floor_aten_s=3e-6)
    assert set(row) == set(overhead.NUMBERS)
    assert row["eager_us"] == pytest.approx(30) and row["host_us"] == pytest.approx(28)
    assert row["graph_us"] == pytest.approx(8) and row["floor_us"] == pytest.approx(5)
    assert row["overhead_us"] == pytest.approx(22)
    assert row["over_floor_us"] == pytest.approx(17)
    assert row["eager_per_graph"] == pytest.approx(3.75) and row["floor_aten_us"] == pytest.approx(3)
    assert overhead.summarize(1e-6, 1e-6, 0.0, 0.0)["eager_per_graph"] is None


def test_the_floor_is_an_empty_op_through_a_function():
    x = torch.randn(3, 4, requires_grad=True)
    out = overhead.floor_call(x, torch.randn(2))
    assert out.shape == (1,) and out.grad_fn is not None
    assert torch.ops.geokern_bench.noop.default([x]).shape == (1,)


def _cpu_family(monkeypatch, calls):
    """measure on CPU: the given calls, fp32 only, the graph's time a constant."""
    monkeypatch.setattr(overhead, "CALLS", calls)
    monkeypatch.setattr(overhead, "DTYPES", {"fp32": torch.float32})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(overhead, "_graph_time", lambda fn, inputs, n, repeats: 1e-6)


def _cpu_call(op, shape):
    return overhead.Call(op, shape, lambda dt: (torch.randn(2, 4, dtype=dt), torch.randn(2, 4, dtype=dt)),
                         lambda be, a, b: geokern.quaternion_mul(a, b, backend=be))


def test_measure_plumbing_with_a_fake_graph(monkeypatch):
    """measure's rows on CPU: the reference backend, the graph's time replaced by a constant."""
    _cpu_family(monkeypatch, [_cpu_call("quaternion_mul", "2x4")])
    rows = overhead.measure(n=5, repeats=1, backends=("torch", "cuda"), progress=lambda s: None)
    floor, torch_row, bad = rows
    assert floor["backend"] == "floor" and floor["error"] is None and floor["floor_us"] > 0 < floor["floor_aten_us"]
    assert torch_row["floor_aten_us"] == floor["floor_aten_us"]
    assert torch_row["error"] is None and torch_row["graph_us"] == pytest.approx(1.0)
    assert torch_row["floor_us"] == floor["floor_us"]
    assert torch_row["overhead_us"] == pytest.approx(torch_row["eager_us"] - 1.0)
    assert torch_row["over_floor_us"] == pytest.approx(torch_row["overhead_us"] - floor["floor_us"])
    assert bad["error"] and bad["eager_us"] is None  # no _C here, or _C on CPU tensors
    text = io.StringIO()
    overhead.print_table(rows, file=text)
    assert "quaternion_mul" in text.getvalue() and "[" in text.getvalue()


def test_plan_puts_the_decode_shape_then_one_pair_per_module_first():
    pairs = overhead.plan()
    labels = [c.label(d) for c, d in pairs]
    assert len(labels) == len(set(labels)) == len(overhead.CALLS) * len(overhead.DTYPES)
    assert all(c.shape.startswith("decode-") for c, _ in pairs[:len(overhead.DTYPES)])
    modules = {overhead._module(c) for c in overhead.CALLS}
    head = pairs[:len(overhead.DTYPES) + len(modules)]
    assert {overhead._module(c) for c, _ in head} == modules
    assert [c.label(d) for c, d in overhead.plan("quaternion_mul")] == ["quaternion_mul 4x4 fp32 fwd", "quaternion_mul 4x4 bf16 fwd"]


def test_a_measure_cut_midway_leaves_a_partial_json(monkeypatch, tmp_path):
    """The runner's checkpoint after every pair: a call that dies in the second pair (as a time
    limit's kill would) leaves the first pair's rows on disk, marked partial."""
    import json

    from geokern.bench import runner

    def dies(be, a, b):
        raise KeyboardInterrupt  # not an Exception: measure does not catch it into the row

    _cpu_family(monkeypatch, [_cpu_call("quaternion_mul", "2x4"), overhead.Call("quaternion_conj", "2x4", _cpu_call("", "").make, dies)])
    header = {"device": "cpu"}
    with pytest.raises(KeyboardInterrupt):
        overhead.measure(n=3, repeats=1, backends=("torch",), progress=lambda s: None,
                         checkpoint=lambda rows: runner._save(str(tmp_path), "overhead", header, rows, partial=True))
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["partial"] is True and saved["device"] == "cpu"
    assert [(r["op"], r["backend"]) for r in saved["rows"]] == [("quaternion_mul", "floor"), ("quaternion_mul", "torch")]
    assert saved["rows"][1]["eager_us"] > 0
    overhead.print_table(saved["rows"], file=io.StringIO())


def test_measure_stops_starting_pairs_when_told(monkeypatch):
    _cpu_family(monkeypatch, [_cpu_call("quaternion_mul", "2x4"), _cpu_call("quaternion_conj", "2x4")])
    said, saved = [], []
    stops = iter([False, True])
    rows = overhead.measure(n=3, repeats=1, backends=("torch",), progress=said.append,
                            checkpoint=lambda rows: saved.append(len(rows)), stop=lambda: next(stops))
    assert [r["op"] for r in rows] == ["quaternion_mul"] * 2 and saved == [2]
    assert said[-1].startswith("budget spent: 1 of 2") and "quaternion_conj 2x4 fp32 fwd" in said[-1]


def test_the_runner_s_budget_marks_the_family_partial(monkeypatch, tmp_path):
    """--budget 0: no pair starts, and the JSON says the family did not finish."""
    import json

    from geokern.bench import runner

    _cpu_family(monkeypatch, [_cpu_call("quaternion_mul", "2x4")])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "cpu")
    assert runner.main(["--family", "overhead", "--out", str(tmp_path), "--budget", "0"]) == 0
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["partial"] is True and saved["rows"] == [] and saved["ceilings"] is None


def test_warm_workers_share_the_plan(monkeypatch):
    seen = []
    monkeypatch.setattr(overhead, "_warm", lambda pairs, backends: seen.append([c.label(d) for c, d in pairs]))
    everything = [c.label(d) for c, d in overhead.plan()]
    for i in range(3):
        overhead._warm_worker(i, 3, None, ["cuda"])
    assert sorted(sum(seen, [])) == sorted(everything) and all(seen)


def test_precompile_processes_reach_the_warm_up(capfd):
    """One compile process on a CPU-only machine: it gets as far as the first input's copy to the
    GPU (an import or argument error would fail before), and its failure is reported, not raised."""
    said = []
    pairs = overhead.plan(r"^quaternion_mul 4x4 fp32 fwd$")
    overhead.precompile(pairs, 4, ("torch",), progress=said.append, timeout=120)
    if torch.cuda.is_available():
        assert said[-1].startswith("precompiled 1 pairs in 1 processes (0 failed)"), said
    else:
        assert said[-1].startswith("precompiled 1 pairs in 1 processes (1 failed)"), said
        assert "CUDA" in said[0] or "NVIDIA" in said[0], said[0]


@gpu
@capturable
def test_measure_on_the_gpu():
    rows = overhead.measure(match=r"^quaternion_conj 4x4 fp32", n=50, repeats=2, progress=lambda s: None)
    assert rows and rows[0]["backend"] == "floor"
    for r in rows:
        if r["error"] and r["error"].startswith("unavailable"):
            continue
        assert r["error"] is None, r
        assert math.isfinite(r["eager_us"]) and r["eager_us"] > 0
        if r["backend"] != "floor":
            assert 0 < r["graph_us"] < r["eager_us"] * 10


# in-place updates and ops without a gradient: their forward only
NO_BACKWARD = {"ultrametric_decode_step_", "ultrametric_signatures", "contrastive_update_", "contrastive_update_many_",
               "lior_recurrence_step_", "lior_action_"}


def test_eager_calls_launch_their_triton_kernels_directly(monkeypatch):
    """Every case's eager call on the Triton backend, forward and backward (the decode case aside:
    large inputs), on
    any machine: each kernel launch must run with wrap_triton off, so the kernel starts directly.
    With it on (the plain-eager shortcut of _registry.triton_op ran the op's body without turning
    it off) each launch went through torch's triton_kernel_wrapper_mutation higher-order op, and a
    Triton op's call cost hundreds of microseconds of host time on the H100 (quaternion_mul:
    295 us, the CUDA backend's 37). Without a GPU the kernels run under the interpreter
    (conftest), whose launch() returns them unwrapped; the flag it would see is what counts."""
    from torch._library.triton import is_wrap_triton_enabled

    from geokern.kernels import _common

    seen = []

    def recording_launch(kernel):
        seen.append(is_wrap_triton_enabled())
        return original(kernel)

    original = _common.launch
    replace_launch(monkeypatch, recording_launch)
    from conftest import DEVICE

    monkeypatch.setattr(overhead, "DEVICE", DEVICE)
    monkeypatch.setattr(overhead, "_ultrametric_caches", {})
    monkeypatch.setattr(overhead, "_lior_states", {})
    ran = []
    for call in overhead.CALLS:
        if call.shape.startswith("decode-"):
            continue
        inputs = call.make(torch.float32)
        if call.op not in NO_BACKWARD:  # the backward's launches too
            inputs = tuple(t.requires_grad_() if t.is_floating_point() else t for t in inputs)
        before = len(seen)
        try:
            out = call.run("triton", *inputs)
            if call.op not in NO_BACKWARD:
                outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
                assert outs, f"{call.op}: no output requires grad"
                torch.autograd.backward([o.float().sum() for o in outs])
        except (RuntimeError, ValueError) as e:
            if "not built" in str(e) or "no triton" in str(e).lower():
                continue  # the op has no Triton backend
            raise
        # the grouped contrastive update launches its kernel itself (no triton_op: raw address tables)
        direct = call.op == "contrastive_update_many_"
        assert direct or len(seen) > before, f"{call.label('float32')}: no kernel launched through launch()"
        assert not any(seen[before:]), f"{call.label('float32')}: a launch went through wrap_triton's higher-order op"
        ran.append(call.op)
    assert len(ran) >= 15, ran
