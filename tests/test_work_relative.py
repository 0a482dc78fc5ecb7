"""Expression relative to the work (issue 20, item 5) and chain-normalised inputs (item 3):
the pure norms, their fallbacks, aligned norms, the index artifact that stores them, the search
that uses them, the protocol's excerpt-level task, and the audio expression features on
generated audio with known asynchrony, articulation, sustain and tempo."""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pytest

from mess_ray.config import MessRayConfig
from mess_ray.descriptors import (
    EXPRESSION_NAMES,
    chord_groups,
    expression_features,
    impute_columns,
)
from mess_ray.index.embed import vectors_table
from mess_ray.index.faiss_index import IndexSpec, build_index
from mess_ray.index.job import INDEX_METADATA_COLUMNS, VECTORS_DIR, write_index_artifact
from mess_ray.index.searcher import SearchIndex
from mess_ray.segments import segment_id
from mess_ray.storage import Storage, new_version
from mess_ray.work_relative import (
    FALLBACK_SINGLE,
    FALLBACK_UNKNOWN,
    NormAccumulator,
    WorkNorms,
    aligned_relative,
    recording_relative,
)

SR = 16000


# -- the norms ---------------------------------------------------------------------------------
def corpus():
    """Work A: two performances (p1 loud, p2 soft) around a high work mean; work B: one."""
    rng = np.random.default_rng(0)
    a1 = rng.normal([10.0, 5.0], 0.1, (6, 2)) + [1.0, 0.0]
    a2 = rng.normal([10.0, 5.0], 0.1, (6, 2)) - [1.0, 0.0]
    b = rng.normal([-3.0, 2.0], 0.1, (4, 2))
    x = np.concatenate([a1, a2, b])
    works = ["A"] * 12 + ["B"] * 4
    perfs = ["p1"] * 6 + ["p2"] * 6 + ["q1"] * 4
    return x, works, perfs


def test_work_norm_with_several_performances_subtracts_the_work_mean_and_scales_by_its_spread():
    x, works, perfs = corpus()
    norms = WorkNorms.fit(x, works, perfs)
    assert set(norms.works) == {"A"} and norms.works["A"].performances == 2
    rel = norms.transform(x, works)
    a = x[:12]
    floor = 0.25 * x.std(axis=0)
    np.testing.assert_allclose(
        rel.vectors[:12], (a - a.mean(axis=0)) / np.maximum(a.std(axis=0), floor)
    )
    # what remains is how each performance deviates: loud p1 > 0, soft p2 < 0 on dimension 0
    assert (rel.vectors[:6, 0] > 0.5).all() and (rel.vectors[6:12, 0] < -0.5).all()
    assert rel.applied[:12].all() and "2 performances" in rel.reasons[0]


def test_a_work_with_one_performance_or_unknown_falls_back_to_the_corpus_norm_and_says_so():
    x, works, perfs = corpus()
    norms = WorkNorms.fit(x, works, perfs)
    rel = norms.transform(x[12:], ["B", "B", "", "never-seen"])
    np.testing.assert_allclose(rel.vectors, (x[12:] - x.mean(axis=0)) / x.std(axis=0))
    assert not rel.applied.any()
    assert rel.reasons == [FALLBACK_SINGLE, FALLBACK_SINGLE, FALLBACK_UNKNOWN, FALLBACK_SINGLE]


def test_center_mode_scales_by_the_corpus_spread():
    x, works, perfs = corpus()
    rel = WorkNorms.fit(x, works, perfs, mode="center").transform(x[:12], works[:12])
    np.testing.assert_allclose(rel.vectors, (x[:12] - x[:12].mean(axis=0)) / x.std(axis=0))


def test_streamed_fit_equals_the_batch_fit_and_round_trips_through_json():
    x, works, perfs = corpus()
    acc = NormAccumulator()
    for sl in (slice(0, 5), slice(5, 13), slice(13, 16)):
        acc.add(x[sl], works[sl], perfs[sl])
    streamed, batch = acc.finish(), WorkNorms.fit(x, works, perfs)
    np.testing.assert_allclose(streamed.works["A"].mean, batch.works["A"].mean)
    np.testing.assert_allclose(streamed.works["A"].scale, batch.works["A"].scale)
    back = WorkNorms.from_dict(json.loads(json.dumps(batch.to_dict())))
    np.testing.assert_allclose(back.transform(x, works).vectors, batch.transform(x, works).vectors)
    with pytest.raises(ValueError, match="schema"):
        WorkNorms.from_dict({**batch.to_dict(), "schema": 99})


