"""Peak memory of ingesting one file, measured in a fresh process, to show it stays flat.

:func:`measure_peak_memory` runs ``python -m mess_ray.ingest.memory`` on one file, so the peak
resident set size (``ru_maxrss``) belongs to that file alone, and reports it with the
``tracemalloc`` peak (Python and NumPy allocations). Mode ``"stream"`` is the worker path
(:func:`mess_ray.ingest.job.ingest_file`: block decoding, soxr stream resampling, segmenting,
and writing the segments to a Parquet shard in ~16 MiB row groups, in a temporary folder); ``"whole_file"`` is the naive reading of the
whole file followed by ``soxr.resample``, for comparison. :func:`write_long_wav` generates long
test recordings block by block, so the generator itself stays small.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

MODES = ("stream", "whole_file")


def write_long_wav(
    path: str | Path,
    seconds: float,
    rate: int = 44100,
    channels: int = 2,
    block_s: float = 10.0,
    seed: int = 0,
) -> Path:
    """A PCM-16 WAV of piano-like decaying partials plus noise, written ``block_s`` at a time."""
    if seconds <= 0 or rate <= 0 or channels <= 0:
        raise ValueError(f"need positive seconds/rate/channels, got {seconds}, {rate}, {channels}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = round(seconds * rate)
    block = max(1, round(block_s * rate))
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=channels, subtype="PCM_16") as out:
        for start in range(0, total, block):
            t = np.arange(start, min(total, start + block)) / rate
            note = 110.0 * 2 ** ((np.floor(t * 2) % 24) / 12)  # a new note every 0.5 s
            envelope = np.exp(-3.0 * (t % 0.5))
            mono = (
                0.3 * envelope * (np.sin(2 * np.pi * note * t) + 0.3 * np.sin(4 * np.pi * note * t))
            )
            frames = np.stack([mono * (0.8 + 0.2 * c / channels) for c in range(channels)], axis=1)
            frames += 0.005 * rng.standard_normal(frames.shape)
            out.write(frames.astype(np.float32))
    return path


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run_in_process(
    uri: str, mode: str, sample_rate: int, window_s: float, hop_s: float, read_block_s: float
) -> dict[str, Any]:
    """Ingest ``uri`` here, discarding the output; peak memory, audio seconds and wall time."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rss_before = _peak_rss_bytes()
    tracemalloc.start()
    began = time.perf_counter()
    if mode == "stream":
        import tempfile

        from mess_ray.ingest.job import ShardWriter, ingest_file
        from mess_ray.storage import Storage

        row = {
            "source_uri": uri,
            "track_id": "probe",
            "piece_id": "",
            "style": "",
            "metadata_json": "{}",
            "size": -1,
            "fingerprint": "",
        }
        settings = {
            "sample_rate": sample_rate,
            "window_s": window_s,
            "hop_s": hop_s,
            "min_duration_s": 0.0,
        }
        with tempfile.TemporaryDirectory(prefix="ingest_probe_") as scratch:
            writer = ShardWriter(Storage(scratch), "segments/part-probe.parquet")
            status = ingest_file(row, settings, read_block_s, None, writer)
        segments = int(status["num_segments"])
        if status.get("status") != "segmented":
            raise ValueError(
                f"{uri} was not segmented: {status.get('reason')}: {status.get('detail')}"
            )
        seconds = float(status["duration_s"])
    else:
        import soxr

        from mess_ray.segments import mix_to_mono

        data, rate = sf.read(uri, dtype="float32", always_2d=True)
        mono = mix_to_mono(data)
        resampled = soxr.resample(mono, rate, sample_rate, quality="HQ")
        seconds, segments = len(data) / rate, 0
        del data, mono, resampled
    wall = time.perf_counter() - began
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "mode": mode,
        "seconds_audio": round(seconds, 3),
        "segments": segments,
        "wall_s": round(wall, 3),
        "tracemalloc_peak_mib": round(traced_peak / 2**20, 2),
        "rss_peak_mib": round(_peak_rss_bytes() / 2**20, 1),
        "rss_baseline_mib": round(rss_before / 2**20, 1),
    }


def measure_peak_memory(
    uri: str,
    mode: str = "stream",
    sample_rate: int = 16000,
    window_s: float = 4.0,
    hop_s: float = 2.0,
    read_block_s: float = 30.0,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """:func:`run_in_process` in a fresh Python process (so ``rss_peak_mib`` is this file's alone)."""
    args = json.dumps(
        {
            "uri": uri,
            "mode": mode,
            "sample_rate": sample_rate,
            "window_s": window_s,
            "hop_s": hop_s,
            "read_block_s": read_block_s,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mess_ray.ingest.memory", args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_in_process(**json.loads(sys.argv[1]))))
