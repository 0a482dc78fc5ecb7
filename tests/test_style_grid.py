"""Style made non-circular (issue 15, task 6): the parameter grid's train/eval split, the grid
renderings (one piano, loudness-normalised), the Spearman scorer, and the protocol table's
style_parameters task."""

from __future__ import annotations

import json

import numpy as np
import pretty_midi
import pytest
import soundfile as sf
from helpers import (
    make_asap_folder_with_scores,
    make_score,
    render_and_ingest_without_ray,
    tiny_config,
)

from mess_ray import style_grid as g
from mess_ray.config import RenderConfig, StyleGridConfig, default_styles, load_config
from mess_ray.eval.tasks.style import (
    negative_parameter_distance,
    same_passage_candidates,
    spearman_per_query,
)
from mess_ray.render.job import grid_plan
from mess_ray.render.sources import list_score_refs


# -- the grid -------------------------------------------------------------------------------------
def test_grid_eval_values_are_never_training_values_and_lie_between_them():
    for name in g.LEVELS:
        train, held = g.side_values(name, g.TRAIN), g.side_values(name, g.EVAL)
        assert len(train) == 4 and len(held) == 3
        assert not set(train) & set(held), name
        assert all(min(train) < v < max(train) for v in held), name  # interpolation, not beyond
    assert g.side_values("pedal", g.TRAIN) == g.side_values("pedal", g.EVAL) == (False, True)
    with pytest.raises(ValueError):
        g.side_values("tempo_scale", "test")


def test_grid_sampling_is_seeded_deterministic_distinct_and_one_sided():
    a = g.sample_combinations(g.EVAL, 8, seed=0, key="piece-a")
    assert a == g.sample_combinations(g.EVAL, 8, seed=0, key="piece-a")
    assert a != g.sample_combinations(g.EVAL, 8, seed=1, key="piece-a")
    assert a != g.sample_combinations(g.EVAL, 8, seed=0, key="piece-b")
    names = {g.style_name(c, g.EVAL) for c in a}
    assert len(names) == 8 and all(n.startswith("grid-e-") for n in names)
    assert all(g.combination_side(c) == g.EVAL for c in a)
    train = g.sample_combinations(g.TRAIN, 50, seed=0, key="piece-a")
    assert all(g.combination_side(c) == g.TRAIN for c in train)
    for name in g.LEVELS:  # no training rendering ever takes an evaluation value
        assert not {c[name] for c in train} & set(g.side_values(name, g.EVAL))
    with pytest.raises(ValueError, match="only"):
        g.sample_combinations(g.EVAL, 10**6, seed=0, key="x")
    style = g.style_spec(a[0], g.EVAL)
    assert style.program == 0 and style.tempo_scale == a[0]["tempo_scale"]


def test_parameter_vector_standardises_each_parameter_over_its_levels():
    low = {n: g.LEVELS[n][0] for n in g.LEVELS} | {"pedal": False}
    high = {n: g.LEVELS[n][-1] for n in g.LEVELS} | {"pedal": True}
    lo, hi = g.parameter_vector(low), g.parameter_vector(high)
    np.testing.assert_allclose(lo, -hi)  # symmetric levels
    np.testing.assert_allclose(hi[-1], 1.0)
    mid = {n: g.LEVELS[n][3] for n in g.LEVELS} | {"pedal": True}
    np.testing.assert_allclose(g.parameter_vector(mid)[:-1], 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="lack"):
        g.parameter_vector({"tempo_scale": 1.0})


def test_presets_avoid_eval_values_and_a_colliding_preset_is_refused():
    assert g.preset_collisions(default_styles()) == []
    assert g.preset_collisions(load_config("configs/m21-bench.yaml").render.styles) == []
    cfg = RenderConfig(
        style_grid={"eval_renders": 2}, styles=[{"name": "a", "velocity": 52}, {"name": "b"}]
    )
    refs = list_score_refs(cfg)
    with pytest.raises(ValueError, match="held-out style grid.*velocity=52"):
        grid_plan(refs, cfg, set())
    cfg = RenderConfig(style_grid={"eval_renders": 2}, styles=[{"name": "grid-x"}])
    with pytest.raises(ValueError, match="reserved"):
        grid_plan(refs, cfg, set())


