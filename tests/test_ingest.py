"""Ingest: segment bounds, ids, block decoding, reject classification, Ray runs (local + S3)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from mess_ray.config import MessRayConfig
from mess_ray.ingest import job as ingest_job
from mess_ray.ingest.catalog import (
    build_catalog,
    catalog_from_folder,
    catalog_from_manifest,
    catalog_from_render,
    resolve_catalog_kind,
)
from mess_ray.ingest.decode import RejectError, decode_stream, sniff, wav_truncation
from mess_ray.ingest.job import ShardWriter, ingest_file, ingest_row, run_ingest
from mess_ray.ingest.segment import Segmenter, segment_blocks, segment_track, window_starts
from mess_ray.segments import SEGMENT_SCHEMA, decode_audio, read_segment_table, segment_id
from mess_ray.storage import Storage

SR = 16000


def tone(
    seconds: float, rate: int, channels: int = 1, freq: float = 440.0, seed: int = 0
) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    cols = [
        0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) + 0.01 * rng.standard_normal(len(t))
        for c in range(channels)
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def write_audio(path: Path, seconds: float, rate: int = SR, channels: int = 1, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, rate, channels), rate, **kw)
    return path


def cfg_for(root: str, source: str | None = None, **ingest) -> MessRayConfig:
    cfg = MessRayConfig.model_validate(
        {
            "storage": {"root": root},
            "audio": {"sample_rate": SR, "window_s": 2.0, "hop_s": 1.0, "min_duration_s": 0.5},
            "ingest": {"source": source, "read_block_s": 0.7, **ingest},
        }
    )
    return cfg


# -- segmentation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "total,window,hop,expected",
    [
        (10, 4, 2, [0, 2, 4, 6]),  # grid reaches the end exactly
        (11, 4, 2, [0, 2, 4, 6, 7]),  # final window [total - window, total]
        (3, 4, 2, [0]),  # shorter than one window: one short segment
        (4, 4, 4, [0]),
        (9, 4, 4, [0, 4, 5]),
        (0, 4, 2, []),
    ],
)
def test_window_starts(total, window, hop, expected):
    assert window_starts(total, window, hop) == expected


def test_window_starts_rejects_bad_hop():
    with pytest.raises(ValueError):
        window_starts(10, 2, 3)


@pytest.mark.parametrize("total", [1, 7, 31, 32, 33, 100, 257])
@pytest.mark.parametrize("block", [1, 5, 64])
def test_segmenter_matches_reference_and_content(total, block):
    window, hop = 32, 12
    signal = np.arange(total, dtype=np.float32)
    blocks = [signal[i : i + block] for i in range(0, total, block)]
    cuts = list(segment_blocks(blocks, window, hop))
    assert [c.start_sample for c in cuts] == window_starts(total, window, hop)
    for c in cuts:
        np.testing.assert_array_equal(c.samples, signal[c.start_sample : c.start_sample + window])
    assert cuts[-1].start_sample + len(cuts[-1].samples) == total  # ends exactly at the track end


def test_segmenter_memory_is_bounded():
    seg = Segmenter(window=100, hop=50)
    for _ in range(200):
        seg.push(np.zeros(37, dtype=np.float32))
        assert len(seg._buffer) <= 100 + 37
    assert seg.total == 200 * 37


# -- decoding ------------------------------------------------------------------------------
def test_block_decoding_equals_whole_file(tmp_path):
    rate = 44100
    path = write_audio(tmp_path / "a.wav", 3.3, rate=rate, channels=2, subtype="FLOAT")
    whole = sf.read(str(path), dtype="float32")[0].mean(axis=1)
    reference = soxr.resample(whole, rate, SR, quality="HQ")
    stats: dict = {}
    streamed = np.concatenate(list(decode_stream(str(path), SR, read_block_s=0.25, stats=stats)))
    assert len(streamed) == round(len(whole) * SR / rate)
    assert abs(len(reference) - len(streamed)) <= 1
    n = min(len(reference), len(streamed))
    assert np.max(np.abs(reference[:n] - streamed[:n])) < 1e-3
    assert stats["duration_s"] == pytest.approx(3.3, abs=1e-4)


def test_multichannel_96k_is_mixed_and_resampled_without_normalising(tmp_path):
    rate = 96000
    data = tone(2.5, rate, channels=4) * 0.1  # quiet: must stay quiet
    path = tmp_path / "quad.wav"
    sf.write(str(path), data, rate, subtype="PCM_24")
    out = np.concatenate(list(decode_stream(str(path), SR, read_block_s=0.3)))
    assert len(out) == round(len(data) * SR / rate)
    assert abs(np.sqrt(np.mean(out**2)) - np.sqrt(np.mean(data.mean(axis=1) ** 2))) < 2e-3
    assert np.max(np.abs(out)) < 0.2


def test_segment_track_rows_bounds_and_stable_ids(tmp_path):
    path = write_audio(tmp_path / "t.flac", 5.3, rate=22050)
    row = {
        "source_uri": str(path),
        "track_id": "t",
        "piece_id": "p",
        "style": "s",
        "metadata_json": "{}",
    }
    kw = dict(sample_rate=SR, window_s=2.0, hop_s=1.0, read_block_s=0.5)
    first = list(segment_track(row, **kw))
    second = list(segment_track(row, **kw))
    assert [r["segment_id"] for r in first] == [r["segment_id"] for r in second]
    total = round(5.3 * 22050 * SR / 22050)
    assert [r["start_sample"] for r in first] == window_starts(total, 2 * SR, SR)
    assert first[-1]["end_s"] == pytest.approx(5.3, abs=1 / SR)
    assert all(r["segment_id"] == segment_id("t", r["start_sample"]) for r in first)
    assert all(len(decode_audio(r["audio"])) == r["num_samples"] == 2 * SR for r in first)


def test_short_track_gives_one_short_segment(tmp_path):
    path = write_audio(tmp_path / "s.wav", 0.8)
    row = {"source_uri": str(path), "track_id": "s"}
    rows = list(segment_track(row, SR, 2.0, 1.0, 0.5, min_duration_s=0.5))
    assert len(rows) == 1 and rows[0]["start_s"] == 0.0 and rows[0]["end_s"] == pytest.approx(0.8)
    with pytest.raises(RejectError) as err:
        list(segment_track(row, SR, 2.0, 1.0, 0.5, min_duration_s=1.0))
    assert err.value.reason == "too_short"


def test_sniff_and_wav_header_check():
    assert sniff(b"RIFF....WAVE")[0] == "audio"
    assert sniff(b"MThd\x00\x00")[0] == "other"
    assert sniff("héllo, world\n".encode())[0] == "text"
    assert sniff(bytes([0, 1, 2, 250, 7]))[0] == "unknown"
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1000, dtype=np.float32), SR, format="WAV", subtype="PCM_16")
    data = buf.getvalue()
    assert wav_truncation(data, len(data)) is None
    assert "declares" in wav_truncation(data[:600], 600)


def make_fixture_folder(folder: Path) -> dict[str, str | None]:
    """Files of every kind; returns track id -> expected reject reason (None: segmented)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    write_audio(folder / "good" / "wav16.wav", 3.5)
    expected["good/wav16"] = None
    write_audio(folder / "good" / "quad96k.wav", 2.2, rate=96000, channels=4, subtype="PCM_24")
    expected["good/quad96k"] = None
    write_audio(folder / "good" / "flac.flac", 2.5, rate=44100, channels=2)
    expected["good/flac"] = None
    write_audio(folder / "good" / "ogg.ogg", 2.5, rate=48000, channels=2)
    expected["good/ogg"] = None
    write_audio(folder / "good" / "mp3.mp3", 3.0, rate=44100, channels=2)
    expected["good/mp3"] = None
    write_audio(folder / "good" / "short.wav", 0.7)
    expected["good/short"] = None
    rng = np.random.default_rng(1)
    (folder / "bad").mkdir()
    (folder / "bad" / "corrupt.wav").write_bytes(
        rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    )
    expected["bad/corrupt"] = "unreadable"
    full = (write_audio(folder / "tmp.wav", 2.0)).read_bytes()
    (folder / "tmp.wav").unlink()
    (folder / "bad" / "truncated.wav").write_bytes(full[: len(full) // 2])
    expected["bad/truncated"] = "truncated"
    (folder / "bad" / "empty.wav").write_bytes(b"")
    expected["bad/empty"] = "zero_length"
    (folder / "bad" / "notes.txt").write_text("not audio at all\n" * 20)
    expected["bad/notes"] = "not_audio"
    sf.write(str(folder / "bad" / "one_sample.wav"), np.zeros(1, dtype=np.float32), SR)
    expected["bad/one_sample"] = "too_short"
    sf.write(str(folder / "bad" / "no_frames.wav"), np.zeros(0, dtype=np.float32), SR)
    expected["bad/no_frames"] = "zero_length"
    # Cut off mid-stream: segments are produced before the truncation shows, and must be dropped.
    mp3 = make_mp3(folder / "tmp.mp3", 5.0)
    (folder / "bad" / "cut.mp3").write_bytes(mp3.read_bytes()[: mp3.stat().st_size * 2 // 3])
    mp3.unlink()
    expected["bad/cut"] = "truncated"
    return expected


def make_mp3(path: Path, seconds: float) -> Path:
    """An MP3 with a Xing/Info header (ffmpeg), so that its length is declared."""
    wav = write_audio(path.with_suffix(".src.wav"), seconds, rate=44100)
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-b:a", "128k", str(path)],
        check=True,
    )
    wav.unlink()
    return path


def test_every_fixture_file_is_classified(tmp_path):
    expected = make_fixture_folder(tmp_path / "in")
    rows = catalog_from_folder(str(tmp_path / "in"))
    assert {r["track_id"] for r in rows} == set(expected)
    for row in rows:
        try:
            segs = list(segment_track(row, SR, 2.0, 1.0, 0.5, min_duration_s=0.5))
            got = None
            assert segs and segs[-1]["end_s"] > 0.5
        except RejectError as err:
            got = err.reason
            assert err.detail
        assert got == expected[row["track_id"]], (row["track_id"], got)


def test_truncated_mp3_from_ffmpeg_is_rejected(tmp_path):
    mp3 = make_mp3(tmp_path / "x.mp3", 4.0)
    row = {"source_uri": str(mp3), "track_id": "x"}
    assert len(list(segment_track(row, SR, 2.0, 1.0, 0.5))) >= 3  # ffmpeg's MP3 decodes whole
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(mp3.read_bytes()[: mp3.stat().st_size // 2])
    with pytest.raises(RejectError) as err:
        list(segment_track({"source_uri": str(cut), "track_id": "c"}, SR, 2.0, 1.0, 0.5))
    assert err.value.reason == "truncated"


def reference_segments(rows: list[dict], cfg: MessRayConfig) -> pa.Table:
    """The segment table computed without Ray or writing: segment_track on every file that it
    does not reject, sorted by segment id."""
    out = []
    for row in rows:
        try:
            out += list(
                segment_track(
                    row,
                    cfg.audio.sample_rate,
                    cfg.audio.window_s,
                    cfg.audio.hop_s,
                    cfg.ingest.read_block_s,
                    cfg.audio.min_duration_s,
                )
            )
        except RejectError:
            continue
    return pa.Table.from_pylist(out, schema=SEGMENT_SCHEMA).sort_by("segment_id")


def test_one_pass_writer_streams_row_groups_and_removes_a_track_cut_mid_stream(
    tmp_path, monkeypatch
):
    """Tiny row groups: the shard is opened and written segment by segment, so a file whose
    truncation shows only after segments were written must have its shard removed."""
    monkeypatch.setattr(ingest_job, "OUTPUT_BATCH_BYTES", 1)
    folder = tmp_path / "in"
    write_audio(folder / "good.wav", 6.0, rate=44100, channels=2)
    mp3 = make_mp3(tmp_path / "whole.mp3", 5.0)
    (folder / "cut.mp3").write_bytes(mp3.read_bytes()[: mp3.stat().st_size * 2 // 3])
    cfg = cfg_for(str(tmp_path / "store"), str(folder))
    storage = Storage(cfg.storage.root)
    rows = {
        r["track_id"]: {**r, "fingerprint": r["track_id"]} for r in catalog_from_folder(str(folder))
    }
    settings = ingest_job.segmentation_settings(cfg)

    cut = ingest_row(rows["cut"], settings, 0.7, None, storage, "segs")
    assert (cut["status"], cut["reason"], cut["num_segments"]) == ("rejected", "truncated", 0)
    assert not storage.exists("segs/part-cut.parquet")

    good = ingest_row(rows["good"], settings, 0.7, None, storage, "segs")
    shard = pq.ParquetFile(storage.open("segs/part-good.parquet"))
    assert good["status"] == "segmented" and good["duration_s"] == pytest.approx(6.0)
    assert shard.metadata.num_rows == good["num_segments"] == shard.num_row_groups == 5
    written = shard.read().sort_by("segment_id")
    assert written.equals(reference_segments([rows["good"]], cfg))

    # Without a destination (the single-process baseline) nothing is written.
    status = ingest_file(rows["good"], settings, 0.7, None, ShardWriter(None, None))
    assert status["num_segments"] == 5 and storage.listdir("segs") == ["part-good.parquet"]


def test_segment_shards_store_audio_plain_and_metadata_with_statistics(tmp_path):
    """The audio column (float32 PCM, incompressible) is written without compression,
    dictionary or statistics, which only cost CPU; the metadata columns keep Snappy and their
    min/max statistics; the samples read back bit for bit."""
    write_audio(tmp_path / "in" / "a.wav", 5.0, rate=44100, channels=2)
    cfg = cfg_for(str(tmp_path / "store"), str(tmp_path / "in"))
    storage = Storage(cfg.storage.root)
    (row,) = catalog_from_folder(str(tmp_path / "in"))
    row = {**row, "fingerprint": "a"}
    status = ingest_row(row, ingest_job.segmentation_settings(cfg), 0.7, None, storage, "segs")
    shard = pq.ParquetFile(storage.open("segs/part-a.parquet"))
    group = shard.metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    audio = columns["audio"]
    assert audio.compression == "UNCOMPRESSED" and audio.statistics is None
    assert not any("DICTIONARY" in encoding for encoding in audio.encodings)
    start = columns["start_s"]
    assert start.compression == "SNAPPY" and start.statistics.has_min_max
    written = shard.read().sort_by("segment_id")
    assert status["num_segments"] == written.num_rows
    assert written.equals(reference_segments([row], cfg))


# -- catalogs ------------------------------------------------------------------------------
def test_catalog_kinds_and_manifest(tmp_path):
    assert resolve_catalog_kind(None, "auto") == "render"
    assert resolve_catalog_kind("s3://b/list.csv", "auto") == "manifest"
    assert resolve_catalog_kind("/data/audio", "auto") == "folder"
    with pytest.raises(ValueError):
        resolve_catalog_kind(None, "folder")
    write_audio(tmp_path / "a" / "x.wav", 1.0)
    write_audio(tmp_path / "a" / "x.flac", 1.0)
    ids = {r["track_id"] for r in catalog_from_folder(str(tmp_path / "a"))}
    assert ids == {"x.wav", "x.flac"}  # colliding stems keep their extension
    (tmp_path / "list.csv").write_text(
        "path,piece_id,performer\na/x.wav,007,Ann\na/missing.wav,,Bob\n"
    )
    rows = catalog_from_manifest(str(tmp_path / "list.csv"))
    assert rows[0]["piece_id"] == "007" and json.loads(rows[0]["metadata_json"]) == {
        "performer": "Ann"
    }
    assert rows[0]["source_uri"] == str(tmp_path / "a" / "x.wav") and rows[0]["size"] > 0
    assert rows[1]["track_id"] == "a/missing" and rows[1]["size"] == -1
    (tmp_path / "dup.csv").write_text("path,track_id\na/x.wav,t\na/x.flac,t\n")
    with pytest.raises(ValueError, match="unique"):
        catalog_from_manifest(str(tmp_path / "dup.csv"))
    with pytest.raises(ValueError, match="path"):
        (tmp_path / "nopath.csv").write_text("file\nx\n")
        catalog_from_manifest(str(tmp_path / "nopath.csv"))


def test_render_catalog(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    write_audio(Path(storage.path("render", "v1", "audio", "p1__romantic.wav")), 1.0)
    table = pa.table(
        {
            "track_id": ["p1__romantic"],
            "path": ["audio/p1__romantic.wav"],
            "piece_id": ["p1"],
            "composer": ["bach"],
            "title": ["x"],
            "style": ["romantic"],
            "style_params_json": ["{}"],
            "seed": [3],
            "duration_s": [1.0],
            "sample_rate": [SR],
            "source": ["music21"],
        }
    )
    with storage.open("render/v1/catalog.parquet", "wb") as f:
        pq.write_table(table, f)
    storage.publish("render", "v1", {"counts": {}})
    rows, version = catalog_from_render(storage)
    assert version == "v1" and rows[0]["source_uri"] == storage.url(
        "render", "v1", "audio/p1__romantic.wav"
    )
    meta = json.loads(rows[0]["metadata_json"])
    assert meta["composer"] == "bach" and meta["seed"] == 3 and rows[0]["style"] == "romantic"
    assert rows[0]["size"] > 0
    rows2, source = build_catalog(cfg_for(storage.root), storage)
    assert source["render"] == "v1" and rows2 == rows


# -- Ray integration -----------------------------------------------------------------------
def _check_run(manifest: dict, storage: Storage, expected: dict[str, str | None]) -> pa.Table:
    counts = manifest["counts"]
    assert (
        counts["files_in"] == len(expected) == counts["files_segmented"] + counts["files_rejected"]
    )
    table = read_segment_table(storage, manifest["version"])
    assert table.num_rows == counts["segments"]
    assert set(table["track_id"].to_pylist()) == {t for t, r in expected.items() if r is None}
    rejects = pq.read_table(storage.open(f"ingest/{manifest['version']}/rejects.parquet"))
    assert dict(zip(rejects["track_id"].to_pylist(), rejects["reason"].to_pylist())) == {
        t: r for t, r in expected.items() if r is not None
    }
    want = {}
    for r in expected.values():
        if r is not None:
            want[r] = want.get(r, 0) + 1
    assert counts["rejects_by_reason"] == want
    assert len(set(table["segment_id"].to_pylist())) == table.num_rows
    return table


def test_ray_ingest_local_folder_and_incremental(ray_local, tmp_path):
    expected = make_fixture_folder(tmp_path / "in")
    storage = Storage(str(tmp_path / "store"))
    cfg = cfg_for(storage.root, str(tmp_path / "in"))
    first = run_ingest(cfg, storage)
    table = _check_run(first, storage, expected)
    # One pass, same rows: every column of every segment equals the Ray-free segmenter's
    # output, and each segmented file has exactly one shard (rejected ones none).
    rows, _ = build_catalog(cfg, storage)
    written = read_segment_table(storage, first["version"], columns=SEGMENT_SCHEMA.names)
    assert written.equals(reference_segments(rows, cfg))
    files = pq.read_table(storage.open(f"ingest/{first['version']}/files.parquet")).to_pylist()
    assert sorted(storage.listdir(f"ingest/{first['version']}/segments")) == sorted(
        f"part-{f['fingerprint']}.parquet" for f in files if f["status"] == "segmented"
    )
    assert first["counts"]["files_decoded"] == len(expected)
    assert first["inputs"]["source"] == str(tmp_path / "in")
    # The last segment of every track ends at the track end.
    full = read_segment_table(
        storage, first["version"], columns=["track_id", "end_s", "num_samples", "audio"]
    )
    ends = {}
    for t, e in zip(full["track_id"].to_pylist(), full["end_s"].to_pylist()):
        ends[t] = max(ends.get(t, 0.0), e)
    assert ends["good/wav16"] == pytest.approx(3.5) and ends["good/short"] == pytest.approx(0.7)
    assert all(
        len(a) == 4 * n for a, n in zip(full["audio"].to_pylist(), full["num_samples"].to_pylist())
    )

    # Incremental: one new file, one removed, one changed; the rest is carried over unchanged.
    write_audio(tmp_path / "in" / "good" / "new.wav", 2.0)
    (tmp_path / "in" / "bad" / "notes.txt").unlink()
    write_audio(tmp_path / "in" / "good" / "wav16.wav", 4.5)
    expected = {**expected, "good/new": None}
    del expected["bad/notes"]
    # The incremental run with at most one decode task at a time: same result, one task after
    # the other (ingest.max_concurrent_tasks caps Ray Data's task pool).
    second = run_ingest(
        cfg_for(storage.root, str(tmp_path / "in"), max_concurrent_tasks=1), storage
    )
    table2 = _check_run(second, storage, expected)
    assert (
        second["counts"]["files_decoded"] == 2
        and second["counts"]["files_reused"] == len(expected) - 2
    )
    assert second["inputs"]["reused_from"] == first["version"]
    old = {
        i
        for i, t in zip(table["segment_id"].to_pylist(), table["track_id"].to_pylist())
        if t == "good/flac"
    }
    new = {
        i
        for i, t in zip(table2["segment_id"].to_pylist(), table2["track_id"].to_pylist())
        if t == "good/flac"
    }
    assert old == new and old
    ends2 = max(
        e
        for t, e in zip(table2["track_id"].to_pylist(), table2["end_s"].to_pylist())
        if t == "good/wav16"
    )
    assert ends2 == pytest.approx(4.5)


def test_ray_ingest_s3(ray_local, s3_bucket, tmp_path):
    import fsspec

    local = tmp_path / "in"
    write_audio(local / "a.wav", 3.0, rate=44100, channels=2)
    write_audio(local / "b.flac", 2.4)
    (local / "c.txt").write_text("hello")
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    fs.put(str(local) + "/", f"{s3_bucket}/audio/", recursive=True)
    storage = Storage(f"{s3_bucket}/store")
    cfg = cfg_for(storage.root, f"{s3_bucket}/audio")
    manifest = run_ingest(cfg, storage)
    _check_run(manifest, storage, {"a": None, "b": None, "c": "not_audio"})
    assert storage.latest("ingest") == manifest["version"]
    assert manifest["counts"]["seconds_audio"] == pytest.approx(5.4, abs=1e-3)
