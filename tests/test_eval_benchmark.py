"""The style-retrieval benchmark: protocol masks, scoring, and end-to-end runs on synthetic styles."""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import tiny_config

from mess_ray.eval.benchmark import (
    DESCRIPTORS,
    RANDOM,
    build_protocol,
    headline,
    run_evaluate,
    score_system,
    system_order,
)
from mess_ray.eval.report import markdown_report
from mess_ray.segments import SEGMENT_SCHEMA, encode_audio, segment_id, segments_dir, split_pieces
from mess_ray.storage import Storage, new_version

PIECES = ["piece-a", "piece-b", "piece-c", "piece-d"]
# Two clearly different ways of playing: loud and busy vs soft and sparse.
STYLES = {"loud_fast": (0.5, 8.0), "soft_slow": (0.03, 2.0)}


# -- pure functions -------------------------------------------------------------------------------
def test_build_protocol_masks():
    tracks = ["t1", "t1", "t2", "t3", "t4"]
    pieces = ["p1", "p1", "p2", "p1", "p2"]
    styles = ["s1", "s1", "s1", "s2", "s2"]
    p = build_protocol(tracks, pieces, styles)
    assert not p.candidates[0, 1] and not p.candidates[0, 0]  # own track excluded
    assert p.relevant[0].tolist() == [False, False, True, False, False]  # same style, other piece
    assert p.hard_negatives[0].tolist() == [
        False,
        False,
        False,
        True,
        False,
    ]  # same piece, other style
    assert p.negatives[0].tolist() == [False, False, False, True, True]
    assert not (p.relevant & p.negatives).any()
    with pytest.raises(ValueError, match="equal length"):
        build_protocol(["t1"], ["p1", "p2"], ["s1"])


def test_score_system_perfect_and_inverted_embeddings():
    tracks = [f"t{i}" for i in range(8)]
    pieces = ["p1", "p2", "p3", "p4"] * 2
    styles = ["a"] * 4 + ["b"] * 4
    protocol = build_protocol(tracks, pieces, styles)
    by_style = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    perfect, _ = score_system(by_style, protocol)
    assert (
        perfect["map"] == pytest.approx(1.0)
        and perfect["recall@1"] == 1.0
        and perfect["mrr"] == 1.0
    )
    assert perfect["cos_positive"] == pytest.approx(1.0) and perfect[
        "cos_hard_negative"
    ] == pytest.approx(0.0)
    assert perfect["triplet_loss"] == 0.0 and perfect["triplet_accuracy"] == 1.0
    # 3 relevant among 7 candidates: a random ranking's expected AP, H_7 / 7 + 2 (7 - H_7) / 42
    assert perfect["chance"] == pytest.approx(0.5803, abs=1e-4)
    # Embeddings that encode the piece (what is played) instead of the style score badly.
    by_piece = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]]
    wrong, _ = score_system(by_piece, protocol)
    assert wrong["recall@1"] == 0.0 and wrong["map"] < perfect["map"]
    assert wrong["triplet_loss"] == pytest.approx(1.2) and wrong["triplet_accuracy"] == 0.0
    with pytest.raises(ValueError, match="does not match"):
        score_system(by_style[:3], protocol)


def test_system_order_and_headline():
    assert system_order(["finetune", "random", "finetune"]) == ["finetune", "random", DESCRIPTORS]
    assert system_order([]) == [DESCRIPTORS, RANDOM]
    with pytest.raises(ValueError):
        system_order([""])
    line = headline(
        {"finetune": {"map": 0.712, "chance": 0.25}, "descriptors": {"map": 0.4, "chance": 0.25}}, 3
    )
    assert (
        line
        == "style retrieval mAP (preset sanity check) on 3 held-out pieces: finetune 0.71 vs descriptors 0.40 (chance 0.25)"
    )


def test_run_evaluate_rejects_a_string_of_refs(tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="list"):
        run_evaluate(cfg, Storage.from_config(cfg.storage), "finetune")


