"""Render stage: sources, expressive transforms, synthesis and the Ray job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pretty_midi
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from helpers import make_asap_folder, make_score, write_midi
from pydantic import ValidationError

from mess_ray.config import RenderConfig, StyleSpec, load_config
from mess_ray.render import expressive as ex
from mess_ray.render.job import CATALOG_SCHEMA, plan_tracks, read_catalog, run_render, track_seed
from mess_ray.render.sources import iter_scores, list_score_refs, load_score, slugify
from mess_ray.render.synth import check_soundfont, render_midi, trim_tail
from mess_ray.storage import Storage


# -- fixtures -------------------------------------------------------------------------------
def onsets(midi: pretty_midi.PrettyMIDI) -> list[tuple[float, int]]:
    return sorted((n.start, n.pitch) for inst in midi.instruments for n in inst.notes)


def plain(**overrides) -> StyleSpec:
    """A style that changes nothing except what a test sets."""
    return StyleSpec(**{"name": "plain", "velocity_range": 0, **overrides})


def melody_notes(midi: pretty_midi.PrettyMIDI) -> list[pretty_midi.Note]:
    return sorted(midi.instruments[0].notes, key=lambda n: n.start)


# -- expressive transforms ------------------------------------------------------------------
def test_plain_style_keeps_timing_and_pitches():
    score = make_score()
    out, params = ex.apply_style(score, plain(), seed=0)
    assert np.allclose([t for t, _ in onsets(out)], [t for t, _ in onsets(score)], atol=1e-6)
    assert [p for _, p in onsets(out)] == [p for _, p in onsets(score)]
    assert params["style"]["name"] == "plain" and params["seed"] == 0 and not params["truncated"]
    assert json.loads(json.dumps(params)) == params  # written verbatim into the catalog


def test_staccato_shortens_and_legato_lengthens_durations():
    score = make_score()
    base = [n.end - n.start for n in melody_notes(score)]
    short = [
        n.end - n.start for n in melody_notes(ex.apply_style(score, plain(articulation=0.4), 0)[0])
    ]
    long = [
        n.end - n.start for n in melody_notes(ex.apply_style(score, plain(articulation=1.3), 0)[0])
    ]
    assert np.allclose(short, np.array(base) * 0.4, atol=1e-6)
    assert np.allclose(long, np.array(base) * 1.3, atol=1e-6)
    # Legato overlaps the next note.
    notes = melody_notes(ex.apply_style(score, plain(articulation=1.3), 0)[0])
    assert all(a.end > b.start for a, b in zip(notes, notes[1:]))


@pytest.mark.parametrize("arc,sign", [("crescendo", 1), ("diminuendo", -1)])
def test_dynamics_arcs_are_monotonic(arc, sign):
    out, _ = ex.apply_style(
        make_score(), plain(velocity=70, velocity_range=30, dynamics_arc=arc), 0
    )
    velocities = np.array([n.velocity for n in melody_notes(out)])
    assert np.all(sign * np.diff(velocities) >= 0)
    assert sign * (velocities[-1] - velocities[0]) >= 50


def test_hairpin_peaks_in_the_middle_and_flat_is_constant():
    hairpin, _ = ex.apply_style(
        make_score(), plain(velocity=70, velocity_range=30, dynamics_arc="hairpin"), 0
    )
    v = np.array([n.velocity for n in melody_notes(hairpin)])
    assert v[len(v) // 2] > v[0] + 40 and v[len(v) // 2] > v[-1] + 40
    flat, _ = ex.apply_style(make_score(), plain(velocity=55, velocity_range=30), 0)
    assert {n.velocity for inst in flat.instruments for n in inst.notes} == {55}


def test_accents_every_nth_beat():
    out, params = ex.apply_style(make_score(bars=4), plain(velocity=60, accent_every=4), 0)
    velocities = [n.velocity for n in melody_notes(out)]
    assert velocities[0::4] == [60 + ex.ACCENT_VELOCITY] * 4
    assert set(velocities) - set(velocities[0::4]) == {60}
    assert params["accented_notes"] > 0


def test_rubato_moves_onsets_not_pitches_and_slows_phrase_ends():
    score = make_score(bars=8)
    out, params = ex.apply_style(score, plain(rubato=0.8, phrase_bars=4), 0)
    before, after = onsets(score), onsets(out)
    assert [p for _, p in after] == [p for _, p in before]
    assert not np.allclose([t for t, _ in after], [t for t, _ in before], atol=1e-3)
    ioi = np.diff([n.start for n in melody_notes(out)])  # 16 beats per phrase
    middle, end = ioi[7], ioi[14]
    assert end > middle * 1.3
    assert len(params["phrase_boundaries_s"]) == 3


def test_tempo_jitter_is_seeded():
    style = plain(tempo_jitter=0.2)
    a, _ = ex.apply_style(make_score(), style, seed=1)
    b, _ = ex.apply_style(make_score(), style, seed=1)
    c, _ = ex.apply_style(make_score(), style, seed=2)
    assert onsets(a) == onsets(b)
    assert onsets(a) != onsets(c)
    assert [p for _, p in onsets(a)] == [p for _, p in onsets(c)]


def test_tempo_scale_two_halves_duration():
    score = make_score()
    fast, params = ex.apply_style(score, plain(tempo_scale=2.0), 0)
    assert ex.last_note_end(fast) == pytest.approx(ex.last_note_end(score) / 2, rel=1e-3)
    assert params["tempo_factor_mean"] == pytest.approx(2.0)


@pytest.mark.parametrize("mode", ["bar", "harmony"])
def test_pedal_adds_sustain_changes(mode):
    score = make_score(bars=4)
    assert not any(c.number == 64 for inst in score.instruments for c in inst.control_changes)
    out, params = ex.apply_style(score, plain(pedal=True, pedal_mode=mode), 0)
    for inst in out.instruments:
        sustain = [c for c in inst.control_changes if c.number == 64]
        assert {c.value for c in sustain} == {0, 127}
        assert sustain[-1].value == 0  # released at the end
    assert params["pedal_changes"] == (4 if mode == "bar" else 8)  # bass changes every half note


def test_timbre_sets_program_and_writes_no_cc74():
    out, _ = ex.apply_style(make_score(), plain(program=40), 0)
    assert {inst.program for inst in out.instruments} == {40}
    assert not any(c.number == 74 for inst in out.instruments for c in inst.control_changes)


def test_style_brightness_key_is_refused_with_the_reason():
    with pytest.raises(ValidationError, match="brightness.*bit-identical.*brightness_centroid"):
        StyleSpec(name="bright", brightness=100)
    with pytest.raises(ValueError, match="brightness"):
        load_config(overrides=["render.styles=[{name: a, brightness: 10}]"])


def test_truncation_after_tempo_warp():
    score = make_score(bars=8)  # 16 s at 120 bpm
    out, params = ex.apply_style(
        score, plain(tempo_scale=0.5, articulation=1.5), 0, max_duration_s=5.0
    )
    assert ex.last_note_end(out) <= 5.0 + 1e-9
    assert params["truncated"] and params["notes"] < ex.note_count(score)
    kept, params = ex.apply_style(score, plain(tempo_scale=4.0), 0, max_duration_s=5.0)
    assert not params["truncated"] and ex.note_count(kept) == ex.note_count(score)


def test_apply_style_leaves_input_untouched_and_rejects_empty():
    score = make_score()
    snapshot = onsets(score)
    ex.apply_style(score, plain(tempo_scale=2.0, articulation=0.5, pedal=True), 0)
    assert onsets(score) == snapshot
    with pytest.raises(ValueError, match="without notes"):
        ex.apply_style(pretty_midi.PrettyMIDI(), plain(), 0)


def test_as_played_drops_leading_silence_only():
    score = make_score(bars=2)
    for inst in score.instruments:
        for n in inst.notes:
            n.start += 3.0
            n.end += 3.0
    out, params = ex.as_played(score, max_duration_s=100)
    assert ex.first_note_start(out) == pytest.approx(0.0, abs=1e-6)
    assert params["leading_silence_s"] == pytest.approx(3.0)
    iois = np.diff([t for t, _ in onsets(out)])
    assert np.allclose(iois, np.diff([t for t, _ in onsets(score)]), atol=1e-6)


def test_style_names_must_be_slugs():
    with pytest.raises(ValueError, match="slug"):
        StyleSpec(name="Bad Name")


# -- sources --------------------------------------------------------------------------------
def test_slugify():
    assert slugify("Bach/Fugue/bwv_846") == "bach-fugue-bwv-846"
    with pytest.raises(ValueError):
        slugify("///")


def test_music21_source_yields_valid_midi(tmp_path):
    cfg = RenderConfig(pieces=["bach/bwv66.6", "corelli/opus3no1/1grave"], num_pieces=1)
    scores = list(iter_scores(cfg))
    assert len(scores) == 1
    piece_id, composer, title, midi = scores[0]
    assert piece_id == "bach-bwv66-6" and composer and title
    assert midi.resolution == 480 and ex.note_count(midi) > 100
    assert {n.pitch for inst in midi.instruments for n in inst.notes} <= set(range(128))
    # Round-trips as a MIDI file.
    midi.write(str(tmp_path / "x.mid"))
    assert ex.note_count(pretty_midi.PrettyMIDI(str(tmp_path / "x.mid"))) == ex.note_count(midi)


def test_default_music21_list_is_long_enough():
    refs = list_score_refs(RenderConfig(num_pieces=100))
    assert len(refs) >= 12 and len({r.composer for r in refs}) >= 6


def test_music21_bad_piece_is_skipped(caplog):
    cfg = RenderConfig(pieces=["bach/no_such_work_xyz", "bach/bwv3.6"])
    assert [s.piece_id for s in iter_scores(cfg)] == ["bach-bwv3-6"]
    assert "no_such_work_xyz" in caplog.text or "bach-no-such-work-xyz" in caplog.text


def test_midi_folder_source(tmp_path):
    write_midi(tmp_path / "Satie" / "Gnossienne_1.mid")
    write_midi(tmp_path / "loose.midi", bars=2)
    (tmp_path / "notes.txt").write_text("not midi")
    (tmp_path / "broken.mid").write_bytes(b"MThd garbage")
    refs = list_score_refs(
        RenderConfig(source="midi_folder", source_path=str(tmp_path), num_pieces=10)
    )
    assert [r.piece_id for r in refs] == ["broken", "loose", "satie-gnossienne-1"]
    assert refs[2].composer == "Satie" and refs[2].title == "Gnossienne 1"
    with pytest.raises(ValueError, match="not a readable MIDI"):
        load_score(refs[0])
    loaded = list(
        iter_scores(RenderConfig(source="midi_folder", source_path=str(tmp_path), num_pieces=10))
    )
    assert [s.piece_id for s in loaded] == ["loose", "satie-gnossienne-1"]


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="needs render.source_path"):
        list_score_refs(RenderConfig(source="midi_folder"))
    with pytest.raises(ValueError, match="not a folder"):
        list_score_refs(RenderConfig(source="midi_folder", source_path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no .mid"):
        list_score_refs(RenderConfig(source="midi_folder", source_path=str(tmp_path)))
    with pytest.raises(ValueError, match="metadata.csv"):
        list_score_refs(RenderConfig(source="asap", source_path=str(tmp_path)))


def test_asap_source_lists_performances_per_piece(tmp_path):
    root = make_asap_folder(tmp_path / "asap")
    refs = list_score_refs(RenderConfig(source="asap", source_path=str(root), num_pieces=5))
    assert sorted((r.piece_id, r.variant) for r in refs) == [
        ("bach-prelude-bwv-846", "lee01"),
        ("bach-prelude-bwv-846", "shi05m"),
        ("chopin-etude-op-10-3", "kim07"),
    ]
    assert all(r.extra["performance_annotations"].endswith("_annotations.txt") for r in refs)
    assert all(Path(r.extra["performance_annotations_uri"]).is_file() for r in refs)
    several = list_score_refs(
        RenderConfig(source="asap", source_path=str(root), num_pieces=5, min_performances=2)
    )
    assert {r.piece_id for r in several} == {"bach-prelude-bwv-846"}
    with pytest.raises(ValueError, match="min_performances"):
        list_score_refs(RenderConfig(source="asap", source_path=str(root), min_performances=3))
    one = list_score_refs(RenderConfig(source="asap", source_path=str(root), num_pieces=1))
    assert len({r.piece_id for r in one}) == 1  # all performances of the chosen piece
    assert ex.note_count(load_score(refs[0]).midi) > 0


# -- synthesis ------------------------------------------------------------------------------
def test_synth_renders_non_silent_audio_of_expected_length():
    midi = make_score(bars=2)  # 4 s of notes
    cfg = RenderConfig(sample_rate=16000, tail_s=1.0)
    audio = render_midi(midi, cfg)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 3.5 * 16000 <= len(audio) <= 5.0 * 16000
    assert np.sqrt(np.mean(audio**2)) > 1e-3
    stereo = render_midi(midi, cfg.model_copy(update={"channels": 2}))
    assert stereo.ndim == 2 and stereo.shape[1] == 2


def test_missing_soundfont_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="SoundFont"):
        check_soundfont(str(tmp_path / "none.sf2"))
    with pytest.raises(FileNotFoundError, match="SoundFont"):
        render_midi(make_score(bars=1), RenderConfig(soundfont=str(tmp_path / "none.sf2")))


def test_trim_tail_cuts_silence_and_caps_tail():
    rate = 1000
    audio = np.zeros(10 * rate, dtype=np.float32)
    audio[: 2 * rate] = 0.5  # notes until 2 s
    audio[2 * rate : 3 * rate] = np.linspace(0.5, 0, rate)  # decay
    out = trim_tail(audio, rate, last_note_end_s=2.0, tail_s=5.0, silence_db=-40)
    assert 2.9 * rate <= len(out) <= 3.0 * rate
    capped = trim_tail(
        np.full(10 * rate, 0.5, dtype=np.float32), rate, 2.0, tail_s=1.0, silence_db=-40
    )
    assert len(capped) == 3 * rate and capped[-1] == 0.0  # faded out


# -- job ------------------------------------------------------------------------------------
def test_plan_tracks_and_seeds():
    refs = list_score_refs(RenderConfig(pieces=["bach/bwv66.6", "bach/bwv3.6"]))
    styles = [plain(), StyleSpec(name="loud", velocity=120)]
    plan = plan_tracks(refs, styles)
    assert [tid for _, _, tid in plan] == [
        "bach-bwv66-6__plain",
        "bach-bwv66-6__loud",
        "bach-bwv3-6__plain",
        "bach-bwv3-6__loud",
    ]
    with pytest.raises(ValueError, match="duplicate"):
        plan_tracks(refs, [plain(), plain()])
    assert track_seed(0, "a__b") == track_seed(0, "a__b") != track_seed(1, "a__b")


def _check_artifact(storage: Storage, manifest: dict, tracks: int) -> pq.Table:
    version = manifest["version"]
    assert storage.latest("render") == version
    catalog = read_catalog(storage)
    assert catalog.schema.equals(CATALOG_SCHEMA)
    assert catalog.num_rows == tracks == manifest["counts"]["tracks"]
    for row in catalog.to_pylist():
        with storage.open(f"render/{version}/{row['path']}", "rb") as f:
            audio, rate = sf.read(f, dtype="float32")
        assert rate == row["sample_rate"] and len(audio) / rate == pytest.approx(
            row["duration_s"], abs=1e-3
        )
        assert np.abs(audio).max() > 0.01
        assert row["track_id"] == f"{row['piece_id']}__{row['style']}" or row["source"] == "asap"
        json.loads(row["style_params_json"])
    assert manifest["seconds_of_audio"] == pytest.approx(
        sum(catalog.column("duration_s").to_pylist()), abs=0.01
    )
    return catalog


def test_run_render_music21_two_pieces_two_styles(ray_local, tmp_path):
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path / 'store'}",
            "render.num_pieces=2",
            "render.max_duration_s=3",
            "render.sample_rate=16000",
        ],
    )
    cfg.render.styles = cfg.render.styles[:2]
    storage = Storage.from_config(cfg.storage)
    manifest = run_render(cfg, storage)
    assert manifest["counts"] == {
        "pieces": 2,
        "styles": 2,
        "tracks": 4,
        "failed": 0,
        "failed_pieces": 0,
        "style_grid_tracks": 0,
    }
    catalog = _check_artifact(storage, manifest, 4)
    rows = catalog.to_pylist()
    assert {r["style"] for r in rows} == {"romantic", "baroque_crisp"}
    assert all(r["duration_s"] <= 3 + cfg.render.tail_s for r in rows)
    params = json.loads(rows[0]["style_params_json"])
    assert params["style"]["name"] == rows[0]["style"] and params["seed"] == rows[0]["seed"]


def test_run_render_skips_broken_pieces_and_writes_to_s3(ray_local, tmp_path, s3_bucket):
    folder = tmp_path / "midi"
    write_midi(folder / "good.mid", bars=2)
    (folder / "broken.mid").parent.mkdir(exist_ok=True)
    (folder / "broken.mid").write_bytes(b"not a midi file")
    cfg = load_config(
        None,
        [
            f"storage.root={s3_bucket}/store",
            "render.source=midi_folder",
            f"render.source_path={folder}",
            "render.sample_rate=16000",
        ],
    )
    cfg.render.styles = [plain(), StyleSpec(name="fast", tempo_scale=2.0)]
    storage = Storage.from_config(cfg.storage)
    manifest = run_render(cfg, storage)
    assert manifest["counts"]["tracks"] == 2 and manifest["counts"]["failed"] == 2
    assert manifest["counts"]["failed_pieces"] == 1
    assert all(f["track_id"].startswith("broken__") for f in manifest["failures"])
    _check_artifact(storage, manifest, 2)


def test_run_render_asap_as_played(ray_local, tmp_path):
    root = make_asap_folder(tmp_path / "asap")
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path / 'store'}",
            "render.source=asap",
            f"render.source_path={root}",
            "render.sample_rate=16000",
        ],
    )
    storage = Storage.from_config(cfg.storage)
    manifest = run_render(cfg, storage)
    catalog = _check_artifact(storage, manifest, 3)
    rows = catalog.to_pylist()
    assert {r["style"] for r in rows} == {""}
    assert "bach-prelude-bwv-846__shi05m" in {r["track_id"] for r in rows}
    params = json.loads(rows[0]["style_params_json"])
    assert params["style"] is None and params["performer"]
    assert Path(
        params["performance_annotations_uri"]
    ).is_file()  # eval maps segment times to beats with it
    # the performed MIDI is kept beside the audio and is what was synthesised
    played = pretty_midi.PrettyMIDI(
        str(storage.path("render", manifest["version"], rows[0]["midi_path"]))
    )
    assert ex.note_count(played) > 0 and ex.last_note_end(played) == pytest.approx(
        params["duration_s"], abs=0.01
    )


def test_midi_folder_as_played_renders_each_performance_once_unstyled(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("performances")
    store = tmp_path_factory.mktemp("store")
    # A "performance": irregular onsets and velocities that a style transform would rewrite.
    perf = make_score(bars=2, tempo=90.0)
    for i, note in enumerate(perf.instruments[0].notes):
        note.velocity = 30 + (i * 13) % 90
        note.start += 0.03 * (i % 3)
    (tmp_path / "Pianist_A").mkdir()
    perf.write(str(tmp_path / "Pianist_A" / "take1.mid"))
    write_midi(tmp_path / "take2.mid", bars=1)
    cfg = RenderConfig(
        source="midi_folder",
        source_path=str(tmp_path),
        num_pieces=10,
        midi_as_played=True,
        sample_rate=16000,
    )
    refs = list_score_refs(cfg)
    plan = plan_tracks(refs, cfg.styles)
    # One track per file, no style: four styles configured, none applied.
    assert [(tid, style) for _, style, tid in plan] == [
        ("pianist-a-take1__played", None),
        ("take2__played", None),
    ]
    from mess_ray.render.job import render_track

    storage = Storage(str(store))
    ref = refs[0]
    row = render_track(load_score(ref), ref, None, plan[0][2], cfg, storage, "v1")
    assert row["style"] == "" and row["source"] == "midi_folder"
    played = pretty_midi.PrettyMIDI(str(store / "render" / "v1" / row["midi_path"]))
    original = sorted((n.start, n.pitch, n.velocity) for n in perf.instruments[0].notes)
    rendered = sorted((n.start, n.pitch, n.velocity) for n in played.instruments[0].notes)
    # As played: the same onsets (to MIDI tick precision) and velocities.
    assert [(p, v) for _, p, v in rendered] == [(p, v) for _, p, v in original]
    assert np.allclose([s for s, _, _ in rendered], [s for s, _, _ in original], atol=0.01)
    # Off by default: the same folder renders as scores in every style.
    styled = plan_tracks(
        list_score_refs(cfg.model_copy(update={"midi_as_played": False})), cfg.styles
    )
    assert len(styled) == 2 * len(cfg.styles) and all(s is not None for _, s, _ in styled)