def test_grid_plan_gives_held_out_pieces_eval_values_and_training_pieces_train_values(tmp_path):
    folder = make_asap_folder_with_scores(tmp_path / "asap", pieces=3)
    cfg = RenderConfig(
        source="asap",
        source_path=str(folder),
        style_grid={"eval_renders": 3, "train_renders": 2},
    )
    refs = list_score_refs(cfg)
    pieces = sorted({r.piece_id for r in refs})
    held = {pieces[0]}
    plan = grid_plan(refs, cfg, held)
    assert len(plan) == 3 + 2 * 2  # one score per piece, not one per performance
    for ref, style, tid, chain in plan:
        assert chain == g.CHAIN and ref.locator.endswith("midi_score.mid") and not ref.variant
        side = g.EVAL if ref.piece_id in held else g.TRAIN
        assert style.name.startswith(f"grid-{side[0]}-") and tid == f"{ref.piece_id}__{style.name}"
    assert plan == grid_plan(refs, cfg, held)  # deterministic
    train_styles = [{s.name for r, s, _, _ in plan if r.piece_id == p} for p in pieces[1:]]
    assert train_styles[0] == train_styles[1]  # shared by training pieces: fine-tuning classes
    assert grid_plan(refs, RenderConfig(source="asap", source_path=str(folder)), held) == []


@pytest.mark.parametrize("lufs", [-23.0, -30.0])
def test_grid_renderings_are_loudness_normalised_one_piano(tmp_path, lufs):
    import pyloudnorm as pyln

    from mess_ray.render.job import render_track
    from mess_ray.render.sources import Score, ScoreRef
    from mess_ray.storage import Storage

    cfg = RenderConfig(max_duration_s=6, style_grid={"eval_renders": 2, "lufs": lufs})
    storage = Storage.from_config(load_config(None, [f"storage.root={tmp_path}"]).storage)
    ref = ScoreRef("p", "c", "t", "music21", "x")
    score = Score("p", "c", "t", make_score(bars=4, program=5))
    quiet = {n: g.side_values(n, g.EVAL)[0] for n in g.LEVELS} | {"pedal": False}
    loud = {n: g.side_values(n, g.EVAL)[-1] for n in g.LEVELS} | {"pedal": True}
    levels = []
    for combo in (quiet, loud):
        style = g.style_spec(combo, g.EVAL)
        row = render_track(score, ref, style, f"p__{style.name}", cfg, storage, "v1", g.CHAIN)
        audio, sr = sf.read(storage.path("render", "v1", row["path"]))
        loudness = pyln.Meter(sr).integrated_loudness(audio)
        assert abs(loudness - lufs) < 0.5, loudness
        levels.append(loudness)
        midi = pretty_midi.PrettyMIDI(storage.path("render", "v1", row["midi_path"]))
        assert {i.program for i in midi.instruments} == {0}  # one instrument, whatever the score
        params = json.loads(row["style_params_json"])[g.PARAMETER_KEY]
        assert params["side"] == g.EVAL and params["values"] == combo
        assert json.loads(row["chain_json"])["lufs"] == lufs
    assert abs(levels[0] - levels[1]) < 0.5  # velocity 52 vs 80: same loudness


# -- the scorer -----------------------------------------------------------------------------------
def test_spearman_is_one_for_negative_parameter_distance_and_about_zero_for_random():
    rng = np.random.default_rng(0)
    params = rng.normal(size=(40, 7))
    target = negative_parameter_distance(params, params)
    candidates = ~np.eye(40, dtype=bool)
    perfect = spearman_per_query(target, target, candidates)
    np.testing.assert_allclose(perfect, 1.0)
    np.testing.assert_allclose(spearman_per_query(-target, target, candidates), -1.0)
    noise = rng.normal(size=(400, 7))
    random_sim = rng.normal(size=(400, 400))
    big_target = negative_parameter_distance(noise, noise)
    rho = spearman_per_query(random_sim, big_target, ~np.eye(400, dtype=bool))
    assert abs(np.mean(rho)) < 0.02 and np.std(rho) > 0.02
    # monotone transforms do not matter, too few candidates or a constant side give NaN
    np.testing.assert_allclose(spearman_per_query(np.exp(target), target, candidates), 1.0)
    few = np.zeros((40, 40), bool)
    few[:, :2] = True
    assert np.isnan(spearman_per_query(target, target, few)).all()
    assert np.isnan(spearman_per_query(np.ones((40, 40)), target, candidates)).all()
    with pytest.raises(ValueError):
        spearman_per_query(target[:3], target, candidates)


def test_candidates_are_the_same_passage_in_other_renderings():
    pieces = np.array(["a", "a", "a", "a", "b"], dtype=object)
    tracks = np.array(["a1", "a1", "a2", "a3", "b1"], dtype=object)
    starts = np.array([0.0, 2.0, 0.4, 2.0, 0.0])
    cand = same_passage_candidates(pieces, tracks, starts, hop_s=2.0)
    assert cand[0].tolist() == [
        False,
        False,
        True,
        False,
        False,
    ]  # a2 at 0.4 s; not b, not a3 at 2 s
    assert cand[1].tolist() == [False, False, False, True, False]