def test_bad_input_is_refused():
    x, works, perfs = corpus()
    with pytest.raises(ValueError, match="one entry per vector"):
        WorkNorms.fit(x, works[:-1], perfs)
    with pytest.raises(ValueError, match="NaN"):
        WorkNorms.fit(np.full((2, 2), np.nan), ["A", "A"], ["p", "q"])
    with pytest.raises(ValueError, match="min_performances"):
        WorkNorms.fit(x, works, perfs, min_performances=1)
    with pytest.raises(ValueError, match="mode"):
        WorkNorms.fit(x, works, perfs, mode="zscore")
    with pytest.raises(ValueError, match="dimension"):
        WorkNorms.fit(x, works, perfs).transform(np.ones((1, 3)), ["A"])


def test_aligned_norms_compare_a_passage_with_the_same_beats_of_the_other_performances():
    # Two performances of a work that gets louder along the score; p1 is always 1 louder.
    beats = np.arange(6) * 4.0
    level = beats / 4.0
    x = np.concatenate([level + 1.0, level - 1.0])[:, None] * np.ones((1, 2))
    x[:, 1] = 0.0
    spans = np.tile(np.stack([beats, beats + 4.0], axis=1), (2, 1))
    works, perfs = ["W"] * 12, ["p1"] * 6 + ["p2"] * 6
    aligned = aligned_relative(x, works, perfs, spans, mode="center")
    whole = WorkNorms.fit(x, works, perfs, mode="center").transform(x, works)
    # aligned: every p1 passage sits the same distance above its aligned peers
    assert np.allclose(aligned.vectors[:6, 0], aligned.vectors[0, 0])
    assert (aligned.vectors[:6, 0] > 0).all() and (aligned.vectors[6:, 0] < 0).all()
    assert "aligned passages of 2 performances" in aligned.reasons[0]
    # the whole-work norm mixes the crescendo into the deviation
    assert np.ptp(whole.vectors[:6, 0]) > 1.0
    # a passage no other performance covers keeps the whole-work norm
    spans[0] = [100.0, 104.0]
    lonely = aligned_relative(x, works, perfs, spans, mode="center")
    assert lonely.reasons[0].startswith("relative to the norm of 2 performances")


def test_recording_relative_removes_each_recordings_gain_from_the_chosen_columns():
    x = np.array([[1.0, 10.0], [3.0, 12.0], [21.0, 10.0], [23.0, 12.0]])
    out = recording_relative(x, ["r1", "r1", "r2", "r2"], columns=[0])
    np.testing.assert_allclose(out[:, 0], [-1.0, 1.0, -1.0, 1.0])
    np.testing.assert_allclose(out[:, 1], x[:, 1])


