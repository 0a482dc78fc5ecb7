#!/usr/bin/env bash
# Set up (if needed) and run the whole pipeline on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mess-ray demo "$@"
