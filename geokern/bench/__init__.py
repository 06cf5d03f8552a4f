"""Microbenchmarks: `python -m geokern.bench` (make bench) and the pytest-benchmark suite
in benchmarks/ read the same case registry (geokern.bench.registry)."""
