"""Integration: a tiny ingest artifact -> run_index on Ray (actor pool + sharded build) -> search."""

from __future__ import annotations

import posixpath

import numpy as np
from helpers import publish_tiny_ingest, tiny_config

from mess_ray.content import track_features
from mess_ray.index import SearchIndex, run_index
from mess_ray.index.content_features import (
    ContentIntegrityError,
    load_content,
    read_content_table,
    stitch,
)
from mess_ray.models import Embedder
from mess_ray.storage import Storage


def test_run_index_reconciles_and_finds_itself(ray_local, tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.index.batch_size = 4
    storage = Storage.from_config(cfg.storage)
    table = publish_tiny_ingest(cfg, storage)

    manifest = run_index(cfg, storage, model_ref="random")

    assert storage.latest("index") == manifest["version"]
    assert (
        manifest["count"]
        == table.num_rows
        == manifest["counts"]["segments"]
        == manifest["counts"]["vectors"]
    )
    assert manifest["inputs"]["ingest"] == storage.latest("ingest")
    assert manifest["model"]["kind"] == "random" and manifest["index"]["type"] == "flat"
    assert set(manifest["checksums"]) == {"index.faiss", "metadata.parquet"}

    index = SearchIndex.load(storage)
    assert len(index) == table.num_rows
    # The embedder rebuilt from the manifest reproduces the stored vectors.
    embedder = Embedder.from_info(cfg, storage, manifest["model"])
    audio = np.frombuffer(table.column("audio")[3].as_py(), dtype="<f4").copy()[None, :]
    query = embedder.embed(audio)[0]
    sid = table.column("segment_id")[3].as_py()
    np.testing.assert_allclose(index.vector(sid), query, atol=1e-4)
    hits = index.search(query, k=3)
    assert hits[0].segment_id == sid and hits[0].similarity > 0.999


def test_index_job_stores_checksummed_content_features_of_every_track(ray_local, tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.index.batch_size = 4
    storage = Storage.from_config(cfg.storage)
    table = publish_tiny_ingest(cfg, storage, seconds=8.0)
    manifest = run_index(cfg, storage, model_ref="random")

    content = manifest["content"]
    assert content["tracks"] == content["computed"] == 3 and not content["tracks_without_features"]
    assert content["checksums"] and content["feature_rate"] == cfg.content.feature_rate
    features = load_content(storage, manifest)
    assert set(features) == {"track0", "track1", "track2"}
    # The stored features are those of the track stitched back from its segments.
    rows = [i for i, t in enumerate(table.column("track_id").to_pylist()) if t == "track1"]
    audio = stitch(
        np.asarray([table.column("start_sample")[i].as_py() for i in rows]),
        [table.column("audio")[i].as_py() for i in rows],
    )
    expected = track_features(audio, cfg.audio.sample_rate, cfg.content.feature_rate)
    assert features["track1"].frames == expected.frames
    np.testing.assert_allclose(features["track1"].chroma, expected.chroma, atol=1e-2)

    # A content file that changed after publishing is refused.
    name = sorted(content["checksums"])[0]
    rel = posixpath.join("index", manifest["version"], "content", name)
    blob = storage.read_bytes(rel)
    storage.write_bytes(rel, blob[:-8] + bytes(8))
    try:
        read_content_table(storage, manifest)
        raise AssertionError("a tampered content file was read")
    except ContentIntegrityError as err:
        assert "checksum" in str(err)
