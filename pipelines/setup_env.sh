#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the toolkit into it.
# Usage: bash pipelines/setup_env.sh      (VENV=path to use another folder)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.d3code-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing d3code and its dependencies (torch, diffusers, img2dataset, ...)"
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
