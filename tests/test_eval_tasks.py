"""Benchmark tasks 2 (passage retrieval across performances) and 3 (expressive agreement):
protocols on hand-made cases, and an end-to-end run on a tiny ASAP-layout corpus."""

from __future__ import annotations

import json
import math
import posixpath

import numpy as np
import pytest
from helpers import ASAP_PIECES, SR, tiny_config, write_asap_ingest

from mess_ray.eval.benchmark import (
    AGREEMENT_TASK,
    DESCRIPTORS,
    PASSAGE_TASK,
    RANDOM,
    STYLE_TASK,
    run_evaluate,
)
from mess_ray.eval.tasks.agreement import (
    graded_relevance,
    other_piece_candidates,
    random_ndcg,
    score_agreement,
)
from mess_ray.eval.tasks.passage import overlapping_beats, score_passage, top_hit_errors
from mess_ray.midi_descriptors import expressive_matrix
from mess_ray.performances import segment_beat_span, track_sources
from mess_ray.segments import split_pieces
from mess_ray.storage import Storage


# -- task 2 -----------------------------------------------------------------------------------
def test_passage_relevance_is_same_piece_other_performance_overlapping_beats():
    tracks = ["a1", "a1", "a2", "a2", "b1"]
    pieces = ["A", "A", "A", "A", "B"]
    spans = np.array([[0, 4], [4, 8], [3, 7], [8, 12], [0, 4]], dtype=float)
    candidates, relevant = overlapping_beats(tracks, pieces, spans)
    assert not candidates[0, 1] and candidates[0, 2] and candidates[0, 4]
    assert relevant[0].tolist() == [False, False, True, False, False]  # [0,4) meets [3,7) only
    assert relevant[1].tolist() == [
        False,
        False,
        True,
        False,
        False,
    ]  # [4,8) meets [3,7); [8,12) only touches
    assert not relevant[:, 4].any() and not relevant[4].any()  # another piece is never relevant
    with pytest.raises(ValueError, match="beat span"):
        overlapping_beats(tracks, pieces, np.full((5, 2), np.nan))


def test_top_hit_timestamp_error_in_seconds_and_beats():
    # Two performances of one piece: p1 at 0.5 s per beat, p2 at 1.0 s per beat from 0 s.
    beats = {"p1": np.arange(20) * 0.5, "p2": np.arange(20) * 1.0}
    tracks = np.array(["p1", "p2", "p2"], dtype=object)
    pieces = np.array(["A", "A", "A"], dtype=object)
    start = np.array([1.0, 2.5, 8.0])  # p1 query starts at beat 2
    spans = np.array([[2.0, 6.0], [2.5, 6.5], [8.0, 12.0]])
    candidates, relevant = overlapping_beats(tracks, pieces, spans)
    similarity = np.array([[1, 0.9, 0.1], [0.9, 1, 0.2], [0.1, 0.2, 1]])
    errors = top_hit_errors(similarity, candidates, pieces, tracks, start, spans, beats)
    # query 0's top hit starts at 2.5 s in p2 where its beat 2 is at 2.0 s: 0.5 s, 0.5 beats off;
    # queries 1 and 2 (p2) hit p1's only segment: beat 2.5 is at 1.25 s there (0.25 s), beat 8 at 4 s (3 s).
    assert errors["top1_same_piece"] == 1.0 and errors["located_queries"] == 3
    assert errors["timestamp_error_s_median"] == pytest.approx(0.5)
    assert errors["timestamp_error_s_mean"] == pytest.approx((0.5 + 0.25 + 3.0) / 3)
    assert errors["timestamp_error_beats_median"] == pytest.approx(0.5)
    summary = score_passage(similarity, candidates, relevant, pieces, tracks, start, spans, beats)
    assert summary["map"] == pytest.approx(1.0) and summary["recall@1"] == pytest.approx(1.0)
    assert summary["evaluated_queries"] == 2  # query 2 overlaps nothing in p1


def test_segment_beat_span_needs_the_segment_inside_the_annotations():
    beats = np.arange(10) * 0.5 + 1.0
    assert segment_beat_span(1.0, 3.0, beats) == pytest.approx((0.0, 4.0))
    assert all(math.isnan(x) for x in segment_beat_span(5.0, 7.0, beats))
    assert all(math.isnan(x) for x in segment_beat_span(0.0, 2.0, None))


