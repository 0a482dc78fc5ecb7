"""Fine-tuning losses: multi-positive InfoNCE / NT-Xent, batch-hard triplet, and the
soft-neighbour KL that supervises facet heads (descriptor targets) and the searched vector
(performed-MIDI targets); :func:`finetune_loss` combines them as a fine-tuning step does."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mess_ray.facets import OVERALL, TIMELINE
from mess_ray.train.finetune_settings import FinetuneLoop


def positive_mask(
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


def hard_negative_mask(labels: torch.Tensor, pieces: torch.Tensor | None) -> torch.Tensor:
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
        logits = logits + math.log(hard_negative_weight) * hard_negative_mask(labels, pieces).to(
            logits.dtype
        )
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = positive_mask(labels, pieces, mined_from)
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        return embeddings.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(dim=1)) / counts.clamp_min(1)
    return per_anchor[has_positive].mean()


def performer_codes(performers) -> np.ndarray:
    """Integer codes of each row's pianist ("" or None: unknown, a code of its own below 0, so
    an unknown row is nobody's positive)."""
    names = [str(p) if p else "" for p in performers]
    known = sorted({n for n in names if n})
    index = {n: i for i, n in enumerate(known)}
    return np.array([index[n] if n else -1 - i for i, n in enumerate(names)], dtype=np.int64)


