# Whole set-up from a fresh clone: `make test` or `make bench`.
PYTHON ?= python3
VENV ?= .venv
# Pinned: on a CPU machine this resolves to the local CPU wheel; an unpinned torch
# would download several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,examples

PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check
# Re-install (rebuild _C) when the build files or the C++/CUDA sources change.
STAMP := $(VENV)/.cnnlstm_fast-installed
BUILD_INPUTS := setup.py pyproject.toml cnnlstm_fast/_version.py $(shell find csrc -type f 2>/dev/null)

.PHONY: setup bench test env clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install triton pybind11 ninja setuptools wheel
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

bench: setup
	$(PY) -m cnnlstm_fast.bench

test: setup
	$(PY) -m cnnlstm_fast.env
	$(PY) -m pytest -q tests

env: setup
	$(PY) -m cnnlstm_fast.env

clean:
	rm -rf build *.egg-info cnnlstm_fast/*.so .pytest_cache $(STAMP)
