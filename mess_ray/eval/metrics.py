"""Retrieval metrics from a similarity matrix, a relevance matrix and a candidate mask.

Every function takes ``similarity`` [Q, N] (higher is closer), ``relevance`` [Q, N]
(bool, or graded non-negative numbers for nDCG) and ``candidates`` [Q, N] (bool: which
items a query may retrieve; a query never retrieves itself or items excluded by the
protocol, e.g. segments of its own track). Rankings sort candidates by descending
similarity; ties break by item index so results are deterministic.

Queries without any relevant candidate have no defined AP/MRR/recall; they get NaN per
query and are left out of the means (``evaluated`` counts the rest).
"""

from __future__ import annotations

import numpy as np


def _check(
    similarity: np.ndarray, relevance: np.ndarray, candidates: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    similarity = np.asarray(similarity, dtype=np.float64)
    relevance = np.asarray(relevance)
    if similarity.ndim != 2:
        raise ValueError(
            f"similarity must be a [queries, items] matrix, got shape {similarity.shape}"
        )
    if relevance.shape != similarity.shape:
        raise ValueError(
            f"relevance shape {relevance.shape} != similarity shape {similarity.shape}"
        )
    if candidates is None:
        candidates = np.ones(similarity.shape, dtype=bool)
    candidates = np.asarray(candidates, dtype=bool)
    if candidates.shape != similarity.shape:
        raise ValueError(
            f"candidate mask shape {candidates.shape} != similarity shape {similarity.shape}"
        )
    if np.any(np.isnan(similarity[candidates])):
        raise ValueError("similarity has NaN entries among candidates")
    relevance = relevance.astype(np.float64)
    if np.any(relevance < 0):
        raise ValueError("relevance must be non-negative")
    return similarity, relevance, candidates


def _ranked(
    similarity: np.ndarray, relevance: np.ndarray, candidates: np.ndarray, row: int
) -> np.ndarray:
    """Relevance of one query's candidates in ranked order (best first)."""
    idx = np.flatnonzero(candidates[row])
    # lexsort: last key is primary -> descending similarity, then ascending index.
    order = np.lexsort((idx, -similarity[row, idx]))
    return relevance[row, idx[order]]


def average_precision(similarity, relevance, candidates=None) -> np.ndarray:
    """Per-query average precision (binary relevance: > 0); NaN where nothing is relevant."""
    similarity, relevance, candidates = _check(similarity, relevance, candidates)
    out = np.full(similarity.shape[0], np.nan)
    for q in range(similarity.shape[0]):
        hits = _ranked(similarity, relevance, candidates, q) > 0
        if hits.any():
            precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
            out[q] = precision_at_hit.mean()
    return out


def mean_average_precision(similarity, relevance, candidates=None) -> float:
    ap = average_precision(similarity, relevance, candidates)
    return float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan")


def recall_at_k(
    similarity, relevance, candidates=None, k: int = 10, mode: str = "hit"
) -> np.ndarray:
    """Per-query recall@k.

    ``mode="hit"`` (the metric-learning Recall@K): 1 if any relevant item is in the top k.
    ``mode="fraction"``: the fraction of the query's relevant items found in the top k.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if mode not in ("hit", "fraction"):
        raise ValueError(f"mode must be 'hit' or 'fraction', got {mode!r}")
    similarity, relevance, candidates = _check(similarity, relevance, candidates)
    out = np.full(similarity.shape[0], np.nan)
    for q in range(similarity.shape[0]):
        hits = _ranked(similarity, relevance, candidates, q) > 0
        total = hits.sum()
        if total:
            found = hits[:k].sum()
            out[q] = float(found > 0) if mode == "hit" else found / total
    return out


def reciprocal_rank(similarity, relevance, candidates=None) -> np.ndarray:
    """Per-query 1 / rank of the first relevant item; NaN where nothing is relevant."""
    similarity, relevance, candidates = _check(similarity, relevance, candidates)
    out = np.full(similarity.shape[0], np.nan)
    for q in range(similarity.shape[0]):
        hits = np.flatnonzero(_ranked(similarity, relevance, candidates, q) > 0)
        if hits.size:
            out[q] = 1.0 / (hits[0] + 1)
    return out


def ndcg_at_k(similarity, relevance, candidates=None, k: int = 10) -> np.ndarray:
    """Per-query nDCG@k with linear graded gains (as sklearn.metrics.ndcg_score)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    similarity, relevance, candidates = _check(similarity, relevance, candidates)
    out = np.full(similarity.shape[0], np.nan)
    for q in range(similarity.shape[0]):
        gains = _ranked(similarity, relevance, candidates, q)
        ideal = np.sort(gains)[::-1][:k]
        discounts = 1.0 / np.log2(np.arange(2, k + 2))
        ideal_dcg = float((ideal * discounts[: ideal.size]).sum())
        if ideal_dcg > 0:
            top = gains[:k]
            out[q] = float((top * discounts[: top.size]).sum()) / ideal_dcg
    return out


def chance_level(relevance, candidates=None) -> np.ndarray:
    """Per-query expected average precision of a uniformly random ranking of the candidates:
    with R relevant among N, ``H_N / N + (R - 1) (N - H_N) / (N (N - 1))`` (H_N the N-th harmonic
    number). It is the fraction R / N only when R is large: for one relevant item among N it is
    H_N / N (0.61 for N = 3, 0.031 for N = 190), so the fraction understates chance for tasks
    with few relevant items per query (performer identity)."""
    relevance = np.asarray(relevance) > 0
    candidates = (
        np.ones(relevance.shape, bool) if candidates is None else np.asarray(candidates, bool)
    )
    n = candidates.sum(axis=1).astype(np.float64)
    r = (relevance & candidates).sum(axis=1).astype(np.float64)
    out = np.full(n.shape, np.nan)
    ok = (n > 0) & (r > 0)
    nn, rr = n[ok], r[ok]
    # H_k for every k up to the largest candidate count, looked up per query
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(nn.max(initial=0)) + 1))])
    harmonic = table[nn.astype(np.int64)]
    # (R - 1) is 0 whenever N is 1: the max only keeps the denominator positive
    out[ok] = harmonic / nn + (rr - 1) * (nn - harmonic) / (nn * np.maximum(nn - 1, 1))
    return out


