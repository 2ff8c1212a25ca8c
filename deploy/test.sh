#!/usr/bin/env bash
# The test command: install (idempotent), then ruff, mypy (strict), the fast unit tests,
# and the integration tests that start real Redis, Ray and vLLM CPU engines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
export HF_HUB_OFFLINE=1
V=.venv/bin
echo "==> ruff";   "$V/ruff" check . && "$V/ruff" format --check .
echo "==> mypy";   "$V/mypy"
echo "==> unit tests";        "$V/python" -m pytest -m "not integration" -q -p no:cacheprovider
echo "==> integration tests"; "$V/python" -m pytest -m integration -q -p no:cacheprovider --durations=15
