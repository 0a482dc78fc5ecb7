"""Fine-tuning pieces without Ray: facet heads, level side channel, hard negatives, facet loss,
augmentations, collation, and a short training run showing a facet learns its descriptor."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mess_ray.config import AugmentConfig, load_config
from mess_ray.descriptors import DESCRIPTOR_NAMES, FACET_DESCRIPTORS, descriptor_vector
from mess_ray.facets import FACETS, OVERALL, parse_layout
from mess_ray.models import Embedder, EmbeddingModel, build_encoder
from mess_ray.segments import encode_audio
from mess_ray.storage import Storage
from mess_ray.train.augment import (
    add_noise,
    augment_batch,
    eq_tilt,
    synthetic_reverb,
)
from mess_ray.train.collate import collate_labelled
from mess_ray.train.finetune_settings import FinetuneLoop
from mess_ray.train.losses import (
    PerformerMemory,
    batch_hard_triplet,
    multi_positive_infonce,
    performer_codes,
    performer_infonce,
    positive_mask,
    soft_neighbour_kl,
)
from mess_ray.train.targets import (
    MINED_PREFIX,
    facet_agreement,
    facet_groups,
    filter_training_rows,
    mine_descriptor_labels,
    performer_batch,
    zscore_descriptors,
)

SR = 16000


def _tones(n: int, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    rows = [
        np.sin(2 * np.pi * rng.uniform(200, 800) * t)
        * (np.sin(2 * np.pi * rng.uniform(1, 6) * t) > 0)
        for _ in range(n)
    ]
    return torch.tensor(np.stack(rows) * 0.3, dtype=torch.float32)


# -- model ---------------------------------------------------------------------------------
def test_facet_model_output_follows_the_facets_contract(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingModel(
        build_encoder("tiny", seed=0), embedding_dim=16, pooling="attentive", facet_dim=4
    ).eval()
    assert model.facet_layout == {
        OVERALL: (0, 16),
        "tempo": (16, 20),
        "dynamics": (20, 24),
        "articulation": (24, 28),
        "timbre": (28, 32),
    }
    assert model.embedding_dim == 32 and model.part_names == (OVERALL, *FACETS)
    x = torch.randn(4, SR)
    with torch.no_grad():
        parts = model.forward_parts(x)
        out = model(x)
    assert out.shape == (4, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    for name, (start, end) in model.facet_layout.items():
        assert torch.allclose(out[:, start:end] * math.sqrt(5), parts[name], atol=1e-6)
    # The inner product of two faceted vectors is the mean of their part cosines.
    mean_cos = torch.stack([(parts[n][0] * parts[n][1]).sum() for n in model.part_names]).mean()
    assert float(out[0] @ out[1]) == pytest.approx(float(mean_cos), abs=1e-5)
    # Each facet head weights the hidden states on its own.
    assert set(model.facet_heads) == set(FACETS)
    assert model.facet_heads["tempo"].layer_logits is not model.layer_logits

    model.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "embedding_config.json").read_text())
    assert parse_layout(saved["facet_layout"]) == model.facet_layout
    loaded = EmbeddingModel.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(loaded(x), out, atol=1e-5)
    assert loaded.facet_layout == model.facet_layout
    saved["facet_layout"]["overall"] = [0, 8]
    (tmp_path / "m" / "embedding_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="contiguous|layout"):
        EmbeddingModel.load(tmp_path / "m")
    with pytest.raises(ValueError, match="facet_dim"):
        EmbeddingModel(build_encoder("tiny", seed=0), facet_dim=-1)


def test_plain_model_has_no_layout_and_embedder_exposes_facet_layout(tmp_path):
    plain = EmbeddingModel(build_encoder("tiny", seed=0), embedding_dim=16, pooling="mean")
    assert plain.facet_layout is None and plain.embedding_dim == 16
    faceted = EmbeddingModel(
        build_encoder("tiny", seed=0), embedding_dim=16, pooling="stats", facet_dim=8
    )
    storage = Storage(str(tmp_path / "store"))
    faceted.save(tmp_path / "store" / "finetune" / "v1" / "model")
    storage.publish("finetune", "v1", {"inputs": {}})
    cfg = load_config(
        None, [f"storage.root={tmp_path / 'store'}", "audio.window_s=1.0", "audio.hop_s=0.5"]
    )
    embedder = Embedder.from_ref(cfg, storage, "finetune")
    layout = embedder.info["facet_layout"]
    assert json.loads(json.dumps(layout)) == layout  # JSON lists, ready for the index manifest
    assert parse_layout(layout) == faceted.facet_layout and embedder.dim == 16 + 4 * 8
    assert Embedder.from_info(cfg, storage, embedder.info).info["facet_layout"] == layout
    assert Embedder.from_ref(cfg, storage, "random").info["facet_layout"] is None


def test_level_channel_makes_the_model_hear_loudness():
    x = _tones(2)
    plain = EmbeddingModel(build_encoder("tiny", seed=0), embedding_dim=16, pooling="stats").eval()
    levelled = EmbeddingModel(
        build_encoder("tiny", seed=0), embedding_dim=16, pooling="stats", level_channel=True
    ).eval()
    with torch.no_grad():
        # The encoder normalises every example to unit variance: 20 dB quieter is the same input...
        assert torch.allclose(plain(x), plain(0.1 * x), atol=1e-4)
        # ...unless the level side channel carries the raw loudness to the heads.
        assert not torch.allclose(levelled(x), levelled(0.1 * x), atol=1e-3)


def _descriptor_stats(audio: np.ndarray) -> dict:
    raw = np.stack([descriptor_vector(a, SR) for a in audio])
    return {
        "names": list(DESCRIPTOR_NAMES),
        "mean": raw.mean(0).tolist(),
        "std": (raw.std(0) + 0.1).tolist(),
    }


def test_descriptor_channel_feeds_zscored_descriptors_and_round_trips(tmp_path):
    x = _tones(4, seed=3)
    stats = _descriptor_stats(x.numpy())
    model = EmbeddingModel(
        build_encoder("tiny", seed=0),
        embedding_dim=16,
        pooling="stats",
        facet_dim=4,
        descriptor_stats=stats,
    ).eval()
    side = model.descriptor_input(x)
    expected = zscore_descriptors(np.stack([descriptor_vector(a, SR) for a in x.numpy()]), stats)
    assert side.shape == (4, len(DESCRIPTOR_NAMES))
    assert np.allclose(side.numpy(), np.clip(np.nan_to_num(expected), -5, 5), atol=1e-4)
    # The channel reaches every head: the same model without it gives other vectors.
    plain = EmbeddingModel(
        build_encoder("tiny", seed=0), embedding_dim=16, pooling="stats", facet_dim=4
    ).eval()
    assert (
        plain.projection[0].in_features + len(DESCRIPTOR_NAMES) == model.projection[0].in_features
    )
    assert all(
        h.projection[0].in_features == model.projection[0].in_features
        for h in model.facet_heads.values()
    )
    with torch.no_grad():
        before = model(x)
        # Descriptors measured by the caller (fine-tuning's collate) give the same vectors.
        raw = torch.from_numpy(np.stack([descriptor_vector(a, SR) for a in x.numpy()]))
        assert torch.allclose(model(x, raw), before, atol=1e-6)
        model.save(tmp_path / "m")
        after = EmbeddingModel.load(tmp_path / "m")(x)
    assert torch.allclose(before, after, atol=1e-5)  # the z-scoring travels with the model
    config = json.loads((tmp_path / "m" / "embedding_config.json").read_text())
    assert config["descriptor_stats"]["names"] == list(DESCRIPTOR_NAMES)
    with pytest.raises(ValueError, match="retrain"):
        EmbeddingModel(
            build_encoder("tiny", seed=0), descriptor_stats={**stats, "names": ["onset_rate_hz"]}
        )


# -- losses --------------------------------------------------------------------------------
def test_infonce_hard_negative_weight_targets_same_piece_pairs():
    labels = torch.tensor([0, 0, 1, 1])
    pieces = torch.tensor([0, 1, 0, 1])
    # Anchor 0's hard negative (index 2: same piece, other style) sits right next to it.
    emb = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.99, 0.14], [0.0, 1.0]]), dim=1)
    base = multi_positive_infonce(emb, labels, 0.1)
    assert multi_positive_infonce(emb, labels, 0.1, pieces, 1.0).item() == pytest.approx(
        base.item()
    )
    assert multi_positive_infonce(emb, labels, 0.1, pieces, 4.0) > base
    with pytest.raises(ValueError, match="hard_negative_weight"):
        multi_positive_infonce(emb, labels, 0.1, pieces, 0.0)


def test_performer_loss_pairs_a_pianist_only_across_pieces():
    codes = performer_codes(["ann", "ann", "ann", "bob", "", None])
    assert list(codes[:4]) == [0, 0, 0, 1] and codes[4] < 0 and codes[5] < 0
    assert codes[4] != codes[5]  # two unknown pianists are not one
    pieces = torch.tensor([0, 0, 1, 1, 2, 3])
    labels = torch.from_numpy(codes)
    # ann's rows 0 and 1 are one piece: only row 2 is their positive; bob has none
    apart = F.normalize(torch.eye(6)[:, :4] + 0.01, dim=-1)
    together = apart.clone()
    together[2] = together[0] = F.normalize(torch.tensor([1.0, 0.0, 0.0, 1.0]), dim=0)
    assert performer_infonce(together, labels, pieces, 0.1) < performer_infonce(
        apart, labels, pieces, 0.1
    )
    # who is whose positive: ann's other piece only; bob and the unknown rows: nobody
    mask = positive_mask(labels, pieces, mined_from=0)
    assert mask[0].nonzero().flatten().tolist() == [2] and mask[2].nonzero().flatten().tolist() == [
        0,
        1,
    ]
    assert not mask[3:].any()


def test_performer_memory_supplies_positives_the_batch_lacks():
    # ann plays piece 0 in this batch; her piece-1 row is only in the memory
    batch = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    performers, pieces = torch.tensor([0, 1, -3]), torch.tensor([0, 0, 0])
    assert performer_infonce(batch, performers, pieces, 0.1).item() == 0.0  # no positive
    memory = PerformerMemory(4)
    memory.push(torch.stack([batch[0], -batch[0]]), torch.tensor([0, 0]), torch.tensor([1, 0]))
    near = performer_infonce(batch, performers, pieces, 0.1, memory.bank())
    memory_far = PerformerMemory(4)
    memory_far.push(torch.stack([-batch[0], batch[0]]), torch.tensor([0, 0]), torch.tensor([1, 0]))
    far = performer_infonce(batch, performers, pieces, 0.1, memory_far.bank())
    # the memory's piece-1 row is the positive; its piece-0 row (ann, same piece) counts for
    # nothing, so where it lies does not matter
    assert near < far
    memory.push(torch.zeros(5, 8), torch.full((5,), 2), torch.zeros(5, dtype=torch.long))
    vectors, codes, _ = memory.bank()
    assert vectors.shape == (4, 8) and codes.tolist() == [2, 2, 2, 2]  # oldest rows overwritten


def _four_row_batch(segment_ids, styles, seed: int) -> dict:
    """A Ray Data batch of four encoded tones, pieces p1 p2 p1 p2."""
    audio = _tones(4, seed=seed).numpy()
    return {
        "segment_id": np.array(segment_ids),
        "audio": np.array([encode_audio(a) for a in audio], dtype=object),
        "style": np.array(styles, dtype=object),
        "piece_id": np.array(["p1", "p2", "p1", "p2"], dtype=object),
    }


def test_finetune_loss_adds_the_performer_term_and_fills_the_memory():
    from mess_ray.train.finetune import ContrastiveModel
    from mess_ray.train.losses import finetune_loss

    batch = _four_row_batch([10, 11, 12, 13], ["", "", "", ""], seed=3)
    loop = FinetuneLoop(
        window_samples=SR,
        sample_rate=SR,
        augment=AugmentConfig(views=1),
        performers={10: 0, 11: 0, 12: 1},  # segment 13: a pianist in one piece only
        performer_weight=1.0,
        performer_memory=16,
    )
    out = collate_labelled(batch, loop)
    assert out["performers"][:4].tolist()[:3] == [0, 0, 1] and out["performers"][3] < 0
    assert out["performers"][4:].tolist() == out["performers"][:4].tolist()  # views: same pianist
    model = ContrastiveModel(
        EmbeddingModel(build_encoder("tiny", seed=0), embedding_dim=16, pooling="mean"),
        0.1,
        False,
        performer_memory=16,
    )
    loss, extra = finetune_loss(model, out, loop)
    assert extra["performer_loss"] > 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.performer_memory.bank()[0].shape == (8, 16)
    assert "performer_memory" not in str(list(model.state_dict()))  # never checkpointed


def test_performer_batch_draws_each_pianist_from_two_pieces():
    codes = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, -1])
    pieces = np.array(["a", "a", "b", "c", "a", "a", "b", "c", "c", "b"], dtype=object)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = performer_batch(rng, codes, pieces, players=4, per_player=4)
        # pianist 1 plays one piece and row 9 has no pianist: never drawn
        assert set(codes[rows]) == {0, 2} and rows.size == 8
        for c in (0, 2):
            assert len(set(pieces[rows[codes[rows] == c]])) == 2
    assert performer_batch(rng, np.array([0, 0, -1]), np.array(["a", "a", "b"])).size == 0


def test_triplet_mines_the_same_piece_negative_first():
    labels = torch.tensor([0, 0, 1, 1])
    pieces = torch.tensor([0, 1, 1, 0])
    # Anchor 0: positive 1 at distance ~0.2; easy negative 2 is 0.5 away but the hard negative
    # (index 3, same piece) is 1.0 away; the other-piece negative is nearer, so batch-hard
    # alone would pick it, while piece-aware mining scores the same-piece pair.
    emb = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.5, 0.0], [1.0, 0.0]])
    batch_hard = batch_hard_triplet(emb, labels, margin=0.5)
    piece_aware = batch_hard_triplet(emb, labels, margin=0.5, pieces=pieces)
    assert piece_aware < batch_hard
    # Without any same-piece pair in the batch it is plain batch-hard.
    assert batch_hard_triplet(emb, labels, 0.5, torch.arange(4)).item() == pytest.approx(
        batch_hard.item()
    )


def test_soft_neighbour_kl_rewards_descriptor_geometry():
    rng = np.random.default_rng(0)
    targets = torch.tensor(rng.standard_normal((12, 2)), dtype=torch.float32)
    aligned = F.normalize(torch.cat([targets, torch.ones(12, 1)], dim=1), dim=1)
    shuffled = aligned[torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    good = soft_neighbour_kl(aligned, targets, temperature=0.1)
    bad = soft_neighbour_kl(shuffled, targets, temperature=0.1)
    assert 0 <= good < bad
    part = aligned.clone().requires_grad_()
    soft_neighbour_kl(part, targets, 0.1).backward()
    assert part.grad is not None and torch.isfinite(part.grad).all()
    assert soft_neighbour_kl(aligned[:2], targets[:2], 0.1).item() == 0.0
    with pytest.raises(ValueError, match="batch size"):
        soft_neighbour_kl(aligned, targets[:5], 0.1)


def test_soft_neighbour_kl_can_leave_pairs_out():
    rng = np.random.default_rng(1)
    targets = torch.tensor(rng.standard_normal((8, 2)), dtype=torch.float32)
    part = F.normalize(
        torch.tensor(rng.standard_normal((8, 3)), dtype=torch.float32), dim=1
    ).requires_grad_()
    pieces = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    same_piece = pieces.unsqueeze(0) == pieces.unsqueeze(1)
    loss = soft_neighbour_kl(part, targets, 0.1, exclude=same_piece)
    # Reference: each row's KL over its other-piece neighbours only, the target scale being the
    # (lower, as torch.median) median squared distance over those pairs.
    x, t = part.detach().double().numpy(), targets.double().numpy()
    d2 = ((t[:, None] - t[None]) ** 2).sum(-1)
    kept = ~same_piece.numpy()
    scale = np.sort(d2[kept])[(kept.sum() - 1) // 2]
    kls = []
    for i in range(8):
        logit_p, logit_q = -d2[i, kept[i]] / (0.5 * scale), (x[i] @ x[kept[i]].T) / 0.1
        log_p = logit_p - np.log(np.exp(logit_p).sum())
        log_q = logit_q - np.log(np.exp(logit_q).sum())
        kls.append(float((np.exp(log_p) * (log_p - log_q)).sum()))
    assert loss.item() == pytest.approx(np.mean(kls), rel=1e-4)
    # Moving row 1 moves the loss: it still has other-piece neighbours.
    moved = part.detach().clone()
    moved[1] = F.normalize(moved[1] + torch.tensor([3.0, -2.0, 1.0]), dim=0)
    assert soft_neighbour_kl(moved, targets, 0.1, exclude=same_piece) != loss
    loss.backward()
    assert torch.isfinite(part.grad).all()
    # A row left with no neighbour at all does not count and gives no NaN gradient.
    lonely = torch.zeros(8, 8, dtype=torch.bool)
    lonely[0, :] = lonely[:, 0] = True
    fresh = part.detach().clone().requires_grad_()
    soft_neighbour_kl(fresh, targets, 0.1, exclude=lonely).backward()
    assert torch.isfinite(fresh.grad).all() and fresh.grad[0].abs().sum() == 0
    assert (
        soft_neighbour_kl(part, targets, 0.1, exclude=~torch.eye(8, dtype=torch.bool)).item() == 0.0
    )


def test_unlabelled_rows_are_nobodys_hard_negative():
    from mess_ray.train.losses import hard_negative_mask

    labels = torch.tensor([0, 1, -1, -2])
    pieces = torch.tensor([5, 5, 5, 5])
    hard = hard_negative_mask(labels, pieces)
    assert hard[0, 1] and hard[1, 0]
    assert not hard[2].any() and not hard[:, 2].any() and not hard[3].any()
    assert not positive_mask(labels)[2].any()  # an unlabelled row has no positive but its own views


def test_facet_groups_follow_the_descriptor_map_at_call_time():
    groups = facet_groups()
    assert set(groups) == set(FACET_DESCRIPTORS)
    for facet, idx in groups.items():
        assert [DESCRIPTOR_NAMES[i] for i in idx] == list(FACET_DESCRIPTORS[facet])
    assert facet_groups({"tempo": ("ioi_cv",)}) == {"tempo": [DESCRIPTOR_NAMES.index("ioi_cv")]}
    with pytest.raises(ValueError, match="unknown descriptors"):
        facet_groups({"tempo": ("no_such_descriptor",)})


def test_facet_agreement_measures_tracking():
    rng = np.random.default_rng(0)
    descriptors = rng.standard_normal((40, 3))
    layout = {OVERALL: (0, 4), "tempo": (4, 7)}
    # The tempo part encodes descriptor 0 (as a point on a circle arc); overall is noise.
    angle = descriptors[:, 0] / 4
    vectors = np.concatenate(
        [
            rng.standard_normal((40, 4)),
            np.stack([np.cos(angle), np.sin(angle), np.zeros(40)], axis=1),
        ],
        axis=1,
    )
    rho = facet_agreement(vectors, layout, descriptors, {"tempo": [0]})
    assert rho["tempo"]["tempo"] > 0.95 and abs(rho["tempo"][OVERALL]) < 0.2
    with pytest.raises(ValueError, match="3 segments"):
        facet_agreement(vectors[:2], layout, descriptors[:2], {"tempo": [0]})


def test_mined_labels_cluster_descriptors_and_pair_only_across_pieces():
    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    truth = np.repeat([0, 1, 2], 20)
    descriptors = centres[truth] + 0.1 * rng.standard_normal((60, 3))
    pieces = np.array(
        [f"p{i % 4}" for i in range(40)] + ["solo"] * 20, dtype=object
    )  # cluster 2: one piece
    ids = np.arange(1000, 1060)
    labels = mine_descriptor_labels(ids, pieces, descriptors, num_clusters=3, seed=0)
    assert set(labels) == set(
        ids[:40].tolist()
    )  # the single-piece cluster gives no cross-piece positive
    assert all(v.startswith(MINED_PREFIX) for v in labels.values())
    assert len({labels[i] for i in ids[:20]}) == 1 and len({labels[i] for i in ids[20:40]}) == 1
    assert labels[1000] != labels[1020]
    with pytest.raises(ValueError, match="at least"):
        mine_descriptor_labels(ids[:4], pieces[:4], descriptors[:4], num_clusters=3)

    # A mined pair of one piece is not a positive; a style pair of one piece (same rendering) still is.
    tensor_labels, tensor_pieces = torch.tensor([0, 0, 2, 2, 2]), torch.tensor([1, 1, 1, 1, 2])
    positives = positive_mask(tensor_labels, tensor_pieces, mined_from=2)
    assert positives[0, 1] and not positives[2, 3] and positives[2, 4] and positives[3, 4]
    assert positive_mask(tensor_labels)[2, 3]

    import pyarrow as pa

    rows = pa.table(
        {
            "segment_id": pa.array([1, 2, 3], pa.int64()),
            "audio": [b"", b"", b""],
            "style": ["fast", "", ""],
            "piece_id": ["a", "a", "b"],
        }
    )
    kept = filter_training_rows(rows, ["a", "b"], {3: "mined:000"})
    assert kept.column("style").to_pylist() == ["fast", "mined:000"]
    assert kept.column("segment_id").to_pylist() == [1, 3]  # collate looks MIDI targets up by id
    # Rows with MIDI targets are kept even without a style (it stays empty: a label of their own).
    kept = filter_training_rows(rows, ["a", "b"], with_midi={2})
    assert kept.column("segment_id").to_pylist() == [1, 2] and kept.column("style").to_pylist() == [
        "fast",
        "",
    ]


# -- augmentations -------------------------------------------------------------------------
def _centroid(x: np.ndarray) -> float:
    mag = np.abs(np.fft.rfft(x))
    return float((mag * np.fft.rfftfreq(x.size, 1 / SR)).sum() / mag.sum())


def test_augmentations_keep_timing_and_loudness():
    # Notes over a quiet sustained bed (recorded music is never digital silence, where any
    # added noise would move the loudness floor by tens of dB).
    x = _tones(3, seed=1) + 0.02 * torch.sin(2 * torch.pi * 110 * torch.arange(SR) / SR)
    g = torch.Generator().manual_seed(0)
    rms = x.pow(2).mean(dim=1).sqrt()
    brighter = eq_tilt(x, SR, torch.full((3,), 3.0))
    darker = eq_tilt(x, SR, torch.full((3,), -3.0))
    for y in (brighter, darker):
        assert y.shape == x.shape and torch.allclose(y.pow(2).mean(dim=1).sqrt(), rms, rtol=1e-3)
    noisy_src = (
        torch.randn(3, SR, generator=g) * 0.1 + x
    )  # broadband, so the tilt moves the centroid
    assert _centroid(eq_tilt(noisy_src, SR, torch.full((3,), 3.0))[0].numpy()) > _centroid(
        noisy_src[0].numpy()
    )
    assert _centroid(eq_tilt(noisy_src, SR, torch.full((3,), -3.0))[0].numpy()) < _centroid(
        noisy_src[0].numpy()
    )
    noisy = add_noise(x, torch.full((3,), 20.0), g)
    snr = 10 * torch.log10(x.pow(2).mean(dim=1) / (noisy - x).pow(2).mean(dim=1))
    assert torch.allclose(snr, torch.full((3,), 20.0), atol=0.5)
    wet = synthetic_reverb(x, SR, torch.full((3,), 0.3), g)
    assert torch.allclose(wet.pow(2).mean(dim=1).sqrt(), rms, rtol=1e-3)
    # No time-stretch or shift: the augmented view still lines up with the original at lag 0,
    # and the onset-rate and loudness descriptors barely move.
    view = augment_batch(x, AugmentConfig(), SR, torch.Generator().manual_seed(1))
    assert view.shape == x.shape
    for a, b in zip(x.numpy(), view.numpy()):
        corr = np.correlate(b, a, mode="full")
        assert abs(int(np.argmax(corr)) - (a.size - 1)) <= 2
        da, db = descriptor_vector(a, SR), descriptor_vector(b, SR)
        i = DESCRIPTOR_NAMES.index("loudness_mean_db")
        assert abs(da[i] - db[i]) < 3.0  # reverb fills the gaps between notes a little
        j = DESCRIPTOR_NAMES.index("onset_rate_hz")
        assert abs(da[j] - db[j]) <= 2.0
    again = augment_batch(x, AugmentConfig(), SR, torch.Generator().manual_seed(1))
    assert torch.equal(view, again)
    with pytest.raises(ValueError, match="batch"):
        augment_batch(x[0], AugmentConfig(), 16000, g)


def test_collate_adds_views_as_positives_and_zscored_descriptors():
    audio = _tones(3, seed=2).numpy()
    batch = {
        "audio": np.array([encode_audio(a) for a in audio], dtype=object),
        "style": np.array(["b", "a", "b"], dtype=object),
        "piece_id": np.array(["p1", "p1", "p2"], dtype=object),
    }
    stats = {"mean": [0.0] * len(DESCRIPTOR_NAMES), "std": [2.0] * len(DESCRIPTOR_NAMES)}
    loop = FinetuneLoop(
        styles=("a", "b"),
        window_samples=SR,
        sample_rate=SR,
        augment=AugmentConfig(views=1),
        descriptor_stats=stats,
    )
    out = collate_labelled(batch, loop)
    assert out["audio"].shape == (6, SR) and out["labels"].tolist() == [1, 0, 1, 1, 0, 1]
    assert (
        out["pieces"][:3].tolist() == out["pieces"][3:].tolist()
        and out["pieces"][0] == out["pieces"][1]
    )
    assert out["pieces"][0] != out["pieces"][2]
    assert torch.equal(out["audio"][:3], torch.from_numpy(audio))
    assert not torch.equal(out["audio"][3:], out["audio"][:3])
    raw = descriptor_vector(audio[0], SR)
    assert np.allclose(
        out["descriptors"][0].numpy(), zscore_descriptors(raw[None], stats)[0], atol=1e-4
    )
    plain = collate_labelled(
        batch, dataclasses.replace(loop, augment=AugmentConfig(views=0), descriptor_stats=None)
    )
    assert plain["audio"].shape == (3, SR) and "descriptors" not in plain


def test_collate_looks_up_midi_targets_and_labels_unstyled_rows_apart():
    audio = _tones(3, seed=4).numpy()
    batch = {
        "audio": np.array([encode_audio(a) for a in audio], dtype=object),
        "style": np.array(["a", "", ""], dtype=object),
        "piece_id": np.array(["p1", "p1", "p2"], dtype=object),
        "segment_id": np.array([10, 11, 12]),
    }
    loop = FinetuneLoop(
        styles=("a",),
        window_samples=SR,
        sample_rate=SR,
        augment=AugmentConfig(views=1),
        midi_targets={11: [1.0, -1.0], 12: [0.5, 0.0]},
        midi_target_names=("rubato", "velocity_mean"),
    )
    out = collate_labelled(batch, loop)
    labels = out["labels"].tolist()
    assert labels[0] == 0 and labels[1] < 0 and labels[2] < 0 and labels[1] != labels[2]
    assert labels[3:] == labels[:3]  # an augmented view keeps its row's label: its only positive
    assert out["has_midi"].tolist() == [False, True, True] * 2
    assert out["midi"][1].tolist() == [1.0, -1.0] and out["midi"][5].tolist() == [0.5, 0.0]


# -- it learns -----------------------------------------------------------------------------
@pytest.mark.slow
def test_dynamics_facet_learns_to_track_loudness():
    """A few dozen steps of the facet loss alone: the dynamics facet's cosine comes to rank
    held-out pairs by their loudness descriptors, far better than the untrained facet."""
    torch.manual_seed(0)
    np.random.seed(0)  # transformers' SpecAugment time masks draw from numpy's global RNG
    groups = facet_groups({"dynamics": ("loudness_mean_db", "loudness_range_db")})

    def clips(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
        rng = np.random.default_rng(seed)
        tones = _tones(n, seconds=0.5, seed=seed)
        gains = torch.tensor(10 ** (rng.uniform(-40, 0, n) / 20), dtype=torch.float32).view(-1, 1)
        audio = tones * gains
        return audio, np.stack([descriptor_vector(a, SR) for a in audio.numpy()])

    train_audio, train_desc = clips(48, 0)
    test_audio, test_desc = clips(24, 1)
    mean, std = train_desc.mean(axis=0), train_desc.std(axis=0)
    stats = {"mean": mean.tolist(), "std": std.tolist()}
    model = EmbeddingModel(
        build_encoder("tiny", seed=0),
        embedding_dim=8,
        pooling="stats",
        facet_dim=8,
        level_channel=True,
    )
    layout = model.facet_layout

    def agreement() -> float:
        model.eval()
        with torch.no_grad():
            vectors = model(test_audio).numpy()
        z = zscore_descriptors(test_desc, stats)
        return facet_agreement(vectors, layout, z, groups)["dynamics"]["dynamics"]

    before = agreement()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    targets = torch.tensor(zscore_descriptors(train_desc, stats), dtype=torch.float32)[
        :, groups["dynamics"]
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        model.train()
        idx = torch.randperm(48, generator=generator)[:16]
        out = model(train_audio[idx])
        start, end = layout["dynamics"]
        loss = soft_neighbour_kl(
            F.normalize(out[:, start:end], dim=1), targets[idx], temperature=0.1
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = agreement()
    assert after > 0.4 and after > before + 0.3, (
        before,
        after,
    )  # seeded: 80 steps at lr 1e-3 learn for torch seeds 0-2; 40 steps at 3e-3 did not for seed 2


def test_descriptor_stats_include_unlabelled_human_performances(tmp_path):
    """Facet targets are z-scored over training-piece segments whether or not they carry a
    style: a corpus of human performances only (labels to be mined) must train with facets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mess_ray.segments import SEGMENT_SCHEMA, encode_audio, segment_id
    from mess_ray.storage import Storage
    from mess_ray.train.targets import training_descriptor_stats

    storage = Storage(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    rows = []
    for piece in range(3):
        track = f"perf{piece}"
        for i in range(4):
            audio = (0.1 * rng.normal(size=SR)).astype(np.float32)
            rows.append(
                {
                    "segment_id": segment_id(track, i * SR),
                    "track_id": track,
                    "piece_id": f"piece{piece}",
                    "style": "",
                    "start_s": float(i),
                    "end_s": float(i + 1),
                    "start_sample": i * SR,
                    "num_samples": SR,
                    "sample_rate": SR,
                    "source_uri": f"mem://{track}.wav",
                    "metadata_json": "{}",
                    "audio": encode_audio(audio),
                }
            )
    with storage.open("ingest/v1/segments/part-000.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", "v1", {"counts": {"segments": len(rows)}})

    stats = training_descriptor_stats(
        storage, "v1", ["piece0", "piece1"], window=SR, sample_rate=SR, max_segments=100, seed=0
    )
    assert len(stats["mean"]) == len(stats["std"]) and np.all(np.isfinite(stats["mean"]))
    with pytest.raises(ValueError, match="no training-piece segment"):
        training_descriptor_stats(
            storage, "v1", ["absent"], window=SR, sample_rate=SR, max_segments=100, seed=0
        )


def test_removed_flat_augment_keys_name_the_augment_block():
    from pydantic import ValidationError

    from mess_ray.config import MessRayConfig

    with pytest.raises(ValidationError, match="finetune.augment_views was removed.*augment.views"):
        MessRayConfig.model_validate({"finetune": {"augment_views": 1}})
    cfg = MessRayConfig.model_validate({"finetune": {"augment": {"views": 2, "reverb_prob": 0}}})
    assert cfg.finetune.augment.views == 2 and cfg.finetune.augment.reverb_prob == 0


def test_timeline_part_comes_last_in_the_layout_and_round_trips(tmp_path):
    from mess_ray.facets import TIMELINE

    torch.manual_seed(0)
    model = EmbeddingModel(
        build_encoder("tiny", seed=0),
        embedding_dim=16,
        pooling="mean",
        facet_dim=4,
        timeline_bins=4,
        timeline_dim=3,
    ).eval()
    assert list(model.facet_layout) == [OVERALL, *FACETS, TIMELINE]
    assert model.facet_layout[TIMELINE] == (32, 44) and model.embedding_dim == 44
    x = _tones(3)
    with torch.no_grad():
        out = model(x)
        parts = model.forward_parts(x)
    assert out.shape == (3, 44) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(parts[TIMELINE].norm(dim=1), torch.ones(3), atol=1e-5)
    model.save(tmp_path / "m")
    loaded = EmbeddingModel.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(loaded(x), out, atol=1e-5)
    plain = EmbeddingModel(build_encoder("tiny", seed=0), embedding_dim=16, timeline_bins=4)
    assert list(plain.facet_layout) == [OVERALL, TIMELINE]
    assert "timeline_bins" not in EmbeddingModel(build_encoder("tiny", seed=0)).options
    with pytest.raises(ValueError, match="timeline_bins"):
        EmbeddingModel(build_encoder("tiny", seed=0), timeline_bins=1)


def test_timeline_term_trains_only_the_timeline_on_a_rows_own_views():
    from mess_ray.facets import TIMELINE
    from mess_ray.train.finetune import ContrastiveModel
    from mess_ray.train.losses import finetune_loss

    batch = _four_row_batch([1, 2, 3, 4], ["a", "a", "b", "b"], seed=5)
    loop = FinetuneLoop(
        styles=("a", "b"),
        window_samples=SR,
        sample_rate=SR,
        augment=AugmentConfig(views=1),
        timeline_weight=1.0,
    )
    out = collate_labelled(batch, loop)
    assert out["instances"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # each view: its own row

    def model():
        torch.manual_seed(0)
        embedding = EmbeddingModel(
            build_encoder("tiny", seed=0), embedding_dim=8, pooling="mean", timeline_bins=4
        )
        return ContrastiveModel(embedding, 0.1, False)

    with_term = model()
    loss, extra = finetune_loss(with_term, out, loop)
    assert extra["timeline_loss"] > 0 and torch.isfinite(loss)
    loss.backward()
    head = with_term.embedding.timeline_head
    assert head.projection.weight.grad.abs().sum() > 0
    # without the term the other losses never reach the timeline part
    without = model()
    off = dataclasses.replace(loop, timeline_weight=0.0)
    loss, extra = finetune_loss(without, collate_labelled(batch, off), off)
    loss.backward()
    assert "timeline_loss" not in extra
    grad = without.embedding.timeline_head.projection.weight.grad
    assert grad is None or grad.abs().sum() == 0
    assert without.embedding.facet_layout[TIMELINE][1] == without.embedding.embedding_dim


def test_a_timeline_without_views_is_refused_before_any_work(tmp_path):
    from mess_ray.train.finetune import run_finetune

    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path}",
            "model.timeline_bins=8",
            "finetune.cross_chain_views=false",
            "finetune.augment.views=0",
        ],
    )
    with pytest.raises(ValueError, match="timeline"):
        run_finetune(cfg, Storage.from_config(cfg.storage))
