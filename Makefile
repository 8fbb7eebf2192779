# quantkit: the two commands a new user runs are `make demo` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# Compile the CUDA kernels whenever nvcc is present (on a CPU-only machine this is the compile-and-link check).
CUDA    ?= $(if $(shell command -v nvcc 2>/dev/null),1,0)
PYTEST  := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: setup build demo test test-ext test-ref bench clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q ninja numpy einops faiss-cpu tqdm matplotlib safetensors scikit-learn scikit-image \
		pytest hypothesis vector-quantize-pytorch==1.32.0
	touch $@

setup: $(VENV)/.deps

build: setup
	QUANTKIT_CUDA=$(CUDA) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m quantkit info

# The main job on built-in data.
demo: build
	$(PY) -m quantkit demo

# The whole suite twice: with the compiled kernels, then with the pure-PyTorch references.
test: build
	QUANTKIT_EXPECT_CUDA_KERNELS=$(CUDA) QUANTKIT_EXPECT_EXT=1 HYPOTHESIS_PROFILE=ci $(PYTEST)
	QUANTKIT_DISABLE_EXT=1 HYPOTHESIS_PROFILE=ci $(PYTEST) -m "not slow"

bench: build
	$(PY) benchmarks/bench_nearest.py

clean:
	rm -rf build *.egg-info quantkit/_C*.so
