"""Every case of geokern.bench.registry as a pytest-benchmark test, one group per case:
`pytest benchmarks --benchmark-only [-k family]`."""

import pytest
from conftest import case_params, run_benchmark


@pytest.mark.parametrize("case,name,fn", case_params())
def test_case(benchmark, case, name, fn):
    run_benchmark(benchmark, case, name, fn)