def test_track_sources_of_a_rendering_and_of_an_asap_recording(tmp_path):
    storage = Storage(str(tmp_path))
    rendered = {
        "midi_path": "audio/x.mid",
        "render_version": "v1",
        "style_params_json": json.dumps(
            {
                "leading_silence_s": 0.75,
                "performance_annotations_uri": "/a/p_annotations.txt",
                "midi_score_annotations_uri": "/a/midi_score_annotations.txt",
            }
        ),
    }
    src = track_sources(rendered, storage)
    assert src.midi_uri == storage.url("render", "v1", "audio/x.mid")
    assert src.beats_uri == "/a/p_annotations.txt" and src.beat_offset_s == 0.75
    asap = {
        "midi_uri": "/a/p.mid",
        "annotations_uri": "/a/p_annotations.txt",
        "score_annotations_uri": "/a/s.txt",
    }
    src = track_sources(asap)
    assert (src.midi_uri, src.score_beats_uri, src.beat_offset_s) == ("/a/p.mid", "/a/s.txt", 0.0)
    assert track_sources({"title": "x"}).midi_uri is None


# -- task 3 -----------------------------------------------------------------------------------
def test_agreement_relevance_prefers_close_descriptors_of_other_pieces():
    from mess_ray.midi_descriptors import MIDI_DESCRIPTOR_NAMES

    rng = np.random.default_rng(0)
    n = 12
    desc = rng.normal(size=(n, len(MIDI_DESCRIPTOR_NAMES)))
    desc[:, MIDI_DESCRIPTOR_NAMES.index("rubato")] = np.nan  # unknown everywhere: dropped
    desc[:3, MIDI_DESCRIPTOR_NAMES.index("pedal_fraction")] = np.nan  # partly unknown: imputed
    features, kept = expressive_matrix(desc)
    assert "rubato" not in kept and "note_rate_hz" not in kept and "pedal_fraction" in kept
    assert np.all(np.isfinite(features)) and features.shape == (n, len(kept))
    pieces = np.array(["A", "B", "C"] * 4, dtype=object)
    candidates = other_piece_candidates(pieces)
    relevance = graded_relevance(features, candidates)
    assert np.all(relevance[~candidates] == 0) and np.all(
        (relevance[candidates] > 0) & (relevance[candidates] <= 1)
    )
    # An embedding that *is* the descriptors ranks perfectly; its reverse ranks worst; random in between.
    sim_oracle = -np.linalg.norm(features[:, None] - features[None], axis=2)
    good = score_agreement(sim_oracle, relevance, candidates, k=5)
    bad = score_agreement(-sim_oracle, relevance, candidates, k=5)
    chance = random_ndcg(relevance, candidates, k=5, seed=0)
    assert good["ndcg@5"] == pytest.approx(1.0) and good["spearman"] == pytest.approx(1.0)
    assert bad["ndcg@5"] < chance < good["ndcg@5"] and bad["spearman"] == pytest.approx(-1.0)
    assert random_ndcg(relevance, candidates, k=5, seed=0) == chance  # seeded


# -- end to end on a tiny ASAP-layout corpus ----------------------------------------------------
@pytest.mark.slow
def test_run_evaluate_runs_tasks_2_and_3_on_performances_and_says_why_task_1_did_not(tmp_path):
    cfg = tiny_config(str(tmp_path / "store"), audio={"sample_rate": SR})
    cfg.eval.holdout_fraction = 0.9
    _, holdout = split_pieces(ASAP_PIECES, cfg.eval.holdout_fraction, cfg.eval.seed)
    storage = Storage.from_config(cfg.storage)
    write_asap_ingest(storage, tmp_path / "asap", cfg.audio.window_s, cfg.audio.hop_s)

    manifest = run_evaluate(cfg, storage, ["finetune"])

    assert set(manifest["tasks"]) == {PASSAGE_TASK, AGREEMENT_TASK}
    assert "style" in manifest["tasks_skipped"][STYLE_TASK]
    assert "finetune" in manifest["skipped"] and manifest["systems"] == [DESCRIPTORS, RANDOM]
    assert manifest["held_out_pieces"] == holdout
    passage = manifest["tasks"][PASSAGE_TASK]
    assert passage["counts"]["pieces"] == len(holdout) and passage["counts"]["tracks"] == 2 * len(
        holdout
    )
    for system in (DESCRIPTORS, RANDOM):
        m = passage["metrics"][system]
        assert 0 < m["chance"] < 1 and 0 < m["map"] <= 1  # 4/4 beats of a 6 s piece: many overlap
        assert m["timestamp_error_s_median"] >= 0 or math.isnan(m["timestamp_error_s_median"])
        a = manifest["tasks"][AGREEMENT_TASK]["metrics"][system]
        assert 0 < a["ndcg@10"] <= 1 and 0 < a["chance"] < 1
    # Performers differ in loudness and note length: the audio descriptors agree with the MIDI
    # descriptors far better than a random encoder does.
    agreement = manifest["tasks"][AGREEMENT_TASK]["metrics"]
    assert agreement[DESCRIPTORS]["ndcg@10"] > agreement[DESCRIPTORS]["chance"] + 0.1
    assert agreement[DESCRIPTORS]["spearman"] > 0.3
    assert "tempo_ratio_to_score" in manifest["tasks"][AGREEMENT_TASK]["counts"]["descriptors"]
    for name in ("report.json", "report.md", "tasks.png", "passage_similarity_hist.png"):
        assert storage.exists("eval", manifest["version"], name), name
    md = storage.read_bytes(posixpath.join("eval", manifest["version"], "report.md")).decode()
    assert "Task 2" in md and "Task 3" in md and "tasks not run" in md and "held-out pieces" in md
    again = run_evaluate(cfg, storage, ["finetune"])
    assert again["tasks"] == manifest["tasks"]  # deterministic for a seed and corpus


