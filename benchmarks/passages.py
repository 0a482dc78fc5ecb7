"""The content view on human performances: same-passage retrieval, alignment error, "who plays it
most like this", and latency. One JSON line per figure.

Data: the latest ingest of a rendered asap-dev corpus (``configs/asap-dev.yaml``), pieces split
by the benchmark's split (:func:`mess_ray.segments.split_pieces` with ``eval.holdout_fraction``
and ``eval.seed``): every figure except ``calibration`` is on the HELD-OUT (test) pieces;
``calibration`` (the ``content.max_cost`` threshold) is measured on the TRAINING pieces.
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

Run: ``nice -n 10 python -m benchmarks.passages --config configs/asap-dev.yaml [--out FILE]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
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
def load_tracks(storage: Storage, cfg, pieces: set[str]) -> dict[str, dict[str, Any]]:
    """Per track of ``pieces``: features, duration, beats (audio time, within the audio), MIDI,
    and its segments (start, end)."""
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
            "features": track_features(audio, rate, cfg.content.feature_rate),
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
def retrieval_and_errors(tracks: dict, cfg, out) -> None:
    ids = sorted(tracks)
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
    hits = {"alignment": [], "chroma_stats": []}
    aps = {"alignment": [], "chroma_stats": []}
    recalls = {"alignment": [], "chroma_stats": []}
    misses: dict[str, dict[str, int]] = {"alignment": {}, "chroma_stats": {}}
    errs = {4: ([], []), 10: ([], [])}
    align_ms = []
    for qi in range(n):
        tq = seg_track[qi]
        q = tracks[tq]
        qs, qe = seg_span[qi]
        # relevant: other performances of the piece, segments overlapping the truth span
        cand = seg_track != tq
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
        score = base_sim[qi].copy()
        for tc in ids:
            if tc == tq or tracks[tc]["piece"] != q["piece"]:
                continue
            started = time.perf_counter()
            al = align_passage(query, tracks[tc]["features"])
            align_ms.append(1000 * (time.perf_counter() - started))
            if al.cost > cfg.content.max_cost:
                continue
            mask = seg_track == tc
            ov = np.clip(
                np.minimum(seg_span[:, 1], al.end_s) - np.maximum(seg_span[:, 0], al.start_s),
                0,
                None,
            ) / (seg_span[:, 1] - seg_span[:, 0])
            boost = mask & (ov > 0)
            score[boost] = 10.0 + ov[boost] - al.cost
            if tc in truths:
                errs[4][0].append(abs(al.start_s - truths[tc][0]))
                errs[4][1].append(abs(al.end_s - truths[tc][1]))
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
        # 10 s passages starting at this segment
        le = qs + LONG_QUERY_S
        if le <= tracks[tq]["beats"][-1]:
            query10 = q["features"].slice(qs, le)
            for tc, _ in truths.items():
                truth = truth_span(q, tracks[tc], qs, le)
                if truth is None:
                    continue
                al = align_passage(query10, tracks[tc]["features"])
                errs[10][0].append(abs(al.start_s - truth[0]))
                errs[10][1].append(abs(al.end_s - truth[1]))
    queries = len(hits["alignment"])
    for name in hits:
        emit(
            {
                "figure": "retrieval",
                "split": "test (held-out pieces)",
                "method": name,
                "queries": queries,
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
    for length, (starts, ends) in errs.items():
        emit(
            {
                "figure": "alignment_error",
                "split": "test (held-out pieces)",
                "query_s": length,
                "pairs": len(starts),
                "start_median_s": round(pct(starts, 50), 3),
                "start_p90_s": round(pct(starts, 90), 3),
                "end_median_s": round(pct(ends, 50), 3),
                "end_p90_s": round(pct(ends, 90), 3),
                "target": "median < 0.15 s, p90 < 0.5 s",
                "met": bool(
                    pct(starts, 50) < 0.15
                    and pct(starts, 90) < 0.5
                    and pct(ends, 50) < 0.15
                    and pct(ends, 90) < 0.5
                ),
            },
            out,
        )
    emit(
        {
            "figure": "alignment_cost_per_candidate",
            "split": "test (held-out pieces)",
            "query_s": 4,
            "candidates": len(align_ms),
            "p50_ms": round(pct(align_ms, 50), 2),
            "p90_ms": round(pct(align_ms, 90), 2),
        },
        out,
    )


def plays_alike(tracks: dict, cfg, out, step_s: float = 5.0) -> None:
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
                al = align_passage(query, cand["features"])
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
                "split": "test (held-out pieces)",
                "method": name,
                "queries": queries,
                "query_s": LONG_QUERY_S,
                "ndcg_at_10": round(float(np.nanmean(nd)), 4) if nd else None,
                "spearman": round(float(np.mean(rho)), 4) if rho else None,
            },
            out,
        )


def calibration(tracks: dict, cfg, out) -> None:
    """Alignment costs of 10 s passages in other performances of the same piece vs of other pieces
    (training pieces): where ``content.max_cost`` separates them."""
    ids = sorted(tracks)
    same, other = [], []
    for tq in ids[::2]:
        q = tracks[tq]
        for qs in (q["beats"][0] + 5.0, q["beats"][0] + 25.0):
            if qs + LONG_QUERY_S > q["duration"]:
                continue
            query = q["features"].slice(qs, qs + LONG_QUERY_S)
            for tc in ids:
                if tc == tq:
                    continue
                cost = align_passage(query, tracks[tc]["features"]).cost
                (same if tracks[tc]["piece"] == q["piece"] else other).append(cost)
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
            "same_kept": round(float(np.mean(np.asarray(same) <= cfg.content.max_cost)), 4)
            if same
            else None,
            "other_rejected": round(float(np.mean(np.asarray(other) > cfg.content.max_cost)), 4)
            if other
            else None,
        },
        out,
    )


def latency(tracks: dict, cfg, out, repeats: int = 7) -> None:
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
                    al = align_passage(query, cand)
                    curves = expression_curves(query, cand, al, c.curve_points, c.smooth_s)
                    curve_distance(own, curves)
                times.append(time.perf_counter() - started)
            p50 = pct(times, 50)
            emit(
                {
                    "figure": "latency",
                    "split": "test (held-out features, reused cyclically)",
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
        "--exclude-tracks",
        default="",
        help="comma-separated track ids left out of the test set (a sensitivity run; say why)",
    )
    parser.add_argument(
        "--figures",
        default="calibration,retrieval,plays_alike,latency",
        help="comma-separated subset",
    )
    args = parser.parse_args()
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
        },
        out,
    )
    if "calibration" in figures:
        calibration(load_tracks(storage, cfg, set(train)), cfg, out)
    test = load_tracks(storage, cfg, set(holdout))
    excluded = [t for t in args.exclude_tracks.split(",") if t]
    test = {k: v for k, v in test.items() if k not in excluded}
    emit(
        {
            "figure": "test_set",
            "tracks": len(test),
            "pieces": len({t["piece"] for t in test.values()}),
            "hours": round(sum(t["duration"] for t in test.values()) / 3600, 3),
            "excluded_tracks": excluded,
        },
        out,
    )
    if "retrieval" in figures:
        retrieval_and_errors(test, cfg, out)
    if "plays_alike" in figures:
        plays_alike(test, cfg, out)
    if "latency" in figures:
        latency(test, cfg, out)


if __name__ == "__main__":
    main()
