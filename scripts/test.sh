#!/usr/bin/env bash
# Set up (if needed) and run the test suite (no GPU, no ../shared, loopback only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Tests only: ffmpeg writes MP3 fixtures with a Xing header (declared length), which
# libsndfile cannot; the package itself never calls ffmpeg. chromium + chromium-driver run the
# web page test in headless Chromium (Selenium uses this chromedriver; nothing is downloaded).
if ! command -v ffmpeg >/dev/null || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    ffmpeg chromium chromium-driver >/dev/null
fi
# Lint and format first: CI fails on either (ruff is pinned in requirements.lock).
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
exec .venv/bin/python -m pytest -q "$@"
