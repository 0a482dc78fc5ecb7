"""Pure pieces of training: schedules, losses, k-means targets, masks, data selection (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from mess_ray.config import load_config
from mess_ray.models import build_encoder
from mess_ray.models.encoder import num_frames
from mess_ray.segments import encode_audio, split_pieces
from mess_ray.storage import Storage
from mess_ray.train.common import decode_audio_column, lr_at, resolve_init, seed_numpy
from mess_ray.train.finetune import ContrastiveModel
from mess_ray.train.losses import batch_hard_triplet, multi_positive_infonce
from mess_ray.train.pretrain import (
    HubertPretrainModel,
    LogMelFrames,
    align_targets,
    assign_targets,
    fit_codebook,
    masked_prediction_loss,
    span_mask,
)
from mess_ray.train.targets import training_selection

SR = 16000


def test_lr_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, warmup_steps=2, total_steps=10) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # non-increasing after warmup
    assert lr_at(10, 1.0, 2, 10) == pytest.approx(0.1)  # decays to min_ratio
    assert lr_at(0, 1.0, 0, 5) == pytest.approx(1.0)


def test_decode_audio_column_fits_length():
    blobs = [encode_audio(np.ones(10, np.float32)), encode_audio(np.arange(3, dtype=np.float32))]
    batch = decode_audio_column(np.array(blobs, dtype=object), 5)
    assert batch.shape == (2, 5) and batch.dtype == torch.float32
    assert batch[1].tolist() == [0, 1, 2, 0, 0]


def _clustered(labels, dim=8, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: max(labels) + 1]
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim))
    return F.normalize(torch.tensor(x, dtype=torch.float32), dim=1)


def test_infonce_prefers_separated_embeddings():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    separated = _clustered(labels.tolist())
    shuffled = _clustered([0, 1, 2, 0, 1, 2])  # positives in different clusters
    good = multi_positive_infonce(separated, labels, 0.1)
    bad = multi_positive_infonce(shuffled, labels, 0.1)
    assert good < 0.05 and bad > 5.0
    # One positive among 5 candidates, all equally similar: loss = log(5).
    same = F.normalize(torch.ones(6, 4), dim=1)
    assert multi_positive_infonce(same, labels, 0.1).item() == pytest.approx(math.log(5), rel=1e-4)


def test_infonce_excludes_self_and_skips_anchors_without_positive():
    labels = torch.tensor([0, 1, 2])  # no positives at all
    emb = _clustered([0, 1, 2]).requires_grad_()
    loss = multi_positive_infonce(emb, labels, 0.1)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph (DDP needs every rank to backprop)
    with pytest.raises(ValueError):
        multi_positive_infonce(emb, torch.tensor([0, 1]), 0.1)


def test_batch_hard_triplet_loss():
    labels = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet(_clustered([0, 0, 1, 1]), labels, margin=0.2).item() == pytest.approx(
        0.0
    )
    hard = batch_hard_triplet(_clustered([0, 1, 0, 1]), labels, margin=0.2).item()
    assert hard == pytest.approx(math.sqrt(2) + 0.2, rel=0.05)  # d(pos)=sqrt2, d(neg)=0
    assert batch_hard_triplet(_clustered([0, 1]), torch.tensor([0, 1]), 0.2).item() == 0.0


def test_learnable_temperature_is_clamped():
    from mess_ray.models import EmbeddingModel

    model = ContrastiveModel(
        EmbeddingModel(build_encoder("tiny", seed=0), embedding_dim=8, pooling="mean"),
        temperature=0.1,
        learn_temperature=True,
    )
    assert model.log_temperature.requires_grad and model.temperature().item() == pytest.approx(0.1)
    with torch.no_grad():
        model.log_temperature.fill_(-20.0)
    assert model.temperature().item() == pytest.approx(0.01)


def test_kmeans_codebook_recovers_clusters():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 6)) * 10
    labels = rng.integers(0, 4, 2000)
    frames = (centres[labels] + rng.standard_normal((2000, 6)) * 0.1).astype(np.float32)
    codebook = fit_codebook(frames, 4, iterations=20, seed=0)
    assert codebook["centroids"].shape == (4, 6)
    assigned = assign_targets(
        torch.from_numpy(frames)[None],
        *(torch.from_numpy(codebook[k]) for k in ("centroids", "mean", "std")),
    )[0].numpy()
    # Same partition up to relabelling: every true cluster maps to exactly one code.
    mapping = {(t, a) for t, a in zip(labels.tolist(), assigned.tolist())}
    assert len(mapping) == 4
    with pytest.raises(ValueError, match="at least"):
        fit_codebook(frames[:3], 4)


def test_targets_align_with_encoder_frames_and_masks():
    encoder = build_encoder("tiny", seed=0)
    waveform = torch.randn(2, 2 * SR)
    mel = LogMelFrames(SR, 320, 16)(waveform)
    frames = num_frames(encoder, waveform.shape[1])
    assert mel.shape[0] == 2 and mel.shape[2] == 16 and mel.shape[1] >= frames
    targets = align_targets(torch.zeros(2, mel.shape[1], dtype=torch.long), frames)
    assert targets.shape == (2, frames)
    with pytest.raises(ValueError, match="stride"):
        align_targets(torch.zeros(2, frames - 1, dtype=torch.long), frames)
    mask = span_mask(2, frames, mask_prob=0.5, mask_length=5)
    assert mask.shape == (2, frames) and mask.dtype == torch.bool and mask.sum(dim=1).min() >= 5
    with pytest.raises(ValueError, match="mask_length"):
        span_mask(2, 4, 0.5, 5)


def test_pretrain_model_loss_is_on_masked_frames_and_trains():
    torch.manual_seed(0)
    codebook = {
        "centroids": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32),
        "mean": np.zeros(16, np.float32),
        "std": np.ones(16, np.float32),
    }
    model = HubertPretrainModel(
        build_encoder("tiny", seed=0), codebook, SR, 16, mask_prob=0.5, mask_length=5
    )
    waveform = torch.randn(2, SR)
    logits, targets, mask = model(waveform)
    assert logits.shape[:2] == targets.shape == mask.shape and logits.shape[2] == 8
    loss, accuracy = masked_prediction_loss(logits, targets, mask)
    assert loss.item() > 0 and 0.0 <= accuracy <= 1.0
    loss.backward()
    assert model.encoder.masked_spec_embed.grad is not None  # the mask embedding is used
    # Loss ignores unmasked frames: changing their logits leaves it unchanged.
    changed = logits.detach().clone()
    changed[~mask] = 100.0
    assert masked_prediction_loss(changed, targets, mask)[0].item() == pytest.approx(
        loss.item(), rel=1e-5
    )


def test_training_selection_uses_train_pieces_and_labelled_rows():
    pieces = [f"p{i}" for i in range(6)]
    table = pa.table(
        {"piece_id": [p for p in pieces for _ in range(3)], "style": ["a", "b", ""] * 6}
    )
    train_pieces, styles = training_selection(table, 0.34, 0)
    expected_train, holdout = split_pieces(pieces, 0.34, 0)
    assert train_pieces == expected_train and holdout and styles == ["a", "b"]
    with pytest.raises(ValueError, match="2 styles"):
        training_selection(pa.table({"piece_id": ["p0", "p1"], "style": ["a", "a"]}), 0.34, 0)
    with pytest.raises(ValueError, match="piece_id"):
        training_selection(pa.table({"piece_id": ["", ""], "style": ["a", "b"]}), 0.34, 0)


def test_resolve_init_order_named_weights_win_over_unrelated_artifact(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    storage = Storage(str(tmp_path))
    assert resolve_init(cfg, storage, "auto")["kind"] == "random"
    with pytest.raises(FileNotFoundError):
        resolve_init(cfg, storage, "pretrain")
    with pytest.raises(ValueError, match="model.pretrained"):
        resolve_init(cfg, storage, "pretrained")
    storage.publish("pretrain", "p1", {"inputs": {"init": {"kind": "random"}}})
    init = resolve_init(cfg, storage, "auto")
    assert init["kind"] == "artifact" and init["version"] == "p1"
    # Named published weights win over a pretrain artifact that did not start from them...
    cfg.model.pretrained = "/some/folder"
    init = resolve_init(cfg, storage, "auto")
    assert init["kind"] == "pretrained" and init["name"] == "/some/folder"
    assert resolve_init(cfg, storage, "pretrain")["version"] == "p1"  # unless forced
    # ...but not over one pretrained from those same weights (their continuation).
    storage.publish(
        "pretrain", "p2", {"inputs": {"init": {"kind": "pretrained", "name": "/some/folder"}}}
    )
    init = resolve_init(cfg, storage, "auto")
    assert init["kind"] == "artifact" and init["version"] == "p2"
    cfg.model.pretrained = "/other/folder"
    assert resolve_init(cfg, storage, "auto")["kind"] == "pretrained"
    assert resolve_init(cfg, storage, "random")["kind"] == "random"


def test_resume_guard_reads_newest_checkpoint_inputs(tmp_path):
    from mess_ray.train.common import HISTORY_FILE, check_resume_inputs, previous_run_inputs

    storage = Storage(str(tmp_path))
    assert previous_run_inputs(storage, "finetune", "r") is None
    storage.write_json(
        f"finetune/runs/r/checkpoint_0000002/{HISTORY_FILE}", {"inputs": {"ingest": "a"}}
    )
    storage.write_json(
        f"finetune/runs/r/checkpoint_0000010/{HISTORY_FILE}", {"inputs": {"ingest": "b"}}
    )
    assert previous_run_inputs(storage, "finetune", "r") == {"ingest": "b"}
    check_resume_inputs(None, {"ingest": "b"}, "r")
    check_resume_inputs({"ingest": "b"}, {"ingest": "b"}, "r")
    with pytest.raises(ValueError, match="new run_name"):
        check_resume_inputs({"ingest": "a"}, {"ingest": "b"}, "r")


def test_derived_run_name_is_stable_and_tracks_inputs():
    from mess_ray.config import load_config
    from mess_ray.train.common import with_run_name

    cfg = load_config(None)
    inputs = {"ingest": "v1", "init": {"kind": "random", "seed": 0, "size": "tiny"}}
    name = with_run_name(cfg, "pretrain", cfg.pretrain, inputs).run_name
    assert name.startswith("pretrain-")
    # Same job re-submitted: same run (resumes); new data or settings: a new run.
    assert with_run_name(cfg, "pretrain", cfg.pretrain, dict(inputs)).run_name == name
    assert with_run_name(cfg, "pretrain", cfg.pretrain, {**inputs, "ingest": "v2"}).run_name != name
    more_steps = cfg.pretrain.model_copy(update={"steps": 99})
    assert with_run_name(cfg, "pretrain", more_steps, inputs).run_name != name
    # Reading the corpus into the object store (or streaming it) is not a model setting.
    streamed = cfg.pretrain.model_copy(update={"materialize_below_mb": 0})
    assert with_run_name(cfg, "pretrain", streamed, inputs).run_name == name
    # An explicit run name is kept as given.
    named = cfg.pretrain.model_copy(update={"run_name": "mine"})
    assert with_run_name(cfg, "pretrain", named, inputs).run_name == "mine"


def _fail_in_child(storage_root: str) -> None:
    import os

    from mess_ray.train.common import maybe_inject_test_failure

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0"  # no wait for a controller poll here
    maybe_inject_test_failure(
        {"test_fail_at_step": 3, "run_name": "r"},
        {"root": storage_root},
        "pretrain",
        step=3,
        rank=1,
        world_size=2,
    )


@pytest.mark.slow
def test_injected_test_failure_kills_once(tmp_path):
    import multiprocessing

    from mess_ray.train.common import TEST_FAILURE_MARKER, maybe_inject_test_failure

    storage = Storage(str(tmp_path / "store"))
    tcfg = {"test_fail_at_step": 3, "run_name": "r"}
    # Not configured, another step or another rank: nothing happens (this process survives).
    for kwargs in ({"step": 2, "rank": 1}, {"step": 3, "rank": 0}):
        maybe_inject_test_failure(tcfg, {"root": storage.root}, "pretrain", world_size=2, **kwargs)
    maybe_inject_test_failure(
        {"test_fail_at_step": None, "run_name": "r"},
        {"root": storage.root},
        "pretrain",
        step=3,
        rank=1,
        world_size=2,
    )
    assert not storage.exists(f"pretrain/runs/r/{TEST_FAILURE_MARKER}")
    # The configured step on the last rank: the process exits abruptly, leaving the marker...
    child = multiprocessing.get_context("spawn").Process(
        target=_fail_in_child, args=(storage.root,)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 1
    assert storage.read_json(f"pretrain/runs/r/{TEST_FAILURE_MARKER}")["step"] == 3
    # ...so the restarted worker passes the same step without failing again.
    maybe_inject_test_failure(
        tcfg, {"root": storage.root}, "pretrain", step=3, rank=1, world_size=2
    )


def test_span_masks_are_a_function_of_seed_worker_and_step():
    """HuBERT's span sampler draws from NumPy's global generator: seeding it per worker and
    resume step makes a training run a function of its seed (the shipped model's recipe)."""

    def masks(seed: int, rank: int, step: int) -> np.ndarray:
        seed_numpy(seed, rank, step)
        return np.stack([span_mask(4, 50, 0.5, 5).numpy() for _ in range(3)])

    np.testing.assert_array_equal(masks(0, 0, 0), masks(0, 0, 0))
    for other in ((1, 0, 0), (0, 1, 0), (0, 0, 3)):
        assert not np.array_equal(masks(0, 0, 0), masks(*other)), other


def test_ddp_skips_the_per_step_buffer_broadcast_only_without_running_statistics():
    """The training models hold constant buffers (mel filterbank, codebook): DDP need not
    broadcast them before every forward; a batch-norm model keeps the broadcast."""
    from mess_ray.train.common import ddp_kwargs

    rng = np.random.default_rng(0)
    codebook = {
        "centroids": rng.standard_normal((8, 64)).astype(np.float32),
        "mean": np.zeros(64, np.float32),
        "std": np.ones(64, np.float32),
    }
    model = HubertPretrainModel(build_encoder("tiny", seed=0), codebook, SR, 64, 0.5, 5)
    assert any(True for _ in model.buffers())
    assert ddp_kwargs(model) == {"forward_sync_buffers": False}
    with_bn = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert ddp_kwargs(with_bn) == {"forward_sync_buffers": True}
    frozen_stats = torch.nn.BatchNorm1d(4, track_running_stats=False)
    assert ddp_kwargs(frozen_stats) == {"forward_sync_buffers": False}


def test_ingest_size_is_the_segment_files_on_storage(tmp_path):
    from helpers import write_tiny_ingest

    from mess_ray.segments import segments_dir
    from mess_ray.train.common import ingest_size_mb

    storage = Storage(str(tmp_path / "store"))
    write_tiny_ingest(storage, pieces=3, per_style=2)
    folder = tmp_path / "store" / segments_dir("ing1")
    on_disk = sum(f.stat().st_size for f in folder.rglob("*.parquet"))
    assert on_disk > 0 and ingest_size_mb(storage, "ing1") == pytest.approx(on_disk / 1e6)
