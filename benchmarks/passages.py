"""The content view on human performances: same-passage retrieval, alignment error, "who plays it
most like this", and latency. One JSON line per figure.

Data: the latest ingest of a rendered asap-dev corpus (``configs/asap-dev.yaml``), pieces split
by the benchmark's split (:func:`mess_ray.segments.split_pieces` with ``eval.holdout_fraction``
and ``eval.seed``): every figure except ``calibration`` is on the HELD-OUT (test) pieces
(``--split train``: on the training pieces instead); ``calibration`` (the ``content.max_cost``
threshold) and ``tuning`` are measured on the TRAINING pieces.
Truth comes from ASAP's beat annotations and the performed MIDI; nothing here is tuned on
held-out pieces. Tracks are stitched back from their ingest segments and turned into content
features exactly as the index job does (:mod:`mess_ray.index.content_features`).

Figures:

- ``retrieval``: task 2 of the evaluation (queries: the 4 s segments; candidates: every segment
  of every other held-out recording; relevant: segments of other performances of the same
  piece whose beat span overlaps the query's). ``alignment``: the work from the catalog, the
  query aligned by subsequence DTW in each other performance of it; the segments overlapping
  the aligned span rank first (by overlap with it), the rest by the chroma-statistics score.
  ``chroma_stats``: mean/std of CQT chroma per segment, cosine (the baseline, same features).
  hit@10 (a relevant segment among the first 10), mAP, recall@10.
- ``alignment_error``: |aligned start - truth| and |aligned end - truth| (s), truth = the
  query's first/last beat position (fractional beats) mapped through the other performance's
  beats; for the 4 s segments and for 10 s passages. median and p90.
- ``plays_alike``: for 10 s passages, the other performances of the piece ranked by the curve
  distance of their aligned passages (tempo and loudness shape) against truth from the
  performed MIDI (per-beat inter-onset intervals and mean velocities in the aligned beats,
  the same distance form): nDCG@10 (gain exp(-truth distance)) and Spearman per query, mean
  over queries; against the same curves on an unaligned span (the query's span scaled by the
  recordings' length ratio) and chance.
- ``latency``: a 10 s query against N = 1..30 performances (real held-out features, reused
  cyclically; candidate length 60 s and 300 s), alignment + curves + distance per candidate,
  p50/p90 over repeats, single thread (OMP/NUMBA threads = 1).

- ``tuning`` (``--split train --grid JSON``): the content view's settings are chosen here, on
  the TRAINING pieces only: one line per setting of the grid (``content.*`` keys, e.g.
  ``dtw_step_weight``, ``coarse_factor``, ``feature_rate``, ``max_cost``) with retrieval, 4 s
  and 10 s alignment errors (every ``--query-stride``-th segment as a query) and how well
  ``max_cost`` separates same-piece from other-piece alignments (4 s and 10 s passages).

Run: ``nice -n 10 python -m benchmarks.passages --config configs/asap-dev.yaml [--out FILE]``
(``--split train`` gives the same figures on the training pieces; ``--grid`` only with it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from benchmarks import common  # noqa: E402
from mess_ray.config import load_config  # noqa: E402
from mess_ray.content import (  # noqa: E402
    Alignment,
    Features,
    align_passage,
    curve_distance,
    expression_curves,
    track_features,
)
from mess_ray.index.content_features import stitch  # noqa: E402
from mess_ray.midi_descriptors import beat_position, beat_time  # noqa: E402
from mess_ray.performances import load_track, track_sources  # noqa: E402
from mess_ray.segments import segments_dataset, split_pieces  # noqa: E402
from mess_ray.storage import Storage  # noqa: E402

LONG_QUERY_S = 10.0


def emit(record: dict[str, Any], out) -> None:
    common.emit({**record, "loadavg_1m": round(os.getloadavg()[0], 2)}, out)


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


# -- data -----------------------------------------------------------------------------------
def load_tracks(
    storage: Storage, cfg, pieces: set[str], keep_audio: bool = False
) -> dict[str, dict[str, Any]]:
    """Per track of ``pieces``: features, duration, beats (audio time, within the audio), MIDI,
    and its segments (start, end); ``keep_audio``: the audio instead of the features."""
    dataset = segments_dataset(storage)
    table = dataset.to_table(
        columns=[
            "segment_id",
            "track_id",
            "piece_id",
            "start_s",
            "end_s",
            "start_sample",
            "metadata_json",
            "audio",
        ],
        filter=pc.field("piece_id").isin(sorted(pieces)),
    )
    tracks: dict[str, dict[str, Any]] = {}
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    for i, tid in enumerate(cols["track_id"]):
        t = tracks.setdefault(
            tid, {"piece": cols["piece_id"][i], "meta": cols["metadata_json"][i], "rows": []}
        )
        t["rows"].append(i)
    rate = cfg.audio.sample_rate
    out = {}
    for tid, t in sorted(tracks.items()):
        rows = sorted(t["rows"], key=lambda r: cols["start_sample"][r])
        audio = stitch(
            np.asarray([cols["start_sample"][r] for r in rows]), [cols["audio"][r] for r in rows]
        )
        data = load_track(
            track_sources(json.loads(t["meta"] or "{}"), storage), storage.s3_endpoint_url
        )
        if data.beats is None:
            continue
        duration = len(audio) / rate
        beats = data.beats[data.beats <= duration - 0.05]
        if beats.size < 8:
            continue
        out[tid] = {
            "piece": t["piece"],
            **(
                {"audio": audio}
                if keep_audio
                else {"features": track_features(audio, rate, cfg.content.feature_rate)}
            ),
            "duration": duration,
            "beats": beats,
            "midi": data.midi,
            "segments": [(cols["start_s"][r], cols["end_s"][r]) for r in rows],
        }
    return out


def chroma_stats(features: Features, start: float, end: float) -> np.ndarray:
    c = features.slice(start, end).chroma
    v = np.concatenate([c.mean(axis=1), c.std(axis=1)])
    return v / max(float(np.linalg.norm(v)), 1e-9)


def truth_span(q: dict, c: dict, start: float, end: float) -> tuple[float, float] | None:
    """Where [start, end] of track q lies in track c, by the beats; None outside c's beats."""
    b = beat_position(np.array([start, end]), q["beats"])
    if np.isnan(b).any() or b[0] < 0 or b[1] > q["beats"].size - 1:
        return None
    if b[1] > c["beats"].size - 1:
        return None
    s, e = beat_time(b, c["beats"])
    return float(s), float(e)


