"""geokern/bench/runner.py on the CPU: the rows run_case makes, with a fake do_bench; the
host-bound mark (a row whose call spends as long on the host as do_bench's events measured)."""

import io
import time

import torch

from geokern.bench import registry, runner


def _case(impls):
    return registry.Case(op="probe", shape="n4", dtype="fp32", direction="fwd", make_inputs=lambda: (torch.ones(4),),
                         impls=impls, peers={"peer": lambda x: x * 2}, reference=lambda x: x * 2, amount=1e9,
                         metric="TFLOP/s", ceiling="c")


def test_rows_mark_the_calls_whose_host_time_fills_the_timed_span():
    def slow_host(x):  # 3 ms of host time a call, against do_bench's 2 ms below: host-bound
        time.sleep(3e-3)
        return x * 2

    rows = runner.run_case(_case({"slow": slow_host, "fast": lambda x: x * 2}), {"c": 1.0},
                           lambda fn, **kw: (fn(), 2.0)[1], lambda s: None)
    by = {r["backend"]: r for r in rows}
    assert set(by) == {"slow", "fast", "peer"}
    assert by["slow"]["host_bound"] and by["slow"]["host_ms"] >= 2.9, by["slow"]
    assert not by["fast"]["host_bound"] and by["fast"]["host_ms"] < 1.0, by["fast"]
    assert by["fast"]["ms"] == 2.0 and by["fast"]["speedup_vs_peer"] == 1.0 and by["fast"]["error"] is None
    table = io.StringIO()
    runner.print_table(rows, file=table)
    line = {b: next(ln for ln in table.getvalue().splitlines() if f" {b} " in ln) for b in ("slow", "fast")}
    assert "host-bound" in line["slow"] and "host-bound" not in line["fast"], table.getvalue()


def test_a_failing_impl_is_reported_not_timed():
    rows = runner.run_case(_case({"wrong": lambda x: x * 3}), {"c": 1.0}, lambda fn, **kw: 1.0, lambda s: None)
    wrong = next(r for r in rows if r["backend"] == "wrong")
    assert wrong["ms"] is None and wrong["error"].startswith("failed check") and not wrong["host_bound"]
