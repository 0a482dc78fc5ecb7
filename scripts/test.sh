#!/usr/bin/env bash
# Set up (if needed) and run the test suite (no GPU, no ../shared, loopback only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
