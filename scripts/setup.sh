#!/usr/bin/env bash
# Create ./.venv (if needed) and install sai-hf with its test extras into it.
# torch is installed first and pinned (TORCH_SPEC), so pip never replaces it with a
# multi-GB CUDA build on a CPU-only machine. Override, e.g. TORCH_SPEC="torch" on a GPU box.
#
# pip's own chatter (progress, build-backend notices such as setuptools' "Editable installation")
# goes to $VENV/pip-install.log instead of the terminal. A failing pip step prints its whole output
# and stops the script with pip's exit status; ERROR lines of a successful step (e.g. dependency
# conflicts) are still shown. VERBOSE=1 shows everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-dev}"
VERBOSE="${VERBOSE:-0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
LOG="$VENV/pip-install.log"
: >"$LOG"

pip_step() {  # pip_step DESCRIPTION PIP-ARGS...: run pip quietly, loudly on failure
  local what="$1" status=0
  shift
  echo "setup: $what"
  if [ "$VERBOSE" = "1" ]; then
    "$PY" -m pip "$@" 2>&1 | tee -a "$LOG"
    return
  fi
  local out
  out="$(mktemp)"
  "$PY" -m pip "$@" >"$out" 2>&1 || status=$?
  cat "$out" >>"$LOG"
  if [ "$status" -ne 0 ]; then
    cat "$out" >&2
    rm -f "$out"
    echo "setup: error: 'pip $*' failed with exit status $status (output above, also in $LOG)" >&2
    exit "$status"
  fi
  grep -E '^ERROR' "$out" >&2 || true
  rm -f "$out"
}

pip_step "upgrading pip (details in $LOG)" install --disable-pip-version-check --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_step "installing $TORCH_SPEC (a few minutes the first time)" install --disable-pip-version-check "$TORCH_SPEC"
fi
pip_step "installing sai-hf[$EXTRAS] and its dependencies" install --disable-pip-version-check -e ".[${EXTRAS}]"
"$PY" -c "import torch, transformers, sai_hf; print(f'setup: done: sai-hf {sai_hf.__version__} | torch {torch.__version__} | transformers {transformers.__version__} in $VENV')"
touch "$VENV/.sai_hf_installed"
