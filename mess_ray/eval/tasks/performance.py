"""Tasks 2 and 3 over a held-out :class:`~mess_ray.performances.PerformanceSet`: which of
them its data supports (with their masks, or why not), and one system's scores on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mess_ray.eval.tasks import agreement, passage
from mess_ray.midi_descriptors import expressive_matrix

STYLE_TASK = "style_retrieval"
PASSAGE_TASK = "passage_retrieval"
AGREEMENT_TASK = "expressive_agreement"


@dataclass
class PerformanceTasks:
    """The performance set and the masks of tasks 2 and 3 over its rows (None: not run)."""

    perf: Any  # PerformanceSet
    passage_rows: np.ndarray | None = None  # indices into perf
    passage_candidates: np.ndarray | None = None
    passage_relevant: np.ndarray | None = None
    agreement_rows: np.ndarray | None = None
    agreement_candidates: np.ndarray | None = None
    agreement_relevance: np.ndarray | None = None
    agreement_features: list[str] = field(default_factory=list)
    agreement_chance: float = float("nan")
    skipped: dict[str, str] = field(default_factory=dict)


def plan_performance_tasks(perf, ndcg_k: int, seed: int) -> PerformanceTasks:
    """Which of tasks 2 and 3 the performance set supports, with their masks (or why not)."""
    plan = PerformanceTasks(perf=perf)
    rows = np.flatnonzero(perf.has_beats)
    if rows.size == 0:
        plan.skipped[PASSAGE_TASK] = "no held-out segment lies within annotated beats"
    else:
        candidates, relevant = passage.overlapping_beats(
            perf.track_ids[rows], perf.piece_ids[rows], perf.beat_spans[rows]
        )
        if not relevant.any():
            plan.skipped[PASSAGE_TASK] = (
                "no held-out piece has two performances with beat annotations "
                f"(held-out pieces: {perf.holdout_pieces})"
            )
        else:
            plan.passage_rows, plan.passage_candidates, plan.passage_relevant = (
                rows,
                candidates,
                relevant,
            )
    rows = np.flatnonzero(perf.has_midi)
    if rows.size == 0:
        plan.skipped[AGREEMENT_TASK] = "no held-out segment has performed MIDI"
    elif len(set(perf.piece_ids[rows])) < 2:
        plan.skipped[AGREEMENT_TASK] = (
            "expressive agreement across pieces needs two held-out pieces with MIDI"
        )
    else:
        try:
            features, kept = expressive_matrix(perf.midi_descriptors[rows])
        except ValueError as err:
            plan.skipped[AGREEMENT_TASK] = str(err)
        else:
            candidates = agreement.other_piece_candidates(perf.piece_ids[rows])
            relevance = agreement.graded_relevance(features, candidates)
            plan.agreement_rows, plan.agreement_candidates, plan.agreement_relevance = (
                rows,
                candidates,
                relevance,
            )
            plan.agreement_features = kept
            plan.agreement_chance = agreement.random_ndcg(relevance, candidates, ndcg_k, seed)
    return plan


def score_performance_tasks(
    vectors: np.ndarray, plan: PerformanceTasks, recall_ks, ndcg_k: int
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Metrics of one system's embeddings of the performance set, per task; and the similarity
    matrices (for the report's histograms)."""
    unit = unit_rows(vectors)
    out: dict[str, dict[str, float]] = {}
    sims: dict[str, np.ndarray] = {}
    perf = plan.perf
    if plan.passage_rows is not None:
        r = plan.passage_rows
        sim = unit[r] @ unit[r].T
        beats = {t: b for t, b in perf.beats.items()}
        out[PASSAGE_TASK] = passage.score_passage(
            sim,
            plan.passage_candidates,
            plan.passage_relevant,
            perf.piece_ids[r],
            perf.track_ids[r],
            perf.start_s[r],
            perf.beat_spans[r],
            beats,
            recall_ks=recall_ks,
            ndcg_k=ndcg_k,
        )
        sims[PASSAGE_TASK] = sim
    if plan.agreement_rows is not None:
        r = plan.agreement_rows
        sim = unit[r] @ unit[r].T
        scores = agreement.score_agreement(
            sim, plan.agreement_relevance, plan.agreement_candidates, k=ndcg_k
        )
        scores["chance"] = plan.agreement_chance
        out[AGREEMENT_TASK] = scores
        sims[AGREEMENT_TASK] = sim
    return out, sims


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64); NaN or infinite values are an error."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if not np.all(np.isfinite(vectors)):
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 1e-12, norms, 1.0)
