"""The protocol's tasks on a synthetic held-out set: masks, per-query scores, CIs and verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ray.eval import baselines as bl
from mess_ray.eval.protocol import (
    AGREEMENT,
    CHAIN_INVARIANCE,
    PASSAGE,
    PERFORMER,
    PERFORMER_UNSEEN,
    PERFORMER_WORK,
    EvalData,
    SegmentLabels,
    build_views,
    labels_from_metadata,
    markdown_table,
    plot_table,
    score_table,
)
from mess_ray.midi_descriptors import MIDI_DESCRIPTOR_NAMES
from mess_ray.performances import PerformanceSet

PIECES, PIANISTS, CHAINS, SEGMENTS = 4, 3, ("dry", "eval-1"), 5


def synthetic() -> tuple[EvalData, dict[str, np.ndarray]]:
    """Every pianist plays every piece, through two chains; 5 segments of 2 s each."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(PIECES):
        for a in range(PIANISTS):
            for c in CHAINS:
                for s in range(SEGMENTS):
                    rows.append((f"piece{p}", f"pianist{a}", c, s))
    n = len(rows)
    piece = np.array([r[0] for r in rows], dtype=object)
    pianist = np.array([r[1] for r in rows], dtype=object)
    chain = np.array([r[2] for r in rows], dtype=object)
    seg = np.array([r[3] for r in rows])
    performance = np.array([f"{r[0]}__{r[1]}" for r in rows], dtype=object)
    track = np.array([f"{r[0]}__{r[1]}__{r[2]}" for r in rows], dtype=object)
    beats = {t: np.arange(0, 30, 0.5) for t in set(track)}
    midi = rng.normal(size=(n, len(MIDI_DESCRIPTOR_NAMES)))
    perf = PerformanceSet(
        segment_ids=np.arange(n),
        track_ids=track,
        piece_ids=piece,
        start_s=seg * 2.0,
        end_s=seg * 2.0 + 4.0,
        beat_spans=np.stack([seg * 4.0, seg * 4.0 + 8.0], axis=1),
        midi_descriptors=midi,
        has_midi=np.ones(n, bool),
        audio=np.zeros((n, 0), np.float32),
        beats=beats,
        holdout_pieces=[f"piece{p}" for p in range(PIECES)],
        train_pieces=[],
    )
    side = np.where(np.isin(piece, ["piece0", "piece1"]), "validation", "test").astype(object)
    labels = SegmentLabels(chain, performance, pianist, side)
    data = EvalData(
        perf,
        labels,
        {"validation": ["piece0", "piece1"], "test": ["piece2", "piece3"]},
        {"pianist0"},
    )
    # A system that knows the pianist (+ noise), one that knows the performance and position, chance.
    pianist_code = np.array([int(p[-1]) for p in pianist])
    knows_pianist = np.eye(PIANISTS)[pianist_code] * 3 + rng.normal(0, 0.3, (n, PIANISTS))
    perf_code = np.unique(performance, return_inverse=True)[1]
    knows_passage = np.concatenate(
        [np.eye(perf_code.max() + 1)[perf_code], np.eye(SEGMENTS)[seg] * 3], axis=1
    ) + rng.normal(0, 0.05, (n, perf_code.max() + 1 + SEGMENTS))
    systems = {
        "pianist_model": knows_pianist,
        "passage_model": knows_passage,
        "chance": bl.chance_embeddings(n, 0),
    }
    return data, systems


def test_views_cover_tasks_splits_and_chain_conditions():
    data, _ = synthetic()
    views = build_views(data)
    keys = {(v.task, v.split, v.condition) for v in views}
    for split in ("validation", "test"):
        assert (PERFORMER, split, "dry") in keys and (PERFORMER, split, "dry->eval-1") in keys
        assert (CHAIN_INVARIANCE, split, "dry->eval-1") in keys
        assert (CHAIN_INVARIANCE, split, "dry") not in keys  # needs two chains
        assert (PASSAGE, split, "eval-1") in keys and (AGREEMENT, split, "dry") in keys
    for v in views:
        q_piece = data.perf.piece_ids[v.rows][v.queries]
        cand_piece = data.perf.piece_ids[v.rows]
        if v.task in (PERFORMER, PERFORMER_UNSEEN, PERFORMER_WORK, AGREEMENT):
            # candidates from other pieces only
            assert not (v.candidates & (q_piece[:, None] == cand_piece[None, :])).any()
        if v.task == CHAIN_INVARIANCE:
            assert ((v.relevance > 0).sum(axis=1) == 1).all()
        # no validation piece meets a test piece
        assert set(cand_piece) <= set(data.split[v.split])
    unseen = [v for v in views if v.task == PERFORMER_UNSEEN]
    assert unseen and all("pianist0" not in set(v.pianists) for v in unseen)
    data.heard_pianists = None  # who the models heard is unknown: no unseen rows, not a guess
    assert not [v for v in build_views(data) if v.task == PERFORMER_UNSEEN]


