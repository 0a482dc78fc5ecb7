"""Reindex: pure parts (id diff, embedder identity, in-place update, resume) and one Ray run that
adds a track, re-runs as a no-op, removes a track and resumes after a crash before publish."""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import publish_ingest, tiny_config

import mess_ray.index.reindex as reindex_mod
from mess_ray.facets import make_layout
from mess_ray.index import SearchIndex, run_index, run_reindex
from mess_ray.index.content_features import load_content, read_content_table
from mess_ray.index.embed import vectors_table
from mess_ray.index.faiss_index import build_index, choose_index_spec, training_points_needed
from mess_ray.index.job import IndexIntegrityError, keep_segment_ids, model_provenance
from mess_ray.index.reindex import (
    can_update_in_place,
    completed_vector_files,
    diff_segment_ids,
    filter_vector_table,
    pending_key,
    remove_from_index,
    same_embedder,
)
from mess_ray.models import Embedder
from mess_ray.storage import Storage


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- pure parts -----------------------------------------------------------------------------
def test_diff_segment_ids():
    added, removed, kept = diff_segment_ids(np.array([5, 1, 9, 3]), np.array([3, 7, 1]))
    assert added.tolist() == [5, 9] and removed.tolist() == [7] and kept.tolist() == [1, 3]
    with pytest.raises(IndexIntegrityError):
        diff_segment_ids(np.array([1, 1]), np.array([1]))


def test_same_embedder_and_pending_key():
    a = {
        "ref": "finetune",
        "kind": "embedding_model",
        "stage": "finetune",
        "version": "f1",
        "path": "/m",
        "layer": None,
    }
    provenance = {**a, "checkpoint": "/runs/ckpt", "trained_config_digest": "abc"}
    assert same_embedder(a, provenance)
    assert same_embedder(a, {**a, "path": "/copied/store/finetune/f1/model"})  # a moved store
    assert not same_embedder({"kind": "encoder", "path": "/a"}, {"kind": "encoder", "path": "/b"})
    assert not same_embedder(a, {**a, "version": "f2"})
    assert not same_embedder(
        {"kind": "random", "seed": 0, "size": "tiny"}, {"kind": "random", "seed": 1, "size": "tiny"}
    )
    timeline = {"chroma_rate": 20.0, "onset_rate": 50.0}
    assert same_embedder({**a, "content_timeline": timeline}, {**a, "content_timeline": timeline})
    assert not same_embedder(a, {**a, "content_timeline": timeline})  # an older record: none
    assert not same_embedder(
        {**a, "content_timeline": timeline},
        {**a, "content_timeline": {**timeline, "onset_rate": 25}},
    )
    ids = np.array([3, 1, 2])
    key = pending_key("v1", "i1", a, ids)
    assert key == pending_key(
        "v1", "i1", provenance, ids[::-1]
    )  # order and provenance do not matter
    assert key != pending_key("v1", "i2", a, ids) and key != pending_key("v1", "i1", a, ids[:2])


def test_can_update_in_place():
    flat = choose_index_spec(100, 8)
    assert can_update_in_place(flat, choose_index_spec(150, 8))
    assert not can_update_in_place(flat, choose_index_spec(150, 16))
    ivf = choose_index_spec(200_000, 8, "ivf")
    assert can_update_in_place(ivf, choose_index_spec(250_000, 8, "ivf"))
    assert not can_update_in_place(
        ivf, choose_index_spec(2_000_000, 8, "ivf", ivfpq_above=10**9)
    )  # 3x lists
    hnsw = choose_index_spec(100, 8, "hnsw")
    assert not can_update_in_place(hnsw, hnsw)
    assert not can_update_in_place(flat, choose_index_spec(200_000, 8))  # flat -> ivf: rebuild


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_remove_then_merge_equals_fresh_build(kind):
    x, ids = unit_vectors(1200, 16), np.arange(10**10, 10**10 + 1200, dtype=np.int64)
    spec = choose_index_spec(1200, 16, kind)
    train = x[: training_points_needed(spec)] if training_points_needed(spec) else None
    index = build_index(spec, [(x[:1000], ids[:1000])], train)
    assert remove_from_index(index, ids[:100]) == 100
    template = build_index(spec, [], train)
    added = build_index(spec, [(x[1000:], ids[1000:])], train) if kind == "flat" else None
    if added is None:  # IVF: add to a copy of the same trained empty index
        template.add_with_ids(x[1000:], ids[1000:])
        added = template
    index.merge_from(added, 0)
    assert index.ntotal == 1100
    if kind == "ivf":
        index.nprobe = spec.nlist
    _, found = index.search(x[:5], 1)
    assert not set(found[:, 0].tolist()) & set(ids[:100].tolist())  # removed vectors are gone
    _, found = index.search(x[1100:1105], 1)
    assert (
        found[:, 0].tolist() == ids[1100:1105].tolist()
    )  # added vectors are found under their ids