# -- integration -----------------------------------------------------------------------------------
def synthetic_track(
    piece_index: int, amplitude: float, rate_hz: float, seconds: float, sr: int, seed: int
) -> np.ndarray:
    """Decaying harmonic notes; the piece sets the pitches, the style sets loudness and note rate."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int((seconds + 1) * sr))
    length = int(0.4 * sr)
    t = np.arange(length) / sr
    env = np.minimum(t / 0.005, 1) * np.exp(-t / 0.15) * np.minimum((t[-1] - t) / 0.03, 1)
    scale = [0, 2, 4, 5, 7, 9, 11, 12]
    for j, start in enumerate(np.arange(0.02, seconds, 1 / rate_hz)):
        f0 = 196 * 2 ** ((scale[(j * (piece_index + 1)) % 8] + 3 * piece_index) / 12)
        i = int(start * sr)
        out[i : i + length] += (
            amplitude * env * sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 5))
        )
    return (out[: int(seconds * sr)] + 1e-4 * rng.standard_normal(int(seconds * sr))).astype(
        np.float32
    )


def write_synthetic_ingest(
    storage: Storage, sr: int, window_s: float, hop_s: float, seconds: float = 5.0
) -> str:
    """An 'ingest' artifact: 4 pieces x 2 styles, one track each, cut into windows."""
    rows = []
    seed = 0
    for p_index, piece in enumerate(PIECES):
        for style, (amplitude, rate) in STYLES.items():
            track = f"{piece}--{style}"
            audio = synthetic_track(p_index, amplitude, rate, seconds, sr, seed)
            seed += 1
            win, hop = int(window_s * sr), int(hop_s * sr)
            for start in range(0, len(audio) - win + 1, hop):
                rows.append(
                    {
                        "segment_id": segment_id(track, start),
                        "track_id": track,
                        "piece_id": piece,
                        "style": style,
                        "start_s": start / sr,
                        "end_s": (start + win) / sr,
                        "start_sample": start,
                        "num_samples": win,
                        "sample_rate": sr,
                        "source_uri": f"synthetic://{track}.wav",
                        "metadata_json": json.dumps({"title": piece}),
                        "audio": encode_audio(audio[start : start + win]),
                    }
                )
    # One unlabelled segment that must be excluded (no style).
    rows.append(
        {
            **rows[0],
            "segment_id": segment_id("unlabelled", 0),
            "track_id": "unlabelled",
            "style": "",
        }
    )
    version = new_version()
    table = pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)
    with storage.open(posixpath.join(segments_dir(version), "part-00000.parquet"), "wb") as f:
        pq.write_table(table, f)
    storage.publish("ingest", version, {"counts": {"segments": len(rows)}})
    return version


def eval_config(root: str):
    cfg = tiny_config(root)
    cfg.eval.holdout_fraction = 0.9
    _, holdout = split_pieces(PIECES, cfg.eval.holdout_fraction, cfg.eval.seed)
    assert len(holdout) >= 2, "the synthetic benchmark needs two held-out pieces"
    return cfg, holdout


@pytest.mark.parametrize("key", ["min_actors", "max_actors", "cpus_per_actor"])
def test_removed_eval_pool_settings_name_their_index_replacement(key):
    from pydantic import ValidationError

    from mess_ray.config import MessRayConfig

    with pytest.raises(ValidationError, match=f"eval.{key} was removed.*index.{key}"):
        MessRayConfig.model_validate({"eval": {key: 2}})


def test_run_evaluate_on_ray_data_actor_pool(ray_local, tmp_path):
    cfg, holdout = eval_config(str(tmp_path / "store"))
    cfg.eval.ray_data_min_segments = 0  # force the Ray Data actor pool path
    storage = Storage.from_config(cfg.storage)
    ingest_version = write_synthetic_ingest(
        storage, cfg.audio.sample_rate, cfg.audio.window_s, cfg.audio.hop_s
    )

    manifest = run_evaluate(cfg, storage, ["random"])

    assert storage.latest("eval") == manifest["version"]
    assert manifest["inputs"]["ingest"] == ingest_version
    assert manifest["systems"] == ["random", DESCRIPTORS]
    assert manifest["counts"]["held_out_pieces"] == len(holdout)
    assert manifest["counts"]["segments"] == len(holdout) * 2 * 4  # 2 styles x 4 windows of 5 s
    assert manifest["counts"]["excluded_unknown_style_segments"] in (0, 1)
    for name in (
        "report.json",
        "report.md",
        "metrics.png",
        "similarity_hist.png",
        "pca_styles.png",
    ):
        assert storage.exists("eval", manifest["version"], name), name
    chance = manifest["metrics"][DESCRIPTORS]["chance"]
    assert 0 < chance < 1
    # The descriptor baseline separates loud-and-busy from soft-and-sparse playing.
    assert manifest["metrics"][DESCRIPTORS]["map"] > chance + 0.3
    assert manifest["metrics"][DESCRIPTORS]["recall@1"] == 1.0
    assert "(chance" in manifest["headline"] and "descriptors" in manifest["headline"]
    report = json.loads(
        storage.read_bytes(posixpath.join("eval", manifest["version"], "report.json"))
    )
    assert report["settings"]["config_digest"] == cfg.digest()
    assert report["systems_info"]["random"]["kind"] == "random"
    md = storage.read_bytes(posixpath.join("eval", manifest["version"], "report.md")).decode()
    assert manifest["headline"] in md and "| map | " in md


@pytest.mark.slow
def test_run_evaluate_driver_side_on_s3_skips_missing_models_and_is_deterministic(s3_bucket):
    cfg, holdout = eval_config(f"{s3_bucket}/store")
    storage = Storage.from_config(cfg.storage)
    write_synthetic_ingest(storage, cfg.audio.sample_rate, cfg.audio.window_s, cfg.audio.hop_s)

    first = run_evaluate(cfg, storage, ["pretrain"])
    assert "pretrain" in first["skipped"] and "pretrain" not in first["metrics"]
    assert first["systems"] == [DESCRIPTORS, RANDOM]
    assert storage.exists("eval", first["version"], "pca_styles.png")
    assert "skipped systems" in markdown_report(first)
    second = run_evaluate(cfg, storage, ["pretrain"])
    assert second["version"] != first["version"]
    assert second["metrics"] == first["metrics"]
