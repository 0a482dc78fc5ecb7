#!/usr/bin/env bash
# Idempotent setup: Debian packages (FluidSynth + a GM SoundFont), a venv with the pinned
# environment (requirements.lock) and the package itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# The SoundFonts of the recording chains (mess_ray/render/chains.py): FluidR3_GM and TimGM6mb
# on the training side, MuseScore_General_Lite for evaluation only. ffmpeg writes the MP3 files
# of the tests and of benchmarks/quickstart_time.py (ingest itself decodes without it).
if ! command -v fluidsynth >/dev/null || ! command -v ffmpeg >/dev/null \
  || [ ! -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ] \
  || [ ! -f /usr/share/sounds/sf2/TimGM6mb.sf2 ] \
  || [ ! -f /usr/share/sounds/sf3/MuseScore_General_Lite.sf3 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    fluidsynth fluid-soundfont-gm timgm6mb-soundfont musescore-general-soundfont-small ffmpeg \
    >/dev/null
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# Reinstall only when the lock file changed since the last setup.
stamp=".venv/.requirements.sha256"
want="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 in the lock is the CPU build on CPU machines (see README for GPU nodes).
  .venv/bin/python -m pip install -q -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
