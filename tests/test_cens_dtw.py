"""The CENS subsequence-DTW passage baseline: finds a passage in a time-stretched copy, and is
n/a (never 0) on the tasks it cannot do."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ray.eval import baselines as bl
from mess_ray.eval.protocol import (
    PASSAGE,
    PERFORMER,
    ContentScorer,
    EvalData,
    SegmentLabels,
    build_views,
    markdown_table,
    score_table,
)
from mess_ray.midi_descriptors import MIDI_DESCRIPTOR_NAMES
from mess_ray.performances import PerformanceSet, segment_beat_span

SR, WINDOW_S, HOP_S, BEAT_S, STRETCH = 16000, 4.0, 2.0, 0.5, 0.8
TRIADS = [(0, 4, 7), (2, 5, 9), (4, 7, 11), (5, 9, 0), (7, 11, 2), (9, 0, 4), (11, 2, 5)]


def chords(seed: int, seconds: float = 20.0) -> np.ndarray:
    """A random triad every beat: piano-like partials with a decay."""
    rng = np.random.default_rng(seed)
    n = int(BEAT_S * SR)
    t = np.arange(n) / SR
    env = np.exp(-3.0 * t) * np.minimum(t / 0.01, 1.0)
    out = []
    for _ in range(int(seconds / BEAT_S)):
        root = TRIADS[rng.integers(len(TRIADS))]
        x = np.zeros(n)
        for pc in root:
            f0 = 261.63 * 2 ** (pc / 12)
            x += sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3))
        out.append(0.1 * x * env)
    return np.concatenate(out).astype(np.float32)


def segments(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    win, hop = int(WINDOW_S * SR), int(HOP_S * SR)
    starts = np.arange(0, len(audio) - win + 1, hop)
    return np.stack([audio[s : s + win] for s in starts]), starts / SR


def passage_data() -> EvalData:
    """Piece p0 played twice (the second a 0.8x time-stretch of the first), piece p1 once by
    the first pianist (so the performer task has a view, where the baseline is n/a)."""
    import librosa

    a = chords(0)
    tracks = {
        "p0__a": ("p0", "ann", a, np.arange(0, 20.0 + 1e-9, BEAT_S)),
        "p0__b": (
            "p0",
            "bob",
            librosa.effects.time_stretch(a, rate=STRETCH),
            np.arange(0, 20.0 + 1e-9, BEAT_S) / STRETCH,
        ),
        "p1__c": ("p1", "ann", chords(1), np.arange(0, 20.0 + 1e-9, BEAT_S)),
    }
    cols: dict[str, list] = {k: [] for k in ("track", "piece", "pianist", "start", "audio", "span")}
    for tid, (piece, pianist, audio, beats) in tracks.items():
        clips, starts = segments(audio)
        for clip, start in zip(clips, starts):
            cols["track"].append(tid)
            cols["piece"].append(piece)
            cols["pianist"].append(pianist)
            cols["start"].append(start)
            cols["audio"].append(clip)
            cols["span"].append(segment_beat_span(start, start + WINDOW_S, beats))
    n = len(cols["track"])
    track = np.array(cols["track"], dtype=object)
    perf = PerformanceSet(
        segment_ids=np.arange(n),
        track_ids=track,
        piece_ids=np.array(cols["piece"], dtype=object),
        start_s=np.array(cols["start"]),
        end_s=np.array(cols["start"]) + WINDOW_S,
        beat_spans=np.array(cols["span"], dtype=np.float64),
        midi_descriptors=np.full((n, len(MIDI_DESCRIPTOR_NAMES)), np.nan),
        has_midi=np.zeros(n, bool),
        audio=np.stack(cols["audio"]),
        beats={tid: v[3] for tid, v in tracks.items()},
        holdout_pieces=["p0", "p1"],
        train_pieces=[],
    )
    labels = SegmentLabels(
        np.array(["dry"] * n, dtype=object),
        track,
        np.array(cols["pianist"], dtype=object),
        np.array(["test"] * n, dtype=object),
    )
    return EvalData(perf, labels, {"validation": [], "test": ["p0", "p1"]}, set())


@pytest.fixture(scope="module")
def data() -> EvalData:
    return passage_data()


def test_cens_dtw_ranks_the_true_passage_first_in_a_time_stretched_copy(data):
    perf = data.perf
    dtw = bl.CensDtw(perf.track_ids, perf.start_s, perf.audio, SR)
    queries = np.flatnonzero((perf.track_ids == "p0__a") & (perf.start_s + WINDOW_S <= 16.0))
    rows = np.arange(len(perf))
    candidates = np.broadcast_to(perf.track_ids[None, :] != "p0__a", (queries.size, rows.size))
    sim, scored = dtw.scores(queries, rows, candidates)
    assert scored.all() and np.isfinite(sim).all()
    for i, q in enumerate(queries):
        top = int(np.argmax(np.where(candidates[i], sim[i], -np.inf)))
        assert perf.track_ids[top] == "p0__b"  # the same music, never the other piece
        expected = perf.start_s[q] / STRETCH  # where the query starts in the stretched copy
        assert abs(perf.start_s[top] - expected) < HOP_S  # under one hop
    # a deterministic, seeded subsample when asked for
    few = bl.CensDtw(perf.track_ids, perf.start_s, perf.audio, SR, max_queries=2, seed=3)
    sim2, scored2 = few.scores(queries, rows, candidates)
    assert scored2.sum() == 2 and np.isnan(sim2[~scored2]).all()
    np.testing.assert_allclose(sim2[scored2], sim[scored2])


def test_cens_dtw_in_the_table_scores_passages_and_is_na_elsewhere(data):
    perf = data.perf
    systems = {
        "chance": bl.chance_embeddings(len(perf), 0),
        bl.CENS_DTW: ContentScorer(
            bl.CensDtw(perf.track_ids, perf.start_s, perf.audio, SR),
            (PASSAGE,),
            "content baseline",
        ),
    }
    views = build_views(data, hop_s=HOP_S)
    rows = score_table(views, systems, data, reference="chance", n_boot=100, min_pieces=1)
    get = {(r["task"], r["system"], r["metric"]): r for r in rows}
    dtw_map = get[(PASSAGE, bl.CENS_DTW, "map")]
    assert dtw_map["value"] > get[(PASSAGE, "chance", "map")]["value"]
    # every query but the last of each performance, whose passage runs past the other's end
    assert get[(PASSAGE, bl.CENS_DTW, "recall@1")]["value"] >= 0.9
    assert get[(PASSAGE, bl.CENS_DTW, "top_hit_error_s")]["value"] < HOP_S
    na = get[(PERFORMER, bl.CENS_DTW, "map")]
    assert na["value"] is None and na["reference_verdict"] == "n/a"
    summary = {
        "split": data.split,
        "chains": ["dry"],
        "reference": "chance",
        "bootstrap": {"samples": 100},
    }
    summary["cens_dtw"] = {
        "seconds": 1.0,
        "alignments": 10,
        "unscored_queries": 3,
        "max_queries_per_view": 5,
        "feature_rate_hz": 10.0,
        "cens_smooth_frames": 5,
    }
    summary["unseen_pianists"] = {
        "test_pianist_fraction": 0.3,
        "left_out": ["bob"],
        "heard": 1,
        "heard_from": {"finetune/v1": "manifest: 1 pianists heard"},
        "coverage": [{"split": "test", "chains": "dry", "pieces": 2, "pianists": 1, "queries": 9}],
    }
    text = markdown_table(rows, summary)
    assert f"| {PERFORMER} | dry | map | {bl.CENS_DTW} | n/a |" in text
    assert "3 queries left unscored" in text and "test dry: 2 pieces, 1 pianists, 9 queries" in text


def test_stitching_puts_overlapping_segments_back_together():
    audio = np.arange(10, dtype=np.float32)
    clips = np.stack([audio[0:4], audio[2:6], audio[4:8], audio[6:10]])
    out = bl.stitch_tracks(["t"] * 4, np.array([0, 2, 4, 6]) / 1.0, clips, 1)
    np.testing.assert_array_equal(out["t"], audio)
    with pytest.raises(ValueError):
        bl.stitch_tracks(["t"], [0.0, 1.0], clips[:1], 1)
