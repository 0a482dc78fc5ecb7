"""The search service without Ray: FastAPI TestClient over a real (tiny) published index."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr
from fastapi.testclient import TestClient
from helpers import TRACK_SECONDS, publish_audio_index, tiny_config, track_audio, wav_bytes

from mess_ray.index.faiss_index import IndexSpec
from mess_ray.models import Embedder
from mess_ray.serve import SearchService, create_app
from mess_ray.serve.client import format_hits
from mess_ray.serve.service import PayloadTooLarge, UnsupportedMedia, clip_windows, decode_upload
from mess_ray.storage import Storage


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(str(root / "store"))
    manifest = publish_audio_index(cfg, root / "audio")
    return cfg, manifest, root


@pytest.fixture(scope="module")
def service(published):
    cfg, _, _ = published
    return SearchService.from_config(cfg)


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


# -- pure helpers ----------------------------------------------------------------------
def test_decode_upload_resamples_and_downmixes():
    stereo = np.stack([np.ones(44100, np.float32) * 0.5, np.zeros(44100, np.float32)], axis=1)
    mono, info = decode_upload(wav_bytes(stereo, 44100), 16000)
    assert (
        abs(len(mono) - 16000) <= 2
        and info["channels"] == 2
        and info["source_sample_rate"] == 44100
    )
    assert np.allclose(mono[1000:-1000], 0.25, atol=0.01)
    with pytest.raises(UnsupportedMedia):
        decode_upload(b"definitely not audio" * 50, 16000)
    with pytest.raises(UnsupportedMedia):
        decode_upload(b"", 16000)
    with pytest.raises(PayloadTooLarge):
        decode_upload(b"x" * 100, 16000, max_bytes=10)


def test_clip_windows_cover_the_clip():
    assert clip_windows(np.ones(5, np.float32), 10, 5).shape == (1, 10)
    frames = clip_windows(np.arange(23, dtype=np.float32), 10, 5)
    assert frames.shape == (4, 10) and frames[-1, -1] == 22  # tail window added


# -- endpoints -------------------------------------------------------------------------
def test_health_ready_and_page(client, published):
    _, manifest, _ = published
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["index_version"] == manifest["version"] and ready["count"] == manifest["count"]
    page = client.get("/")
    assert page.status_code == 200 and "mess-ray" in page.text and "/search/by-track" in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/search",
        "/search/by-track",
        "/tracks",
        "/tracks/{track_id}",
        "/audio/{track_id}",
    } <= set(paths)


def test_tracks_and_track_detail(client):
    tracks = client.get("/tracks").json()
    assert [t["track_id"] for t in tracks] == ["track0", "track1", "track2"]
    assert tracks[0]["metadata"] == {
        "title": "track0",
        "composer": "J. S. Bach",
        "catalog": "Op. 10",
    }
    assert tracks[0]["duration_s"] == TRACK_SECONDS
    detail = client.get("/tracks/track1").json()
    assert detail["num_segments"] == len(detail["segments"]) == 5
    missing = client.get("/tracks/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]


@pytest.mark.parametrize(
    "fmt,rate,channels", [("WAV", 44100, 2), ("FLAC", 22050, 1), ("OGG", 48000, 1)]
)
def test_search_upload_finds_its_track(client, fmt, rate, channels):
    clip = soxr.resample(track_audio(1, 16000)[16000:48000], 16000, rate)
    if channels == 2:
        clip = np.stack([clip, clip], axis=1)
    response = client.post(
        "/search", params={"k": 4}, files={"file": (f"q.{fmt.lower()}", wav_bytes(clip, rate, fmt))}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert len(result["hits"]) == 4 and result["hits"][0]["track_id"] == "track1"
    assert result["query"]["source_sample_rate"] == rate
    sims = [h["similarity"] for h in result["hits"]]
    assert sims == sorted(sims, reverse=True)
    assert "track1" in format_hits(result) and "similarity" in format_hits(result)


def test_search_upload_mp3(client, tmp_path):
    wav = tmp_path / "q.wav"
    sf.write(wav, track_audio(2, 16000)[:32000], 16000)
    mp3 = tmp_path / "q.mp3"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-ar", "44100", str(mp3)], check=True
    )
    response = client.post("/search", files={"file": ("q.mp3", mp3.read_bytes())})
    assert response.status_code == 200, response.text
    assert response.json()["hits"][0]["track_id"] == "track2"


def test_search_upload_options(client):
    clip = wav_bytes(track_audio(0, 16000)[:32000], 16000)
    excluded = client.post(
        "/search", params={"k": 5, "exclude_track": "track0"}, files={"file": ("q.wav", clip)}
    )
    assert excluded.status_code == 200 and all(
        h["track_id"] != "track0" for h in excluded.json()["hits"]
    )
    gapped = client.post(
        "/search", params={"k": 15, "min_gap_s": 2.5}, files={"file": ("q.wav", clip)}
    ).json()
    for track in {h["track_id"] for h in gapped["hits"]}:
        starts = sorted(h["start_s"] for h in gapped["hits"] if h["track_id"] == track)
        assert all(b - a >= 2.5 for a, b in zip(starts, starts[1:]))


def test_search_by_track(client):
    result = client.get(
        "/search/by-track", params={"track_id": "track2", "start_s": 1.0, "end_s": 3.0, "k": 3}
    )
    assert result.status_code == 200, result.text
    body = result.json()
    assert len(body["query"]["segment_ids"]) == 3  # starts 0, 1, 2 overlap (1, 3)
    assert not set(body["query"]["segment_ids"]) & {h["segment_id"] for h in body["hits"]}
    assert body["hits"][0]["track_id"] == "track2"
    other = client.get(
        "/search/by-track", params={"track_id": "track2", "start_s": 1.0, "exclude_track": "track2"}
    )
    assert all(h["track_id"] != "track2" for h in other.json()["hits"])


def test_audio_passage(client):
    response = client.get("/audio/track1", params={"start_s": 1.0, "end_s": 2.5})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(response.content))
    assert rate == 16000 and len(samples) == 24000
    np.testing.assert_allclose(samples, track_audio(1, 16000)[16000:40000], atol=1e-3)
    whole, _ = sf.read(io.BytesIO(client.get("/audio/track1").content))
    assert len(whole) == int(TRACK_SECONDS * 16000)


# -- error codes -----------------------------------------------------------------------
def test_415_for_non_audio(client):
    response = client.post(
        "/search", files={"file": ("notes.txt", b"these are not audio samples" * 40)}
    )
    assert response.status_code == 415 and "decode" in response.json()["detail"]
    assert client.post("/search", files={"file": ("empty.wav", b"")}).status_code == 415


def test_413_for_oversize_upload(published):
    cfg, _, _ = published
    small = cfg.model_copy(deep=True)
    small.serve.max_upload_mb = 0.05
    limited = TestClient(create_app(SearchService.from_config(small)))
    big = wav_bytes(np.zeros(16000 * 3, np.float32), 16000)  # ~96 KB > 51 KB
    response = limited.post("/search", files={"file": ("big.wav", big)})
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    ok = limited.post(
        "/search", files={"file": ("small.wav", wav_bytes(track_audio(0, 16000)[:8000], 16000))}
    )
    assert ok.status_code == 200


@pytest.mark.parametrize("params", [{"k": 0}, {"k": 5000}, {"min_gap_s": -1}, {"k": "many"}])
def test_422_for_bad_search_params(client, params):
    clip = wav_bytes(track_audio(0, 16000)[:16000], 16000)
    assert client.post("/search", params=params, files={"file": ("q.wav", clip)}).status_code == 422


def test_422_and_404_for_by_track(client):
    assert client.post("/search").status_code == 422  # no file
    assert client.get("/search/by-track", params={"start_s": 1}).status_code == 422  # no track
    past = client.get("/search/by-track", params={"track_id": "track0", "start_s": 99})
    assert past.status_code == 422 and "past the end" in past.json()["detail"]
    backwards = client.get(
        "/search/by-track", params={"track_id": "track0", "start_s": 3, "end_s": 2}
    )
    assert backwards.status_code == 422
    assert (
        client.get("/search/by-track", params={"track_id": "ghost", "start_s": 0}).status_code
        == 404
    )
    assert client.get("/audio/ghost").status_code == 404
    assert client.get("/audio/track0", params={"start_s": -1}).status_code == 422
    assert client.get("/audio/track0", params={"start_s": 99}).status_code == 422


def test_404_when_source_audio_is_gone(published, service):
    _, _, root = published
    moved = root / "audio" / "track2.wav"
    backup = root / "track2.bak"
    shutil.move(moved, backup)
    try:
        response = TestClient(create_app(service)).get("/audio/track2")
        assert response.status_code == 404 and "not available" in response.json()["detail"]
    finally:
        shutil.move(backup, moved)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_serve_time_search_knobs_reach_the_loaded_index(tmp_path, kind):
    import faiss
    import yaml

    from mess_ray.config import load_config

    cfg = tiny_config(str(tmp_path / "store"))
    dim = Embedder.from_ref(cfg, Storage.from_config(cfg.storage), "random").dim
    built = (
        IndexSpec(type="ivf", dim=dim, nlist=4, nprobe=1)
        if kind == "ivf"
        else IndexSpec(type="hnsw", dim=dim, hnsw_m=8, ef_search=16)
    )
    publish_audio_index(cfg, tmp_path / "audio", spec=built)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    def searcher(*overrides: str):
        index = SearchService.from_config(load_config(path, list(overrides))).index
        if kind == "ivf":
            return index.spec, faiss.extract_index_ivf(index.index)
        inner = faiss.downcast_index(index.index)
        while not hasattr(inner, "hnsw"):  # inside the id map
            inner = faiss.downcast_index(inner.index)
        return index.spec, inner

    if kind == "ivf":
        spec, ivf = searcher("index.nprobe=1")
        assert spec.nprobe == 1 and ivf.nprobe == 1
        spec, ivf = searcher("index.nprobe=3")
        assert spec.nprobe == 3 and ivf.nprobe == 3
        spec, ivf = searcher("index.nprobe=99")  # capped at the index's lists
        assert spec.nprobe == 4 and ivf.nprobe == 4
    else:
        spec, hnsw = searcher("index.ef_search=16")
        assert spec.ef_search == 16 and hnsw.hnsw.efSearch == 16
        spec, hnsw = searcher("index.ef_search=80")
        assert spec.ef_search == 80 and hnsw.hnsw.efSearch == 80


def test_an_upload_is_searched_at_every_query_lag_of_the_model_and_scored_at_its_best(tmp_path):
    """A model that tries its content timeline at several lags: an upload becomes one query
    vector per lag, and each hit's similarity is its best over them (never below the unshifted
    query's), the hit's timeline facet taken at that lag."""
    cfg = tiny_config(
        str(tmp_path / "store"),
        model={"content_timeline": True, "content_timeline_query_shift_ms": 40.0},
    )
    publish_audio_index(cfg, tmp_path / "audio")
    service = SearchService.from_config(cfg)
    assert service._state.embedder.query_shifts_ms == (0.0, -20.0, 20.0, -40.0, 40.0)
    delayed = np.concatenate([np.zeros(640, np.float32), track_audio(1, 16000)[16000:48000]])
    (variants,), state = service.embed_clips([delayed])
    assert variants.shape == (5, state.index.dim)
    result = TestClient(create_app(service)).post(
        "/search", params={"k": 3}, files={"file": ("q.wav", wav_bytes(delayed, 16000))}
    )
    assert result.status_code == 200, result.text
    hits = result.json()["hits"]
    assert hits[0]["track_id"] == "track1"
    for hit in hits:
        stored = state.index.vector(hit["segment_id"])
        assert hit["similarity"] == pytest.approx(float(np.max(variants @ stored)), abs=1e-4)
        assert hit["similarity"] >= float(variants[0] @ stored) - 1e-6


def test_a_track_and_time_query_is_searched_at_every_lag_from_the_tracks_audio(tmp_path):
    """Search by track + time with a model that tries several lags: the span's audio is read
    back from the source and its timeline recomputed at each lag (the unshifted variant is the
    stored vectors' mean again), each hit scored at its best lag; with the source gone, the
    stored vectors alone, and the response says why."""
    cfg = tiny_config(
        str(tmp_path / "store"),
        model={"content_timeline": True, "content_timeline_query_shift_ms": 40.0},
    )
    publish_audio_index(cfg, tmp_path / "audio")
    service = SearchService.from_config(cfg)
    state = service._state
    reads = []
    passage = service._passage
    service._passage = lambda uri, start_s, end_s: (
        reads.append((start_s, end_s)) or passage(uri, start_s, end_s)
    )
    vector, ids, lags, audio = service._track_query(state, "track1", 1.0, 3.0)
    stored, _ = state.index.span_vector("track1", 1.0, 3.0)
    assert vector.shape == (5, state.index.dim) and lags == {"query_lags": 5}
    assert float(vector[0] @ stored) > 0.999  # the audio read back embeds as it was indexed
    assert not np.allclose(vector[1:], vector[0])
    # Overlapping segments: their span is read once, and that audio comes back for explanations.
    rows = [state.index.segment(s) for s in ids]
    assert len(rows) > 1 and all(b["start_s"] < a["end_s"] for a, b in zip(rows, rows[1:]))

    def _span_of(segment_ids):
        rows = [state.index.segment(s) for s in segment_ids]
        return min(r["start_s"] for r in rows), max(r["end_s"] for r in rows)

    span = _span_of(ids)
    assert reads == [span] and len(audio) == round((span[1] - span[0]) * cfg.audio.sample_rate)
    client = TestClient(create_app(service))
    reads.clear()
    result = client.get("/search/by-track", params={"track_id": "track1", "start_s": 1.0, "k": 3})
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["query"]["query_lags"] == 5
    assert not set(body["query"]["segment_ids"]) & {h["segment_id"] for h in body["hits"]}
    # The explanations read each hit's passage, and the query's span no more than once.
    query_span = _span_of(body["query"]["segment_ids"])
    assert body["hits"][0]["explanation"] and reads.count(query_span) == 1
    variants, _, _, _ = service._track_query(state, "track1", 1.0, None)
    for hit in body["hits"]:
        score = float(np.max(variants @ state.index.vector(hit["segment_id"])))
        assert hit["similarity"] == pytest.approx(score, abs=1e-4)
    (tmp_path / "audio" / "track1.wav").unlink()
    gone = client.get("/search/by-track", params={"track_id": "track1", "start_s": 1.0, "k": 3})
    assert gone.status_code == 200, gone.text
    query = gone.json()["query"]
    assert query["query_lags"] == 1 and "track1.wav" in query["query_lags_skipped"]
    assert len(gone.json()["hits"]) == 3
