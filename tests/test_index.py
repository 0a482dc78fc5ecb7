"""Unit tests of the index stage's pure parts: FAISS build/merge, publish, searcher."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mess_ray.config import MessRayConfig
from mess_ray.index.embed import segment_audio_matrix, table_to_vectors, vectors_table
from mess_ray.index.faiss_index import (
    IndexSpec,
    build_index,
    choose_index_spec,
    create_empty_index,
    index_to_bytes,
    load_index,
    save_index,
    sha256_bytes,
    training_points_needed,
)
from mess_ray.index.job import (
    INDEX_METADATA_COLUMNS,
    IndexIntegrityError,
    reconcile_ids,
    shard_loaders,
    write_index_artifact,
)
from mess_ray.index.searcher import SearchIndex, select_hits
from mess_ray.segments import encode_audio, segment_id
from mess_ray.storage import Storage, new_version


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def big_ids(n: int) -> np.ndarray:
    """Ids above 2**32, as real segment ids are, to catch truncation."""
    return np.array([segment_id(f"t{i}", i * 7) for i in range(n)], dtype=np.int64)


def brute_force(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


# -- faiss_index -----------------------------------------------------------------------
def test_choose_index_spec_by_size():
    assert choose_index_spec(500, 64).type == "flat"
    assert choose_index_spec(200_000, 64).type == "ivf"
    assert choose_index_spec(2_000_000, 64, "ivf").type == "ivfpq"
    assert choose_index_spec(2_000_000, 64, "ivf").rerank
    hnsw = choose_index_spec(10, 8, "hnsw")
    assert hnsw.type == "hnsw" and not hnsw.mergeable
    small_ivf = choose_index_spec(100, 8, "ivf")
    assert 1 <= small_ivf.nlist <= 100 // 39 + 1 and small_ivf.nprobe <= small_ivf.nlist
    with pytest.raises(ValueError):
        choose_index_spec(0, 8)
    with pytest.raises(ValueError):
        choose_index_spec(10, 8, "lsh")
    assert IndexSpec.from_dict(hnsw.to_dict()) == hnsw


def test_merged_flat_shards_equal_brute_force():
    x, ids = unit_vectors(1000, 32), big_ids(1000)
    spec = choose_index_spec(len(x), 32, "flat")
    parts = [(x[i::3], ids[i::3]) for i in range(3)]
    index = build_index(spec, parts)
    assert index.ntotal == 1000
    q = unit_vectors(20, 32, seed=1)
    _, found = index.search(q, 10)
    np.testing.assert_array_equal(found, brute_force(x, ids, q, 10))
    # 64-bit ids survive and reconstruct by id returns the stored vector
    np.testing.assert_allclose(index.reconstruct(int(ids[123])), x[123], atol=1e-6)


def test_merged_ivf_shards_keep_ids_and_are_exact_with_all_lists_probed():
    x, ids = unit_vectors(2000, 16), big_ids(2000)
    spec = choose_index_spec(len(x), 16, "ivf")
    train = x[: training_points_needed(spec)]
    index = build_index(spec, [(x[:700], ids[:700]), (x[700:], ids[700:])], train_vectors=train)
    assert index.ntotal == 2000
    index.nprobe = spec.nlist  # probing every list makes IVF-Flat exact
    q = unit_vectors(10, 16, seed=2)
    _, found = index.search(q, 5)
    np.testing.assert_array_equal(found, brute_force(x, ids, q, 5))


def test_create_empty_ivf_needs_training_data():
    spec = choose_index_spec(5000, 8, "ivf")
    with pytest.raises(ValueError, match="training"):
        create_empty_index(spec, None)


def test_add_rejects_bad_shapes_and_nan():
    index = create_empty_index(IndexSpec(type="flat", dim=4))
    with pytest.raises(ValueError, match="shape"):
        build_index(IndexSpec(type="flat", dim=4), [(np.zeros((3, 5), np.float32), np.arange(3))])
    bad = np.full((2, 4), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        build_index(IndexSpec(type="flat", dim=4), [(bad, np.arange(2))])
    assert index.ntotal == 0


def test_save_load_roundtrip_with_checksum(tmp_path):
    storage = Storage(str(tmp_path))
    x, ids = unit_vectors(50, 8), big_ids(50)
    index = build_index(IndexSpec(type="flat", dim=8), [(x, ids)])
    digest = save_index(storage, "a/index.faiss", index)
    assert digest == sha256_bytes(storage.read_bytes("a/index.faiss"))
    loaded = load_index(storage, "a/index.faiss", digest)
    assert loaded.ntotal == 50
    storage.write_bytes(
        "a/index.faiss",
        index_to_bytes(build_index(IndexSpec(type="flat", dim=8), [(x[:3], ids[:3])])),
    )
    with pytest.raises(ValueError, match="checksum"):
        load_index(storage, "a/index.faiss", digest)


def test_index_bytes_roundtrip_on_s3(s3_bucket):
    storage = Storage(f"{s3_bucket}/root")
    x, ids = unit_vectors(20, 8), big_ids(20)
    digest = save_index(
        storage, "idx/index.faiss", build_index(IndexSpec(type="flat", dim=8), [(x, ids)])
    )
    loaded = load_index(storage, "idx/index.faiss", digest)
    _, found = loaded.search(x[:1], 1)
    assert found[0, 0] == ids[0]


# -- embed helpers / job helpers -------------------------------------------------------
def test_segment_audio_matrix_pads_crops_and_checks_rate():
    blobs = [encode_audio(np.ones(5, np.float32)), encode_audio(np.ones(20, np.float32))]
    m = segment_audio_matrix(blobs, np.array([16000, 16000]), 16000, 10)
    assert m.shape == (2, 10) and m[0, 5:].sum() == 0 and m[1].sum() == 10
    with pytest.raises(ValueError, match="sample rate"):
        segment_audio_matrix(blobs, np.array([16000, 22050]), 16000, 10)


def test_vectors_table_roundtrip():
    x, ids = unit_vectors(7, 5), big_ids(7)
    table = vectors_table(ids, x)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 5)
    back, back_ids = table_to_vectors(table)
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(back_ids, ids)
    with pytest.raises(ValueError, match="NaN"):
        vectors_table(ids[:1], np.full((1, 5), np.nan))


def test_reconcile_ids_fails_loudly():
    ids = big_ids(10)
    assert reconcile_ids(ids, ids[::-1]) == {"segments": 10, "vectors": 10}
    with pytest.raises(IndexIntegrityError, match="1 missing"):
        reconcile_ids(ids, ids[:-1])
    with pytest.raises(IndexIntegrityError, match="1 duplicated"):
        reconcile_ids(ids, np.concatenate([ids, ids[:1]]))
    with pytest.raises(IndexIntegrityError, match="1 unknown"):
        reconcile_ids(ids[:-1], ids)


def test_shard_loaders_cover_every_vector_once(tmp_path):
    storage = Storage(str(tmp_path))
    x, ids = unit_vectors(30, 4), big_ids(30)
    pq.write_table(vectors_table(ids, x), storage.path("v.parquet"))
    loaders = shard_loaders(
        storage, [storage.path("v.parquet")], 3
    )  # fewer files than shards: split by id
    got = np.concatenate([loader()[1] for loader in loaders])
    assert sorted(got.tolist()) == sorted(ids.tolist())
    with pytest.raises(ValueError):
        shard_loaders(storage, [], 0)


# -- searcher --------------------------------------------------------------------------
def make_search_index(
    n_tracks: int = 3, per_track: int = 6, dim: int = 8
) -> tuple[SearchIndex, dict]:
    rows = {c: [] for c in INDEX_METADATA_COLUMNS}
    for t in range(n_tracks):
        for s in range(per_track):
            start = float(s)  # window 2 s, hop 1 s
            rows["segment_id"].append(segment_id(f"track{t}", s * 16000))
            rows["track_id"].append(f"track{t}")
            rows["piece_id"].append(f"piece{t % 2}")
            rows["style"].append("romantic")
            rows["start_s"].append(start)
            rows["end_s"].append(start + 2.0)
            rows["sample_rate"].append(16000)
            rows["source_uri"].append(f"/audio/track{t}.wav")
            rows["metadata_json"].append(json.dumps({"n": t}))
    table = pa.table(rows)
    ids = np.array(rows["segment_id"], dtype=np.int64)
    x = unit_vectors(len(ids), dim, seed=3)
    index = build_index(IndexSpec(type="flat", dim=dim), [(x, ids)])
    return SearchIndex(index, table, IndexSpec(type="flat", dim=dim)), {
        "ids": ids,
        "x": x,
        "rows": rows,
    }


def test_search_returns_self_first_with_metadata():
    si, data = make_search_index()
    hits = si.search(data["x"][4], k=3)
    assert hits[0].segment_id == data["ids"][4] and hits[0].rank == 1
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert hits[0].track_id == "track0" and hits[0].start_s == 4.0 and hits[0].metadata == {"n": 0}
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)


def test_search_exclusions_and_min_gap():
    si, data = make_search_index()
    hits = si.search(data["x"][0], k=20, exclude_track="track0")
    assert hits and all(h.track_id != "track0" for h in hits)
    assert len(hits) == 12  # widened until the other two tracks are exhausted
    gapped = si.search(data["x"][0], k=20, min_gap_s=2.5)
    for track in {h.track_id for h in gapped}:
        starts = sorted(h.start_s for h in gapped if h.track_id == track)
        assert all(b - a >= 2.5 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        si.search(data["x"][0], k=0)
    with pytest.raises(ValueError, match="dimension"):
        si.search(np.ones(3), k=1)


def test_select_hits_skips_padding_ids():
    rows = {10: 0, 11: 1}
    kept = select_hits([(-1, 0.0), (10, 0.9), (11, 0.8)], rows, ["a", "a"], [0.0, 1.0], k=5)
    assert kept == [(10, 0.9), (11, 0.8)]


def test_track_time_lookup_and_span_average():
    si, data = make_search_index()
    assert si.segments_in_span("track1", 3.5) == [int(data["ids"][6 + 3])]
    span = si.segments_in_span("track1", 1.0, 3.0)
    assert span == [int(i) for i in data["ids"][6:9]]  # starts 0,1,2 overlap (1, 3)
    vector, ids = si.span_vector("track1", 1.0, 3.0)
    expected = data["x"][6:9].mean(axis=0)
    np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-5)
    query_ids, hits = si.search_by_track("track1", 1.0, 3.0, k=5)
    assert query_ids == ids and not set(ids) & {h.segment_id for h in hits}
    with pytest.raises(KeyError):
        si.segments_in_span("nope", 0.0)
    with pytest.raises(ValueError, match="past the end"):
        si.segments_in_span("track1", 99.0)
    with pytest.raises(ValueError):
        si.segments_in_span("track1", 2.0, 1.0)


def test_tracks_listing_and_unknown_ids():
    si, data = make_search_index()
    tracks = si.tracks()
    assert [t["track_id"] for t in tracks] == ["track0", "track1", "track2"]
    assert tracks[0]["num_segments"] == 6 and tracks[0]["duration_s"] == 7.0
    assert len(si.track("track2")["segments"]) == 6
    hits = si.search_by_segment(int(data["ids"][0]), k=4)
    assert int(data["ids"][0]) not in {h.segment_id for h in hits}
    with pytest.raises(KeyError):
        si.track("missing")
    with pytest.raises(KeyError):
        si.segment(12345)
    with pytest.raises(KeyError):
        si.vector(12345)


def test_searcher_rejects_mismatched_metadata():
    si, data = make_search_index()
    table = pa.table({c: v[:-1] for c, v in data["rows"].items()})
    with pytest.raises(ValueError, match="metadata"):
        SearchIndex(si.index, table, si.spec)


def test_publish_writes_checksummed_manifest_and_latest(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    si, data = make_search_index()
    table = pa.table(data["rows"])
    version = new_version()
    manifest = write_index_artifact(
        MessRayConfig(),
        storage,
        version,
        si.index,
        si.spec,
        table,
        {"ref": "random", "kind": "random"},
        {"segments": 18, "vectors": 18},
        {"ingest": "v0"},
    )
    assert storage.latest("index") == version
    on_disk = storage.manifest("index")
    assert on_disk == json.loads(json.dumps(manifest, default=str))
    assert on_disk["checksums"]["index.faiss"] == sha256_bytes(
        storage.read_bytes(f"index/{version}/index.faiss")
    )
    assert on_disk["checksums"]["metadata.parquet"] == sha256_bytes(
        storage.read_bytes(f"index/{version}/metadata.parquet")
    )
    assert on_disk["count"] == 18 and on_disk["dim"] == 8 and on_disk["model"]["ref"] == "random"
    assert on_disk["facet_layout"] is None  # an embedder without facet heads
    assert (
        pq.read_table(storage.path("index", version, "metadata.parquet")).column_names
        == INDEX_METADATA_COLUMNS
    )
    loaded = SearchIndex.load(storage)
    assert loaded.version == version and len(loaded) == 18
    assert loaded.search(data["x"][5], k=1)[0].segment_id == data["ids"][5]
    # a replaced file is caught by the checksum
    storage.write_bytes(f"index/{version}/metadata.parquet", b"garbage")
    with pytest.raises(ValueError, match="checksum"):
        SearchIndex.load(storage, version)
    with pytest.raises(IndexIntegrityError):
        write_index_artifact(
            MessRayConfig(),
            storage,
            new_version(),
            si.index,
            si.spec,
            table.slice(0, 3),
            {},
            {},
            {},
        )


@pytest.mark.slow
def test_a_query_with_variants_scores_each_passage_at_its_best_variant():
    """[K, D] query variants (the same passage at several lags): every passage's similarity is
    its highest to any variant, the ranking is by that, and a bad shape is refused."""
    si, data = make_search_index()
    x = data["x"]
    variants = np.stack([x[3], x[9], 0.6 * x[1] + 0.8 * x[2]])
    hits = si.search(variants, k=6)
    unit = variants / np.linalg.norm(variants, axis=1, keepdims=True)
    best = (x @ unit.T).max(axis=1)
    order = np.argsort(-best, kind="stable")[:6]
    assert {h.segment_id for h in hits} == {int(data["ids"][i]) for i in order}
    assert {h.segment_id for h in hits[:2]} == {int(data["ids"][3]), int(data["ids"][9])}
    by_id = dict(zip(data["ids"].tolist(), best))
    for h in hits:
        assert h.similarity == pytest.approx(float(by_id[h.segment_id]), abs=1e-5)
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    single = si.search(x[3], k=6)
    assert [h.segment_id for h in si.search(x[3][None], k=6)] == [h.segment_id for h in single]
    with pytest.raises(ValueError, match="variants"):
        si.search(np.ones((2, 2, x.shape[1])), k=1)


def test_ivfpq_candidates_are_reranked_exactly():
    x, ids = unit_vectors(3000, 16, seed=5), big_ids(3000)
    spec = choose_index_spec(len(x), 16, "ivf", ivfpq_above=1000, nprobe=64)
    assert spec.type == "ivfpq" and spec.rerank
    index = build_index(
        spec,
        [(x[:1500], ids[:1500]), (x[1500:], ids[1500:])],
        train_vectors=x[: training_points_needed(spec)],
    )
    rows = {c: [] for c in INDEX_METADATA_COLUMNS}
    for i, sid in enumerate(ids):
        for c, v in zip(
            INDEX_METADATA_COLUMNS,
            [int(sid), f"t{i % 50}", "p", "s", float(i), i + 2.0, 16000, "", "{}"],
        ):
            rows[c].append(v)
    si = SearchIndex(index, pa.table(rows), spec, rerank_vectors=dict(zip(ids.tolist(), x)))
    for i in (0, 777, 2999):
        hits = si.search(x[i], k=5)
        assert hits[0].segment_id == ids[i] and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
        exact = brute_force(x, ids, x[i : i + 1], 5)[0]
        assert hits[1].segment_id in exact  # exact scores, not PQ approximations


def test_choose_index_spec_tuned_defaults_and_memory_budget():
    # thresholds from benchmarks/index_search.py: exact up to 5e4, IVF-Flat (2 sqrt(n) lists, nprobe 16) above
    assert choose_index_spec(49_999, 128).type == "flat"
    ivf = choose_index_spec(1_000_000, 128)
    assert (ivf.type, ivf.nlist, ivf.nprobe) == ("ivf", 2000, 16)
    # IVF-Flat of 1e6 x 128 needs ~500 MiB: a smaller budget switches to IVF-PQ with re-ranking
    pq = choose_index_spec(1_000_000, 128, memory_budget_mb=256)
    assert pq.type == "ivfpq" and pq.rerank and pq.pq_bits == 8
    assert choose_index_spec(1_000_000, 128, memory_budget_mb=1024).type == "ivf"
    # tiny forced IVF-PQ corpora get codebooks they can train
    small = choose_index_spec(2000, 64, "ivf", ivfpq_above=0)
    assert small.type == "ivfpq" and 2**small.pq_bits * 39 <= 2000


def test_hnsw_ef_construction_reaches_faiss_and_old_specs_still_load():
    spec = choose_index_spec(10, 8, "hnsw", ef_construction=96)
    index = create_empty_index(spec)
    import faiss

    assert faiss.downcast_index(index.index).hnsw.efConstruction == 96
    old = {
        k: v for k, v in spec.to_dict().items() if k != "ef_construction"
    }  # a manifest from before the field
    assert IndexSpec.from_dict(old).ef_construction == 40


def test_manifest_facet_layout_is_checked_against_the_index_dim():
    from mess_ray.facets import make_layout
    from mess_ray.index.job import IndexIntegrityError, manifest_facet_layout

    assert manifest_facet_layout({"kind": "random"}, 64) is None
    assert manifest_facet_layout({"facet_layout": None}, 64) is None
    layout = manifest_facet_layout({"facet_layout": make_layout(32, 8)}, 64)
    assert layout == {
        "overall": [0, 32],
        "tempo": [32, 40],
        "dynamics": [40, 48],
        "articulation": [48, 56],
        "timbre": [56, 64],
    }
    with pytest.raises(IndexIntegrityError, match="spans 64 dimensions"):
        manifest_facet_layout({"facet_layout": make_layout(32, 8)}, 128)
    with pytest.raises(ValueError, match="contiguous"):
        manifest_facet_layout({"facet_layout": {"overall": [0, 8], "tempo": [9, 12]}}, 12)


def test_manifest_facet_layout_reads_back_a_name_sorted_layout():
    from mess_ray.facets import make_layout
    from mess_ray.index.job import manifest_facet_layout

    stored = json.loads(
        json.dumps({k: list(v) for k, v in make_layout(32, 8).items()}, sort_keys=True)
    )
    assert next(iter(stored)) == "articulation"  # what a manifest holds
    assert list(manifest_facet_layout({"facet_layout": stored}, 64)) == [
        "overall",
        "tempo",
        "dynamics",
        "articulation",
        "timbre",
    ]