def test_run_evaluate_on_renderings_with_midi_runs_tasks_1_and_3_and_reuses_embeddings(
    s3_bucket, tmp_path
):
    cfg = tiny_config(f"{s3_bucket}/store", audio={"sample_rate": SR})
    cfg.eval.holdout_fraction = 0.9
    storage = Storage.from_config(cfg.storage)
    write_asap_ingest(
        storage, tmp_path / "rendered", cfg.audio.window_s, cfg.audio.hop_s, styled=True
    )

    manifest = run_evaluate(cfg, storage, [RANDOM])

    assert set(manifest["tasks"]) == {STYLE_TASK, AGREEMENT_TASK}
    assert "beats" in manifest["tasks_skipped"][PASSAGE_TASK]
    assert (
        manifest["metrics"] == manifest["tasks"][STYLE_TASK]["metrics"]
    )  # task 1 stays the headline table
    assert (
        manifest["headline"].startswith("style retrieval mAP")
        and "expressive agreement" in manifest["headline"]
    )
    random = manifest["tasks"][AGREEMENT_TASK]["metrics"][RANDOM]
    assert 0 < random["ndcg@10"] <= 1
    for name in ("tasks.png", "metrics.png", "similarity_hist.png", "pca_styles.png"):
        assert storage.exists("eval", manifest["version"], name), name


def test_reuse_or_embed_takes_task1_vectors_and_embeds_only_the_rest(monkeypatch):
    from types import SimpleNamespace

    import mess_ray.eval.benchmark as bench
    from mess_ray.performances import PerformanceSet

    held_out = SimpleNamespace(segment_ids=np.array([10, 20, 30]))
    held_vectors = np.array([[1.0, 0], [2.0, 0], [3.0, 0]])
    n = 3
    perf = PerformanceSet(
        np.array([30, 99, 10]),
        np.array(["t"] * n, dtype=object),
        np.array(["p"] * n, dtype=object),
        np.zeros(n),
        np.ones(n),
        np.full((n, 2), np.nan),
        np.full((n, 10), np.nan),
        np.ones(n, dtype=bool),
        np.zeros((n, 4), dtype=np.float32),
        {},
        ["p"],
        [],
    )
    asked = []

    def fake_embed(cfg, storage, ref, subset):
        asked.append(subset.segment_ids.tolist())
        return np.array([[9.0, 9.0]] * len(subset)), {"ref": ref}

    monkeypatch.setattr(bench, "embed_system", fake_embed)
    vectors, _ = bench.reuse_or_embed(None, None, "m", perf, held_out, held_vectors, {"ref": "m"})
    assert asked == [[99]]
    assert vectors.tolist() == [[3.0, 0], [9.0, 9.0], [1.0, 0]]


def test_plot_labels_shorten_model_folders():
    from mess_ray.eval.report import plot_label

    assert plot_label("/data/m21/finetune/finetune-c970/model") == "finetune-c970"
    assert plot_label("s3://b/models/mine") == "mine"
    assert plot_label("descriptors") == "descriptors"


def test_load_track_shifts_beats_and_drops_score_beats_that_do_not_match(tmp_path):
    from mess_ray.performances import TrackSources, load_track

    (tmp_path / "p.txt").write_text("1.0\t1.0\tdb\n1.5\t1.5\tb\n2.0\t2.0\tb\n")
    (tmp_path / "s3.txt").write_text("0\t0\tdb\n1\t1\tb\n2\t2\tb\n")
    (tmp_path / "s2.txt").write_text("0\t0\tdb\n1\t1\tb\n")
    ok = load_track(
        TrackSources(None, str(tmp_path / "p.txt"), str(tmp_path / "s3.txt"), beat_offset_s=1.0)
    )
    assert (
        ok.beats.tolist() == [0.0, 0.5, 1.0]
        and ok.score_beats.tolist() == [0, 1, 2]
        and not ok.problems
    )
    bad = load_track(
        TrackSources(
            str(tmp_path / "missing.mid"), str(tmp_path / "p.txt"), str(tmp_path / "s2.txt")
        )
    )
    assert bad.score_beats is None and bad.midi is None and bad.beats is not None
    assert any("2 != performed beats 3" in p for p in bad.problems) and any(
        "midi" in p for p in bad.problems
    )