def test_a_pianists_other_work_is_not_the_other_half_of_a_prelude_and_fugue_or_a_sonata():
    """performer_identity_other_work: the same pianist in another *work*. A prelude and the fugue
    of its BWV number share a key (a key detector would find the pianist who played both), as
    do a sonata's movements their material: neither counts as the pianist's other work."""
    from mess_ray.splits import work_of

    assert work_of("bach-prelude-bwv-885") == work_of("bach-fugue-bwv-885") == "bach-bwv-885"
    assert work_of("bach-prelude-bwv-874") != work_of("bach-fugue-bwv-885")
    assert work_of("haydn-keyboard-sonatas-50-1-no-repeat") == "haydn-keyboard-sonatas-50"
    assert work_of("beethoven-piano-sonatas-18-2") == work_of("beethoven-piano-sonatas-18-3")
    for own in ("scriabin-sonatas-5", "schumann-kreisleriana-7", "bach-italian-concerto"):
        assert work_of(own) == own
    with pytest.raises(ValueError):
        work_of("")

    data, _ = synthetic()
    names = {
        "piece0": "bach-prelude-bwv-885",
        "piece1": "bach-fugue-bwv-885",
        "piece2": "beethoven-piano-sonatas-18-2",
        "piece3": "mozart-piano-sonatas-12-1",
    }
    data.perf.piece_ids = np.array([names[p] for p in data.perf.piece_ids], dtype=object)
    views = build_views(data)
    by_key = {(v.task, v.split, v.condition): v for v in views}
    # Validation holds one work (the prelude and fugue): no pianist has another work there.
    assert not [v for v in views if v.task == PERFORMER_WORK and v.split == "validation"]
    assert (PERFORMER, "validation", "dry") in by_key  # another *piece* still counts there
    # Test holds two works: the same candidates as performer identity.
    for cond in ("dry", "eval-1", "dry->eval-1"):
        work, piece = by_key[(PERFORMER_WORK, "test", cond)], by_key[(PERFORMER, "test", cond)]
        np.testing.assert_array_equal(work.candidates, piece.candidates)
        np.testing.assert_array_equal(work.relevance, piece.relevance)
    for v in views:
        if v.task == PERFORMER_WORK:
            q = np.array([work_of(p) for p in data.perf.piece_ids[v.rows][v.queries]])
            c = np.array([work_of(p) for p in data.perf.piece_ids[v.rows]])
            assert not (v.candidates & (q[:, None] == c[None, :])).any()


def test_scores_separate_a_pianist_model_from_chance_with_verdicts():
    data, systems = synthetic()
    rows = score_table(
        build_views(data), systems, data, reference="pianist_model", n_boot=200, min_pieces=2
    )
    get = {(r["task"], r["split"], r["chains"], r["system"], r["metric"]): r for r in rows}
    good = get[(PERFORMER, "test", "dry->eval-1", "pianist_model", "map")]
    chance = get[(PERFORMER, "test", "dry->eval-1", "chance", "map")]
    assert good["value"] > 0.9 and chance["value"] < 0.6
    assert (
        chance["reference_verdict"] == "wins"
        and chance["ci_low"] <= chance["value"] <= chance["ci_high"]
    )
    # the chance column is what a random ranking scores: the random-vector system lands on it
    # (its mAP, not the share of relevant candidates, which understates chance with few of them)
    assert good["chance"] == pytest.approx(chance["value"], abs=0.05)
    assert good["chance"] > 1 / PIANISTS
    assert "ci_low_pianists" in good and good["pianists"] == PIANISTS
    inv = get[(CHAIN_INVARIANCE, "validation", "eval-1->dry", "passage_model", "recall@1")]
    assert inv["value"] == 1.0
    assert (
        get[(CHAIN_INVARIANCE, "validation", "eval-1->dry", "passage_model", "recall@1")][
            "reference_verdict"
        ]
        == "loses"
    )
    err = get[(PASSAGE, "test", "dry", "passage_model", "top_hit_error_s")]
    assert err["value"] == pytest.approx(0.0, abs=1e-6)


