#!/usr/bin/env bash
# Create ./.venv (if needed) and install sai-hf with its test extras into it.
# torch is installed first and pinned (TORCH_SPEC), so pip never replaces it with a
# multi-GB CUDA build on a CPU-only machine. Override, e.g. TORCH_SPEC="torch" on a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-dev}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -e ".[${EXTRAS}]"
"$PY" -c "import torch, transformers, sai_hf; print(f'sai-hf {sai_hf.__version__} | torch {torch.__version__} | transformers {transformers.__version__}')"
touch "$VENV/.sai_hf_installed"
