"""Readers see an ingest version's segments in track-id order, however its shards are named."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import publish_tiny_ingest, tiny_config

from mess_ray.segments import segment_files, segments_dataset, segments_dir
from mess_ray.storage import Storage


def test_fingerprint_named_shards_are_read_in_track_order_and_unnamed_ones_last(tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    storage = Storage.from_config(cfg.storage)
    table = publish_tiny_ingest(cfg, storage, n_tracks=3, seconds=3.0, files=1)
    version = storage.require_latest("ingest")
    rel = segments_dir(version)
    storage.fs.rm(storage.path(rel), recursive=True)
    # Fingerprints whose name order is the reverse of the track order, plus one shard that
    # belongs to no file record (a carried-over part): it must come last.
    fingerprints = {"track0": "ffff", "track1": "8888", "track2": "0000"}
    tracks = table.column("track_id").to_pylist()
    for track, fp in fingerprints.items():
        part = table.filter(pa.compute.equal(table["track_id"], track))
        with storage.open(posixpath.join(rel, f"part-{fp}.parquet"), "wb") as f:
            pq.write_table(part, f)
    with storage.open(posixpath.join(rel, "0000_carried.parquet"), "wb") as f:
        pq.write_table(table.slice(0, 1), f)
    with storage.open(posixpath.join("ingest", version, "files.parquet"), "wb") as f:
        pq.write_table(
            pa.table({"fingerprint": list(fingerprints.values()), "track_id": list(fingerprints)}),
            f,
        )

    names = [posixpath.basename(p) for p in segment_files(storage, version)]
    assert names == [
        "part-ffff.parquet",
        "part-8888.parquet",
        "part-0000.parquet",
        "0000_carried.parquet",
    ]
    read = segments_dataset(storage, version).to_table(columns=["track_id"]).column("track_id")
    assert read.to_pylist() == sorted(tracks) + [tracks[0]]


def test_shards_without_file_records_keep_name_order(tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    storage = Storage.from_config(cfg.storage)
    publish_tiny_ingest(cfg, storage, n_tracks=2, seconds=3.0, files=2)
    version = storage.require_latest("ingest")
    names = [posixpath.basename(p) for p in segment_files(storage, version)]
    assert names == ["part-0.parquet", "part-1.parquet"]


def test_a_parquet_read_gets_one_footer_reader_per_batch_of_ten_files_up_to_32():
    from mess_ray.segments import footer_readers

    assert [footer_readers(n) for n in (0, 1, 10, 11, 95, 320, 5000)] == [1, 1, 1, 2, 10, 32, 32]


def test_the_footer_pool_is_sized_for_each_read_and_a_users_setting_wins(tmp_path, monkeypatch):
    """``read_segments_ray`` sets Ray Data's footer-pool variable while the read is planned
    (Ray's indexer reads it then) and takes it away after; a value the user set stays."""
    import os

    import ray.data
    from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import (
        FooterFileIndexer,
    )

    from mess_ray.segments import FOOTER_ACTORS_ENV, read_segments_ray

    cfg = tiny_config(str(tmp_path / "store"))
    storage = Storage.from_config(cfg.storage)
    publish_tiny_ingest(cfg, storage, n_tracks=3, seconds=3.0, files=1)
    planned = []

    def plan(paths, **kwargs):
        # What Ray's footer indexer would start for this read, planned here.
        planned.append((len(paths), FooterFileIndexer(ignore_missing_paths=False)._num_actors))
        return "dataset"

    monkeypatch.setattr(ray.data, "read_parquet", plan)
    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    assert read_segments_ray(storage) == "dataset"
    assert planned[-1][1] == 1 and FOOTER_ACTORS_ENV not in os.environ
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "7")
    read_segments_ray(storage)
    assert planned[-1][1] == 7 and os.environ[FOOTER_ACTORS_ENV] == "7"
