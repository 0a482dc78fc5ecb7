"""The index job's content-feature pass, without Ray: stitching, per-track rows, manifest entry."""

from __future__ import annotations

import io
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mess_ray.content import track_features
from mess_ray.index.content_features import (
    CONTENT_DIR,
    ContentIntegrityError,
    features_of_group,
    finish_content,
    load_content,
    segments_digest,
    stitch,
    track_digests,
)
from mess_ray.segments import encode_audio
from mess_ray.storage import Storage

SR = 16000


def tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.7 * t))).astype(
        np.float32
    )


def group(track: str, audio: np.ndarray, window: int = 2 * SR, hop: int = SR, rate: int = SR):
    starts = list(range(0, len(audio) - window + 1, hop))
    return {
        "segment_id": np.asarray([hash((track, s)) & 0xFFFF for s in starts], dtype=np.int64),
        "track_id": np.asarray([track] * len(starts), dtype=object),
        "start_sample": np.asarray(starts),
        "sample_rate": np.asarray([rate] * len(starts)),
        "audio": np.asarray([encode_audio(audio[s : s + window]) for s in starts], dtype=object),
    }


def test_stitching_overlapping_segments_gives_back_the_track():
    audio = tone(5.0, 330.0)
    batch = group("t", audio)
    shuffled = np.random.default_rng(0).permutation(len(batch["start_sample"]))
    out = stitch(batch["start_sample"][shuffled], list(batch["audio"][shuffled]))
    np.testing.assert_array_equal(out, audio[: len(out)])
    assert len(out) == 5 * SR


def test_a_track_group_becomes_one_row_of_its_features():
    audio = tone(6.0, 440.0)
    row = features_of_group(group("t1", audio), SR, 20.0)
    assert list(row["track_id"]) == ["t1"] and row["frames"][0] > 0
    expected = track_features(audio, SR, 20.0)
    assert row["frames"][0] == expected.frames
    assert row["segments_digest"][0] == segments_digest(group("t1", audio)["segment_id"][::-1])


def test_a_track_at_the_wrong_rate_is_listed_without_features():
    row = features_of_group(group("t2", tone(6.0, 440.0), rate=22050), SR, 20.0)
    assert row["frames"][0] == 0 and row["features"][0] == b""


def _write(storage: Storage, base: str, name: str, rows: dict) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table(rows), buffer)
    storage.write_bytes(posixpath.join(base, CONTENT_DIR, name), buffer.getvalue())


def test_manifest_entry_lists_checksums_and_tracks_without_features(tmp_path):
    storage = Storage(str(tmp_path))
    base = "index/v1"
    rows = {name: [] for name in ("track_id", "segments_digest", "rate", "frames", "features")}
    for track, rate in (("a", SR), ("b", 22050)):
        row = features_of_group(group(track, tone(6.0, 300.0), rate=rate), SR, 20.0)
        for name in rows:
            rows[name].append(row[name][0])
    _write(storage, base, "part-0.parquet", rows)
    segments = pa.table({"segment_id": [1, 2, 3], "track_id": ["a", "b", "c"]})
    info = finish_content(storage, base, track_digests(segments), 20.0)
    assert info["tracks"] == 1 and info["tracks_without_features"] == ["b", "c"]
    assert set(info["checksums"]) == {"part-0.parquet"}
    features = load_content(storage, {"version": "v1", "content": info})
    assert set(features) == {"a"}

    # the same track in two files is refused
    _write(storage, base, "part-1.parquet", rows)
    with pytest.raises(ContentIntegrityError, match="twice"):
        finish_content(storage, base, track_digests(segments), 20.0)
    # a file the manifest does not list is refused on load
    with pytest.raises(ContentIntegrityError, match="differ from its manifest"):
        load_content(storage, {"version": "v1", "content": info})


def test_chroma_puts_a_tone_in_its_own_pitch_class_in_every_octave():
    t = np.arange(2 * SR) / SR
    for hz, pitch_class in ((110.0, 9), (440.0, 9), (261.63, 0), (392.0, 7)):
        feats = track_features(np.sin(2 * np.pi * hz * t).astype(np.float32), SR)
        assert int(feats.chroma.mean(axis=1).argmax()) == pitch_class, hz


def test_features_of_an_older_version_are_refused_on_load(tmp_path):
    storage = Storage(str(tmp_path))
    base = "index/v1"
    row = features_of_group(group("a", tone(6.0, 300.0)), SR, 20.0)
    _write(storage, base, "part-0.parquet", row)
    segments = pa.table({"segment_id": [1], "track_id": ["a"]})
    info = finish_content(storage, base, track_digests(segments), 20.0)
    assert set(load_content(storage, {"version": "v1", "content": info})) == {"a"}
    old = {k: v for k, v in info.items() if k != "features_version"}  # written before version 2
    with pytest.raises(ContentIntegrityError, match="rebuild it"):
        load_content(storage, {"version": "v1", "content": old})


def test_each_track_is_one_work_item_with_every_file_that_holds_it(tmp_path):
    """The content pass needs no shuffle: a track spread over two files (not the ingest job's
    layout, which writes one shard per track) is read whole by one item, and the rows equal
    those of the track's grouped segments."""
    import json

    from helpers import publish_tiny_ingest, tiny_config

    from mess_ray.index.content_features import features_of_items, track_items

    cfg = tiny_config(str(tmp_path / "store"))
    storage = Storage(cfg.storage.root)
    table = publish_tiny_ingest(cfg, storage, n_tracks=3, seconds=6.0, files=2)
    version = storage.latest("ingest")
    items = track_items(storage, version)
    tracks = [t for item in items for t in json.loads(item["tracks"])]
    assert sorted(tracks) == ["track0", "track1", "track2"]  # every track in exactly one item
    spread = [item for item in items if len(json.loads(item["files"])) == 2]
    assert spread and all(len(json.loads(i["files"])) == 1 for i in items if i not in spread)

    batch = {k: np.asarray([item[k] for item in items], dtype=object) for k in ("files", "tracks")}
    rows = features_of_items(batch, storage.config().model_dump(), SR, 20.0)
    assert sorted(rows.column("track_id").to_pylist()) == sorted(tracks)
    for track in tracks:
        mine = table.filter(pa.array([t == track for t in table.column("track_id").to_pylist()]))
        expected = features_of_group(
            {n: mine.column(n).to_numpy(zero_copy_only=False) for n in mine.column_names}, SR, 20.0
        )
        got = rows.filter(pa.array([t == track for t in rows.column("track_id").to_pylist()]))
        assert got.column("features").to_pylist() == list(expected["features"])
        assert got.column("segments_digest").to_pylist() == list(expected["segments_digest"])

    only = track_items(storage, version, only_tracks=["track2"])
    assert [json.loads(item["tracks"]) for item in only] == [["track2"]]
    assert track_items(storage, version, only_tracks=[]) == []