def mean_pair_similarity(similarity, pairs_mask) -> float:
    """Mean similarity over the (query, item) pairs selected by ``pairs_mask``; NaN if none."""
    similarity = np.asarray(similarity, dtype=np.float64)
    pairs_mask = np.asarray(pairs_mask, dtype=bool)
    if pairs_mask.shape != similarity.shape:
        raise ValueError(
            f"pair mask shape {pairs_mask.shape} != similarity shape {similarity.shape}"
        )
    return float(similarity[pairs_mask].mean()) if pairs_mask.any() else float("nan")


def triplet_margin_loss(
    similarity, positives, negatives, margin: float = 0.2
) -> tuple[float, float, int]:
    """Mean ``max(0, s(a,n) - s(a,p) + margin)`` over every (anchor, positive, negative) triplet.

    Triplets are all combinations, per anchor row, of a positive column and a negative
    column. Returns (mean loss, fraction of triplets ranked correctly ``s(a,p) > s(a,n)``,
    number of triplets); NaN for the first two when there are no triplets.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    similarity = np.asarray(similarity, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    negatives = np.asarray(negatives, dtype=bool)
    if positives.shape != similarity.shape or negatives.shape != similarity.shape:
        raise ValueError("positive/negative masks must have the similarity matrix's shape")
    if np.any(positives & negatives):
        raise ValueError("an item cannot be both a positive and a negative of the same anchor")
    loss_sum = 0.0
    correct = 0
    count = 0
    for a in range(similarity.shape[0]):
        pos = similarity[a, positives[a]]
        neg = similarity[a, negatives[a]]
        if pos.size == 0 or neg.size == 0:
            continue
        diff = neg[None, :] - pos[:, None]  # [P, N]: s(a,n) - s(a,p)
        loss_sum += float(np.maximum(0.0, diff + margin).sum())
        correct += int((diff < 0).sum())
        count += diff.size
    if count == 0:
        return float("nan"), float("nan"), 0
    return loss_sum / count, correct / count, count


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def retrieval_summary(
    similarity, relevance, candidates=None, recall_ks=(1, 10), ndcg_k: int = 10
) -> dict:
    """The ranking metrics of one system as a flat dict of floats (means over evaluated queries)."""
    ap = average_precision(similarity, relevance, candidates)
    summary = {
        "map": _nanmean(ap),
        "mrr": _nanmean(reciprocal_rank(similarity, relevance, candidates)),
        f"ndcg@{ndcg_k}": _nanmean(ndcg_at_k(similarity, relevance, candidates, k=ndcg_k)),
        "chance": _nanmean(chance_level(relevance, candidates)),
        "evaluated_queries": int(np.sum(~np.isnan(ap))),
    }
    for k in recall_ks:
        summary[f"recall@{k}"] = _nanmean(recall_at_k(similarity, relevance, candidates, k=k))
    return summary