def test_a_model_searching_at_several_query_lags_scores_each_candidate_at_its_best_lag():
    """:class:`QueryVariants`: a candidate's similarity is its best over the query's variants
    (one variant: the plain system's figures exactly); excerpt pooling uses the indexed vectors."""
    from mess_ray.config import load_config
    from mess_ray.eval.protocol import QueryVariants, score_all

    data, systems = synthetic()
    plain = systems["chance"]
    track = data.perf.track_ids
    # the second variant of each query is its counterpart through the other chain (what a lag
    # that undoes the chain's delay would give): every chain-invariance query finds it first
    other = {
        (t.rsplit("__", 1)[0], t.rsplit("__", 1)[1], s): i
        for i, (t, s) in enumerate(zip(track, data.perf.start_s))
    }
    swap = np.array(
        [
            other[(t.rsplit("__", 1)[0], "eval-1" if t.endswith("dry") else "dry", s)]
            for t, s in zip(track, data.perf.start_s)
        ]
    )
    systems = {
        "plain": plain,
        "one lag": QueryVariants(plain, plain[None]),
        "lags": QueryVariants(plain, np.stack([plain, plain[swap]])),
    }
    rows = score_all(load_config(None), data, systems, reference="plain")
    get = {(r["task"], r["split"], r["chains"], r["system"], r["metric"]): r for r in rows}
    for split in ("validation", "test"):
        key = (CHAIN_INVARIANCE, split, "dry->eval-1")
        assert get[(*key, "lags", "recall@1")]["value"] == 1.0
        assert get[(*key, "plain", "recall@1")]["value"] < 0.6
        for task, metric in ((PERFORMER, "map"), (CHAIN_INVARIANCE, "recall@1")):
            for cond in ("dry", "dry->eval-1"):
                if (task, split, cond, "plain", metric) in get:
                    one = get[(task, split, cond, "one lag", metric)]["value"]
                    assert one == get[(task, split, cond, "plain", metric)]["value"]
    excerpt = [r for r in rows if r["task"] == "performer_identity_excerpt"]
    assert {r["system"] for r in excerpt} == set(systems)


def test_no_verdict_from_too_few_pieces():
    data, systems = synthetic()
    rows = score_table(build_views(data), systems, data, reference="pianist_model", n_boot=50)
    assert {r["reference_verdict"] for r in rows if "reference_verdict" in r} == {"too few pieces"}


