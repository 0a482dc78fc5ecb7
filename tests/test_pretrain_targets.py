"""Pretraining targets (logmel, mfcc, dynamics, chroma), multi-codebook masked prediction, and
the pure statistics of benchmarks/pretrain_vs_random.py. No Ray: fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from benchmarks import common as bench_common
from benchmarks import pretrain_vs_random as bench
from mess_ray.config import load_config
from mess_ray.models import build_encoder
from mess_ray.models.encoder import num_frames
from mess_ray.train.pretrain import (
    CODEBOOK_FILE,
    TARGET_KINDS,
    HubertPretrainModel,
    MfccFrames,
    TargetFeatures,
    align_targets,
    fit_codebook,
    masked_prediction_loss,
    save_encoder,
)

SR, HOP = 16000, 320


def _tone(freq: float, seconds: float = 1.0, amplitude: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return (amplitude * torch.sin(2 * math.pi * freq * t))[None]


def _codebook(dim: int, codes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "centroids": rng.standard_normal((codes, dim)).astype(np.float32),
        "mean": np.zeros(dim, np.float32),
        "std": np.ones(dim, np.float32),
    }


@pytest.mark.parametrize(
    "kind,dim", [("logmel", 32), ("mfcc", 13), ("dynamics", 5), ("chroma", 12)]
)
def test_every_target_has_one_frame_per_encoder_frame(kind, dim):
    encoder = build_encoder("tiny", seed=0)
    waveform = 0.1 * torch.randn(2, 2 * SR)
    features = TargetFeatures(kind, SR, HOP, 32)(waveform)
    assert features.shape[0] == 2 and features.shape[2] == dim
    assert torch.isfinite(features).all()
    frames = num_frames(encoder, waveform.shape[1])
    assert align_targets(torch.zeros(features.shape[:2], dtype=torch.long), frames).shape == (
        2,
        frames,
    )


def test_level_invariant_targets_ignore_gain_but_logmel_does_not():
    waveform = 0.05 * torch.randn(1, SR)
    for kind in ("mfcc", "dynamics", "chroma"):
        extract = TargetFeatures(kind, SR, HOP, 32)
        assert torch.allclose(extract(waveform), extract(10 * waveform), rtol=1e-3, atol=1e-3), kind
    logmel = TargetFeatures("logmel", SR, HOP, 32)
    assert (logmel(10 * waveform) - logmel(waveform)).mean().item() == pytest.approx(
        math.log(100), abs=0.05
    )


def test_mfcc_is_an_orthonormal_dct_of_the_logmel_frame():
    mfcc = MfccFrames(SR, HOP, 32)
    gram = mfcc.dct.T @ mfcc.dct
    assert torch.allclose(gram, torch.eye(13), atol=1e-5)
    # c0 is the (scaled) mean log-mel level of the frame.
    logmel = mfcc.logmel(_tone(440.0))
    assert torch.allclose(
        mfcc(_tone(440.0))[..., 0], logmel.mean(dim=-1) * math.sqrt(32), atol=1e-3
    )
    with pytest.raises(ValueError, match="n_mels"):
        MfccFrames(SR, HOP, 8)


def test_chroma_peaks_at_the_played_pitch_class():
    chroma = TargetFeatures("chroma", SR, HOP, 32)
    for freq, pitch_class in ((440.0, 9), (261.63, 0), (392.0, 7)):  # A4, C4, G4
        profile = chroma(_tone(freq))[0, 10:-10].mean(dim=0)
        assert int(profile.argmax()) == pitch_class, freq
        assert profile.sum().item() == pytest.approx(1.0, abs=1e-3)


def test_dynamics_flux_and_level_change_mark_note_onsets():
    dynamics = TargetFeatures("dynamics", SR, HOP, 32)
    tone = _tone(440.0, seconds=1.0)
    gated = tone.clone()
    gated[:, : SR // 2] = 0.0  # silence, then the note starts at 0.5 s
    gated = gated + 1e-4 * torch.randn_like(gated)
    features = dynamics(gated)[0]  # [frames, 5]: level, d level, flux, centroid, d centroid
    onset = SR // 2 // HOP
    around = slice(onset - 1, onset + 3)
    assert (
        features[around, 1].max() > 5 * features[5 : onset - 5, 1].abs().max()
    )  # level jumps at the onset
    assert features[around, 2].max() > 5 * features[5 : onset - 5, 2].max()  # and so does the flux
    steady = dynamics(tone)[0, 10:-10]
    assert steady[:, 2].max() < features[around, 2].max()  # a held note has little flux


def test_multi_codebook_model_averages_the_heads_losses():
    torch.manual_seed(0)
    books = {"logmel": _codebook(16, 8, 0), "dynamics": _codebook(5, 8, 1)}
    model = HubertPretrainModel(
        build_encoder("tiny", seed=0), books, SR, 16, mask_prob=0.5, mask_length=5
    )
    logits, targets, mask = model(0.1 * torch.randn(2, SR))
    assert logits.shape[:3] == targets.shape and logits.shape[0] == 2 and logits.shape[-1] == 8
    assert targets.shape[1:] == mask.shape
    loss, accuracy = masked_prediction_loss(logits, targets, mask)
    per_head = [masked_prediction_loss(logits[h], targets[h], mask)[0] for h in range(2)]
    assert loss.item() == pytest.approx(float(sum(p.item() for p in per_head)) / 2, rel=1e-5)
    assert 0.0 <= accuracy <= 1.0
    loss.backward()
    assert all(head.weight.grad is not None for head in model.heads.values())
    with pytest.raises(ValueError, match="line up"):
        masked_prediction_loss(logits, targets[:1], mask)


def test_codebooks_must_agree_and_are_all_saved(tmp_path):
    encoder = build_encoder("tiny", seed=0)
    with pytest.raises(ValueError, match="same number of codes"):
        HubertPretrainModel(
            encoder, {"logmel": _codebook(16, 8, 0), "mfcc": _codebook(13, 4, 1)}, SR, 16, 0.5, 5
        )
    with pytest.raises(ValueError, match="unknown pretraining target"):
        TargetFeatures("pitch", SR, HOP, 16)
    model = HubertPretrainModel(
        encoder, {"logmel": _codebook(16, 8, 0), "mfcc": _codebook(13, 8, 1)}, SR, 16, 0.5, 5
    )
    save_encoder(model, tmp_path, {})
    assert np.load(tmp_path / CODEBOOK_FILE)["centroids"].shape == (8, 16)
    assert np.load(tmp_path / "kmeans_codebook_mfcc.npz")["centroids"].shape == (8, 13)
    # A codebook fitted on real target features assigns every frame a valid code.
    features = TargetFeatures("mfcc", SR, HOP, 16)(0.1 * torch.randn(4, SR))
    book = fit_codebook(features.reshape(-1, 13).numpy(), 8, iterations=5)
    assert book["centroids"].shape == (8, 13)


def test_config_targets_are_validated():
    assert load_config(None, []).pretrain.targets == ["logmel"]
    cfg = load_config(None, ["pretrain.targets=[logmel,chroma]"])
    assert cfg.pretrain.targets == ["logmel", "chroma"] and set(cfg.pretrain.targets) <= set(
        TARGET_KINDS
    )
    for bad in ("[logmel,logmel]", "[pitch]", "[]"):
        with pytest.raises((ValidationError, ValueError)):
            load_config(None, [f"pretrain.targets={bad}"])


# -- benchmarks/pretrain_vs_random.py pure pieces ---------------------------------------------
def test_per_query_ap_matches_the_eval_benchmark():
    from mess_ray.eval.benchmark import build_protocol, score_system

    rng = np.random.default_rng(0)
    tracks = np.array([f"t{i // 3}" for i in range(24)], dtype=object)
    pieces = np.array([f"p{i // 6}" for i in range(24)], dtype=object)
    styles = np.array([["a", "b"][(i // 3) % 2] for i in range(24)], dtype=object)
    x = rng.standard_normal((24, 8))
    ap, chance = bench.per_query_ap(x, tracks, pieces, styles)
    summary, _ = score_system(x, build_protocol(tracks, pieces, styles))
    assert np.nanmean(ap) == pytest.approx(summary["map"]) and chance == pytest.approx(
        summary["chance"]
    )


def test_cluster_bootstrap_interval():
    clusters = np.repeat(np.arange(10), 4)
    # A constant difference has a zero-width interval at that value.
    point, lo, hi = bench_common.cluster_bootstrap_ci(
        [(np.full(40, 0.25), clusters)], iterations=200
    )
    assert point == lo == hi == pytest.approx(0.25)
    # Noise around +0.1 in two strata: the interval covers 0.1 and excludes 0; NaNs are ignored.
    rng = np.random.default_rng(1)
    values = [0.1 + 0.05 * rng.standard_normal(40) for _ in range(2)]
    values[0][3] = np.nan
    point, lo, hi = bench_common.cluster_bootstrap_ci(
        [(v, clusters) for v in values], iterations=2000
    )
    assert lo < 0.1 < hi and lo > 0 and lo < point < hi
    # Correlated clusters (one value per cluster, repeated) widen the interval vs independent queries.
    per_cluster = np.repeat(rng.standard_normal(10), 4)
    _, clo, chi = bench_common.cluster_bootstrap_ci([(per_cluster, clusters)], iterations=2000)
    _, ilo, ihi = bench_common.cluster_bootstrap_ci([(per_cluster, np.arange(40))], iterations=2000)
    assert chi - clo > 1.5 * (ihi - ilo)
    with pytest.raises(ValueError):
        bench_common.cluster_bootstrap_ci([(np.full(4, np.nan), np.arange(4))])


def test_layer_embeddings_match_the_pipeline_embedder(tmp_path):
    from mess_ray.models.embedder import MeanPooledEncoder

    encoder = build_encoder("tiny", seed=3)
    audio = 0.1 * np.random.default_rng(0).standard_normal((5, SR)).astype(np.float32)
    per_layer = bench.layer_embeddings(encoder, audio, batch_size=2)
    assert per_layer.shape == (encoder.config.num_hidden_layers + 1, 5, encoder.config.hidden_size)
    with torch.inference_mode():
        pipeline = MeanPooledEncoder(encoder, None)(torch.from_numpy(audio)).numpy()
    assert np.allclose(
        F.normalize(torch.from_numpy(per_layer[1]), dim=-1).numpy(), pipeline, atol=1e-5
    )
    systems = bench.with_layer_mean(per_layer)
    assert set(systems) == {"layer0", "layer1", "layer2", "layer_mean"}
    assert np.allclose(np.linalg.norm(systems["layer_mean"], axis=1) <= 1.0 + 1e-6, True)


def test_exclude_eval_holdout_keeps_held_out_pieces_out_of_pretraining(tmp_path):
    import pyarrow as pa
    from helpers import tiny_config, write_tiny_ingest

    from mess_ray.segments import split_pieces
    from mess_ray.storage import Storage
    from mess_ray.train.pretrain import excluded_pieces, sample_frames
    from mess_ray.train.targets import drop_excluded

    storage = Storage(str(tmp_path / "store"))
    write_tiny_ingest(storage, pieces=4, per_style=2)
    cfg = tiny_config(storage.root)
    assert excluded_pieces(cfg, storage, "ing1") == []
    cfg = cfg.model_copy(
        update={
            "pretrain": cfg.pretrain.model_copy(
                update={"exclude_eval_holdout": True, "kmeans_sample_frames": 10**6}
            )
        }
    )
    held = excluded_pieces(cfg, storage, "ing1")
    assert (
        held
        == split_pieces([f"piece{i}" for i in range(4)], cfg.eval.holdout_fraction, cfg.eval.seed)[
            1
        ]
    )
    assert held
    batch = pa.table(
        {"piece_id": ["piece0", "piece1", "piece2", "piece3", ""], "x": [0, 1, 2, 3, 4]}
    )
    kept = drop_excluded(batch, held).column("piece_id").to_pylist()
    assert not set(kept) & set(held) and "" in kept and len(kept) == 5 - len(held)
    # k-means frames come only from the pieces that remain: one piece of four is a quarter of them.
    everything = ["piece0", "piece1", "piece2", "piece3"]
    one_piece = sample_frames(cfg, storage, "ing1", 320, exclude=everything[1:])["logmel"]
    all_pieces = sample_frames(cfg, storage, "ing1", 320)["logmel"]
    assert len(one_piece) > 0 and 4 * len(one_piece) == len(all_pieces)
    with pytest.raises(ValueError, match="no segments to pretrain on"):
        sample_frames(cfg, storage, "ing1", 320, exclude=everything)