# -- the protocol table ---------------------------------------------------------------------------
def test_protocol_table_has_the_style_parameters_task(tmp_path):
    """Performances and evaluation-grid renderings of three ASAP-layout pieces (rendered and cut
    without Ray); `mess-ray evaluate`'s protocol table gets style_parameters rows on validation
    and test with every baseline, a system that reads tempo from onsets beats chance, and the
    other tasks never see a grid rendering."""
    import posixpath

    from mess_ray.eval import run_evaluate
    from mess_ray.eval.protocol import STYLE, markdown_table
    from mess_ray.render.job import chain_plan, plan_tracks
    from mess_ray.splits import split_by_piece
    from mess_ray.storage import Storage

    sr = 16000
    cfg = tiny_config(
        str(tmp_path / "store"), audio={"sample_rate": sr, "window_s": 2.0, "hop_s": 1.0}
    )
    cfg.render = cfg.render.model_copy(
        update={
            "source": "asap",
            "source_path": str(make_asap_folder_with_scores(tmp_path / "asap", pieces=4)),
            "sample_rate": sr,
            "max_duration_s": 5.0,
            "style_grid": StyleGridConfig(eval_renders=5),
        }
    )
    cfg.eval.holdout_fraction = 0.5
    cfg.eval.head_steps = 5
    cfg.eval.bootstrap_samples = 100
    cfg.eval.ray_data_min_segments = 10**6
    storage = Storage.from_config(cfg.storage)
    refs = list_score_refs(cfg.render)
    split = split_by_piece([r.piece_id for r in refs], 0.5, 0)
    held = set(split.held_out)
    assert split.validation and split.test
    plan = chain_plan(plan_tracks(refs, []), ["dry"], [], held) + grid_plan(refs, cfg.render, held)
    rows = render_and_ingest_without_ray(cfg, storage, plan)
    assert sum(g.is_grid_style(r["style"]) for r in rows) == 5 * len(held)

    manifest = run_evaluate(cfg, storage, ["finetune"])
    protocol = manifest["protocol"]
    style_rows = [r for r in protocol["rows"] if r["task"] == STYLE]
    assert {r["split"] for r in style_rows} == {"validation", "test"}
    assert {r["chains"] for r in style_rows} == {g.CHAIN}
    systems = {r["system"] for r in style_rows}
    assert {"random", "chroma", "mfcc", "descriptors", "descriptor_head", "chance"} <= systems
    for r in style_rows:
        assert r["metric"] == "spearman" and r["chance"] == 0.0
        assert -1 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 1
    summary = protocol["summary"][STYLE]
    assert summary["eval_values"]["tempo_scale"] == list(g.side_values("tempo_scale", g.EVAL))
    by = {(r["split"], r["system"]): r["value"] for r in style_rows}
    for side in ("validation", "test"):  # tempo/articulation show in onset statistics
        assert by[(side, "descriptors")] > 0.2 > abs(by[(side, "chance")])
    assert "style_parameters" in markdown_table(protocol["rows"], protocol["summary"])
    # the other tasks' evaluated set holds the performances only, no grid rendering
    from mess_ray.segments import segments_dataset

    seg = segments_dataset(storage).to_table(columns=["piece_id", "style"]).to_pylist()
    held_perf = sum(r["piece_id"] in held and not g.is_grid_style(r["style"]) for r in seg)
    held_grid = sum(r["piece_id"] in held and g.is_grid_style(r["style"]) for r in seg)
    assert sum(protocol["summary"]["segments"].values()) == held_perf
    assert sum(summary["segments"].values()) == held_grid
    with storage.open(posixpath.join("eval", manifest["version"], "protocol", "table.md")) as f:
        assert "style_parameters" in f.read().decode()


def test_run_render_adds_eval_grid_renderings_of_held_out_scores(ray_local, tmp_path):
    from mess_ray.render.job import read_catalog, run_render
    from mess_ray.splits import split_by_piece
    from mess_ray.storage import Storage

    root = make_asap_folder_with_scores(tmp_path / "asap", pieces=4)
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path / 'store'}",
            "render.source=asap",
            f"render.source_path={root}",
            "render.sample_rate=16000",
            "render.max_duration_s=4",
            "render.style_grid.eval_renders=2",
            "eval.holdout_fraction=0.5",
        ],
    )
    storage = Storage.from_config(cfg.storage)
    manifest = run_render(cfg, storage)
    rows = read_catalog(storage, manifest["version"]).to_pylist()
    held = set(split_by_piece([r["piece_id"] for r in rows], 0.5, 0).held_out)
    grid = [r for r in rows if g.is_grid_style(r["style"])]
    assert manifest["counts"]["style_grid_tracks"] == len(grid) == 2 * len(held)
    assert {r["piece_id"] for r in grid} == held
    assert all(r["style"].startswith("grid-e-") for r in grid)
    assert all(json.loads(r["chain_json"])["name"] == g.CHAIN for r in grid)
    assert len(rows) - len(grid) == 8  # every performance still rendered as played