def test_table_markdown_and_plot(tmp_path):
    data, systems = synthetic()
    rows = score_table(
        build_views(data), systems, data, reference="pianist_model", n_boot=100, min_pieces=2
    )
    summary = {
        "split": data.split,
        "chains": list(CHAINS),
        "reference": "pianist_model",
        "bootstrap": {"samples": 100},
    }
    text = markdown_table(rows, summary)
    assert "performer_identity" in text and "| test |" in text and "wins" in text
    plot_table(rows, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_labels_come_from_catalog_metadata():
    meta = [
        {
            "chain_json": '{"name": "train-1"}',
            "performance_id": "p__yarden03",
            "style_params_json": '{"performer": "Yarden03"}',
        },
        {},
    ]
    labels = labels_from_metadata(meta, ["p__yarden03__train-1", "q__x"], {"p": "test"}, ["p", "q"])
    assert list(labels.chain) == ["train-1", "dry"]
    assert list(labels.performance) == ["p__yarden03", "q__x"]
    assert list(labels.pianist) == ["yarden", ""] and list(labels.side) == ["test", ""]


def test_descriptor_head_learns_with_finetune_losses():
    rng = np.random.default_rng(0)
    n = 160
    pieces = np.array([f"p{i % 4}" for i in range(n)], dtype=object)
    x = rng.normal(size=(n, 10)).astype(np.float32)
    midi = rng.normal(size=(n, len(MIDI_DESCRIPTOR_NAMES)))
    embed = bl.train_descriptor_head(x, pieces, midi, steps=30, seed=0)
    out = embed(x)
    assert out.shape == (n, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(
        out, bl.train_descriptor_head(x, pieces, midi, steps=30, seed=0)(x), atol=1e-6
    )
    with pytest.raises(ValueError):
        bl.train_descriptor_head(x, np.array(["p"] * n, dtype=object), None, steps=2)


def test_descriptor_head_with_performer_positives_finds_the_pianist_in_another_piece():
    # Each segment: a pianist's signature (4 of 14 dims) under its piece's (10 dims, 3x larger)
    # and noise; 40 pianists play 3 of 8 pieces each. Trained on one such corpus, the head with
    # the performer term must find the same pianist in another piece of a *new* corpus (new
    # pianists, new pieces) far more often than the same head without it.
    rng = np.random.default_rng(0)

    def corpus(tag, players=40, n_pieces=8, plays=3, per=4):
        piece_sig = [rng.normal(size=10) * 3 for _ in range(n_pieces)]
        xs, pieces, names = [], [], []
        for p in range(players):
            sig = rng.normal(size=4)
            for q in rng.choice(n_pieces, plays, replace=False):
                for _ in range(per):
                    xs.append(np.concatenate([piece_sig[q], sig]) + rng.normal(size=14) * 0.3)
                    pieces.append(f"{tag}{q}")
                    names.append(f"{tag}pianist{p}")
        return np.array(xs, np.float32), np.array(pieces, object), np.array(names, object)

    x, pieces, names = corpus("train")
    x_new, pieces_new, names_new = corpus("new")

    def top1_same_pianist_other_piece(v):
        sim = np.where(pieces_new[:, None] != pieces_new[None, :], v @ v.T, -np.inf)
        return float(np.mean(names_new[sim.argmax(axis=1)] == names_new))

    plain = bl.train_descriptor_head(x, pieces, None, steps=300, seed=0)
    taught = bl.train_descriptor_head(
        x, pieces, None, steps=300, performers=names, performer_weight=1.0, seed=0
    )
    chance = 8 / (len(x_new) - 16)  # 8 relevant rows among the other pieces' rows
    assert top1_same_pianist_other_piece(taught(x_new)) > 4 * chance
    assert top1_same_pianist_other_piece(taught(x_new)) > (
        top1_same_pianist_other_piece(plain(x_new)) + 0.1
    )
    with pytest.raises(ValueError, match="performers"):
        bl.train_descriptor_head(
            x, pieces, None, steps=2, performers=names[:5], performer_weight=1.0
        )


def test_content_baselines_shapes_and_errors():
    sr = 16000
    t = np.arange(sr * 2) / sr
    audio = np.stack([np.sin(2 * np.pi * f * t) * 0.3 for f in (261.6, 329.6, 392.0)]).astype(
        np.float32
    )
    chroma = bl.chroma_statistics(audio, sr)
    assert chroma.shape == (3, 24)
    assert (
        len(set(np.argmax(chroma[:, :12], axis=1))) == 3
    )  # C, E, G peak at different pitch classes
    assert bl.feature_embeddings(bl.MFCC, audio, sr).shape == (3, 2 * bl.N_MFCC)
    with pytest.raises(ValueError):
        bl.feature_embeddings("nope", audio, sr)
    with pytest.raises(ValueError):
        bl.chroma_statistics(np.zeros((0, 10)), sr)


def _notes(onsets_s, pitches_hz, sr, seconds=4.0):
    """Decaying piano-like tones (fundamental + 2 partials) starting at the given times."""
    t = np.arange(int(sr * seconds)) / sr
    y = np.zeros_like(t)
    for on, f in zip(onsets_s, pitches_hz):
        tt = np.clip(t - on, 0, None)
        env = (t >= on) * np.exp(-8.0 * tt)
        y += env * sum(np.sin(2 * np.pi * k * f * tt) / k for k in (1, 2, 3))
    return (0.2 * y / np.abs(y).max()).astype(np.float32)


def test_timeline_baselines_tell_apart_two_timings_of_the_same_notes_where_statistics_cannot():
    from scipy.signal import lfilter

    sr = 16000
    rng = np.random.default_rng(0)
    pitches = [261.6, 329.6, 392.0, 523.3, 392.0, 329.6, 293.7, 261.6]
    even = np.arange(8) * 0.45 + 0.1
    rubato = np.cumsum([0.3, 0.25, 0.55, 0.62, 0.30, 0.58, 0.28, 0.45])  # same notes, other timing
    performance = _notes(even, pitches, sr)
    other = _notes(rubato, pitches, sr)
    # the first performance through another "chain": quieter, low-passed, a little noise
    recorded = lfilter([0.6, 0.4], [1.0], 0.5 * performance).astype(np.float32)
    recorded += 1e-3 * rng.standard_normal(recorded.size).astype(np.float32)
    audio = np.stack([performance, recorded, other])

    def cos(v, i, j):
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        return float(v[i] @ v[j])

    for name in bl.TIMELINES:
        v = bl.feature_embeddings(name, audio, sr)
        assert v.shape[0] == 3 and np.isfinite(v).all()
        # the same performance through another chain is closer than the same notes re-timed
        assert cos(v, 0, 1) > cos(v, 0, 2) + 0.2, name
    from mess_ray.content import timelines

    for rates in ((20.0, 50.0), (5.0, 12.5)):  # the joined pair, full and a quarter size
        v = timelines(audio, sr, *rates)
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
        assert cos(v, 0, 1) > cos(v, 0, 2) + 0.2, rates
    assert timelines(audio, sr, 5.0, 12.5).shape[1] < timelines(audio, sr).shape[1] / 3
    chroma = bl.chroma_statistics(audio, sr)  # order-free: the re-timing is nearly invisible
    assert np.abs(chroma[0, :12] - chroma[2, :12]).max() < 0.15
    assert bl.chroma_timeline(audio[:1], sr).shape[1] % 12 == 0
    with pytest.raises(ValueError):
        bl.onset_timeline(np.zeros((1, 100), np.float32) * np.nan, sr)


def test_protocol_benchmark_prints_headline_figures_and_refuses_a_missing_table():
    from benchmarks.protocol import figure_lines

    data, systems = synthetic()
    rows = score_table(
        build_views(data), systems, data, reference="pianist_model", n_boot=100, min_pieces=2
    )
    lines = figure_lines({"protocol": {"rows": rows}})
    assert lines and all(r["figure"] == "protocol" and "ci_low" in r for r in lines)
    assert {r["metric"] for r in lines} <= {"map", "recall@1", "ndcg@10", "top_hit_error_s"}
    assert any(r.get("reference_verdict") == "wins" for r in lines)
    with pytest.raises(RuntimeError):
        figure_lines({"protocol": {"skipped": "no data"}})


def test_mess_ray_evaluate_writes_the_protocol_table(tmp_path):
    import posixpath

    from helpers import SR, tiny_config, write_asap_ingest

    from mess_ray.eval import run_evaluate
    from mess_ray.storage import Storage

    cfg = tiny_config(str(tmp_path / "store"), audio={"sample_rate": SR})
    cfg.eval.holdout_fraction = 0.9
    cfg.eval.head_steps = 5
    storage = Storage.from_config(cfg.storage)
    write_asap_ingest(storage, tmp_path / "asap", cfg.audio.window_s, cfg.audio.hop_s)
    manifest = run_evaluate(cfg, storage, ["finetune"])
    protocol = manifest["protocol"]
    summary = protocol["summary"]
    assert set(summary["split"]) == {"train", "validation", "test"}
    assert "finetune" in summary["skipped"] and "random" in summary["systems"]
    assert {"chroma", "mfcc", "descriptors", "descriptor_head", "chance", *bl.TIMELINES} <= set(
        summary["systems"]
    )
    passage = [r for r in protocol["rows"] if r["task"] == PASSAGE and r["metric"] == "map"]
    assert {r["split"] for r in passage} == {"validation", "test"}
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in passage)
    for name in ("table.json", "table.md", "table.png"):
        assert storage.exists(posixpath.join("eval", manifest["version"], "protocol", name)), name


def test_performer_head_benchmark_scores_taught_heads_beside_the_protocol_systems(tmp_path, capsys):
    import json

    from helpers import SR, tiny_config, write_asap_ingest

    from benchmarks import performer_head
    from mess_ray.storage import Storage

    cfg = tiny_config(str(tmp_path / "store"), audio={"sample_rate": SR})
    storage = Storage.from_config(cfg.storage)
    write_asap_ingest(
        storage, tmp_path / "asap", cfg.audio.window_s, cfg.audio.hop_s, pianists=True, pieces=8
    )
    sets = [f"storage.root={cfg.storage.root}", f"audio.sample_rate={SR}"]
    sets += ["eval.holdout_fraction=0.6", "eval.head_steps=5", "eval.test_pianist_fraction=0"]
    args = ["--config", str(tmp_path / "c.yaml"), "--models", "--steps", "20", "--boot", "100"]
    (tmp_path / "c.yaml").write_text("model:\n  size: tiny\n")
    assert performer_head.main([*args, *sum((["--set", s] for s in sets), [])]) == 0
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    setup = next(r for r in rows if r["figure"] == "performer_head_setup")
    assert setup["train_pianists"] == 2 and setup["train_pieces"] >= 2
    scored = {(r["task"], r["system"]) for r in rows if r["figure"] == "performer_head"}
    for system in ("descriptors+pianist", "descriptors+rec-rel+pianist", "midi+pianist"):
        assert ("performer_identity", system) in scored
    assert {
        ("performer_identity", s) for s in ("descriptors", "descriptor_head", "chroma")
    } <= scored
    assert not any(r["figure"] == "performer_head" and r["split"] == "test" for r in rows)
    fits = {r["system"]: r["map"] for r in rows if r["figure"] == "performer_head_fit"}
    assert {"descriptors+pianist", "midi+pianist", "chance (random vectors)"} <= set(fits)
    # another corpus's pieces that this one does not hold add training segments, no others
    extra = Storage(str(tmp_path / "extra"))
    write_asap_ingest(
        extra, tmp_path / "asap2", cfg.audio.window_s, cfg.audio.hop_s, pianists=True, pieces=10
    )
    more = ["--extra-train", str(tmp_path / "extra"), "--extra-segments", "1000"]
    assert performer_head.main([*args, *more, *sum((["--set", s] for s in sets), [])]) == 0
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    grown = next(r for r in rows if r["figure"] == "performer_head_setup")
    assert grown["train_pieces"] == setup["train_pieces"] + 2  # extra-8 and extra-9 only
    assert grown["extra_train"] == str(tmp_path / "extra")


def test_protocol_on_renderings_through_two_chains(tmp_path):
    """Render an ASAP-layout folder through a training and an evaluation-only chain (no Ray: the
    render task function itself), segment it as ingest does, and evaluate: the table has the
    cross-chain conditions, chain invariance among them, and the catalog's chain reaches it."""
    import posixpath

    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    from helpers import make_asap_folder, tiny_config

    from mess_ray.eval import run_evaluate
    from mess_ray.ingest.catalog import catalog_from_render
    from mess_ray.render.job import chain_plan, plan_tracks, render_track, write_catalog
    from mess_ray.render.sources import list_score_refs, load_score
    from mess_ray.segments import SEGMENT_SCHEMA, encode_audio, segment_id, segments_dir
    from mess_ray.splits import split_by_piece
    from mess_ray.storage import Storage, new_version

    sr = 16000
    cfg = tiny_config(
        str(tmp_path / "store"), audio={"sample_rate": sr, "window_s": 2.0, "hop_s": 1.0}
    )
    cfg.render = cfg.render.model_copy(
        update={
            "source": "asap",
            "source_path": str(make_asap_folder(tmp_path / "asap")),
            "sample_rate": sr,
        }
    )
    cfg.eval.holdout_fraction = 0.6
    cfg.eval.head_steps = 5
    storage = Storage.from_config(cfg.storage)
    refs = list_score_refs(cfg.render)
    held = set(split_by_piece([r.piece_id for r in refs], 0.6, 0).held_out)
    version = new_version()
    rows = [
        render_track(load_score(ref), ref, style, tid, cfg.render, storage, version, chain)
        for ref, style, tid, chain in chain_plan(plan_tracks(refs, []), ["dry"], ["eval-1"], held)
    ]
    write_catalog(storage, version, rows)
    storage.publish("render", version, {"counts": {"tracks": len(rows)}})
    segments = []
    for row in catalog_from_render(storage)[0]:
        with storage.open(row["source_uri"].replace(storage.root.rstrip("/") + "/", ""), "rb") as f:
            audio, rate = sf.read(f, dtype="float32")
        assert rate == sr
        win, hop = 2 * sr, sr
        for start in range(0, len(audio) - win + 1, hop):
            segments.append(
                {
                    "segment_id": segment_id(row["track_id"], start),
                    "track_id": row["track_id"],
                    "piece_id": row["piece_id"],
                    "style": "",
                    "start_s": start / sr,
                    "end_s": (start + win) / sr,
                    "start_sample": start,
                    "num_samples": win,
                    "sample_rate": sr,
                    "source_uri": row["source_uri"],
                    "metadata_json": row["metadata_json"],
                    "audio": encode_audio(audio[start : start + win]),
                }
            )
    ingest = new_version()
    with storage.open(posixpath.join(segments_dir(ingest), "part-00000.parquet"), "wb") as f:
        pq.write_table(pa.Table.from_pylist(segments, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", ingest, {"counts": {"segments": len(segments)}})

    manifest = run_evaluate(cfg, storage, ["finetune"])
    protocol = manifest["protocol"]
    assert set(protocol["summary"]["chains"]) == {"dry", "eval-1"}
    invariance = [r for r in protocol["rows"] if r["task"] == CHAIN_INVARIANCE]
    assert {r["chains"] for r in invariance} == {"dry->eval-1", "eval-1->dry"}
    chance = [r for r in invariance if r["system"] == "chance" and r["metric"] == "recall@1"]
    assert chance and all(0 <= r["value"] <= 1 for r in chance)


def test_excerpt_level_performer_identity_pools_each_performance_per_chain():
    from mess_ray.eval.protocol import (
        PERFORMER_EXCERPT,
        excerpt_groups,
        excerpt_views,
        pool_excerpts,
    )

    data, systems = synthetic()
    groups, first = excerpt_groups(data)
    assert first.size == PIECES * PIANISTS * len(CHAINS)  # one excerpt per performance x chain
    assert (np.bincount(groups) == SEGMENTS).all()
    views = excerpt_views(data, first)
    assert {(v.split, v.condition) for v in views} >= {("test", "dry"), ("test", "dry->eval-1")}
    piece = data.perf.piece_ids[first]
    for v in views:
        assert v.task == PERFORMER_EXCERPT
        qp, cp = piece[v.rows][v.queries], piece[v.rows]
        assert not (v.candidates & (qp[:, None] == cp[None, :])).any()
    pooled = {k: pool_excerpts(x, groups, first.size) for k, x in systems.items()}
    rows = score_table(views, pooled, data, "pianist_model", n_boot=100, min_pieces=2)
    got = {(r["split"], r["chains"], r["system"]): r["value"] for r in rows if r["metric"] == "map"}
    assert got[("test", "dry", "pianist_model")] == pytest.approx(1.0)
    assert got[("test", "dry", "chance")] < 0.9  # 3 candidates, 1 relevant: chance 0.61


def test_work_relative_systems_remove_what_the_work_dictates():
    from mess_ray.config import MessRayConfig
    from mess_ray.eval.protocol import WORK_REL, work_relative_systems

    data, systems = synthetic()
    rng = np.random.default_rng(1)
    piece_code = np.unique(data.perf.piece_ids, return_inverse=True)[1]
    pianist_code = np.array([int(p[-1]) for p in data.labels.pianist])
    # each work sets the level of every dimension (large); the pianist deviates from it (small)
    content = rng.normal(0, 3.0, (PIECES, PIANISTS))
    mixed = content[piece_code] + np.eye(PIANISTS)[pianist_code] * 0.5
    systems = {"mixed": mixed + rng.normal(0, 0.1, mixed.shape)}
    cfg = MessRayConfig()
    for aligned in (False, True):
        cfg.work_relative.aligned = aligned
        rel = work_relative_systems(cfg, data, systems, ["mixed", "absent"])
        assert set(rel) == {"mixed" + WORK_REL}
        both = {**systems, **rel}
        rows = score_table(build_views(data), both, data, None, n_boot=100, min_pieces=2)
        get = {
            (r["split"], r["chains"], r["system"]): r["value"]
            for r in rows
            if r["task"] == PERFORMER and r["metric"] == "map"
        }
        assert get[("test", "dry", "mixed" + WORK_REL)] > get[("test", "dry", "mixed")] + 0.3
