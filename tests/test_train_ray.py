"""Ray Train integration: pretrain, fine-tune and resume on a tiny generated segment table."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clip, tiny_config, write_tiny_ingest

from mess_ray.models import Embedder
from mess_ray.storage import Storage


@pytest.fixture
def tiny_store(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    write_tiny_ingest(storage)
    return storage


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
    # on every track is checked in tests/test_e2e.py's check_training.)
    from mess_ray.train.common import with_run_name

    def run_name(inputs: dict) -> str:
        return with_run_name(cfg, "pretrain", cfg.pretrain, inputs).run_name

    assert run_name(manifest["inputs"]) == manifest["version"]
    whole = {k: v for k, v in manifest["inputs"].items() if k != "audio_fraction"}
    assert run_name(whole) != manifest["version"]


def test_finetune_resumes_from_checkpoint(ray_local, tiny_store, monkeypatch):
    import mess_ray.train.finetune as finetune_stage
    from mess_ray.train import run_finetune
    from mess_ray.train.common import finished_run

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

    # Re-running a finished run republishes the same model at once: no Ray Train run at all.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run started Ray Train again")

    monkeypatch.setattr(finetune_stage, "fit", no_training)
    third = run_finetune(cfg, tiny_store)
    assert third["counts"]["steps"] == 4 and third["losses"]["history"] == history
    assert (
        third["model_path"] == second["model_path"] and third["created_at"] >= second["created_at"]
    )
    assert tiny_store.latest("finetune") == "resume-me"
    # ... but not when a setting that shapes the model changed, or it is asked for more steps.
    inputs = second["inputs"]
    for change in ({"lr": cfg.finetune.lr * 2}, {"steps": 5}):
        changed = cfg.finetune.model_copy(update=change)
        assert finished_run(cfg, tiny_store, "finetune", changed, inputs) is None
    assert (
        finished_run(cfg, tiny_store, "finetune", cfg.finetune, {**inputs, "ingest": "x"}) is None
    )
    assert finished_run(cfg, tiny_store, "finetune", cfg.finetune, inputs) is not None
    monkeypatch.undo()
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