def test_filter_and_keep_rows():
    table = vectors_table(np.array([1, 2, 3]), unit_vectors(3, 4))
    assert filter_vector_table(table, np.array([1, 3])).column("segment_id").to_pylist() == [1, 3]
    batch = {"segment_id": np.array([1, 2, 3]), "audio": np.array([b"a", b"b", b"c"], dtype=object)}
    kept = keep_segment_ids(batch, np.array([2]))
    assert kept["segment_id"].tolist() == [2] and kept["audio"].tolist() == [b"b"]


def test_completed_vector_files_drops_half_written_shards(tmp_path):
    storage = Storage(str(tmp_path))
    with storage.open("index/_pending/k/added/run-a/good.parquet", "wb") as f:
        pq.write_table(vectors_table(np.array([1, 2]), unit_vectors(2, 4)), f)
    storage.write_bytes("index/_pending/k/added/run-b/torn.parquet", b"PAR1\x00\x00garbage")
    files = completed_vector_files(storage, "index/_pending/k/added")
    assert [posixpath.basename(f) for f in files] == ["good.parquet"]
    assert not storage.exists("index/_pending/k/added/run-b/torn.parquet")
    assert completed_vector_files(storage, "index/_pending/missing") == []


def test_model_provenance_records_checkpoint_and_config_digest(tmp_path):
    storage = Storage(str(tmp_path))
    storage.publish(
        "finetune",
        "f1",
        {
            "checkpoint": "/runs/f1/checkpoint_0000020",
            "config_digest": "abc123",
            "model_path": "/store/finetune/f1/model",
        },
    )
    info = {
        "kind": "embedding_model",
        "stage": "finetune",
        "version": "f1",
        "path": "/store/finetune/f1/model",
    }
    prov = model_provenance(storage, info)
    assert (
        prov["checkpoint"] == "/runs/f1/checkpoint_0000020"
        and prov["trained_config_digest"] == "abc123"
    )
    assert model_provenance(storage, {"kind": "random", "seed": 0})["checkpoint"] is None


# -- Ray integration ------------------------------------------------------------------------


def track_ids(table: pa.Table, track: str) -> set[int]:
    return {
        s
        for s, t in zip(
            table.column("segment_id").to_pylist(), table.column("track_id").to_pylist()
        )
        if t == track
    }