def performer_infonce(
    embeddings: torch.Tensor,
    performers: torch.Tensor,
    pieces: torch.Tensor,
    temperature: torch.Tensor | float,
    bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Multi-positive InfoNCE whose positives are the same pianist in *another piece*
    (:func:`performer_codes`): the loss of the protocol's performer-identity task. The same
    pianist in the *same* piece (one performance, its views and its other chains) is neither a
    positive nor a negative: it shares the music, and the main loss already pulls it close.
    ``bank``: (vectors, pianist codes, piece codes) of earlier rows (detached), ranked as further
    candidates. Anchors without a positive do not count."""
    vectors, codes, piece_codes = embeddings, performers, pieces
    if bank is not None and bank[0].shape[0]:
        vectors = torch.cat([embeddings, bank[0].to(embeddings.dtype)])
        codes = torch.cat([performers, bank[1].to(performers.device)])
        piece_codes = torch.cat([pieces, bank[2].to(pieces.device)])
    n = embeddings.shape[0]
    same_player = performers.unsqueeze(1) == codes.unsqueeze(0)
    same_piece = pieces.unsqueeze(1) == piece_codes.unsqueeze(0)
    own = torch.zeros(same_player.shape, dtype=torch.bool, device=embeddings.device)
    own[:, :n] = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    left_out = own | (same_player & same_piece)
    positives = same_player & ~same_piece & (performers >= 0).unsqueeze(1)
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        return embeddings.sum() * 0.0
    # Only anchors with a positive: each row keeps a finite logit (no NaN gradients).
    rows = has_positive.nonzero().flatten()
    logits = (embeddings[rows] @ vectors.T / temperature).masked_fill(left_out[rows], float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    kept = positives[rows]
    return (-(log_prob.masked_fill(~kept, 0.0).sum(dim=1)) / counts[rows]).mean()


class PerformerMemory:
    """The last ``size`` rows the performer term saw (detached vectors, pianist codes, piece
    codes), per worker, oldest overwritten first; not checkpointed (a resumed run refills it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.vectors: torch.Tensor | None = None
        self.codes = torch.zeros(0, dtype=torch.long)
        self.pieces = torch.zeros(0, dtype=torch.long)

    def bank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.vectors is None:
            return None
        return self.vectors, self.codes, self.pieces

    def push(self, vectors: torch.Tensor, codes: torch.Tensor, pieces: torch.Tensor) -> None:
        if self.size <= 0:
            return
        vectors = vectors.detach()
        if self.vectors is None:
            self.vectors = vectors[:0]
        self.vectors = torch.cat([self.vectors, vectors])[-self.size :]
        self.codes = torch.cat([self.codes.to(codes.device), codes])[-self.size :]
        self.pieces = torch.cat([self.pieces.to(pieces.device), pieces])[-self.size :]


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
    positives = positive_mask(labels, pieces, mined_from)
    negatives = labels.unsqueeze(0) != labels.unsqueeze(1)
    hard = hard_negative_mask(labels, pieces)
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


def finetune_loss(
    model: nn.Module, batch: dict, loop: FinetuneLoop
) -> tuple[torch.Tensor, dict[str, float]]:
    """The contrastive loss (InfoNCE or triplet) plus the facet and MIDI soft-neighbour terms,
    the performer term and the timeline part's own term."""
    inner = model.module if hasattr(model, "module") else model
    # Through the (DDP) wrapper's forward, so gradients are synchronised; parts are
    # sliced back out of the composed vector (each part is unit-norm / sqrt(n) there).
    # The collate's raw descriptors (facet targets) also feed the descriptor channel: measured once.
    embeddings = model(batch["audio"], batch.get("raw_descriptors"))
    layout = inner.embedding.facet_layout
    labels, pieces = batch["labels"], batch.get("pieces")
    timeline = None
    if layout is not None and TIMELINE in layout:
        # The timeline part answers "the same moment of the same performance" only; every other
        # term acts on the rest of the vector (the timeline is the layout's last part).
        start, end = layout[TIMELINE]
        timeline = F.normalize(embeddings[:, start:end], dim=-1)
        embeddings = F.normalize(embeddings[:, :start], dim=-1)
    contrast = embeddings
    if layout is not None and loop.contrastive_target == OVERALL:
        start, end = layout[OVERALL]
        contrast = F.normalize(embeddings[:, start:end], dim=-1)
    if loop.loss == "triplet":
        loss = batch_hard_triplet(contrast, labels, loop.margin, pieces, loop.mined_from)
    else:
        loss = multi_positive_infonce(
            contrast,
            labels,
            inner.temperature(),
            pieces,
            loop.hard_negative_weight,
            loop.mined_from,
        )
    extra = {"contrastive_loss": float(loss.detach())}
    if layout is not None and loop.facet_weight > 0 and "descriptors" in batch:
        facet_losses = []
        for facet, idx in loop.facet_groups.items():
            if facet not in layout:
                continue
            start, end = layout[facet]
            part = F.normalize(embeddings[:, start:end], dim=-1)
            facet_loss = soft_neighbour_kl(
                part,
                batch["descriptors"][:, idx],
                loop.facet_temperature,
                loop.facet_target_temperature,
            )
            extra[f"facet_loss_{facet}"] = float(facet_loss.detach())
            facet_losses.append(facet_loss)
        if facet_losses:
            loss = loss + loop.facet_weight * torch.stack(facet_losses).mean()
    if loop.midi_weight > 0 and "midi" in batch and bool(batch["has_midi"].sum() >= 3):
        # Pair source (b), soft form: the searched vector ranks other pieces' passages as their
        # performed-MIDI descriptors do. Same-piece pairs are left out (they share the music).
        has = batch["has_midi"]
        same_piece = pieces[has].unsqueeze(0) == pieces[has].unsqueeze(1)
        midi_loss = soft_neighbour_kl(
            embeddings[has],
            batch["midi"][has],
            loop.facet_temperature,
            loop.midi_target_temperature,
            exclude=same_piece,
        )
        extra["midi_loss"] = float(midi_loss.detach())
        loss = loss + loop.midi_weight * midi_loss
    if loop.performer_weight > 0 and "performers" in batch:
        # Performer positives: the same pianist in another piece, in the batch or the memory.
        memory = getattr(inner, "performer_memory", None)
        performer_loss = performer_infonce(
            embeddings,
            batch["performers"],
            pieces,
            inner.temperature(),
            memory.bank() if memory is not None else None,
        )
        if memory is not None:
            memory.push(embeddings, batch["performers"], pieces)
        extra["performer_loss"] = float(performer_loss.detach())
        loss = loss + loop.performer_weight * performer_loss
    if timeline is not None and loop.timeline_weight > 0 and "instances" in batch:
        # Instance discrimination on the timeline: positives are a row's own views (its
        # cross-chain partner, its augmentations), negatives every other row, the same
        # performance a few seconds away included.
        timeline_loss = multi_positive_infonce(timeline, batch["instances"], inner.temperature())
        extra["timeline_loss"] = float(timeline_loss.detach())
        loss = loss + loop.timeline_weight * timeline_loss
    anchors = float(positive_mask(labels, pieces, loop.mined_from).any(dim=1).float().mean())
    hard = float(hard_negative_mask(labels, pieces).any(dim=1).float().mean())
    return loss, {
        **extra,
        "temperature": float(inner.temperature()),
        "anchors_with_positive": anchors,
        "anchors_with_hard_negative": hard,
        "styles_in_batch": float(len(torch.unique(labels))),
    }
