"""pytest-benchmark view of geokern.bench.registry: `pytest benchmarks --benchmark-only`."""

import pytest
import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["bench_*.py"]  # GPU timings only; the runner says so too


def case_params():
    """(case, impl name, fn) for every implementation and peer of every registered case;
    ids start with the family, so `-k maxplus` picks one."""
    from geokern.bench import registry

    params = []
    for family in registry.families():
        for case in registry.cases(family):
            for name, fn in list(case.impls.items()) + list(case.peers.items()):
                params.append(pytest.param(case, name, fn, id=f"{family}-{case.key}-{name}"))
    return params


def run_benchmark(benchmark, case, name, fn):
    benchmark.group = case.key
    benchmark.extra_info.update(backend=name, metric=case.metric, amount=case.amount)
    inputs = case.make_inputs()
    fn(*inputs)  # compile / autotune outside the timing

    def timed():
        fn(*inputs)
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, warmup_rounds=3)
    del inputs
    torch.cuda.empty_cache()
