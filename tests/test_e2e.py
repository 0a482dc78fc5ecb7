"""The whole pipeline, end to end, on a tiny generated corpus: local storage and S3.

Renders, ingests, pretrains, fine-tunes, indexes, serves, queries over HTTP and evaluates,
then checks the artifacts against each other.
"""

from __future__ import annotations

import io
import math
import socket

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from helpers import tiny_config

from mess_ray.pipeline import run_demo
from mess_ray.segments import read_segment_table
from mess_ray.storage import Storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_segments(duration_s: float, window_s: float, hop_s: float) -> int:
    """Hop-grid windows that end inside the track, plus one that ends exactly at its end."""
    if duration_s <= window_s:
        return 1
    return math.ceil((duration_s - window_s) / hop_s - 1e-9) + 1


def check_pipeline(cfg, result) -> None:
    storage = Storage.from_config(cfg.storage)
    manifests = result["manifests"]

    # Render -> ingest: every rendered track was segmented, none rejected.
    render_version = manifests["render"]["version"]
    with storage.open(f"render/{render_version}/catalog.parquet") as f:
        catalog = pq.read_table(f).to_pylist()
    assert len(catalog) == manifests["render"]["counts"]["tracks"] >= 4
    segments = read_segment_table(storage).to_pylist()
    by_track: dict[str, list[dict]] = {}
    for row in segments:
        by_track.setdefault(row["track_id"], []).append(row)
    assert set(by_track) == {row["track_id"] for row in catalog}

    # Segment counts reconcile with audio durations; windows cover each track exactly.
    window, hop = cfg.audio.window_s, cfg.audio.hop_s
    for row in catalog:
        track = sorted(by_track[row["track_id"]], key=lambda r: r["start_s"])
        duration = row["duration_s"]
        assert len(track) == expected_segments(duration, window, hop), row["track_id"]
        assert track[0]["start_s"] == 0.0
        assert track[-1]["end_s"] == pytest.approx(duration, abs=2.0 / cfg.audio.sample_rate)
        for seg in track:
            assert seg["end_s"] - seg["start_s"] == pytest.approx(min(window, duration), abs=1e-3)
    assert len({r["segment_id"] for r in segments}) == len(segments)

    # Index size equals segment count, with the same ids.
    index_manifest = manifests["index"]
    assert index_manifest["counts"]["vectors"] == len(segments)
    meta = pq.read_table(storage.open(f"index/{index_manifest['version']}/metadata.parquet"))
    assert sorted(meta.column("segment_id").to_pylist()) == sorted(
        r["segment_id"] for r in segments
    )

    # The demo's real HTTP query (an uploaded clip of one segment) finds that segment first.
    query, hits = result["query"], result["query_result"]["hits"]
    assert hits[0]["track_id"] == query["track_id"]
    assert hits[0]["start_s"] == pytest.approx(query["start_s"])
    elsewhere = result["query_result_elsewhere"]["hits"]
    assert elsewhere and all(h["track_id"] != query["track_id"] for h in elsewhere)
    assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-3)

    # Querying by track + timestamp answers with other passages, best first, never the query itself.
    url = result["service_url"]
    target = segments[len(segments) // 3]
    resp = httpx.get(
        f"{url}/search/by-track",
        params={
            "track_id": target["track_id"],
            "start_s": target["start_s"],
            "end_s": target["end_s"],
            "k": 5,
        },
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    by_track = resp.json()["hits"]
    assert len(by_track) == 5
    assert target["segment_id"] not in {h["segment_id"] for h in by_track}
    assert [h["similarity"] for h in by_track] == sorted(
        (h["similarity"] for h in by_track), reverse=True
    )

    # The playback endpoint serves the passage as audio of the right length.
    resp = httpx.get(
        f"{url}/audio/{target['track_id']}",
        params={"start_s": target["start_s"], "end_s": target["end_s"]},
        timeout=60,
    )
    assert resp.status_code == 200
    audio, rate = sf.read(io.BytesIO(resp.content))
    assert len(audio) / rate == pytest.approx(target["end_s"] - target["start_s"], abs=0.05)

    # Training lowered its loss; evaluation wrote a report with an mAP for every system.
    for stage in ("pretrain", "finetune"):
        assert manifests[stage]["counts"]["steps"] == getattr(cfg, stage).steps
        losses = manifests[stage]["losses"]
        assert np.isfinite(losses["first"]) and np.isfinite(losses["last"])
    evaluation = manifests["evaluate"]
    assert storage.exists("eval", evaluation["version"], "report.md")
    systems = evaluation["metrics"]
    for name in ("descriptors", "random", "pretrain", "finetune"):
        assert 0.0 <= systems[name]["map"] <= 1.0
        assert systems[name]["map"] >= systems[name]["chance"] * 0.5
    assert "mAP" in evaluation["headline"]


def run_pipeline(cfg) -> dict:
    """The demo on the session's Ray; Serve is shut down after the checks so that every test
    can start its own HTTP proxy on its own port."""
    from ray import serve

    cfg.serve.port = _free_port()
    try:
        result = run_demo(cfg, shutdown=False)
        check_pipeline(cfg, result)
    finally:
        serve.shutdown()
    return result


def test_pipeline_end_to_end_local(ray_local, tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    run_pipeline(cfg)


def test_pipeline_end_to_end_s3(ray_local, s3_bucket):
    cfg = tiny_config(f"{s3_bucket}/mess-ray")
    run_pipeline(cfg)
    storage = Storage.from_config(cfg.storage)
    # Every stage published its artifact to the bucket.
    for stage in ("render", "ingest", "pretrain", "finetune", "index", "eval"):
        assert storage.latest(stage), stage
    assert storage.exists("index", storage.latest("index"), "index.faiss")
