"""Contrastive fine-tuning of an :class:`EmbeddingModel` on Ray Train.

Positives are segments of the same expressive ``style`` (the anchor itself excluded), plus
augmented views of the batch (``finetune.augment_views``: EQ tilt, noise, reverb; never a
time-stretch). Hard negatives are the same piece played in another style: InfoNCE can up-weight
them (``hard_negative_weight``) and the triplet loss mines them first. Losses: multi-positive
InfoNCE / NT-Xent (supervised-contrastive form; fixed or learnable temperature) or triplet
margin. Facet heads (``model.facet_dim > 0``) are supervised by a soft-neighbour KL loss whose
target distribution comes from each facet's descriptor group
(:data:`mess_ray.descriptors.FACET_DESCRIPTORS`, read at run time) z-scored on training
segments. Pair source (b) with performed MIDI (``finetune.midi_weight``): for every training
segment whose recording has MIDI (renderings keep theirs, ASAP-layout corpora name theirs),
the expressive MIDI descriptors of benchmark task 3 (tempo against the score, rubato, timing,
velocity, articulation, pedal) give soft-neighbour targets for the searched vector over
*other pieces'* passages; such segments take part even without a style (a label of their own).
Only *training pieces* are used (``split_pieces`` on ``eval.holdout_fraction``/``eval.seed``),
so evaluation on the holdout pieces measures generalisation to unseen music; segments with
neither a style, a mined label nor MIDI are skipped.
"""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from mess_ray.config import MessRayConfig
from mess_ray.descriptors import DESCRIPTOR_NAMES, FACET_DESCRIPTORS, descriptor_vector
from mess_ray.facets import OVERALL
from mess_ray.models.embedding import EmbeddingModel
from mess_ray.segments import (
    decode_audio,
    fit_length,
    read_segment_table,
    read_segments_ray,
    segments_dataset,
    split_pieces,
    window_samples,
)
from mess_ray.storage import Storage
from mess_ray.train.augment import AugmentSettings, augment_batch
from mess_ray.train.common import (
    TrainTask,
    decode_audio_column,
    finish,
    fit,
    load_init_encoder,
    resolve_init,
    with_run_name,
)

log = logging.getLogger(__name__)


# -- losses --------------------------------------------------------------------------------
def _positive_mask(
    labels: torch.Tensor, pieces: torch.Tensor | None = None, mined_from: int | None = None
) -> torch.Tensor:
    """Same label, not the anchor itself. Labels ``>= mined_from`` were mined by descriptor
    proximity (human performances, no style): those pairs are positives only *across* pieces,
    since two passages of one piece share far more than their expression."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positives = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if mined_from is not None and pieces is not None:
        mined_same_piece = (labels >= mined_from).unsqueeze(1) & (
            pieces.unsqueeze(0) == pieces.unsqueeze(1)
        )
        positives = positives & ~mined_same_piece
    return positives


def _hard_negative_mask(labels: torch.Tensor, pieces: torch.Tensor | None) -> torch.Tensor:
    """Same piece, other style: the pairs a system that matches *what* is played gets wrong."""
    if pieces is None:
        return torch.zeros((len(labels), len(labels)), dtype=torch.bool, device=labels.device)
    # Rows without a style or mined label (negative labels, see collate_labelled) are nobody's
    # hard negative: two passages of one unlabelled performance may well be played alike.
    labelled = labels >= 0
    return (
        (pieces.unsqueeze(0) == pieces.unsqueeze(1))
        & (labels.unsqueeze(0) != labels.unsqueeze(1))
        & labelled.unsqueeze(0)
        & labelled.unsqueeze(1)
    )


def multi_positive_infonce(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor | float,
    pieces: torch.Tensor | None = None,
    hard_negative_weight: float = 1.0,
    mined_from: int | None = None,
) -> torch.Tensor:
    """Supervised NT-Xent: each anchor against all others, averaged over its positives.

    ``embeddings`` are L2-normalised [B, D]; anchors without any positive in the batch are
    skipped (a zero loss that keeps the graph when none has one). With ``pieces`` and
    ``hard_negative_weight`` w > 1, each same-piece-other-style negative counts w times in
    the denominator (its logit + log w), so the loss pushes hardest on exactly the pairs
    the benchmark's hard negatives are made of.
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError("embeddings and labels disagree on the batch size")
    if hard_negative_weight <= 0:
        raise ValueError(f"hard_negative_weight must be > 0, got {hard_negative_weight}")
    logits = embeddings @ embeddings.T / temperature
    if pieces is not None and hard_negative_weight != 1.0:
        logits = logits + math.log(hard_negative_weight) * _hard_negative_mask(labels, pieces).to(
            logits.dtype
        )
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = _positive_mask(labels, pieces, mined_from)
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        return embeddings.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(dim=1)) / counts.clamp_min(1)
    return per_anchor[has_positive].mean()


