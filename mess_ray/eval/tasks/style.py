"""Style made non-circular (issue 15, task 6): does the embedding rank renderings of the same
passage by how close their *style parameters* are?

Data: the evaluation side of the style grid (:mod:`mess_ray.style_grid`): each validation / test
piece's score performed with ``render.style_grid.eval_renders`` parameter combinations whose
numeric values were never rendered for training, one instrument, loudness-normalised.

Per query segment, the candidates are the segments of the *same piece* rendered with the other
combinations that start at the same time (within half a hop): content is held fixed, so only the
style parameters differ (other pieces would add content differences that any system, and most of
all a content one, would rank by first). The figure is the Spearman correlation between the
embedding's cosine similarity to the candidates and the negative Euclidean distance of their
standardised parameter vectors (:func:`mess_ray.style_grid.parameter_vector`); mean over queries,
interval by the bootstrap over pieces. A system whose similarity is the negative parameter
distance scores 1, a random one about 0 (the chance level).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from mess_ray import style_grid

log = logging.getLogger(__name__)

STYLE_PARAMETERS = "style_parameters"
MIN_CANDIDATES = 3  # a rank correlation over fewer candidates says nothing


@dataclass
class StyleGridSet:
    """Evaluation-grid segments of the held-out pieces, in segment_id order."""

    segment_ids: np.ndarray  # int64 [N]
    track_ids: np.ndarray  # object [N]
    piece_ids: np.ndarray  # object [N]
    start_s: np.ndarray  # float [N]
    params: np.ndarray  # float [N, len(style_grid.PARAMETERS)], standardised
    side: np.ndarray  # object [N]: validation / test
    audio: np.ndarray  # float32 [N, window]

    def __len__(self) -> int:
        return int(self.segment_ids.size)


def grid_values(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation-grid values of a segment from its catalog metadata (None: not one)."""
    raw = metadata.get("style_params_json")
    if not isinstance(raw, str) or not raw:
        return None
    try:
        info = json.loads(raw).get(style_grid.PARAMETER_KEY)
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(info, dict) or info.get("side") != style_grid.EVAL:
        return None
    return info.get("values")


def load_style_grid_set(
    storage, version: str, split_of: dict[str, str], sample_rate: int, window_s: float
) -> StyleGridSet | None:
    """Evaluation-grid segments of validation and test pieces (None when the ingest has none)."""
    import pyarrow.compute as pc

    from mess_ray.segments import decode_audio, fit_length, segments_dataset, window_samples

    dataset = segments_dataset(storage, version)
    held = sorted(p for p, s in split_of.items() if s in ("validation", "test"))
    filt = pc.starts_with(pc.field("style"), pattern=f"{style_grid.PREFIX}e-") & pc.field(
        "piece_id"
    ).isin(held)
    table = dataset.to_table(
        columns=[
            "segment_id",
            "track_id",
            "piece_id",
            "start_s",
            "sample_rate",
            "metadata_json",
            "audio",
        ],
        filter=filt,
    ).sort_by("segment_id")
    if table.num_rows == 0:
        return None
    rates = set(pc.unique(table["sample_rate"]).to_pylist())
    if rates != {sample_rate}:
        raise ValueError(
            f"segments are at {sorted(rates)} Hz but audio.sample_rate is {sample_rate}"
        )
    params, keep = [], []
    for i, blob in enumerate(table["metadata_json"].to_pylist()):
        values = grid_values(json.loads(blob or "{}"))
        if values is None:
            continue
        params.append(style_grid.parameter_vector(values))
        keep.append(i)
    if not keep:
        return None
    table = table.take(keep)
    window = window_samples(window_s, sample_rate)
    pieces = np.asarray(table["piece_id"].to_pylist(), dtype=object)
    return StyleGridSet(
        segment_ids=np.asarray(table["segment_id"].to_numpy(), dtype=np.int64),
        track_ids=np.asarray(table["track_id"].to_pylist(), dtype=object),
        piece_ids=pieces,
        start_s=np.asarray(table["start_s"].to_numpy(), dtype=np.float64),
        params=np.stack(params),
        side=np.asarray([split_of[p] for p in pieces], dtype=object),
        audio=np.stack(
            [fit_length(decode_audio(a), window) for a in table["audio"].to_pylist()]
        ).astype(np.float32),
    )


def same_passage_candidates(piece_ids, track_ids, start_s, hop_s: float) -> np.ndarray:
    """[N, N]: same piece, another rendering, start within half a hop (content held fixed)."""
    piece_ids = np.asarray(piece_ids, dtype=object)
    track_ids = np.asarray(track_ids, dtype=object)
    start_s = np.asarray(start_s, dtype=np.float64)
    if not (piece_ids.shape == track_ids.shape == start_s.shape) or piece_ids.ndim != 1:
        raise ValueError("piece_ids, track_ids and start_s must be 1-D and of equal length")
    return (
        (piece_ids[:, None] == piece_ids[None, :])
        & (track_ids[:, None] != track_ids[None, :])
        & (np.abs(start_s[:, None] - start_s[None, :]) < hop_s / 2)
    )


def negative_parameter_distance(params_q: np.ndarray, params: np.ndarray) -> np.ndarray:
    """[Q, N]: minus the Euclidean distance between standardised parameter vectors."""
    diff = np.asarray(params_q, np.float64)[:, None, :] - np.asarray(params, np.float64)[None]
    return -np.sqrt((diff**2).sum(axis=-1))


def spearman_per_query(
    similarity: np.ndarray,
    target: np.ndarray,
    candidates: np.ndarray,
    min_candidates: int = MIN_CANDIDATES,
) -> np.ndarray:
    """Per query: Spearman's rho between ``similarity`` and ``target`` over its candidates (ties
    get average ranks); NaN with fewer than ``min_candidates`` or when either side is constant."""
    from scipy.stats import rankdata

    similarity = np.asarray(similarity, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=bool)
    if not (similarity.shape == target.shape == candidates.shape) or similarity.ndim != 2:
        raise ValueError("similarity, target and candidates must be [Q, N] of equal shape")
    out = np.full(similarity.shape[0], np.nan)
    for i in range(similarity.shape[0]):
        idx = np.flatnonzero(candidates[i])
        if idx.size < min_candidates:
            continue
        a, b = rankdata(similarity[i, idx]), rankdata(target[i, idx])
        a, b = a - a.mean(), b - b.mean()
        denom = np.sqrt((a**2).sum() * (b**2).sum())
        if denom > 1e-12:
            out[i] = float((a * b).sum() / denom)
    return out
