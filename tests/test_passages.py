"""GET/POST /passages without Ray: FastAPI TestClient over a tiny published index whose content
features were written the way the index job writes them."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from helpers import (
    PASSAGE_SWELL,
    PASSAGE_TUNE,
    publish_passages_index,
    render_melody,
    tiny_config,
)

from mess_ray.index.faiss_index import IndexSpec, build_index
from mess_ray.index.job import INDEX_METADATA_COLUMNS, write_index_artifact
from mess_ray.models import Embedder
from mess_ray.serve import SearchService, create_app
from mess_ray.storage import Storage, new_version


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("passages")
    cfg = tiny_config(str(root / "store"))
    cfg.content.identify_top = 4
    manifest, onsets = publish_passages_index(cfg, root)
    return cfg, manifest, onsets


@pytest.fixture(scope="module")
def client(published):
    cfg, _, _ = published
    return TestClient(create_app(SearchService.from_config(cfg)))


def test_passage_is_found_in_every_other_performance_of_the_work(client, published):
    _, _, onsets = published
    a, b = onsets["anna"][8], onsets["anna"][28]
    r = client.get("/passages", params={"track_id": "anna", "start_s": a, "end_s": b})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["work_from"] == "catalog" and body["query"]["piece_id"] == "tune"
    got = {p["track_id"]: p for p in body["performances"]}
    assert set(got) == {"ben", "cleo", "dan"}
    assert body["candidates"] == {"considered": 3, "aligned": 3, "matched": 3}
    for track, perf in got.items():
        assert abs(perf["start_s"] - onsets[track][8]) < 0.2, (track, perf["start_s"])
        assert abs(perf["end_s"] - onsets[track][28]) < 0.2, (track, perf["end_s"])
        assert (
            len(perf["curves"]["tempo"])
            == len(body["score_s"])
            == len(perf["curves"]["loudness_db"])
        )
    assert got["ben"]["tempo_ratio"] == pytest.approx(0.50 / 0.42, rel=0.08)
    assert got["cleo"]["tempo_ratio"] == pytest.approx(0.50 / 0.58, rel=0.08)
    # ben plays the same crescendo (quieter), cleo a diminuendo: ben ranks above cleo
    ranks = {p["track_id"]: p["rank"] for p in body["performances"]}
    assert ranks["ben"] < ranks["cleo"]
    assert [p["rank"] for p in body["performances"]] == [1, 2, 3]
    assert got["ben"]["embedding_similarity"] is not None


def test_a_track_without_piece_finds_its_work_from_audio(client, published):
    _, _, onsets = published
    a, b = onsets["nolabel"][5], onsets["nolabel"][25]
    r = client.get("/passages", params={"track_id": "nolabel", "start_s": a, "end_s": b})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["work_from"] == "audio"
    found = {p["track_id"] for p in body["performances"]}
    assert found and found <= {"anna", "ben", "cleo", "dan"}


def test_an_uploaded_passage_is_aligned_in_the_indexed_performances(client, published):
    cfg, _, _ = published
    audio, on = render_melody(PASSAGE_TUNE, 0.55, loud=PASSAGE_SWELL, seed=99)
    clip = audio[int(on[10] * 16000) : int(on[30] * 16000)]
    buf = io.BytesIO()
    sf.write(buf, clip, 16000, format="WAV")
    r = client.post("/passages", files={"file": ("q.wav", buf.getvalue(), "audio/wav")})
    assert r.status_code == 200, r.text
    _, _, onsets = published
    perf = {p["track_id"]: p for p in r.json()["performances"]}
    assert "anna" in perf and abs(perf["anna"]["start_s"] - onsets["anna"][10]) < 0.25


@pytest.mark.parametrize(
    "params, status, words",
    [
        ({"track_id": "nobody", "start_s": 1, "end_s": 5}, 404, "unknown track"),
        ({"track_id": "anna", "start_s": 5000, "end_s": 5010}, 422, "outside"),
        ({"track_id": "anna", "start_s": 3, "end_s": 900}, 422, "outside"),
        ({"track_id": "anna", "start_s": 5, "end_s": 4}, 422, "start_s"),
        ({"track_id": "anna", "start_s": 5, "end_s": 5.5}, 422, "min_query_s"),
        ({"track_id": "solo", "start_s": 1, "end_s": 6}, 404, "no other indexed performance"),
        ({"track_id": "anna", "start_s": 1}, 422, "end_s"),
    ],
)
def test_every_error_path_answers_a_clear_4xx(client, params, status, words):
    r = client.get("/passages", params=params)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_audio_matching_nothing_is_a_404(client):
    noise = np.random.default_rng(5).standard_normal(16000 * 6).astype(np.float32) * 0.1
    buf = io.BytesIO()
    sf.write(buf, noise, 16000, format="WAV")
    r = client.post("/passages", files={"file": ("noise.wav", buf.getvalue(), "audio/wav")})
    assert r.status_code == 404, r.text
    assert "matches no indexed performance" in r.json()["detail"]


def test_passages_are_in_the_openapi_spec(client):
    spec = client.get("/openapi.json").json()
    assert {"get", "post"} <= set(spec["paths"]["/passages"])
    assert "404" in spec["paths"]["/passages"]["get"]["responses"]


def test_an_index_without_content_features_answers_503(tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.content.features = False
    storage = Storage.from_config(cfg.storage)
    embedder = Embedder.from_ref(cfg, storage, "random")
    rows = {c: [] for c in INDEX_METADATA_COLUMNS}
    rows.update(
        segment_id=[1],
        track_id=["t"],
        piece_id=["p"],
        style=["s"],
        start_s=[0.0],
        end_s=[2.0],
        sample_rate=[16000],
        source_uri=["/nonexistent.wav"],
        metadata_json=["{}"],
    )
    spec = IndexSpec(type="flat", dim=embedder.dim)
    vec = embedder.embed(np.zeros((1, 32000), np.float32))
    write_index_artifact(
        cfg,
        storage,
        new_version(),
        build_index(spec, [(vec, np.array([1]))]),
        spec,
        pa.table(rows),
        embedder.info,
        {"segments": 1, "vectors": 1},
        {"ingest": "test"},
    )
    client = TestClient(create_app(SearchService.from_config(cfg)))
    r = client.get("/passages", params={"track_id": "t", "start_s": 0, "end_s": 2})
    assert r.status_code == 503 and "no content features" in r.json()["detail"]


def test_cli_passages_verb_prints_the_aligned_versions(client, published, monkeypatch, capsys):
    import mess_ray.serve.client as http_client
    from mess_ray.cli import main

    def routed_get(url, params=None, timeout=None):
        return client.get(url.replace("http://svc", ""), params=params)

    monkeypatch.setattr(http_client.httpx, "get", routed_get)
    _, _, onsets = published
    argv = ["passages", "--url", "http://svc", "--track", "anna"]
    assert main([*argv, "--start", str(onsets["anna"][8]), "--end", str(onsets["anna"][28])]) == 0
    out = capsys.readouterr().out
    assert "aligned (s)" in out and "ben" in out and "cleo" in out
    with pytest.raises(SystemExit, match="--start and --end"):
        main(argv)
    with pytest.raises(http_client.ServiceError, match="404"):
        main(["passages", "--url", "http://svc", "--track", "solo", "--start", "1", "--end", "6"])
