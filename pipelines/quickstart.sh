#!/usr/bin/env bash
# The main job end to end on the embedded default, on a CPU: builds a tiny D3 (real photos served
# on 127.0.0.1, four tiny generators), trains CoDE for a few minutes, evaluates it, prints the table.
# Usage: bash pipelines/quickstart.sh [--output-root DIR] [--train-steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup_env.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" pipelines/quickstart.py "$@"
