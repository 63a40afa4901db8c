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

.PHONY: setup run test lint typecheck docs pytest bench clean

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

bench: setup
	$(BIN)/python bench/strategy_overhead.py
	$(BIN)/python bench/vs_transformers_trainer.py
	$(BIN)/python bench/memory_truth.py
	$(BIN)/python bench/monitor_overhead.py
	$(BIN)/python bench/paging_coverage.py

clean:
	rm -rf $(VENV) build site .pytest_cache .mypy_cache .ruff_cache
