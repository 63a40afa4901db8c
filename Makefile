# The two commands README gives:
#   make run    set up, then run the main job (the tiny CPU fine-tune)
#   make test   set up, then lint, type-check, build the docs and run the tests
#
# Set-up installs into .venv. Without an NVIDIA GPU it installs a CPU build of torch first, so
# pip never pulls torch's multi-GB CUDA build; on other machines point TORCH_INDEX at the
# CPU wheel index (https://download.pytorch.org/whl/cpu). With a GPU it leaves torch's choice
# to pip (or to the torch you install beforehand).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup run test lint typecheck docs pytest test-lowest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: leaving the torch build to pip"; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install --disable-pip-version-check -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev,docs]"
	@touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/lightning-paged fit --config examples/tiny_cpu.yaml

lint: setup
	$(BIN)/ruff check lightning_paged tests bench examples
	$(BIN)/ruff format --check lightning_paged tests bench examples

typecheck: setup
	$(BIN)/mypy lightning_paged

docs: setup
	$(BIN)/mkdocs build --strict --site-dir build/site

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck docs pytest

# The lowest supported versions (.ci/lowest.txt, torch $(LOWEST_TORCH) CPU) in their own venv, on
# the tests that need no multi-process launch. Not part of `make test`: it downloads about 1 GB.
LOWEST_VENV ?= .venv-lowest
LOWEST_TORCH ?= 2.6.0
LOWEST_TESTS ?= tests/core tests/compat tests/test_architecture.py tests/lightning/test_strategies.py

test-lowest:
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install --disable-pip-version-check -q "torch==$(LOWEST_TORCH)" \
		--index-url $(or $(TORCH_INDEX),https://download.pytorch.org/whl/cpu)
	$(LOWEST_VENV)/bin/pip install --disable-pip-version-check -q -c .ci/lowest.txt -e ".[dev]"
	$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow and not requires_cuda" \
		-k "not read_from_is_the_installed_version" $(LOWEST_TESTS)

bench: setup
	$(BIN)/python bench/strategy_overhead.py
	$(BIN)/python bench/vs_transformers_trainer.py
	$(BIN)/python bench/memory_truth.py
	$(BIN)/python bench/monitor_overhead.py
	$(BIN)/python bench/paging_coverage.py

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build site .pytest_cache .mypy_cache .ruff_cache