# -- expressive truth from the performed MIDI ----------------------------------------------
def beat_curves(track: dict, b0: float, b1: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Per whole beat in [b0, b1): inter-beat interval (s) and mean note velocity."""
    first, last = int(math.ceil(b0)), int(math.floor(b1))
    if last - first < 4 or track["midi"] is None:
        return None
    beats = track["beats"]
    ibi = np.diff(beats[first : last + 1])
    notes = [n for inst in track["midi"].instruments for n in inst.notes]
    starts = np.asarray([n.start for n in notes])
    vel = np.asarray([n.velocity for n in notes], dtype=np.float64)
    mean_vel = np.full(len(ibi), np.nan)
    for k in range(len(ibi)):
        mask = (starts >= beats[first + k]) & (starts < beats[first + k + 1])
        if mask.any():
            mean_vel[k] = vel[mask].mean()
    if np.isnan(mean_vel).all():
        return None
    mean_vel = np.where(np.isnan(mean_vel), np.nanmean(mean_vel), mean_vel)
    return ibi, mean_vel


def truth_distance(qc, cc) -> float:
    """The curve distance's form on MIDI truth: tempo (log IBI) shape + z-scored velocity shape."""
    tq, tc = -np.log(qc[0]), -np.log(cc[0])
    td = float(np.sqrt(np.mean(((tq - tq.mean()) - (tc - tc.mean())) ** 2)))

    def z(x):
        return (x - x.mean()) / x.std() if x.std() > 1e-9 else np.zeros_like(x)

    ld = float(np.sqrt(np.mean((z(qc[1]) - z(cc[1])) ** 2)))
    return td / 0.1 + ld


def ndcg(pred_dist: np.ndarray, gains: np.ndarray, k: int = 10) -> float:
    order = np.argsort(pred_dist, kind="stable")[:k]
    disc = 1.0 / np.log2(np.arange(2, len(order) + 2))
    dcg = float((gains[order] * disc).sum())
    ideal = float((np.sort(gains)[::-1][: len(order)] * disc).sum())
    return dcg / ideal if ideal > 0 else math.nan


# -- figures --------------------------------------------------------------------------------
def align_queries(tracks: dict, cfg, stride: int = 1) -> dict[str, Any]:
    """Every ``stride``-th 4 s segment as a query, aligned in every other performance of its
    piece (and a 10 s passage from the same start): the raw material of ``retrieval`` and
    ``alignment_error``, so that several ``content.max_cost`` values score one alignment pass."""
    ids = sorted(tracks)
    align = cfg.content.align_kwargs()
    seg_track, seg_span, seg_stats = [], [], []
    for tid in ids:
        for s, e in tracks[tid]["segments"]:
            seg_track.append(tid)
            seg_span.append((s, e))
            seg_stats.append(chroma_stats(tracks[tid]["features"], s, e))
    seg_track = np.asarray(seg_track, dtype=object)
    seg_span = np.asarray(seg_span)
    stats = np.stack(seg_stats)
    n = len(seg_track)
    base_sim = stats @ stats.T
    queries = []
    long_errs: tuple[list[float], list[float]] = ([], [])  # start, end errors of 10 s passages
    long_pieces: list[str] = []
    align_ms = []
    for qi in range(0, n, stride):
        tq = seg_track[qi]
        q = tracks[tq]
        qs, qe = seg_span[qi]
        # relevant: other performances of the piece, segments overlapping the truth span
        relevant = np.zeros(n, dtype=bool)
        truths = {}
        for tc in ids:
            if tc == tq or tracks[tc]["piece"] != q["piece"]:
                continue
            truth = truth_span(q, tracks[tc], qs, qe)
            if truth is None:
                continue
            truths[tc] = truth
            mask = (seg_track == tc) & (seg_span[:, 0] < truth[1]) & (seg_span[:, 1] > truth[0])
            relevant |= mask
        if not relevant.any():
            continue
        query = q["features"].slice(qs, qe)
        aligned = []
        for tc in ids:
            if tc == tq or tracks[tc]["piece"] != q["piece"]:
                continue
            started = time.perf_counter()
            al = align_passage(query, tracks[tc]["features"], **align)
            align_ms.append(1000 * (time.perf_counter() - started))
            aligned.append((tc, al.start_s, al.end_s, al.cost, truths.get(tc)))
        queries.append({"qi": qi, "piece": q["piece"], "relevant": relevant, "aligned": aligned})
        # 10 s passages starting at this segment
        le = qs + LONG_QUERY_S
        if le <= tracks[tq]["beats"][-1]:
            query10 = q["features"].slice(qs, le)
            for tc in truths:
                truth = truth_span(q, tracks[tc], qs, le)
                if truth is None:
                    continue
                al = align_passage(query10, tracks[tc]["features"], **align)
                long_errs[0].append(abs(al.start_s - truth[0]))
                long_errs[1].append(abs(al.end_s - truth[1]))
                long_pieces.append(q["piece"])
    return {
        "seg_track": seg_track,
        "seg_span": seg_span,
        "base_sim": base_sim,
        "queries": queries,
        "long_errs": long_errs,
        "long_pieces": long_pieces,
        "align_ms": align_ms,
    }


def score_queries(data: dict[str, Any], max_cost: float) -> dict[str, Any]:
    """Retrieval (alignment vs chroma statistics) and 4 s alignment errors at ``max_cost``:
    an alignment above it is no match (its performance falls back to chroma statistics and
    its error is not counted, as in the service); ``*_all`` errors count every alignment."""
    seg_track, seg_span, base_sim = data["seg_track"], data["seg_span"], data["base_sim"]
    hits = {"alignment": [], "chroma_stats": []}
    aps = {"alignment": [], "chroma_stats": []}
    recalls = {"alignment": [], "chroma_stats": []}
    misses: dict[str, dict[str, int]] = {"alignment": {}, "chroma_stats": {}}
    kept: tuple[list[float], list[float]] = ([], [])
    every: tuple[list[float], list[float]] = ([], [])
    kept_pieces: list[str] = []
    for rec in data["queries"]:
        qi, relevant = rec["qi"], rec["relevant"]
        tq = seg_track[qi]
        cand = seg_track != tq
        score = base_sim[qi].copy()
        for tc, start, end, cost, truth in rec["aligned"]:
            if truth is not None:
                every[0].append(abs(start - truth[0]))
                every[1].append(abs(end - truth[1]))
            if cost > max_cost:
                continue
            mask = seg_track == tc
            ov = np.clip(
                np.minimum(seg_span[:, 1], end) - np.maximum(seg_span[:, 0], start), 0, None
            ) / (seg_span[:, 1] - seg_span[:, 0])
            boost = mask & (ov > 0)
            score[boost] = 10.0 + ov[boost] - cost
            if truth is not None:
                kept[0].append(abs(start - truth[0]))
                kept[1].append(abs(end - truth[1]))
                kept_pieces.append(rec["piece"])
        for name, sim in (("alignment", score), ("chroma_stats", base_sim[qi])):
            idx = np.flatnonzero(cand)
            order = idx[np.argsort(-sim[idx], kind="stable")]
            rel = relevant[order]
            hits[name].append(bool(rel[:10].any()))
            if not rel[:10].any():
                misses[name][tq] = misses[name].get(tq, 0) + 1
            recalls[name].append(rel[:10].sum() / rel.sum())
            prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
            aps[name].append(float((prec * rel).sum() / rel.sum()))
    return {
        "queries": len(hits["alignment"]),
        "hits": hits,
        "aps": aps,
        "recalls": recalls,
        "misses": misses,
        "kept": kept,
        "every": every,
        "kept_pieces": kept_pieces,
    }


def error_stats(starts, ends) -> dict[str, Any]:
    return {
        "pairs": len(starts),
        "start_median_s": round(pct(starts, 50), 3),
        "start_p90_s": round(pct(starts, 90), 3),
        "end_median_s": round(pct(ends, 50), 3),
        "end_p90_s": round(pct(ends, 90), 3),
        "met": bool(
            pct(starts, 50) < 0.15
            and pct(starts, 90) < 0.5
            and pct(ends, 50) < 0.15
            and pct(ends, 90) < 0.5
        ),
    }


def per_piece_p90(starts, ends, pieces, min_pairs: int = 20) -> dict[str, Any]:
    """Each piece's p90 errors (pieces with at least ``min_pairs`` pairs) and their median over
    pieces: every piece counts once, however many performances and pairs it has."""
    starts, ends, pieces = np.asarray(starts), np.asarray(ends), np.asarray(pieces, dtype=object)
    by_piece = {
        p: (round(pct(starts[pieces == p], 90), 3), round(pct(ends[pieces == p], 90), 3))
        for p in sorted(set(pieces.tolist()))
        if (pieces == p).sum() >= min_pairs
    }
    if not by_piece:
        return {"pieces": 0}
    arr = np.asarray(list(by_piece.values()))
    return {
        "pieces": len(by_piece),
        "start_p90_median_s": round(float(np.median(arr[:, 0])), 3),
        "end_p90_median_s": round(float(np.median(arr[:, 1])), 3),
        "start_end_p90_by_piece": by_piece,
    }


def retrieval_and_errors(tracks: dict, cfg, out, split: str) -> None:
    data = align_queries(tracks, cfg)
    scored = score_queries(data, cfg.content.max_cost)
    hits, aps, recalls, misses = (scored[k] for k in ("hits", "aps", "recalls", "misses"))
    for name in hits:
        emit(
            {
                "figure": "retrieval",
                "split": split,
                "method": name,
                "queries": scored["queries"],
                "hit_at_10": round(float(np.mean(hits[name])), 4),
                "mAP": round(float(np.mean(aps[name])), 4),
                "recall_at_10": round(float(np.mean(recalls[name])), 4),
                "target": "hit@10 >= 0.99" if name == "alignment" else None,
                "met": bool(np.mean(hits[name]) >= 0.99) if name == "alignment" else None,
                "misses_by_query_track": dict(
                    sorted(misses[name].items(), key=lambda kv: -kv[1])[:5]
                ),
            },
            out,
        )
    every = error_stats(*scored["every"])
    for length, (starts, ends) in ((4, scored["kept"]), (10, data["long_errs"])):
        starts, ends = list(starts), list(ends)
        emit(
            {
                "figure": "alignment_error",
                "split": split,
                "query_s": length,
                **error_stats(starts, ends),
                "target": "median < 0.15 s, p90 < 0.5 s",
                # 4 s: only alignments within content.max_cost count (the others are no
                # match); the same figures over every alignment, for reference:
                **({f"all_{k}": v for k, v in every.items() if k != "met"} if length == 4 else {}),
            },
            out,
        )
    emit(
        {
            "figure": "alignment_cost_per_candidate",
            "split": split,
            "query_s": 4,
            "candidates": len(data["align_ms"]),
            "p50_ms": round(pct(data["align_ms"], 50), 2),
            "p90_ms": round(pct(data["align_ms"], 90), 2),
        },
        out,
    )


def plays_alike(tracks: dict, cfg, out, split: str, step_s: float = 5.0) -> None:
    ids = sorted(tracks)
    res = {"aligned_curves": ([], []), "unaligned_curves": ([], []), "chance": ([], [])}
    rng = np.random.default_rng(0)
    c = cfg.content
    queries = 0
    for tq in ids:
        q = tracks[tq]
        qs = q["beats"][0]
        while qs + LONG_QUERY_S <= q["beats"][-1]:
            qe = qs + LONG_QUERY_S
            b = beat_position(np.array([qs, qe]), q["beats"])
            qcurve = beat_curves(q, b[0], b[1])
            query = q["features"].slice(qs, qe)
            own = expression_curves(query, query, None, c.curve_points, c.smooth_s)
            truth, pred, naive = [], [], []
            for tc in ids:
                if tc == tq or tracks[tc]["piece"] != q["piece"]:
                    continue
                cand = tracks[tc]
                if qcurve is None or b[1] > cand["beats"].size - 1:
                    continue
                ccurve = beat_curves(cand, b[0], b[1])
                if ccurve is None or len(ccurve[0]) != len(qcurve[0]):
                    continue
                al = align_passage(query, cand["features"], **c.align_kwargs())
                curves = expression_curves(query, cand["features"], al, c.curve_points, c.smooth_s)
                d = curve_distance(own, curves, c.tempo_weight, c.loudness_weight)["combined"]
                # unaligned: the same span scaled by the length ratio, a straight-line path
                ratio = cand["duration"] / q["duration"]
                n = query.frames
                lin = np.stack(
                    [np.arange(n), np.round((np.arange(n) + qs * query.rate) * ratio)], axis=1
                ).astype(np.int64)
                lin[:, 1] = np.clip(lin[:, 1], 0, cand["features"].frames - 1)
                naive_al = Alignment(0.0, 0.0, 0.0, lin)
                ncurves = expression_curves(
                    query, cand["features"], naive_al, c.curve_points, c.smooth_s
                )
                dn = curve_distance(own, ncurves, c.tempo_weight, c.loudness_weight)["combined"]
                truth.append(truth_distance(qcurve, ccurve))
                pred.append(d)
                naive.append(dn)
            if len(truth) >= 3:
                queries += 1
                truth_a = np.asarray(truth)
                gains = np.exp(-truth_a)
                for name, p in (
                    ("aligned_curves", np.asarray(pred)),
                    ("unaligned_curves", np.asarray(naive)),
                    ("chance", rng.random(len(truth))),
                ):
                    res[name][0].append(ndcg(p, gains))
                    rho = spearmanr(p, truth_a).statistic
                    if not np.isnan(rho):
                        res[name][1].append(float(rho))
            qs += step_s
    for name, (nd, rho) in res.items():
        emit(
            {
                "figure": "plays_alike",
                "split": split,
                "method": name,
                "queries": queries,
                "query_s": LONG_QUERY_S,
                "ndcg_at_10": round(float(np.nanmean(nd)), 4) if nd else None,
                "spearman": round(float(np.mean(rho)), 4) if rho else None,
            },
            out,
        )


def calibration_costs(
    tracks: dict, cfg, query_s: float = LONG_QUERY_S, track_stride: int = 2
) -> tuple[list[float], list[float]]:
    """Alignment costs of passages of every ``track_stride``-th track (two starts) in the other
    performances of the same piece and in the performances of other pieces."""
    ids = sorted(tracks)
    align = cfg.content.align_kwargs()
    same, other = [], []
    for tq in ids[::track_stride]:
        q = tracks[tq]
        for qs in (q["beats"][0] + 5.0, q["beats"][0] + 25.0):
            if qs + query_s > q["duration"]:
                continue
            query = q["features"].slice(qs, qs + query_s)
            for tc in ids:
                if tc == tq:
                    continue
                cost = align_passage(query, tracks[tc]["features"], **align).cost
                (same if tracks[tc]["piece"] == q["piece"] else other).append(cost)
    return same, other


def cost_separation(same: list[float], other: list[float], max_cost: float) -> dict[str, Any]:
    return {
        "same_kept": round(float(np.mean(np.asarray(same) <= max_cost)), 4) if same else None,
        "other_rejected": round(float(np.mean(np.asarray(other) > max_cost)), 4) if other else None,
    }


def calibration(tracks: dict, cfg, out) -> None:
    """Alignment costs of 10 s passages in other performances of the same piece vs of other pieces
    (training pieces): where ``content.max_cost`` separates them."""
    same, other = calibration_costs(tracks, cfg)
    emit(
        {
            "figure": "calibration",
            "split": "train (training pieces)",
            "same_piece_cost_p50": round(pct(same, 50), 3),
            "same_piece_cost_p99": round(pct(same, 99), 3),
            "other_piece_cost_p1": round(pct(other, 1), 3),
            "other_piece_cost_p50": round(pct(other, 50), 3),
            "pairs_same": len(same),
            "pairs_other": len(other),
            "max_cost": cfg.content.max_cost,
            **cost_separation(same, other, cfg.content.max_cost),
        },
        out,
    )


def grid_settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a grid {config key: [values]} (keys in sorted order)."""
    keys = sorted(grid)
    for key in keys:
        if not key.startswith("content.") or not isinstance(grid[key], list) or not grid[key]:
            raise ValueError(f"--grid: {key!r} must be a content.* key with a non-empty list")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def tune(
    tracks: dict, args, grid: dict[str, list[Any]], out, stride: int, track_stride: int
) -> None:
    """One JSON line per setting of ``grid`` on the TRAINING pieces: retrieval and alignment
    errors (every ``stride``-th 4 s segment as a query, plus its 10 s passage) and the cost
    separation of same-piece vs other-piece alignments (4 s and 10 s passages of every
    ``track_stride``-th track). ``content.max_cost`` values are scored on one alignment pass."""
    grid = dict(grid)
    max_costs = grid.pop("content.max_cost", None)
    features: dict[float, dict[str, Features]] = {}
    for setting in grid_settings(grid) if grid else [{}]:
        cfg = load_config(
            args.config, args.overrides + [f"{k}={json.dumps(v)}" for k, v in setting.items()]
        )
        rate = cfg.content.feature_rate
        if rate not in features:
            sr = cfg.audio.sample_rate
            features[rate] = {
                tid: track_features(t["audio"], sr, rate) for tid, t in tracks.items()
            }
        for tid, t in tracks.items():
            t["features"] = features[rate][tid]
        started = time.perf_counter()
        data = align_queries(tracks, cfg, stride)
        costs = {
            length: calibration_costs(tracks, cfg, length, track_stride) for length in (4.0, 10.0)
        }
        seconds = time.perf_counter() - started
        long_errs = error_stats(*data["long_errs"])
        for max_cost in max_costs or [cfg.content.max_cost]:
            scored = score_queries(data, max_cost)
            emit(
                {
                    "figure": "tuning",
                    "split": "train (training pieces)",
                    "setting": {**setting, "content.max_cost": max_cost},
                    "queries": scored["queries"],
                    "query_stride": stride,
                    "hit_at_10": round(float(np.mean(scored["hits"]["alignment"])), 4),
                    "mAP": round(float(np.mean(scored["aps"]["alignment"])), 4),
                    "chroma_stats_mAP": round(float(np.mean(scored["aps"]["chroma_stats"])), 4),
                    "error_4s": error_stats(*scored["kept"]),
                    "error_4s_all": error_stats(*scored["every"]),
                    "error_10s": long_errs,
                    "error_4s_per_piece": per_piece_p90(*scored["kept"], scored["kept_pieces"]),
                    "error_10s_per_piece": per_piece_p90(*data["long_errs"], data["long_pieces"]),
                    **{
                        f"separation_{int(length)}s": {
                            **cost_separation(same, other, max_cost),
                            "same_p99": round(pct(same, 99), 3),
                            "other_p1": round(pct(other, 1), 3),
                            "pairs_same": len(same),
                            "pairs_other": len(other),
                        }
                        for length, (same, other) in costs.items()
                    },
                    "align_ms_p50": round(pct(data["align_ms"], 50), 2),
                    "seconds": round(seconds, 1),
                },
                out,
            )


def latency(tracks: dict, cfg, out, split: str, repeats: int = 7) -> None:
    feats = [t["features"] for t in tracks.values()]
    q = feats[0]
    start = q.duration_s / 3
    query = q.slice(start, start + LONG_QUERY_S)
    c = cfg.content
    own = expression_curves(query, query, None, c.curve_points, c.smooth_s)

    def tile(f: Features, seconds: float) -> Features:
        reps = int(math.ceil(seconds / f.duration_s))
        frames = int(seconds * f.rate)
        return Features(
            np.tile(f.chroma, reps)[:, :frames],
            np.tile(f.onset, reps)[:frames],
            np.tile(f.rms_db, reps)[:frames],
            f.rate,
        )

    for length in (60.0, 300.0):
        pool = [tile(feats[(i + 1) % len(feats)], length) for i in range(30)]
        for n in (1, 5, 10, 20, 30):
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                for cand in pool[:n]:
                    al = align_passage(query, cand, **c.align_kwargs())
                    curves = expression_curves(query, cand, al, c.curve_points, c.smooth_s)
                    curve_distance(own, curves)
                times.append(time.perf_counter() - started)
            p50 = pct(times, 50)
            emit(
                {
                    "figure": "latency",
                    "split": f"{split}, features reused cyclically",
                    "query_s": LONG_QUERY_S,
                    "candidate_s": length,
                    "performances": n,
                    "threads": 1,
                    "p50_s": round(p50, 4),
                    "p90_s": round(pct(times, 90), 4),
                    "per_candidate_ms": round(1000 * p50 / n, 2),
                    **(
                        {"target": "p50 < 1 s at N=30 (60 s recordings)", "met": p50 < 1.0}
                        if n == 30 and length == 60.0
                        else {}
                    ),
                },
                out,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/asap-dev.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="pieces the figures run on: test (held-out, the reported figures) or train "
        "(the pieces settings are chosen on); calibration is always on train",
    )
    parser.add_argument(
        "--grid",
        default=None,
        help="tuning mode (only with --split train): JSON {content.key: [values], ...}; one "
        "'tuning' line per setting of the cartesian product, e.g. "
        '\'{"content.dtw_step_weight": [2, 6], "content.max_cost": [0.35, 0.45]}\'',
    )
    parser.add_argument(
        "--query-stride",
        type=int,
        default=1,
        help="tuning mode: every Nth 4 s segment is a query (speed)",
    )
    parser.add_argument(
        "--track-stride",
        type=int,
        default=2,
        help="tuning mode: cost separation from the passages of every Nth track",
    )
    parser.add_argument(
        "--exclude-tracks",
        default="",
        help="comma-separated track ids left out of the evaluated set (a sensitivity run; say why)",
    )
    parser.add_argument(
        "--figures",
        default="calibration,retrieval,plays_alike,latency",
        help="comma-separated subset",
    )
    args = parser.parse_args()
    grid = None
    if args.grid is not None:
        if args.split != "train":
            parser.error("--grid tunes settings: only on the training pieces (--split train)")
        try:
            grid = json.loads(args.grid)
            if not isinstance(grid, dict):
                raise ValueError("expected a JSON object")
            grid_settings(grid)
        except ValueError as err:
            parser.error(f"--grid: {err}")
    if args.query_stride < 1 or args.track_stride < 1:
        parser.error("--query-stride and --track-stride must be >= 1")
    cfg = load_config(args.config, args.overrides)
    storage = Storage.from_config(cfg.storage)
    meta = segments_dataset(storage).to_table(columns=["piece_id"])
    all_pieces = [p for p in pc.unique(meta["piece_id"]).to_pylist() if p]
    train, holdout = split_pieces(all_pieces, cfg.eval.holdout_fraction, cfg.eval.seed)
    figures = set(args.figures.split(","))
    out = open(args.out, "w") if args.out else None
    emit(
        {
            "figure": "split",
            "pieces": len(all_pieces),
            "train_pieces": len(train),
            "test_pieces": len(holdout),
            "feature_rate": cfg.content.feature_rate,
            "content": cfg.content.model_dump(mode="json"),
        },
        out,
    )
    excluded = [t for t in args.exclude_tracks.split(",") if t]
    if grid is not None:
        tracks = load_tracks(storage, cfg, set(train), keep_audio=True)
        tracks = {k: v for k, v in tracks.items() if k not in excluded}
        tune(tracks, args, grid, out, args.query_stride, args.track_stride)
        return
    if "calibration" in figures:
        calibration(load_tracks(storage, cfg, set(train)), cfg, out)
    split = "test (held-out pieces)" if args.split == "test" else "train (training pieces)"
    evaluated = load_tracks(storage, cfg, set(holdout if args.split == "test" else train))
    evaluated = {k: v for k, v in evaluated.items() if k not in excluded}
    emit(
        {
            "figure": f"{args.split}_set",
            "tracks": len(evaluated),
            "pieces": len({t["piece"] for t in evaluated.values()}),
            "hours": round(sum(t["duration"] for t in evaluated.values()) / 3600, 3),
            "excluded_tracks": excluded,
        },
        out,
    )
    if "retrieval" in figures:
        retrieval_and_errors(evaluated, cfg, out, split)
    if "plays_alike" in figures:
        plays_alike(evaluated, cfg, out, split)
    if "latency" in figures:
        latency(evaluated, cfg, out, split)


if __name__ == "__main__":
    main()
