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

    check_training(cfg, storage, manifests, segments)
    # Evaluation wrote a report with an mAP for every system.
    evaluation = manifests["evaluate"]
    assert storage.exists("eval", evaluation["version"], "report.md")
    systems = evaluation["metrics"]
    for name in ("descriptors", "random", "pretrain", "finetune"):
        assert 0.0 <= systems[name]["map"] <= 1.0
        assert systems[name]["map"] >= systems[name]["chance"] * 0.5
    assert "mAP" in evaluation["headline"]


def check_training(cfg, storage: Storage, manifests: dict, segments: list[dict]) -> None:
    """Pretraining and fine-tuning published models the next stages load, with what they
    heard, their losses and per-step timings in their manifests."""
    from mess_ray.models import Embedder
    from mess_ray.segments import split_pieces
    from mess_ray.splits import covered_seconds
    from mess_ray.train.common import TIMING_COLUMNS

    for stage in ("pretrain", "finetune"):
        assert manifests[stage]["counts"]["steps"] == getattr(cfg, stage).steps
        losses = manifests[stage]["losses"]
        assert np.isfinite(losses["first"]) and np.isfinite(losses["last"])
    pre = manifests["pretrain"]
    version = pre["version"]
    # No run_name configured: derived from the inputs, so re-submitting resumes this run.
    assert version.startswith("pretrain-") and storage.latest("pretrain") == version
    assert pre["inputs"]["ingest"] == manifests["ingest"]["version"]
    assert len(pre["losses"]["history"]) == cfg.pretrain.steps
    assert pre["losses"]["first"] > 0  # cross-entropy over the clusters
    # Every track heard but those of the held-out pieces (and test-side pianists, if any).
    pieces = sorted({s["piece_id"] for s in segments})
    train_pieces, holdout = split_pieces(pieces, cfg.eval.holdout_fraction, cfg.eval.seed)
    if cfg.pretrain.exclude_eval_holdout:
        assert sorted(pre["inputs"].get("excluded_pieces", [])) == sorted(holdout)
    else:
        holdout = []
    left_out = set(pre["inputs"].get("excluded_tracks", []))
    heard: dict[str, list[dict]] = {}
    for row in segments:
        if row["piece_id"] not in holdout and row["track_id"] not in left_out:
            heard.setdefault(row["track_id"], []).append(row)
    counts = pre["counts"]
    assert counts["audio_fraction"] == 1.0 and "audio_fraction" not in pre["inputs"]
    assert counts["pretrain_segments"] == sum(len(rows) for rows in heard.values())
    seconds = sum(
        covered_seconds([r["start_s"] for r in rows], [r["end_s"] for r in rows])
        for rows in heard.values()
    )
    assert counts["pretrain_audio_s"] == pytest.approx(seconds, abs=0.01)
    # Per-step phase timings (rank 0): the checkpoint at step 2 was saved and reported after
    # its step; steps 1 and 3 neither reported (report_every=10) nor saved anything.
    rows = [dict(zip(TIMING_COLUMNS, r, strict=True)) for r in pre["step_timings"]]
    assert [r["step_s"] > 0 for r in rows] == [True] * cfg.pretrain.steps
    assert rows[1]["checkpoint_s"] > 0 and rows[1]["report_s"] > 0
    assert all(rows[i]["report_s"] == rows[i]["checkpoint_s"] == 0 for i in (0, 2))
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in rows)
    assert storage.exists("pretrain", version, "model", "config.json")
    with storage.open(f"pretrain/{version}/model/kmeans_codebook.npz") as f:
        assert np.load(f)["centroids"].shape == (cfg.pretrain.num_clusters, cfg.pretrain.n_mels)
    pretrained = Embedder.from_ref(cfg, storage, "pretrain")
    assert pretrained.info["version"] == version and pretrained.dim == 64

    ft = manifests["finetune"]
    assert ft["inputs"]["pretrain"] == version
    assert set(ft["train_pieces"]) <= set(train_pieces) and not set(holdout) & set(
        ft["train_pieces"]
    )
    assert ft["styles"] == sorted({s["style"] for s in segments})
    embedder = Embedder.from_ref(cfg, storage, "finetune")
    # The default model has facet heads: overall part + 4 facet parts, laid out as recorded.
    assert embedder.dim == cfg.model.embedding_dim + 4 * cfg.model.facet_dim
    assert embedder.info["facet_layout"]["overall"] == [0, cfg.model.embedding_dim]


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