# -- index artifact and search ------------------------------------------------------------------
def published_index(tmp_path, enabled: bool = True):
    """Three works: W0 and W1 with two performances each, W2 with one; vectors = work content
    (large, shared by every performance of a work) + the pianist's way (small)."""
    rng = np.random.default_rng(1)
    dim, rows, vecs = 8, {c: [] for c in INDEX_METADATA_COLUMNS}, []
    content = rng.normal(0, 3.0, (3, dim))
    style = {"alice": np.eye(dim)[0], "bob": np.eye(dim)[1], "carol": np.eye(dim)[2]}
    plays = [("W0", "alice"), ("W0", "bob"), ("W1", "alice"), ("W1", "bob"), ("W2", "carol")]
    for t, (work, who) in enumerate(plays):
        for s in range(4):
            rows["segment_id"].append(segment_id(f"t{t}", s * SR))
            rows["track_id"].append(f"t{t}")
            rows["piece_id"].append(work)
            rows["style"].append("")
            rows["start_s"].append(float(2 * s))
            rows["end_s"].append(float(2 * s + 4))
            rows["sample_rate"].append(SR)
            rows["source_uri"].append(f"/a/t{t}.wav")
            rows["metadata_json"].append(json.dumps({"performance_id": f"{work}-{who}"}))
            vecs.append(content[int(work[1])] + style[who] + rng.normal(0, 0.05, dim))
    x = np.asarray(vecs, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # embedders give unit vectors
    ids = np.asarray(rows["segment_id"], dtype=np.int64)
    storage = Storage(str(tmp_path / "store"))
    version = new_version()
    storage.write_bytes(
        posixpath.join("index", version, VECTORS_DIR, "part-0.parquet"),
        _parquet(vectors_table(ids, x)),
    )
    spec = IndexSpec(type="flat", dim=dim)
    cfg = MessRayConfig()
    cfg.work_relative.enabled = enabled
    manifest = write_index_artifact(
        cfg,
        storage,
        version,
        build_index(spec, [(x, ids)]),
        spec,
        pa.table(rows),
        {"ref": "random", "kind": "random"},
        {"segments": len(ids), "vectors": len(ids)},
        {"ingest": "v0"},
    )
    return storage, manifest, ids, x


def _parquet(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_the_index_artifact_carries_versioned_checksummed_work_norms(tmp_path):
    storage, manifest, ids, x = published_index(tmp_path)
    entry = manifest["work_norms"]
    assert entry["schema"] == 1 and entry["works"] == 2 and entry["file"] == "work_norms.json"
    raw = json.loads(storage.read_bytes(f"index/{manifest['version']}/work_norms.json"))
    assert set(raw["works"]) == {"W0", "W1"}  # W2 has one performance: no norm
    np.testing.assert_allclose(raw["works"]["W0"]["mean"], x[:8].mean(axis=0), atol=1e-5)
    loaded = SearchIndex.load(storage)
    assert loaded.work_norms is not None and set(loaded.work_norms.works) == {"W0", "W1"}
    storage.write_bytes(f"index/{manifest['version']}/work_norms.json", b"{}")
    with pytest.raises(ValueError, match="checksum"):
        SearchIndex.load(storage)


def test_a_work_relative_query_finds_the_same_pianist_in_another_work(tmp_path):
    storage, manifest, ids, x = published_index(tmp_path)
    si = SearchIndex.load(storage)
    query = int(ids[0])  # alice playing W0
    plain = si.search_by_segment(query, k=3, exclude_track="t0")
    assert {h.piece_id for h in plain} == {"W0"}  # plain: the same work, whoever plays it
    hits = si.search_work_relative(
        si.vector(query), si.work_of(query), k=4, exclude_track="t0", filters=None
    )
    hits = [h for h in hits if h.piece_id != "W0"][:3]
    assert hits and all(h.track_id == "t2" for h in hits)  # alice in W1
    assert hits[0].work_relative.startswith("relative to the norm of 2 performances")
    by_segment = si.search_by_segment(query, k=4, exclude_track="t0", work_relative=True)
    assert [h.segment_id for h in by_segment] == [
        h.segment_id
        for h in si.search_work_relative(si.vector(query), "W0", k=4, exclude_track="t0")
    ]
    lonely = si.search_by_segment(int(ids[16]), k=2, work_relative=True)  # W2: one performance
    assert lonely and all(h.work_relative == FALLBACK_SINGLE for h in lonely)
    unknown = si.search_work_relative(si.vector(query), None, k=1)
    assert unknown[0].work_relative == FALLBACK_UNKNOWN


def test_an_index_without_norms_refuses_work_relative_search(tmp_path):
    storage, manifest, ids, _ = published_index(tmp_path, enabled=False)
    assert manifest["work_norms"] is None
    si = SearchIndex.load(storage)
    with pytest.raises(ValueError, match="no work norms"):
        si.search_by_segment(int(ids[0]), k=2, work_relative=True)


# -- audio expression features on generated audio ----------------------------------------------
def chords(
    ioi: float = 0.5,
    count: int = 8,
    step: float = 0.0,
    duty: float = 0.9,
    decay: float = 3.0,
    notes=(261.6, 329.6, 392.0),
    seconds: float = 4.0,
) -> np.ndarray:
    """``count`` chords every ``ioi`` s; chord note j starts ``j * step`` s late; each note
    sounds for ``duty * ioi`` s (then a 10 ms release) with an exponential decay of ``decay`` 1/s."""
    y = np.zeros(int(seconds * SR))
    for k in range(count):
        for j, f in enumerate(notes):
            start = int((0.1 + k * ioi + j * step) * SR)
            if start >= y.size:
                continue  # past the end of the clip
            t = np.arange(int(duty * ioi * SR)) / SR
            tone = 0.2 * (np.sin(2 * np.pi * f * t) + 0.5 * np.sin(4 * np.pi * f * t))
            tone *= np.exp(-decay * t)
            tone[-160:] *= np.linspace(1, 0, 160)
            end = min(y.size, start + tone.size)
            y[start:end] += tone[: end - start]
    return y.astype(np.float32)


@pytest.mark.parametrize("step", [0.0, 0.015, 0.025, 0.03])
def test_chord_asynchrony_is_recovered_within_8_ms(step):
    # three-note chords spread over 2 * step seconds (resolvable from 15 ms between notes)
    got = expression_features(chords(step=step), SR)["chord_asynchrony_ms"]
    assert got == pytest.approx(2000 * step, abs=8.0)


@pytest.mark.parametrize("duty", [0.3, 0.6, 0.9])
def test_articulation_is_recovered_within_0_1(duty):
    got = expression_features(chords(duty=duty), SR)["articulation_ratio"]
    assert got == pytest.approx(duty, abs=0.1)


def test_sustain_decay_tells_pedalled_from_dry_notes():
    # fully held notes (duty 1) decaying at 1/s (8.7 dB/s) vs 6/s (52 dB/s): within 30 %
    slow = expression_features(chords(duty=1.0, decay=1.0), SR)["decay_db_per_s"]
    fast = expression_features(chords(duty=1.0, decay=6.0), SR)["decay_db_per_s"]
    assert slow == pytest.approx(8.7, rel=0.3) and fast == pytest.approx(52.1, rel=0.3)


@pytest.mark.parametrize("bpm", [100, 120, 150])
def test_tempo_and_note_rate_are_recovered_within_4_percent(bpm):
    ioi = 60.0 / bpm
    f = expression_features(chords(ioi=ioi, count=int(3.8 / ioi)), SR)
    assert f["tempo_bpm"] == pytest.approx(bpm, rel=0.04)
    assert f["onset_rate_hz"] == pytest.approx(int(3.8 / ioi) / 4.0, rel=0.04)
    assert f["timing_deviation"] == pytest.approx(0.0, abs=0.02)


def test_level_features_follow_the_gain_and_silence_is_unknown_not_zero():
    loud, soft = (expression_features(chords() * g, SR) for g in (1.0, 0.1))
    assert loud["loudness_lufs"] - soft["loudness_lufs"] == pytest.approx(20.0, abs=0.5)
    assert loud["attack_level_db"] - soft["attack_level_db"] == pytest.approx(20.0, abs=0.5)
    quiet = expression_features(np.zeros(SR * 2, np.float32), SR)
    assert np.isnan(quiet["chord_asynchrony_ms"]) and np.isnan(quiet["tempo_bpm"])
    assert set(quiet) == set(EXPRESSION_NAMES)
    with pytest.raises(ValueError):
        expression_features(np.zeros((2, 2)), SR)


def test_chord_groups_and_imputation():
    groups = chord_groups(np.array([0.0, 0.02, 0.05, 0.5, 1.0, 1.03]))
    assert [len(g) for g in groups] == [3, 1, 2]
    x = impute_columns(np.array([[1.0, np.nan], [3.0, np.nan]]))
    np.testing.assert_allclose(x, [[1.0, 0.0], [3.0, 0.0]])


def test_the_service_answers_a_work_relative_query_with_the_index_norms(tmp_path):
    from fastapi.testclient import TestClient

    from mess_ray.serve.app import create_app
    from mess_ray.serve.service import SearchService

    storage, manifest, ids, _ = published_index(tmp_path)
    cfg = MessRayConfig()
    cfg.storage.root = storage.root
    from types import SimpleNamespace

    # by-track queries use the stored vectors: the embedder is never called
    embedder = SimpleNamespace(dim=8, info={"ref": "random"})
    service = SearchService(cfg, SearchIndex.load(storage), embedder, storage=storage)
    client = TestClient(create_app(service))
    params = {"track_id": "t0", "start_s": 0.0, "end_s": 4.0, "k": 2, "explain": False}
    plain = client.get("/search/by-track", params={**params, "exclude_track": "t0"}).json()
    assert {h["piece_id"] for h in plain["hits"]} == {"W0"}
    assert all(h["work_relative"] is None for h in plain["hits"])
    rel = client.get(
        "/search/by-track",
        params={**params, "exclude_track": "t0", "work_relative": True, "piece_id": "W1"},
    )
    assert rel.status_code == 200, rel.text
    hits = rel.json()["hits"]
    assert hits and all(h["track_id"] == "t2" for h in hits)  # alice again, in another work
    assert all(h["work_relative"].startswith("relative to the norm of 2") for h in hits)
