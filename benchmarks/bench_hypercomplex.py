import pytest
from conftest import case_params, run_benchmark


@pytest.mark.parametrize("case,name,fn", case_params("hypercomplex"))
def test_hypercomplex(benchmark, case, name, fn):
    run_benchmark(benchmark, case, name, fn)
