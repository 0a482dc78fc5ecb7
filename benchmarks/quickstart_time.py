"""End-to-end time of `mess-ray quickstart` on a folder of generated recordings.

    nice -n 10 .venv/bin/python -m benchmarks.quickstart_time --minutes 30

Writes ``--minutes`` of audio as 60 s files (a third each WAV, FLAC and MP3, 44.1 kHz stereo
like a user's folder) with a manifest.csv (composer/title/performer), then times
``mess-ray quickstart --audio DIR --exit-after-ready`` as a subprocess, from launch to the
page answering, and prints the 1-minute load average beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def performance(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A seeded 'performance': decaying harmonic notes with its own tempo, rubato and dynamics."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    out = np.zeros(n, dtype=np.float32)
    tempo = rng.uniform(1.5, 5.0)  # notes per second
    t, i = 0.0, 0
    while t < seconds:
        dur = (1 / tempo) * (1 + 0.3 * np.sin(i / 5.0) * rng.uniform(0.2, 1.0))
        start = int(t * rate)
        length = min(n - start, int(rate * dur * rng.uniform(0.4, 1.4)))
        if length > 0:
            tt = np.arange(length) / rate
            freq = 110 * 2 ** (rng.integers(0, 36) / 12)
            level = 0.15 + 0.35 * (0.5 + 0.5 * np.sin(t / seconds * 6.28 * rng.uniform(0.5, 2)))
            tone = sum(np.sin(2 * np.pi * freq * h * tt) / h for h in (1, 2, 3, 4))
            out[start : start + length] += (level * tone * np.exp(-2.5 * tt)).astype(np.float32)
        t += dur
        i += 1
    return np.clip(out, -1, 1)


def write_folder(folder: Path, minutes: float, file_s: float = 60.0, rate: int = 44100) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, round(minutes * 60 / file_s))
    rows = []
    for i in range(count):
        audio = performance(file_s, rate, i)
        stereo = np.stack([audio, 0.9 * audio], axis=1)
        kind = ("wav", "flac", "mp3")[i % 3]
        path = folder / f"take_{i:03d}.{kind}"
        if kind == "mp3":
            wav = path.with_suffix(".src.wav")
            sf.write(wav, stereo, rate)
            subprocess.run(
                ["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-b:a", "128k", str(path)],
                check=True,
            )
            wav.unlink()
        else:
            sf.write(path, stereo, rate)
        rows.append(
            {
                "path": path.name,
                "composer": ("Bach", "Chopin", "Satie")[i % 3],
                "title": f"Study {i}",
                "performer": ("Ann", "Bo", "Cy", "Di")[i % 4],
            }
        )
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--model", default="shipped", help="model ref (default: the shipped default)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mess-ray-quickstart-") as tmp:
        folder = Path(tmp) / "recordings"
        t0 = time.monotonic()
        files = write_folder(folder, args.minutes)
        gen_s = time.monotonic() - t0
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
        cmd = [
            str(ROOT / ".venv" / "bin" / "mess-ray"),
            "quickstart",
            "--audio",
            str(folder),
            "--exit-after-ready",
            "--model",
            args.model,
            "--set",
            f"storage.root={tmp}/store",
            "--set",
            f"serve.port={args.port}",
        ]
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.monotonic() - t0
        load_after = os.getloadavg()[0]
        print(proc.stdout)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        result = {
            "model": args.model,
            "audio_minutes": args.minutes,
            "files": files,
            "generate_s": round(gen_s, 1),
            "quickstart_wall_s": round(wall, 1),
            "load_1min_before": round(load_before, 2),
            "load_1min_after": round(load_after, 2),
            "cpus": os.cpu_count(),
            "stdout_lines": len(proc.stdout.splitlines()),
        }
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
