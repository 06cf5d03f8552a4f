# geokern: the README's commands.
#   make test    fresh machine -> .venv with torch, build (compiles geokern._C when nvcc is present), pytest
#   make bench   python -m geokern.bench (GPU): table, JSON and plots in benchmarks/results/<device>/
#   make wheel   a wheel named for its CUDA and torch versions, in dist/
#   make gpu     on a GPU machine with torch preinstalled (no network): build, tests, sanitizer, benchmarks
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
OUT ?=
SELECT ?=
BENCH ?= 1
JOBS ?= 4
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cuh csrc/*/*.cu csrc/*/*.cuh)

.PHONY: test bench wheel gpu clean

$(VENV)/.deps:
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q "$(TORCH_SPEC)" numpy pytest pytest-benchmark ninja "setuptools>=64" wheel
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.built
	$(VPY) -c "import geokern, json; print(json.dumps(geokern.info()))"
	$(VPY) -m pytest tests -q -m "not huge"

bench: $(VENV)/.built
	$(VPY) -m pip install -q matplotlib tqdm pytest-benchmark || true
	$(VPY) -m geokern.bench $(if $(OUT),--out $(OUT))

wheel: $(VENV)/.deps
	MAX_JOBS=$(MAX_JOBS) $(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .
	ls dist/

gpu:
	BENCH=$(BENCH) JOBS=$(JOBS) STEPS="$(STEPS)" bash scripts/gpu.sh $(OUT) $(SELECT)

clean:
	rm -rf build dist *.egg-info geokern/_C*.so $(VENV)/.built
