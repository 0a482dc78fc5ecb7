"""Task 2: cross-performance passage retrieval on human performances.

A passage (segment) of one performance is a query; candidates are the segments of every
*other* recording in the held-out set; relevant are the segments of other performances of the
same piece whose beat span overlaps the query's (the same music, played by someone else, at
another tempo). Beyond the ranking metrics we measure *where* the top hit lands: when it is
another performance of the query's piece, how far its start is from where the query's first
beat falls in that performance, in seconds and in beats.
"""

from __future__ import annotations

import math

import numpy as np

from mess_ray.eval import metrics
from mess_ray.midi_descriptors import beat_time


def overlapping_beats(track_ids, piece_ids, beat_spans) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, relevant) [N, N] masks: other track; same piece, other track, overlapping beats."""
    track_ids = np.asarray(track_ids, dtype=object)
    piece_ids = np.asarray(piece_ids, dtype=object)
    spans = np.asarray(beat_spans, dtype=np.float64)
    if spans.shape != (track_ids.size, 2) or piece_ids.shape != track_ids.shape:
        raise ValueError(
            "track_ids, piece_ids and beat_spans [N, 2] must describe the same N segments"
        )
    if np.isnan(spans).any():
        raise ValueError(
            "every segment of the passage task needs a beat span (filter NaN spans first)"
        )
    candidates = track_ids[:, None] != track_ids[None, :]
    same_piece = piece_ids[:, None] == piece_ids[None, :]
    overlap = (spans[:, None, 0] < spans[None, :, 1]) & (spans[None, :, 0] < spans[:, None, 1])
    return candidates, candidates & same_piece & overlap


def top_hit_errors(
    similarity, candidates, piece_ids, track_ids, start_s, beat_spans, beats: dict[str, np.ndarray]
) -> dict[str, float]:
    """Timestamp error of each query's top hit when it is another performance of the same piece:
    |hit start - time of the query's first beat in the hit's performance| (s) and
    |hit's first beat - query's first beat| (beats)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    errors_s, errors_beats, same_piece_hits, queries = [], [], 0, 0
    for q in range(similarity.shape[0]):
        idx = np.flatnonzero(candidates[q])
        if idx.size == 0:
            continue
        queries += 1
        top = idx[np.lexsort((idx, -similarity[q, idx]))[0]]
        if piece_ids[top] != piece_ids[q]:
            continue
        same_piece_hits += 1
        expected_s = float(beat_time(np.array([beat_spans[q, 0]]), beats[track_ids[top]])[0])
        errors_s.append(abs(float(start_s[top]) - expected_s))
        errors_beats.append(abs(float(beat_spans[top, 0]) - float(beat_spans[q, 0])))
    nan = math.nan
    return {
        "top1_same_piece": same_piece_hits / queries if queries else nan,
        "timestamp_error_s_median": float(np.median(errors_s)) if errors_s else nan,
        "timestamp_error_s_mean": float(np.mean(errors_s)) if errors_s else nan,
        "timestamp_error_beats_median": float(np.median(errors_beats)) if errors_beats else nan,
        "timestamp_error_beats_mean": float(np.mean(errors_beats)) if errors_beats else nan,
        "located_queries": len(errors_s),
    }


def score_passage(
    similarity,
    candidates,
    relevant,
    piece_ids,
    track_ids,
    start_s,
    beat_spans,
    beats: dict[str, np.ndarray],
    recall_ks=(1, 10),
    ndcg_k: int = 10,
) -> dict[str, float]:
    """Ranking metrics (mAP, recall@k, MRR, nDCG) plus the top hit's timestamp error."""
    summary = metrics.retrieval_summary(
        similarity, relevant, candidates, recall_ks=recall_ks, ndcg_k=ndcg_k
    )
    summary.update(
        top_hit_errors(
            similarity,
            candidates,
            np.asarray(piece_ids, dtype=object),
            np.asarray(track_ids, dtype=object),
            np.asarray(start_s, dtype=np.float64),
            np.asarray(beat_spans, dtype=np.float64),
            beats,
        )
    )
    summary["cos_positive"] = metrics.mean_pair_similarity(similarity, relevant)
    summary["cos_negative"] = metrics.mean_pair_similarity(similarity, candidates & ~relevant)
    return summary
