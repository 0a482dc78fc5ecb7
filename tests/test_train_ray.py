"""Ray Train integration: pretrain, fine-tune and resume on a tiny generated segment table."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import STYLES, clip, tiny_config, write_tiny_ingest

from mess_ray.models import Embedder
from mess_ray.segments import split_pieces
from mess_ray.storage import Storage


@pytest.fixture
def tiny_store(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    write_tiny_ingest(storage)
    return storage


def test_pretrain_then_finetune_publish_models(ray_local, tiny_store):
    from mess_ray.train import run_finetune, run_pretrain

    cfg = tiny_config(tiny_store.root, finetune={"batch_size": 4})
    manifest = run_pretrain(cfg, tiny_store)
    # No run_name configured: derived from the inputs, so re-submitting resumes this run.
    pre_version = manifest["version"]
    assert pre_version.startswith("pretrain-") and tiny_store.latest("pretrain") == pre_version
    assert manifest["counts"]["steps"] == cfg.pretrain.steps
    assert len(manifest["losses"]["history"]) == cfg.pretrain.steps
    assert np.isfinite(manifest["losses"]["first"]) and np.isfinite(manifest["losses"]["last"])
    assert manifest["losses"]["first"] > 0  # cross-entropy over 8 clusters
    assert manifest["inputs"]["ingest"] == "ing1"
    # Every track heard: 12 tracks of four overlapping 2 s clips at a 1 s hop = 5 s each.
    assert manifest["counts"]["audio_fraction"] == 1.0
    assert manifest["counts"]["pretrain_segments"] == 48
    assert manifest["counts"]["pretrain_audio_s"] == pytest.approx(12 * 5.0)
    assert "audio_fraction" not in manifest["inputs"]
    # Per-step phase timings (rank 0): the checkpoint at step 2 was saved and reported after
    # its step; steps 1 and 3 neither reported (report_every=10) nor saved anything.
    from mess_ray.train.common import TIMING_COLUMNS

    rows = [dict(zip(TIMING_COLUMNS, r, strict=True)) for r in manifest["step_timings"]]
    assert [r["step_s"] > 0 for r in rows] == [True] * 4
    assert rows[1]["checkpoint_s"] > 0 and rows[1]["report_s"] > 0
    assert all(rows[i]["report_s"] == rows[i]["checkpoint_s"] == 0 for i in (0, 2))
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in rows)
    assert tiny_store.exists("pretrain", pre_version, "model", "config.json")
    with tiny_store.open(f"pretrain/{pre_version}/model/kmeans_codebook.npz") as f:
        assert np.load(f)["centroids"].shape == (cfg.pretrain.num_clusters, cfg.pretrain.n_mels)
    pre = Embedder.from_ref(cfg, tiny_store, "pretrain")
    assert pre.info["version"] == pre_version and pre.dim == 64

    ft = run_finetune(cfg, tiny_store)
    assert ft["inputs"]["pretrain"] == pre_version and ft["counts"]["steps"] == cfg.finetune.steps
    train_pieces, holdout = split_pieces(
        [f"piece{i}" for i in range(4)], cfg.eval.holdout_fraction, cfg.eval.seed
    )
    assert sorted(ft["train_pieces"]) == sorted(train_pieces) and not set(holdout) & set(
        ft["train_pieces"]
    )
    assert ft["styles"] == sorted(STYLES)
    embedder = Embedder.from_ref(cfg, tiny_store, "finetune")
    # The default model has facet heads: overall part + 4 facet parts, laid out as the manifest says.
    assert embedder.dim == cfg.model.embedding_dim + 4 * cfg.model.facet_dim
    assert embedder.info["facet_layout"]["overall"] == [0, cfg.model.embedding_dim]
    vectors = embedder.embed(np.stack([clip(0, s, 0) for s in STYLES]))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_pretrain_on_a_share_of_the_audio_hears_only_the_kept_tracks(ray_local, tiny_store):
    from mess_ray.splits import read_pretrain_audio
    from mess_ray.train import run_pretrain

    cfg = tiny_config(tiny_store.root, pretrain={"audio_fraction": 0.5, "steps": 2})
    share = read_pretrain_audio(tiny_store, "ing1", 0.5, cfg.pretrain.seed)
    assert 0 < len(share.kept_tracks) < 12
    manifest = run_pretrain(cfg, tiny_store)
    counts = manifest["counts"]
    assert counts["pretrain_segments"] == 4 * len(share.kept_tracks) < 48
    assert counts["pretrain_audio_s"] == pytest.approx(5.0 * len(share.kept_tracks))
    left_out = manifest["inputs"]["audio_fraction"]["left_out_tracks"]
    assert sorted(left_out) == sorted(share.left_out_tracks)
    assert not set(left_out) & set(share.kept_tracks)
    # The run's name derives from its inputs (the share's left-out tracks among them): the same
    # settings on the whole corpus are a different run, not a resume of this one. (Pretraining
    # on every track is test_pretrain_then_finetune_publish_models: 48 segments.)
    from mess_ray.train.common import with_run_name

    def run_name(inputs: dict) -> str:
        return with_run_name(cfg, "pretrain", cfg.pretrain, inputs).run_name

    assert run_name(manifest["inputs"]) == manifest["version"]
    whole = {k: v for k, v in manifest["inputs"].items() if k != "audio_fraction"}
    assert run_name(whole) != manifest["version"]


def test_finetune_resumes_from_checkpoint(ray_local, tiny_store):
    from mess_ray.train import run_finetune

    cfg = tiny_config(
        tiny_store.root,
        finetune={
            "steps": 2,
            "checkpoint_every": 1,
            "loss": "triplet",
            "batch_size": 4,
            "run_name": "resume-me",
        },
    )
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
    assert tiny_store.latest("finetune") == "resume-me"
    # Re-running a finished run trains no further and republishes the same model.
    third = run_finetune(cfg, tiny_store)
    assert third["counts"]["steps"] == 4 and third["losses"]["history"] == history
    # New data under the same run_name must not silently continue the old run.
    write_tiny_ingest(tiny_store, pieces=4, per_style=2, version="ing2")
    with pytest.raises(ValueError, match="new run_name"):
        run_finetune(cfg, tiny_store)


def test_finetune_on_s3_storage(ray_local, s3_bucket):
    """Checkpoints, the run folder and the model artifact all live in the object store."""
    from mess_ray.train import run_finetune

    storage = Storage(f"{s3_bucket}/store")
    write_tiny_ingest(storage, pieces=3, per_style=3)
    cfg = tiny_config(
        storage.root,
        finetune={
            "steps": 2,
            "batch_size": 4,
            "checkpoint_every": 1,
            "num_workers": 1,
            "run_name": "s3run",
        },
    )
    manifest = run_finetune(cfg, storage)
    assert manifest["counts"]["steps"] == 2 and manifest["model_path"].startswith("s3://")
    assert manifest["checkpoint"].startswith(storage.url("finetune", "runs", "s3run"))
    assert any(n.startswith("checkpoint_") for n in storage.listdir("finetune/runs/s3run"))
    embedder = Embedder.from_ref(cfg, storage, "finetune")
    assert embedder.info["version"] == "s3run"
    assert embedder.embed(np.stack([clip(1, "legato", 0)])).shape == (1, embedder.dim)


def test_pretrain_survives_a_killed_worker(ray_local, tiny_store):
    """A worker dies mid-run: Ray Train restarts the group, which resumes from the last checkpoint."""
    import time

    from mess_ray.train import run_pretrain
    from mess_ray.train.common import CHECKPOINT_SCORE, TEST_FAILURE_MARKER

    cfg = tiny_config(
        tiny_store.root,
        pretrain={
            "steps": 6,
            "checkpoint_every": 2,
            "keep_checkpoints": 1,
            "num_workers": 2,
            "max_failures": 1,
            "test_fail_at_step": 3,
            "run_name": "killed",
        },
    )
    started = time.perf_counter()
    manifest = run_pretrain(cfg, tiny_store)
    # The last-rank worker os._exit'ed after step 3 (the marker proves the failure happened).
    assert tiny_store.read_json(f"pretrain/runs/killed/{TEST_FAILURE_MARKER}")["step"] == 3
    # The restarted group continued from the step-2 checkpoint, not from 0, and lost only step 3.
    assert manifest["resumed_from_steps"] == [2]
    assert manifest["counts"]["steps"] == 6
    assert manifest["losses"]["steps"] == [1, 2, 3, 4, 5, 6]  # no step trained twice in the history
    assert len(manifest["losses"]["history"]) == 6 and all(
        np.isfinite(manifest["losses"]["history"])
    )
    # Keep-best-1 plus the latest: the published model is the final step's checkpoint.
    assert manifest["checkpoint"].endswith("checkpoint_0000006")
    kept = manifest["kept_checkpoints"]
    assert 1 <= len(kept) <= 2 and all(c[CHECKPOINT_SCORE] is not None for c in kept)
    on_disk = sorted(
        n for n in tiny_store.listdir("pretrain/runs/killed") if n.startswith("checkpoint_0")
    )
    assert "checkpoint_0000006" in on_disk and len(on_disk) <= 2
    assert time.perf_counter() - started < 90


def test_materialized_corpus_gives_the_same_batches_every_epoch(ray_local, tiny_store):
    """Small corpora are read into the object store once (train.materialize_below_mb); with
    ordered execution (the shipped recipe) each epoch's batches are those of the streamed read."""
    from ray.data import DataContext

    from mess_ray.segments import read_segments_ray

    def epochs(dataset) -> list[list[list[str]]]:
        shard = dataset.streaming_split(1, equal=True)[0]
        return [
            [
                list(batch["segment_id"])
                for batch in shard.iter_batches(
                    batch_size=4,
                    batch_format="numpy",
                    drop_last=True,
                    local_shuffle_buffer_size=8,
                    local_shuffle_seed=epoch,
                )
            ]
            for epoch in range(2)
        ]

    context = DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        dataset = read_segments_ray(tiny_store, "ing1", columns=["segment_id", "audio"])
        dataset = dataset.randomize_block_order(seed=0)
        streamed = epochs(dataset)
        assert streamed[0] and streamed[0] != streamed[1]  # reshuffled per epoch
        assert epochs(dataset.materialize()) == streamed
    finally:
        context.execution_options.preserve_order = preserve
