"""Task 3: expressive agreement with MIDI descriptors, across different pieces.

Each segment with MIDI is a query; candidates are segments of *other pieces*; the graded
relevance of a candidate is its proximity to the query in expressive-descriptor space
(:data:`~mess_ray.midi_descriptors.EXPRESSIVE_MIDI_DESCRIPTORS`: tempo relative to the
score, rubato, timing, velocity level/range/slope, articulation, pedal), z-scored over the
evaluated set. nDCG@k then asks: do the passages a system ranks first sound *played* like the
query, whatever the music? The chance level is the nDCG of random rankings (seeded).
"""

from __future__ import annotations

import numpy as np

from mess_ray.eval import metrics

NEIGHBOURS_FOR_BANDWIDTH = (
    10  # the kernel bandwidth is the typical distance to this many neighbours
)
RANDOM_RANKINGS = 20  # random rankings averaged for the chance level


def graded_relevance(
    features: np.ndarray, candidates: np.ndarray, neighbours: int = NEIGHBOURS_FOR_BANDWIDTH
) -> np.ndarray:
    """Relevance exp(-(d/tau)^2) of each candidate, d the Euclidean descriptor distance and tau
    the median over queries of the distance to the ``neighbours``-th nearest candidate (so about
    that many candidates per query are clearly relevant); 0 outside the candidates."""
    features = np.asarray(features, dtype=np.float64)
    sq = np.sum(features**2, axis=1)
    distance = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * features @ features.T, 0.0))
    kth = []
    for q in range(distance.shape[0]):
        d = np.sort(distance[q, candidates[q]])
        if d.size:
            kth.append(d[min(neighbours, d.size) - 1])
    tau = float(np.median(kth)) if kth else 1.0
    tau = tau if tau > 1e-12 else 1.0
    return np.where(candidates, np.exp(-((distance / tau) ** 2)), 0.0)


def other_piece_candidates(piece_ids) -> np.ndarray:
    piece_ids = np.asarray(piece_ids, dtype=object)
    return piece_ids[:, None] != piece_ids[None, :]


def random_ndcg(
    relevance: np.ndarray,
    candidates: np.ndarray,
    k: int,
    seed: int,
    rankings: int = RANDOM_RANKINGS,
) -> float:
    """Mean nDCG@k of random rankings: the chance level of the task."""
    rng = np.random.default_rng(seed)
    scores = [
        np.nanmean(metrics.ndcg_at_k(rng.random(relevance.shape), relevance, candidates, k=k))
        for _ in range(rankings)
    ]
    return float(np.mean(scores))


def score_agreement(similarity, relevance, candidates, k: int = 10) -> dict[str, float]:
    """nDCG@k of the similarity ranking against descriptor relevance, and the rank correlation
    between similarity and relevance over each query's candidates (mean Spearman)."""
    from scipy.stats import spearmanr

    similarity = np.asarray(similarity, dtype=np.float64)
    ndcg = metrics.ndcg_at_k(similarity, relevance, candidates, k=k)
    rhos = []
    for q in range(similarity.shape[0]):
        idx = np.flatnonzero(candidates[q])
        if idx.size >= 3 and np.ptp(relevance[q, idx]) > 0 and np.ptp(similarity[q, idx]) > 0:
            rhos.append(spearmanr(similarity[q, idx], relevance[q, idx]).statistic)
    return {
        f"ndcg@{k}": float(np.nanmean(ndcg)) if np.any(~np.isnan(ndcg)) else float("nan"),
        "spearman": float(np.mean(rhos)) if rhos else float("nan"),
        "evaluated_queries": int(np.sum(~np.isnan(ndcg))),
    }
