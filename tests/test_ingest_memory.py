"""Bounded memory: peak memory of ingesting a file stays flat as the file gets 4x longer."""

from __future__ import annotations

import pytest
import soundfile as sf

from mess_ray.ingest.memory import measure_peak_memory, run_in_process, write_long_wav


def test_write_long_wav(tmp_path):
    path = write_long_wav(tmp_path / "x.wav", 2.5, rate=8000, channels=3, block_s=1.0)
    info = sf.info(str(path))
    assert (info.frames, info.samplerate, info.channels) == (20000, 8000, 3)
    with pytest.raises(ValueError):
        write_long_wav(tmp_path / "y.wav", 0)


def test_run_in_process_counts_segments(tmp_path):
    path = write_long_wav(tmp_path / "x.wav", 10.0, rate=22050)
    stats = run_in_process(str(path), "stream", 16000, window_s=4.0, hop_s=2.0, read_block_s=1.5)
    assert stats["seconds_audio"] == pytest.approx(10.0) and stats["segments"] == 4  # 0, 2, 4, 6 s
    with pytest.raises(ValueError, match="mode"):
        run_in_process(str(path), "mmap", 16000, 4.0, 2.0, 1.5)


@pytest.mark.slow
def test_peak_memory_is_flat_in_file_length(tmp_path):
    """4 min vs 16 min of 44.1 kHz stereo: streaming peak grows by < 12 MiB, while the
    whole-file reading of the long file needs the ~160 MiB of float32 frames it holds."""
    short = write_long_wav(tmp_path / "short.wav", 240.0)
    long = write_long_wav(tmp_path / "long.wav", 960.0)
    kw = dict(sample_rate=16000, window_s=4.0, hop_s=2.0, read_block_s=5.0)
    short_m, long_m = measure_peak_memory(str(short), **kw), measure_peak_memory(str(long), **kw)
    assert long_m["seconds_audio"] == pytest.approx(960.0) and long_m["segments"] == 479
    assert long_m["tracemalloc_peak_mib"] - short_m["tracemalloc_peak_mib"] < 4
    assert long_m["rss_peak_mib"] - short_m["rss_peak_mib"] < 12
    whole = measure_peak_memory(str(long), mode="whole_file", **kw)
    frames_mib = 960.0 * 44100 * 2 * 4 / 2**20
    assert whole["tracemalloc_peak_mib"] > frames_mib > 4 * long_m["tracemalloc_peak_mib"]
