# fused_conv developer entry points:
#   make demo   set up .venv, install fused_conv from source, run `python -m fused_conv demo`
#   make test   set up .venv, lint, build a wheel, install it, test it (CI runs this: .ci/run)
#   make lint | wheel | clean | distclean | help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VENV_BIN := $(abspath $(VENV))/bin
VPY := $(VENV_BIN)/python
TORCH_VERSION ?= 2.14.1
DEV_REQUIREMENTS := torch==$(TORCH_VERSION) numpy pytest ninja setuptools wheel build ruff \
	clang-format==23.1.1 cibuildwheel expecttest scikit-learn
DEPS_STAMP := $(VENV)/.fused_conv-dev-requirements
LINT_PATHS = $(wildcard fused_conv tests benchmarks examples) setup.py
PIP := $(VPY) -m pip --disable-pip-version-check

# Build environment (see setup.py): the CUDA toolkit when there is one, 2 compile jobs.
ifeq ($(origin CUDA_HOME),undefined)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif
export MAX_JOBS ?= 2

step = @echo "== [$$(date +%T)] $(1)"

.PHONY: help venv demo test lint wheel clean distclean

help:
	@echo "make demo   install fused_conv from source into $(VENV) and run python -m fused_conv demo"
	@echo "make test   ruff, clang-format, build a wheel into dist/, install it, run the tests"
	@echo "make lint   ruff and clang-format (C++ / CUDA, csrc/ and docs/checks/)"
	@echo "make wheel  build dist/fused_conv-*.whl"
	@echo "make clean  remove build outputs (distclean: also $(VENV))"

# The development venv: the one place it is made. Re-run when DEV_REQUIREMENTS change.
ifneq ($(shell cat $(DEPS_STAMP) 2>/dev/null),$(DEV_REQUIREMENTS))
.PHONY: $(DEPS_STAMP)
endif
$(DEPS_STAMP):
	$(call step,venv $(VENV): $(DEV_REQUIREMENTS))
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off $(DEV_REQUIREMENTS)
	echo '$(DEV_REQUIREMENTS)' > $@

venv: $(DEPS_STAMP)

# Run from outside the source tree so that the installed package is imported, not ./fused_conv.
demo: $(DEPS_STAMP)
	$(call step,install fused_conv from source)
	$(PIP) install --no-build-isolation --no-deps --force-reinstall .
	$(call step,demo)
	cd "$${TMPDIR:-/tmp}" && $(VPY) -m fused_conv demo

CXX_SOURCES = $(shell find csrc docs/checks -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

lint: $(DEPS_STAMP)
	$(VENV_BIN)/ruff check $(LINT_PATHS)
	$(VENV_BIN)/clang-format --dry-run --Werror $(CXX_SOURCES)

# build/lib.* is emptied so that no stale file reaches the wheel; build/temp.* (ninja's
# objects) is kept, so rebuilds only compile what changed.
wheel: $(DEPS_STAMP)
	$(call step,build wheel (CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) MAX_JOBS=$(MAX_JOBS)))
	rm -rf build/lib.* build/bdist.* dist/fused_conv-*.whl
	$(PIP) wheel --no-build-isolation --no-deps --wheel-dir dist .
	ls -l dist/fused_conv-*.whl

# One GPU architecture keeps the CI build short; override with TORCH_CUDA_ARCH_LIST=...
test: export TORCH_CUDA_ARCH_LIST ?= 9.0a
test: $(DEPS_STAMP)
	$(call step,ruff and clang-format)
	$(VENV_BIN)/ruff check $(LINT_PATHS)
	$(VENV_BIN)/clang-format --dry-run --Werror $(CXX_SOURCES)
	$(MAKE) --no-print-directory wheel
	$(call step,install the wheel)
	$(PIP) install --force-reinstall --no-deps dist/fused_conv-*.whl
	$(call step,cibuildwheel configuration)
	ids="$$($(VENV_BIN)/cibuildwheel --print-build-identifiers --platform linux)"; \
		echo "$$ids"; test -n "$$ids"
	$(call step,pytest against the installed wheel)
	tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; \
		cp -r tests examples pyproject.toml "$$tmp"/; cd "$$tmp"; \
		env -u PYTHONPATH $(VPY) -m fused_conv info; \
		env -u PYTHONPATH $(VPY) -m pytest -p no:cacheprovider --import-mode=importlib tests
	$(call step,done)

clean:
	rm -rf build dist wheelhouse *.egg-info .pytest_cache .ruff_cache
	rm -f fused_conv/_C*.so fused_conv/_build_info.json
	find $(wildcard fused_conv tests benchmarks) -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
