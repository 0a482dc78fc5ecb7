"""Search options, explanations, range requests and hot index updates (no Ray Serve).

Batching across requests (``@serve.batch`` needs a Serve replica) is tested in test_serve_ray.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from helpers import publish_audio_index, tiny_config, track_audio, wav_bytes

from mess_ray.facets import compose, make_layout
from mess_ray.index.faiss_index import IndexSpec
from mess_ray.index.searcher import SearchIndex, mmr_select
from mess_ray.serve import SearchService, create_app
from mess_ray.serve.app import parse_range
from mess_ray.serve.explain import explain_hit

LAYOUT = make_layout(32, 8)  # 32 + 4 x 8 = 64 dims, the tiny random encoder's size


# -- pure pieces -----------------------------------------------------------------------
def test_mmr_prefers_a_different_passage_over_a_near_duplicate():
    a = np.array([1.0, 0.0, 0.0], np.float32)
    near_a = np.array([0.995, 0.0998, 0.0], np.float32)
    other = np.array([0.6, 0.0, 0.8], np.float32)
    candidates = [(1, 1.0), (2, 0.99), (3, 0.6)]
    vectors = {1: a, 2: near_a / np.linalg.norm(near_a), 3: other}
    assert [sid for sid, _ in mmr_select(candidates, vectors, 2, 1.0)] == [1, 2]
    assert [sid for sid, _ in mmr_select(candidates, vectors, 2, 0.5)] == [1, 3]
    with pytest.raises(ValueError, match="lambda"):
        mmr_select(candidates, vectors, 2, 1.5)


def test_parse_range():
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=50-1000", 100) == (50, 99)
    assert parse_range("bytes=100-", 100) is None and parse_range("bytes=9-3", 100) is None
    assert parse_range("items=0-1", 100) is None and parse_range("bytes=-", 100) is None


def test_explanation_compares_each_facet_in_words():
    query = {
        "onset_rate_hz": 4.1,
        "ioi_cv": 0.12,
        "loudness_mean_db": -20.0,
        "loudness_std_db": 3.0,
        "loudness_range_db": 9.0,
        "loudness_slope_db_per_s": 0.5,
        "flux_mean": 0.05,
        "centroid_mean_hz": 900.0,
        "centroid_std_hz": 120.0,
        "sustain_ratio": 0.8,
    }
    hit = dict(query, onset_rate_hz=4.3, ioi_cv=0.15, centroid_mean_hz=2400.0)
    rows = explain_hit(query, hit)
    by_facet = {r["facet"]: r for r in rows}
    assert "onsets 4.1 vs 4.3/s" in by_facet["tempo"]["text"]
    assert "timing variability 0.12 vs 0.15" in by_facet["tempo"]["text"]
    assert by_facet["dynamics"]["closeness"] == 1.0 and by_facet["timbre"]["closeness"] < 0.51
    assert rows[-1]["facet"] == "timbre"  # least alike last
    ranked = explain_hit(
        query, hit, {"tempo": 0.9, "dynamics": 0.1, "articulation": 0.5, "timbre": 0.7}
    )
    assert [r["facet"] for r in ranked] == ["tempo", "timbre", "articulation", "dynamics"]


def _faceted_index(n: int = 60, seed: int = 0) -> tuple[SearchIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = {
        name: rng.normal(size=(n, b - a)).astype(np.float32) for name, (a, b) in LAYOUT.items()
    }
    vectors = compose(parts, LAYOUT)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, ids)
    composers = ["J. S. Bach", "Chopin", "Liszt"]
    metadata = pa.table(
        {
            "segment_id": ids,
            "track_id": [f"t{i % 6}" for i in range(n)],
            "piece_id": [f"p{i % 3}" for i in range(n)],
            "style": ["romantic" if i % 2 else "baroque" for i in range(n)],
            "start_s": [float(i // 6) for i in range(n)],
            "end_s": [float(i // 6) + 2 for i in range(n)],
            "sample_rate": [16000] * n,
            "source_uri": ["/nowhere.wav"] * n,
            "metadata_json": [
                f'{{"composer": "{composers[i % 3]}", "catalog": "BWV {800 + i % 4}"}}'
                for i in range(n)
            ],
        }
    )
    manifest = {"version": "v1", "facet_layout": {k: list(v) for k, v in LAYOUT.items()}}
    return SearchIndex(
        index, metadata, IndexSpec(type="flat", dim=vectors.shape[1]), manifest
    ), vectors


def test_facet_weights_rank_by_the_chosen_facet():
    index, vectors = _faceted_index()
    query = vectors[0] + 0.01
    hits = index.search(query, k=10, facet_weights={"tempo": 1.0})
    tempo = [h.facet_similarities["tempo"] for h in hits]
    assert tempo == sorted(tempo, reverse=True)
    np.testing.assert_allclose([h.similarity for h in hits], tempo, atol=1e-4)
    mixed = index.search(query, k=5, facet_weights={"tempo": 1.0, "timbre": 3.0})
    for h in mixed:
        expected = 0.25 * h.facet_similarities["tempo"] + 0.75 * h.facet_similarities["timbre"]
        assert abs(h.similarity - expected) < 1e-4
    plain = index.search(query, k=3)
    assert set(plain[0].facet_similarities) == set(LAYOUT)
    with pytest.raises(ValueError, match="unknown facet"):
        index.search(query, k=3, facet_weights={"rubato": 1.0})


def test_the_models_declared_query_weights_rank_a_search_that_names_none():
    index, vectors = _faceted_index()
    declared = {"tempo": 1.0, "timbre": 3.0}
    weighted = SearchIndex(
        index.index,
        pa.table({k: v for k, v in index._cols.items()}),
        index.spec,
        {**index.manifest, "model": {"query_facet_weights": declared}},
    )
    query = vectors[0] + 0.01
    default = weighted.search(query, k=5)
    named = index.search(query, k=5, facet_weights=declared)
    assert [h.segment_id for h in default] == [h.segment_id for h in named]
    np.testing.assert_allclose([h.similarity for h in default], [h.similarity for h in named])
    # explicit weights replace the declared ones
    mine = weighted.search(query, k=5, facet_weights={"tempo": 1.0})
    assert [h.segment_id for h in mine] == [
        h.segment_id for h in index.search(query, k=5, facet_weights={"tempo": 1.0})
    ]
    with pytest.raises(ValueError, match="unknown facet"):
        SearchIndex(
            index.index,
            pa.table({k: v for k, v in index._cols.items()}),
            index.spec,
            {**index.manifest, "model": {"query_facet_weights": {"rubato": 1.0}}},
        )


def test_facet_weights_without_a_layout_are_refused_clearly():
    index, vectors = _faceted_index()
    plain = SearchIndex(
        index.index, pa.table({k: v for k, v in index._cols.items()}), index.spec, {"version": "v1"}
    )
    with pytest.raises(ValueError, match="faceted index"):
        plain.search(vectors[0], k=3, facet_weights={"tempo": 1.0})


def test_metadata_filters():
    index, vectors = _faceted_index()
    bach = index.search(vectors[5], k=50, filters={"composer": "bach"})
    assert bach and all("Bach" in h.metadata["composer"] for h in bach) and len(bach) == 20
    both = index.search(
        vectors[5], k=50, filters={"composer": "bach", "style": "baroque", "catalog": "BWV 802"}
    )
    assert both and all(h.style == "baroque" and h.metadata["catalog"] == "BWV 802" for h in both)
    assert index.search(vectors[5], k=5, filters={"composer": "Mozart"}) == []
    with pytest.raises(ValueError, match="unknown filter field"):
        index.search(vectors[5], k=5, filters={"opus": "1"})
    assert index.search(vectors[5], k=5, filters={"style": "roman"}) == []  # columns match exactly


# -- the HTTP app over a published tiny index ---------------------------------------------
@pytest.fixture(scope="module")
def faceted(tmp_path_factory):
    root = tmp_path_factory.mktemp("faceted")
    cfg = tiny_config(str(root / "store"))
    cfg.serve.reload_interval_s = 0.2
    manifest = publish_audio_index(cfg, root / "audio", facet_layout=LAYOUT)
    service = SearchService.from_config(cfg)
    return cfg, manifest, service, TestClient(create_app(service))


def test_by_track_with_facet_weights_filters_and_explanations(faceted):
    _, manifest, service, client = faceted
    assert service.index.facet_layout == LAYOUT
    info = client.get("/info").json()
    assert (
        info["facet_layout"]["tempo"] == list(LAYOUT["tempo"])
        and "composer" in info["filter_fields"]
    )
    response = client.get(
        "/search/by-track",
        params={
            "track_id": "track0",
            "start_s": 1.0,
            "k": 6,
            "w_dynamics": 2,
            "w_tempo": 1,
            "composer": "bach",
        },
    )
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert len(hits) == 6 and all("Bach" in h["metadata"]["composer"] for h in hits)
    for hit in hits:
        parts = hit["facet_similarities"]
        assert abs(hit["similarity"] - (2 * parts["dynamics"] + parts["tempo"]) / 3) < 1e-4
        facets = {e["facet"]: e for e in hit["explanation"]}
        assert set(facets) == {"tempo", "dynamics", "articulation", "timbre"}
        assert " vs " in facets["tempo"]["text"] and facets["dynamics"][
            "embedding_similarity"
        ] == round(parts["dynamics"], 4)
    # the timeline weight reaches the index, which names the part its model lacks
    refused = client.get(
        "/search/by-track", params={"track_id": "track0", "start_s": 1.0, "w_timeline": 1}
    )
    assert refused.status_code == 422 and "timeline" in refused.text


def test_descriptor_cache_makes_repeated_queries_cheap(faceted):
    _, _, service, client = faceted
    params = {"track_id": "track1", "start_s": 2.0, "k": 5}
    assert client.get("/search/by-track", params=params).status_code == 200
    before = service.descriptor_cache.info()
    again = client.get("/search/by-track", params=params)
    after = service.descriptor_cache.info()
    assert (
        again.status_code == 200
        and after["misses"] == before["misses"]
        and after["hits"] == before["hits"] + 5
    )
    no_explain = client.get("/search/by-track", params={**params, "explain": False}).json()
    assert all(h["explanation"] is None for h in no_explain["hits"])


def test_upload_options_on_a_plain_index(tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    publish_audio_index(cfg, tmp_path / "audio")
    client = TestClient(create_app(SearchService.from_config(cfg)))
    clip = wav_bytes(track_audio(1, 16000)[:40000], 16000)
    refused = client.post("/search", params={"w_tempo": 1}, files={"file": ("q.wav", clip)})
    assert refused.status_code == 422 and "facet" in refused.json()["detail"]
    result = client.post(
        "/search",
        params={"k": 4, "mmr_lambda": 0.3, "filter": "catalog=Op. 11"},
        files={"file": ("q.wav", clip)},
    )
    assert result.status_code == 200, result.text
    hits = result.json()["hits"]
    assert len(hits) == 4 and all(h["track_id"] == "track1" for h in hits)
    assert all(h["explanation"] and h["facet_similarities"] == {} for h in hits)
    diverse = {h["segment_id"] for h in hits}
    plain = {
        h["segment_id"]
        for h in client.post(
            "/search", params={"k": 4, "filter": "catalog=Op. 11"}, files={"file": ("q.wav", clip)}
        ).json()["hits"]
    }
    assert len(diverse) == len(plain) == 4
    bad = client.post(
        "/search", params={"filter": "no-equals-sign"}, files={"file": ("q.wav", clip)}
    )
    assert bad.status_code == 422 and "field=value" in bad.json()["detail"]
    unknown = client.post("/search", params={"filter": "opus=1"}, files={"file": ("q.wav", clip)})
    assert unknown.status_code == 422 and "unknown filter field" in unknown.json()["detail"]
    assert (
        client.post(
            "/search", params={"mmr_lambda": 2}, files={"file": ("q.wav", clip)}
        ).status_code
        == 422
    )


def test_audio_range_requests_and_waveform(faceted):
    _, _, _, client = faceted
    whole = client.get("/audio/track0")
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    part = client.get("/audio/track0", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
    tail = client.get("/audio/track0", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == whole.content[-50:]
    bad = client.get("/audio/track0", headers={"Range": f"bytes={len(whole.content)}-"})
    assert (
        bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(whole.content)}"
    )
    wave = client.get("/tracks/track0/waveform", params={"points": 60}).json()
    assert wave["points"] == 60 and wave["duration_s"] == 6.0
    assert all(lo <= hi for lo, hi in zip(wave["min"], wave["max"])) and max(wave["max"]) > 0.1
    assert client.get("/tracks/ghost/waveform").status_code == 404


def test_hot_index_update_without_errors(faceted):
    cfg, manifest, service, client = faceted
    errors: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            r = client.get(
                "/search/by-track",
                params={"track_id": "track2", "start_s": 0.5, "k": 3, "explain": False},
            )
            if r.status_code != 200:
                errors.append(r.text)
            else:
                versions.append(r.json()["index_version"])

    service.start_reloader()
    worker = threading.Thread(target=loop)
    worker.start()
    try:
        time.sleep(0.3)
        new = publish_audio_index(
            cfg, Path(cfg.storage.root).parent / "audio2", n_tracks=4, facet_layout=LAYOUT
        )
        deadline = time.monotonic() + 30
        while (not versions or versions[-1] != new["version"]) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join()
        service.stop_reloader()
    assert not errors
    assert versions[0] == manifest["version"] and versions[-1] == new["version"]
    # The swap is atomic: once the new version is served, the old one never comes back.
    first_new = versions.index(new["version"])
    assert set(versions[first_new:]) == {new["version"]}
    assert service.stats.reloads == 1 and len(service.index.tracks()) == 4
