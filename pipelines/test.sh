#!/usr/bin/env bash
# Run the whole test suite, slow end-to-end tests included, in the project's virtual environment.
# Usage: bash pipelines/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup_env.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest -p no:cacheprovider --timeout 900 "$@"