def batch_hard_triplet(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    pieces: torch.Tensor | None = None,
    mined_from: int | None = None,
) -> torch.Tensor:
    """Triplet margin loss with the hardest positive and the hardest negative of each anchor.

    With ``pieces``, an anchor's negative is mined among the same piece in another style when
    the batch has one (the benchmark's hard negatives), else among all other styles.
    """
    distances = torch.cdist(embeddings, embeddings)
    positives = _positive_mask(labels, pieces, mined_from)
    negatives = labels.unsqueeze(0) != labels.unsqueeze(1)
    hard = _hard_negative_mask(labels, pieces)
    negatives = torch.where(hard.any(dim=1, keepdim=True), hard, negatives)
    valid = positives.any(dim=1) & negatives.any(dim=1)
    if not valid.any():
        return embeddings.sum() * 0.0
    hardest_positive = distances.masked_fill(~positives, float("-inf")).max(dim=1).values
    hardest_negative = distances.masked_fill(~negatives, float("inf")).min(dim=1).values
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


def soft_neighbour_kl(
    part: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    target_temperature: float = 0.5,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p || q) between descriptor neighbourhoods and embedding neighbourhoods in a batch.

    ``part`` [B, f] L2-normalised facet vectors, ``targets`` [B, g] z-scored descriptors of
    that facet. p_i = softmax_j(-|t_i - t_j|^2 / (target_temperature * median distance^2))
    and q_i = softmax_j(cos(part_i, part_j) / temperature), over j != i. It asks the facet
    to rank batch neighbours as its descriptors do, without forcing a particular geometry
    (a regression would also have to match the descriptors' scale). ``exclude`` [B, B] leaves
    pairs out of both distributions (e.g. same-piece pairs, to rank other pieces only); rows
    left with fewer than two neighbours do not count.
    """
    if part.shape[0] != targets.shape[0]:
        raise ValueError("facet vectors and descriptor targets disagree on the batch size")
    if part.shape[0] < 3:
        return part.sum() * 0.0
    left_out = torch.eye(part.shape[0], dtype=torch.bool, device=part.device)
    if exclude is not None:
        left_out = left_out | exclude.to(device=part.device, dtype=torch.bool)
    rows = (~left_out).sum(dim=1) >= 2
    if not rows.any():
        return part.sum() * 0.0
    # Rows that do not count keep only the diagonal masked: no all -inf softmax (NaN gradients).
    left_out = torch.where(
        rows.unsqueeze(1), left_out, torch.eye(len(rows), dtype=torch.bool, device=part.device)
    )
    d2 = torch.cdist(targets.float(), targets.float()).pow(2)
    scale = d2[~left_out].median().clamp_min(1e-6)
    target_logits = (-d2 / (target_temperature * scale)).masked_fill(left_out, float("-inf"))
    p = target_logits.softmax(dim=1)
    log_q = (part @ part.T / temperature).masked_fill(left_out, float("-inf")).log_softmax(dim=1)
    log_p = target_logits.log_softmax(dim=1)
    kl = (p * (log_p - log_q)).masked_fill(left_out, 0.0).sum(dim=1)
    return kl[rows].mean()


def facet_groups(descriptor_map: dict[str, tuple[str, ...]] | None = None) -> dict[str, list[int]]:
    """Facet -> indices into :data:`DESCRIPTOR_NAMES` (the map is read when called, so a
    descriptor added to FACET_DESCRIPTORS later is picked up)."""
    descriptor_map = FACET_DESCRIPTORS if descriptor_map is None else descriptor_map
    groups = {}
    for facet, names in descriptor_map.items():
        unknown = [n for n in names if n not in DESCRIPTOR_NAMES]
        if unknown:
            raise ValueError(f"facet {facet!r} names unknown descriptors {unknown}")
        groups[facet] = [DESCRIPTOR_NAMES.index(n) for n in names]
    return groups


def facet_agreement(
    embeddings: np.ndarray,
    layout: dict[str, tuple[int, int]],
    descriptors_z: np.ndarray,
    groups: dict[str, list[int]],
) -> dict[str, dict[str, float]]:
    """Does each facet score track its descriptor? Spearman rank correlation, over all pairs,
    between a part's cosine and the facet's descriptor similarity (minus the Euclidean distance
    of z-scored descriptor groups), for every facet and, as the reference, the overall part.

    Returns ``{facet: {part_name: rho}}`` so the facet's own part can be compared with the
    overall part (and with other models' parts) on the same pairs.
    """
    from scipy.stats import spearmanr

    embeddings = np.asarray(embeddings, dtype=np.float64)
    n = embeddings.shape[0]
    if n < 3:
        raise ValueError("facet agreement needs at least 3 segments")
    upper = np.triu_indices(n, k=1)
    part_cos = {}
    for name, (start, end) in layout.items():
        block = embeddings[:, start:end]
        block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        part_cos[name] = (block @ block.T)[upper]
    out: dict[str, dict[str, float]] = {}
    for facet, idx in groups.items():
        group = np.asarray(descriptors_z, dtype=np.float64)[:, idx]
        similarity = -np.linalg.norm(group[:, None, :] - group[None, :, :], axis=-1)[upper]
        out[facet] = {
            name: float(spearmanr(cos, similarity).statistic) for name, cos in part_cos.items()
        }
    return out


# -- model ---------------------------------------------------------------------------------
class ContrastiveModel(nn.Module):
    """EmbeddingModel plus the loss's own parameter (a learnable log-temperature)."""

    def __init__(
        self, embedding: EmbeddingModel, temperature: float, learn_temperature: bool
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(temperature)), requires_grad=learn_temperature
        )

    def forward(
        self, waveform: torch.Tensor, descriptors: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.embedding(waveform, descriptors)

    def temperature(self) -> torch.Tensor:
        # Clamped so a learnable temperature cannot collapse to 0 or blow up.
        return self.log_temperature.exp().clamp(0.01, 1.0)


def build_finetune_model(loop_config: dict) -> nn.Module:
    options = loop_config["embedding"]
    embedding = EmbeddingModel(load_init_encoder(loop_config["init"]), **options)
    return ContrastiveModel(embedding, loop_config["temperature"], loop_config["learn_temperature"])


def piece_code(piece_id: str) -> int:
    """A stable integer for a piece id (the same on every worker: crc32, not Python's hash)."""
    return zlib.crc32(str(piece_id).encode()) & 0x7FFFFFFF


def zscore_descriptors(matrix: np.ndarray, stats: dict[str, list[float]]) -> np.ndarray:
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    return (matrix - mean) / np.where(std > 1e-12, std, 1.0)


def collate_labelled(batch: dict, loop_config: dict) -> dict[str, torch.Tensor]:
    """Decoded audio, style labels and piece codes; with augmentation, one augmented view of
    every row appended per ``augment_views`` (same label and piece: a positive); with facet
    heads, each row's z-scored descriptors (of the audio as the model sees it); with MIDI
    targets, each row's z-scored MIDI descriptors and whether it has them.

    A row without a style (kept for its MIDI targets) gets a label of its own, below 0: no
    positive but its own augmented views, and nobody's hard negative."""
    vocabulary = {style: i for i, style in enumerate(loop_config["styles"])}
    labels = torch.tensor(
        [vocabulary[str(s)] if str(s) else -1 - i for i, s in enumerate(batch["style"])],
        dtype=torch.long,
    )
    pieces = torch.tensor([piece_code(p) for p in batch["piece_id"]], dtype=torch.long)
    audio = decode_audio_column(batch["audio"], loop_config["window_samples"])
    views = int(loop_config.get("augment_views", 0))
    if views:
        # Seeded from the batch's content, so a resumed run sees the same views.
        generator = torch.Generator().manual_seed(
            int(pieces.sum()) + int(loop_config.get("seed", 0))
        )
        settings = AugmentSettings(**loop_config["augment"])
        audio = torch.cat(
            [audio] + [augment_batch(audio, settings, generator) for _ in range(views)]
        )
        labels, pieces = labels.repeat(views + 1), pieces.repeat(views + 1)
    out = {"audio": audio, "labels": labels, "pieces": pieces}
    midi_targets = loop_config.get("midi_targets")
    if midi_targets:
        width = len(loop_config["midi_target_names"])
        rows = [midi_targets.get(int(i)) for i in batch["segment_id"]]
        out["midi"] = torch.tensor(
            [r if r is not None else [0.0] * width for r in rows], dtype=torch.float32
        ).repeat(views + 1, 1)
        out["has_midi"] = torch.tensor([r is not None for r in rows], dtype=torch.bool).repeat(
            views + 1
        )
    if loop_config.get("descriptor_stats"):
        rate = loop_config["embedding"]["sample_rate"]
        raw = np.stack([descriptor_vector(row, rate) for row in audio.numpy()])
        out["raw_descriptors"] = torch.from_numpy(raw).float()
        out["descriptors"] = torch.from_numpy(
            zscore_descriptors(raw, loop_config["descriptor_stats"])
        ).float()
    return out


def finetune_loss(
    model: nn.Module, batch: dict, loop_config: dict
) -> tuple[torch.Tensor, dict[str, float]]:
    inner = model.module if hasattr(model, "module") else model
    # Through the (DDP) wrapper's forward, so gradients are synchronised; parts are
    # sliced back out of the composed vector (each part is unit-norm / sqrt(n) there).
    # The collate's raw descriptors (facet targets) also feed the descriptor channel: measured once.
    embeddings = model(batch["audio"], batch.get("raw_descriptors"))
    layout = inner.embedding.facet_layout
    labels, pieces = batch["labels"], batch.get("pieces")
    target = loop_config.get("contrastive_target", "full")
    contrast = embeddings
    if layout is not None and target == OVERALL:
        start, end = layout[OVERALL]
        contrast = F.normalize(embeddings[:, start:end], dim=-1)
    mined_from = loop_config.get("mined_from")
    if loop_config["loss"] == "triplet":
        loss = batch_hard_triplet(contrast, labels, loop_config["margin"], pieces, mined_from)
    else:
        loss = multi_positive_infonce(
            contrast,
            labels,
            inner.temperature(),
            pieces,
            loop_config.get("hard_negative_weight", 1.0),
            mined_from,
        )
    extra = {"contrastive_loss": float(loss.detach())}
    if layout is not None and loop_config.get("facet_weight", 0) > 0 and "descriptors" in batch:
        facet_losses = []
        for facet, idx in loop_config["facet_groups"].items():
            if facet not in layout:
                continue
            start, end = layout[facet]
            part = F.normalize(embeddings[:, start:end], dim=-1)
            facet_loss = soft_neighbour_kl(
                part,
                batch["descriptors"][:, idx],
                loop_config["facet_temperature"],
                loop_config["facet_target_temperature"],
            )
            extra[f"facet_loss_{facet}"] = float(facet_loss.detach())
            facet_losses.append(facet_loss)
        if facet_losses:
            loss = loss + loop_config["facet_weight"] * torch.stack(facet_losses).mean()
    if (
        loop_config.get("midi_weight", 0) > 0
        and "midi" in batch
        and bool(batch["has_midi"].sum() >= 3)
    ):
        # Pair source (b), soft form: the searched vector ranks other pieces' passages as their
        # performed-MIDI descriptors do. Same-piece pairs are left out (they share the music).
        has = batch["has_midi"]
        same_piece = pieces[has].unsqueeze(0) == pieces[has].unsqueeze(1)
        midi_loss = soft_neighbour_kl(
            embeddings[has],
            batch["midi"][has],
            loop_config["facet_temperature"],
            loop_config["midi_target_temperature"],
            exclude=same_piece,
        )
        extra["midi_loss"] = float(midi_loss.detach())
        loss = loss + loop_config["midi_weight"] * midi_loss
    anchors = float(_positive_mask(labels, pieces, mined_from).any(dim=1).float().mean())
    hard = float(_hard_negative_mask(labels, pieces).any(dim=1).float().mean())
    return loss, {
        **extra,
        "temperature": float(inner.temperature()),
        "anchors_with_positive": anchors,
        "anchors_with_hard_negative": hard,
        "styles_in_batch": float(len(torch.unique(labels))),
    }


def save_embedding_model(model: nn.Module, folder: Path, loop_config: dict) -> None:
    model.embedding.save(folder)


FINETUNE_TASK = TrainTask(
    stage="finetune",
    build_model=build_finetune_model,
    collate=collate_labelled,
    loss=finetune_loss,
    save_model=save_embedding_model,
)


# -- data ----------------------------------------------------------------------------------
def training_selection(
    metadata: pa.Table, holdout_fraction: float, seed: int, require_styles: bool = True
) -> tuple[list[str], list[str]]:
    """(train pieces, styles) for fine-tuning; the holdout pieces are left for evaluation."""
    pieces = [p for p in metadata.column("piece_id").to_pylist() if p]
    if not pieces:
        raise ValueError(
            "no segment has a piece_id: fine-tuning needs pieces to split train/holdout"
        )
    train_pieces, _ = split_pieces(pieces, holdout_fraction, seed)
    keep = _keep_mask(metadata, train_pieces)
    styles = sorted(set(metadata.filter(keep).column("style").to_pylist()))
    if require_styles and len(styles) < 2:
        raise ValueError(
            f"fine-tuning needs at least 2 styles among training pieces, found {styles}"
        )
    return train_pieces, styles


def _keep_mask(table: pa.Table, train_pieces: list[str]) -> pa.Array:
    in_train = pc.is_in(table.column("piece_id"), value_set=pa.array(train_pieces, pa.string()))
    has_style = pc.not_equal(pc.fill_null(table.column("style"), ""), "")
    return pc.and_(pc.fill_null(in_train, False), has_style)


def _filter_training_rows(
    batch: pa.Table,
    train_pieces: list[str],
    mined: dict[int, str] | None = None,
    with_midi: set[int] | None = None,
) -> pa.Table:
    """Labelled training rows, plus mined rows (their ``style`` set to the mined label), plus
    rows with MIDI targets (``with_midi`` segment ids; their style may stay empty)."""
    keep = _keep_mask(batch, train_pieces)
    if with_midi:
        batch = batch.set_column(
            batch.schema.get_field_index("style"), "style", pc.fill_null(batch.column("style"), "")
        )
        has_midi = pa.array(
            [i in with_midi for i in batch.column("segment_id").to_pylist()], pa.bool_()
        )
        keep = pc.or_(keep, has_midi)
    if mined:
        ids = batch.column("segment_id").to_pylist()
        is_mined = pa.array([i in mined for i in ids], pa.bool_())
        styles = [mined.get(i, s) for i, s in zip(ids, batch.column("style").to_pylist())]
        batch = batch.set_column(
            batch.schema.get_field_index("style"), "style", pa.array(styles, pa.string())
        )
        keep = pc.or_(keep, is_mined)
    return batch.filter(keep)


MINED_PREFIX = "mined:"


def mine_descriptor_labels(
    segment_ids: np.ndarray,
    piece_ids: np.ndarray,
    descriptors_z: np.ndarray,
    num_clusters: int,
    seed: int = 0,
) -> dict[int, str]:
    """Pseudo-style labels for unlabelled segments (human performances) by descriptor proximity.

    k-means (FAISS) over z-scored descriptors; a segment's label is its cluster, and two
    segments of one cluster are positives only across *different pieces* (see
    ``_positive_mask``). Clusters drawn from a single piece carry no cross-piece positive and
    are dropped.
    """
    import faiss

    segment_ids = np.asarray(segment_ids)
    piece_ids = np.asarray(piece_ids, dtype=object)
    x = np.ascontiguousarray(descriptors_z, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != segment_ids.size or piece_ids.size != segment_ids.size:
        raise ValueError(
            "segment_ids, piece_ids and descriptors disagree on the number of segments"
        )
    if num_clusters < 2 or x.shape[0] < 2 * num_clusters:
        raise ValueError(
            f"mining {num_clusters} clusters needs at least {2 * num_clusters} segments, "
            f"got {x.shape[0]}"
        )
    kmeans = faiss.Kmeans(x.shape[1], num_clusters, niter=25, seed=seed, verbose=False)
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    assigned = assigned[:, 0]
    labels = {}
    for cluster in range(num_clusters):
        members = assigned == cluster
        if len(set(piece_ids[members])) < 2:
            continue
        labels.update({int(s): f"{MINED_PREFIX}{cluster:03d}" for s in segment_ids[members]})
    return labels


def mine_unlabelled_training_rows(
    storage: Storage,
    version: str,
    train_pieces: list[str],
    window: int,
    sample_rate: int,
    num_clusters: int,
    max_segments: int,
    seed: int,
) -> tuple[dict[int, str], dict[str, Any]]:
    """Mine labels for training-piece segments without a style (a seeded sample of at most
    ``max_segments``): their descriptors are z-scored among themselves, then clustered."""
    dataset = segments_dataset(storage, version)
    unlabelled = pc.field("piece_id").isin(train_pieces) & (pc.field("style") == "")
    meta = dataset.to_table(columns=["segment_id", "piece_id"], filter=unlabelled)
    if meta.num_rows == 0:
        return {}, {"unlabelled_segments": 0}
    rng = np.random.default_rng(seed)
    chosen = np.sort(
        rng.choice(
            meta["segment_id"].to_numpy(), size=min(max_segments, meta.num_rows), replace=False
        )
    )
    table = dataset.to_table(
        columns=["segment_id", "piece_id", "audio"],
        filter=pc.field("segment_id").isin(pa.array(chosen, pa.int64())),
    )
    matrix = np.stack(
        [
            descriptor_vector(fit_length(decode_audio(blob), window), sample_rate)
            for blob in table["audio"].to_pylist()
        ]
    )
    mean, std = matrix.mean(axis=0), matrix.std(axis=0)
    z = (matrix - mean) / np.where(std > 1e-12, std, 1.0)
    labels = mine_descriptor_labels(
        table["segment_id"].to_numpy(),
        np.asarray(table["piece_id"].to_pylist()),
        z,
        num_clusters,
        seed,
    )
    return labels, {
        "unlabelled_segments": meta.num_rows,
        "mined_segments": len(labels),
        "mined_clusters": len(set(labels.values())),
        "described_segments": int(matrix.shape[0]),
    }


def training_descriptor_stats(
    storage: Storage,
    version: str,
    train_pieces: list[str],
    window: int,
    sample_rate: int,
    max_segments: int,
    seed: int,
) -> dict[str, Any]:
    """Mean and std of every descriptor over a seeded sample of training-piece segments
    (the z-scoring of facet targets; recorded in the manifest). Labels play no part here, so
    unlabelled human performances (pair source (b), mined labels) count like renderings."""
    dataset = segments_dataset(storage, version)
    in_train = pc.field("piece_id").isin(train_pieces)
    ids = dataset.to_table(columns=["segment_id"], filter=in_train)["segment_id"].to_numpy()
    if ids.size == 0:
        raise ValueError(f"no training-piece segment in ingest {version} to z-score descriptors on")
    chosen = np.random.default_rng(seed).choice(
        ids, size=min(max_segments, ids.size), replace=False
    )
    table = dataset.to_table(
        columns=["audio"], filter=pc.field("segment_id").isin(pa.array(chosen, pa.int64()))
    )
    matrix = np.stack(
        [
            descriptor_vector(fit_length(decode_audio(blob), window), sample_rate)
            for blob in table["audio"].to_pylist()
        ]
    )
    return {
        "names": list(DESCRIPTOR_NAMES),
        "mean": matrix.mean(axis=0).tolist(),
        "std": matrix.std(axis=0).tolist(),
        "segments": int(matrix.shape[0]),
    }


def training_midi_targets(
    storage: Storage,
    version: str,
    holdout_fraction: float,
    seed: int,
    sample_rate: int,
    window_s: float,
    exclude: set[int] | None = None,
) -> tuple[dict[int, list[float]], list[str], dict[str, Any]]:
    """Z-scored expressive MIDI descriptors of every training-piece segment whose recording has
    performed MIDI (renderings keep theirs; ASAP-layout corpora name theirs): the targets of
    ``finetune.midi_weight``. The descriptors and their z-scoring over the training segments
    are those of benchmark task 3 on the held-out pieces (:func:`mess_ray.midi_descriptors.expressive_matrix`).
    Segments in ``exclude`` get none and play no part in the z-scoring.
    Returns (segment id -> vector, descriptor names kept, counts)."""
    from mess_ray.midi_descriptors import expressive_matrix
    from mess_ray.performances import load_performance_set

    perf = load_performance_set(
        storage,
        version,
        holdout_fraction,
        seed,
        sample_rate,
        window_s,
        pieces="train",
        with_audio=False,
    )
    if perf is None or not perf.has_midi.any():
        raise ValueError(
            f"finetune.midi_weight > 0, but no training-piece segment of ingest {version} has "
            "performed MIDI (renderings keep theirs; recorded corpora need an ASAP/MAESTRO layout)"
        )
    wanted = perf.has_midi & ~np.isin(perf.segment_ids, np.fromiter(exclude or (), dtype=np.int64))
    if not wanted.any():
        raise ValueError(
            f"every training-piece segment with performed MIDI in ingest {version} has a style, "
            "and finetune.midi_targets_for is 'unstyled'"
        )
    rows = np.flatnonzero(wanted)
    matrix, names = expressive_matrix(perf.midi_descriptors[rows])
    targets = {
        int(perf.segment_ids[r]): [round(float(v), 5) for v in matrix[i]]
        for i, r in enumerate(rows)
    }
    counts = {
        "segments_with_midi": int(rows.size),
        "tracks": int(len(set(perf.track_ids[rows]))),
        "pieces": int(len(set(perf.piece_ids[rows]))),
        "tracks_with_problems": len(perf.problems),
    }
    return targets, names, counts


# -- driver --------------------------------------------------------------------------------
def run_finetune(cfg: MessRayConfig, storage: Storage) -> dict[str, Any]:
    """Contrastive fine-tuning on training pieces; publishes ``finetune/<run_name>``."""
    ft = cfg.finetune
    ingest_version = storage.require_latest("ingest")
    metadata = read_segment_table(
        storage, ingest_version, columns=["segment_id", "piece_id", "style"]
    )
    mining = ft.mine_clusters > 0
    train_pieces, styles = training_selection(
        metadata, cfg.eval.holdout_fraction, cfg.eval.seed, require_styles=False
    )
    keep = _keep_mask(metadata, train_pieces)
    train_rows = int(pc.sum(keep.cast(pa.int64())).as_py() or 0)
    midi_targets, midi_names, midi_counts = {}, [], {}
    styled = set(metadata.filter(keep).column("segment_id").to_pylist())
    if ft.midi_weight > 0:
        try:
            midi_targets, midi_names, midi_counts = training_midi_targets(
                storage,
                ingest_version,
                cfg.eval.holdout_fraction,
                cfg.eval.seed,
                cfg.audio.sample_rate,
                cfg.audio.window_s,
                exclude=styled if ft.midi_targets_for == "unstyled" else None,
            )
        except ValueError as err:
            # Recorded corpora without MIDI still fine-tune on styles / mined labels: the manifest
            # says why this pair source was not used.
            log.warning("no MIDI targets: %s", err)
            midi_counts = {"skipped": str(err)}
        train_rows += sum(1 for i in midi_targets if i not in styled)
    with_midi = bool(midi_targets)
    if not (mining or with_midi) and len(styles) < 2:
        raise ValueError(
            f"fine-tuning needs at least 2 styles among training pieces, found {styles} "
            "(or performed MIDI for finetune.midi_weight, or finetune.mine_clusters > 0)"
        )
    mined, mining_counts = {}, {}
    if mining:
        # Source (b): human performances, labelled by descriptor proximity across pieces.
        mined, mining_counts = mine_unlabelled_training_rows(
            storage,
            ingest_version,
            train_pieces,
            window_samples(cfg.audio.window_s, cfg.audio.sample_rate),
            cfg.audio.sample_rate,
            ft.mine_clusters,
            ft.mine_max_segments,
            ft.seed,
        )
        train_rows += sum(1 for i in mined if i not in midi_targets)
        styles = styles + sorted(set(mined.values()))
        if len(styles) < 2 and not with_midi:
            raise ValueError(
                f"fine-tuning needs at least 2 styles or mined clusters, found {styles}"
            )
    if train_rows < ft.batch_size * ft.num_workers:
        raise ValueError(
            f"{train_rows} labelled training segments cannot fill batch_size={ft.batch_size} "
            f"on {ft.num_workers} workers"
        )
    init = resolve_init(cfg, storage, ft.init_from)
    inputs = {"ingest": ingest_version, "init": {k: v for k, v in init.items() if k != "storage"}}
    if init["kind"] == "artifact":
        inputs["pretrain"] = init["version"]
    loop_config = {
        "init": init,
        "inputs": inputs,
        "styles": styles,
        "window_samples": window_samples(cfg.audio.window_s, cfg.audio.sample_rate),
        "mined_from": (len(styles) - len(set(mined.values()))) if mined else None,
        "loss": ft.loss,
        "temperature": ft.temperature,
        "learn_temperature": ft.learn_temperature,
        "margin": ft.margin,
        "hard_negative_weight": ft.hard_negative_weight,
        "contrastive_target": ft.contrastive_target,
        "seed": ft.seed,
        "embedding": {
            "embedding_dim": cfg.model.embedding_dim,
            "pooling": cfg.model.pooling,
            "freeze_encoder": ft.freeze_encoder,
            "freeze_layers": ft.freeze_layers,
            "sample_rate": cfg.audio.sample_rate,
            "facet_dim": cfg.model.facet_dim,
            "level_channel": cfg.model.level_channel,
        },
        "augment_views": ft.augment_views,
        "augment": {
            "eq_tilt_db": ft.augment_eq_tilt_db,
            "noise_snr_db": ft.augment_noise_snr_db,
            "reverb_prob": ft.augment_reverb_prob,
            "reverb_max_s": ft.augment_reverb_max_s,
            "sample_rate": cfg.audio.sample_rate,
        },
    }
    descriptor_stats = None
    facets_supervised = cfg.model.facet_dim > 0 and ft.facet_weight > 0
    if facets_supervised or cfg.model.descriptor_channel:
        descriptor_stats = training_descriptor_stats(
            storage,
            ingest_version,
            train_pieces,
            window_samples(cfg.audio.window_s, cfg.audio.sample_rate),
            cfg.audio.sample_rate,
            ft.descriptor_sample,
            ft.seed,
        )
    if cfg.model.descriptor_channel:
        loop_config["embedding"]["descriptor_stats"] = {
            k: descriptor_stats[k] for k in ("names", "mean", "std")
        }
    loop_config["facet_temperature"] = ft.facet_temperature
    if facets_supervised:
        loop_config.update(
            descriptor_stats=descriptor_stats,
            facet_groups=facet_groups(),
            facet_weight=ft.facet_weight,
            facet_target_temperature=ft.facet_target_temperature,
        )
    if with_midi:
        loop_config.update(
            midi_targets=midi_targets,
            midi_target_names=midi_names,
            midi_weight=ft.midi_weight,
            midi_target_temperature=ft.midi_target_temperature,
        )
    dataset = (
        read_segments_ray(
            storage, ingest_version, columns=["segment_id", "audio", "style", "piece_id"]
        )
        .map_batches(
            _filter_training_rows,
            fn_kwargs={
                "train_pieces": train_pieces,
                "mined": mined,
                "with_midi": set(midi_targets),
            },
            batch_format="pyarrow",
            num_cpus=0.25,
        )
        # Files hold one track or piece each: visit them in random order, and each
        # worker's local shuffle buffer (train.shuffle_buffer) mixes styles within batches.
        .randomize_block_order(seed=ft.seed)
    )
    ft = with_run_name(cfg, "finetune", ft, inputs)
    result = fit(cfg, storage, FINETUNE_TASK, ft, dataset, loop_config)
    return finish(
        cfg,
        storage,
        FINETUNE_TASK,
        ft,
        result,
        loop_config,
        counts={
            "train_segments": train_rows,
            "train_pieces": len(train_pieces),
            "styles": len(styles),
            "segments": metadata.num_rows,
        },
        extra={
            "train_pieces": train_pieces,
            "styles": styles,
            "loss_type": ft.loss,
            "mining": mining_counts,
            "midi_targets": (
                {"names": midi_names, **midi_counts} if with_midi else midi_counts or None
            ),
            "descriptor_stats": descriptor_stats,
            "facet_groups": loop_config.get("facet_groups"),
        },
    )