def test_reindex_adds_removes_noops_and_resumes(ray_local, tmp_path, monkeypatch):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.index.batch_size = 4
    storage = Storage.from_config(cfg.storage)
    publish_ingest(cfg, storage, [0, 1, 2])
    # A faceted model (fake: the random encoder's info with a layout over its 64 dims) for the
    # first build only; reindex rebuilds the info without it and must carry the layout over.
    # One part only: the random encoder's vectors are unit-norm as a whole, not per facet, and
    # the searcher scores by the layout's parts (the name-sorted read-back is tested in test_index).
    real_from_info = Embedder.from_info.__func__

    def faceted_from_info(cls, cfg_, storage_, info):
        embedder = real_from_info(cls, cfg_, storage_, info)
        embedder.info = {**embedder.info, "facet_layout": make_layout(64, 1, facets=())}
        return embedder

    monkeypatch.setattr(Embedder, "from_info", classmethod(faceted_from_info))
    first = run_index(cfg, storage, model_ref="random")
    monkeypatch.setattr(Embedder, "from_info", classmethod(real_from_info))
    assert (
        first["model"]["checkpoint"] is None
        and first["model"]["index_config_digest"] == cfg.digest()
    )
    layout = {"overall": [0, 64]}
    assert first["facet_layout"] == layout

    # nothing changed: no new version
    noop = run_reindex(cfg, storage)
    assert noop["changed"] is False and storage.latest("index") == first["version"]
    assert len(storage.versions("index")) == 1

    # a track added, and a crash after embedding it but before publish: LATEST stays put
    table = publish_ingest(cfg, storage, [0, 1, 2, 3])
    new_ids = track_ids(table, "track3")
    real_write = reindex_mod.write_index_artifact

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before publish")

    monkeypatch.setattr(reindex_mod, "write_index_artifact", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_reindex(cfg, storage, model_ref="random")
    assert storage.latest("index") == first["version"] and len(storage.versions("index")) == 1
    monkeypatch.setattr(reindex_mod, "write_index_artifact", real_write)

    # the re-run reuses the embedded shards (nothing embedded twice) and publishes
    added = run_reindex(cfg, storage, model_ref="random")
    assert added["changed"] and added["previous_version"] == first["version"]
    assert storage.latest("index") == added["version"] != first["version"]
    assert added["reindex"]["added"] == added["reindex"]["reused_pending"] == len(new_ids)
    assert added["reindex"]["removed"] == 0 and added["reindex"]["kept"] == first["count"]
    assert added["count"] == table.num_rows and added["reindex"]["build"] == "in_place"
    assert added["model"]["kind"] == "random" and not storage.exists("index/_pending")
    assert added["facet_layout"] == layout
    # content features: the three unchanged tracks carried over bit for bit, the new one computed
    assert added["content"]["reused"] == 3 and added["content"]["computed"] == 1
    old_content = read_content_table(storage, first)
    new_content = read_content_table(storage, added)
    assert sorted(new_content.column("track_id").to_pylist()) == [f"track{i}" for i in range(4)]
    old_blob = dict(zip(old_content["track_id"].to_pylist(), old_content["features"].to_pylist()))
    new_blob = dict(zip(new_content["track_id"].to_pylist(), new_content["features"].to_pylist()))
    assert all(new_blob[t] == old_blob[t] for t in old_blob)
    index = SearchIndex.load(storage)
    embedder = Embedder.from_info(cfg, storage, added["model"])
    row = table.column("segment_id").to_pylist().index(min(new_ids))
    audio = np.frombuffer(table.column("audio")[row].as_py(), dtype="<f4").copy()[None, :]
    hits = index.search(embedder.embed(audio)[0], k=3)
    assert (
        hits[0].segment_id == min(new_ids)
        and hits[0].track_id == "track3"
        and hits[0].similarity > 0.999
    )
    # the reused vectors are the old ones, bit for bit
    old_index = SearchIndex.load(storage, first["version"])
    some_old = int(table.column("segment_id")[0].as_py())
    np.testing.assert_array_equal(index.vector(some_old), old_index.vector(some_old))

    # a track removed: its vectors are dropped, nothing is embedded; the configured index type
    # changed meanwhile (flat -> ivf), so the index is rebuilt from the reused vectors
    gone = track_ids(table, "track1")
    table = publish_ingest(cfg, storage, [0, 2, 3])
    cfg.index.type = "ivf"
    removed = run_reindex(cfg, storage)
    assert removed["reindex"] == {
        "added": 0,
        "removed": len(gone),
        "kept": table.num_rows,
        "reused_pending": 0,
        "build": "rebuild",
    }
    assert removed["index"]["type"] == "ivf" and removed["facet_layout"] == layout
    assert removed["content"]["reused"] == 3 and removed["content"]["computed"] == 0
    assert "track1" not in load_content(storage, removed)
    assert (
        removed["previous_version"] == added["version"]
        and removed["inputs"]["previous_index"] == added["version"]
    )
    index = SearchIndex.load(storage)
    assert len(index) == table.num_rows and "track1" not in {t["track_id"] for t in index.tracks()}
    assert set(index._rows) == set(table.column("segment_id").to_pylist())
    kept_id = min(track_ids(table, "track3"))
    assert (
        index.search_by_segment(kept_id, k=2)[0].segment_id != kept_id
    )  # searchable, itself excluded
    np.testing.assert_array_equal(
        index.vector(kept_id), SearchIndex.load(storage, added["version"]).vector(kept_id)
    )

    # a different model cannot be mixed into this index
    with pytest.raises(ValueError, match="full rebuild"):
        cfg.model.seed = 1
        run_reindex(cfg, storage, model_ref="random")
