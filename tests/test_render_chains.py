"""Recording chains: seeded, recorded, and every parameter audibly changes the audio."""

from __future__ import annotations

import json

import numpy as np
import pretty_midi
import pytest
from helpers import make_asap_folder, make_score

from mess_ray.config import RenderConfig, load_config
from mess_ray.render.chains import (
    DRY,
    EVAL_SOUNDFONTS,
    TRAIN_SOUNDFONTS,
    ChainSpec,
    EqSpec,
    RoomSpec,
    apply_chain,
    chain_side,
    find_soundfont,
    resolve_chain,
)
from mess_ray.render.job import chain_plan, plan_tracks, read_catalog, run_render
from mess_ray.render.synth import render_midi
from mess_ray.storage import Storage

SR = 16000


@pytest.fixture(scope="module")
def piano() -> np.ndarray:
    """Three seconds of the default SoundFont's piano, mono."""
    midi = make_score(bars=2, tempo=160)
    return render_midi(midi, RenderConfig(sample_rate=SR))[: 3 * SR]


def _log_spectrum(x: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(x, 1024)[::512]
    spec = np.abs(np.fft.rfft(frames * np.hanning(1024), axis=1)).mean(axis=0)
    return 20 * np.log10(spec + 1e-9)


def spectral_distance_db(a: np.ndarray, b: np.ndarray) -> float:
    """RMS difference of the level-matched average log spectra (dB), 50 Hz - 7 kHz."""
    band = slice(4, 448)
    da, db = _log_spectrum(a)[band], _log_spectrum(b)[band]
    return float(np.sqrt(np.mean(((da - da.mean()) - (db - db.mean())) ** 2)))


def lufs(x: np.ndarray) -> float:
    import pyloudnorm as pyln

    return float(pyln.Meter(SR).integrated_loudness(x.astype(np.float64)))


def test_sampled_chains_are_seeded_and_sides_never_share_a_piano():
    assert resolve_chain("train-3") == resolve_chain("train-3")
    assert resolve_chain("train-3") != resolve_chain("train-4")
    train_fonts = {resolve_chain(f"train-{i}").soundfont for i in range(12)}
    eval_fonts = {resolve_chain(f"eval-{i}").soundfont for i in range(12)}
    assert train_fonts <= {find_soundfont(f) for f in TRAIN_SOUNDFONTS}
    assert eval_fonts <= {find_soundfont(f) for f in EVAL_SOUNDFONTS}
    assert not train_fonts & eval_fonts
    assert chain_side("eval-2") == "eval" and chain_side(DRY) == "train"
    assert resolve_chain("train-1").chain_id.startswith("train-1-")
    with pytest.raises(ValueError, match="unknown recording chain"):
        resolve_chain("hall")


def test_chain_output_is_deterministic_per_seed(piano):
    chain = resolve_chain("eval-5").model_copy(update={"soundfont": None})
    a, b = apply_chain(piano, SR, chain), apply_chain(piano, SR, chain)
    np.testing.assert_array_equal(a, b)
    other = resolve_chain("eval-6").model_copy(update={"soundfont": None})
    assert spectral_distance_db(a, apply_chain(piano, SR, other)) > 0.5


def test_dry_chain_changes_nothing_but_the_peak_guard(piano):
    out = apply_chain(piano, SR, ChainSpec(name=DRY))
    np.testing.assert_allclose(out, piano, atol=1e-6)


@pytest.mark.parametrize(
    "update, min_distance_db",
    [
        (
            {
                "room": RoomSpec(
                    rt60_s=1.5, dims_m=(20, 15, 8), source_m=(5, 5, 1.2), mic_m=(14, 8, 1.7)
                )
            },
            1.0,
        ),
        ({"eq": EqSpec(low_shelf_db=6.0, high_shelf_db=-9.0)}, 2.0),
        ({"eq": EqSpec(peak_hz=1000.0, peak_db=6.0, peak_q=1.0)}, 1.0),
        ({"noise_snr_db": 10.0}, 1.0),
        ({"mp3_vbr_quality": 9.0}, 0.3),
    ],
)
def test_each_chain_part_changes_the_spectrum_by_a_measured_amount(piano, update, min_distance_db):
    dry = apply_chain(piano, SR, ChainSpec(name=DRY))
    out = apply_chain(piano, SR, ChainSpec(name="t", **update))
    assert out.shape == dry.shape and out.dtype == np.float32
    assert spectral_distance_db(out, dry) > min_distance_db


def test_loudness_normalisation_reaches_its_target(piano):
    quiet = apply_chain(piano, SR, ChainSpec(name="t", lufs=-32.0))
    loud = apply_chain(piano, SR, ChainSpec(name="t", lufs=-20.0))
    assert lufs(quiet) == pytest.approx(-32.0, abs=0.5)
    assert lufs(loud) - lufs(quiet) == pytest.approx(12.0, abs=1.0)


def test_soundfont_changes_the_rendered_piano():
    midi = make_score(bars=2, tempo=160)
    a = render_midi(
        midi, RenderConfig(sample_rate=SR, soundfont=find_soundfont(TRAIN_SOUNDFONTS[0]))
    )
    b = render_midi(
        midi, RenderConfig(sample_rate=SR, soundfont=find_soundfont(EVAL_SOUNDFONTS[0]))
    )
    n = min(len(a), len(b), 3 * SR)
    assert spectral_distance_db(a[:n], b[:n]) > 2.0


def test_chains_reject_bad_names_and_silence():
    with pytest.raises(ValueError):
        RenderConfig(chains=["studio"])
    with pytest.raises(ValueError):
        RenderConfig(chains=["dry", "dry"])
    with pytest.raises(ValueError, match="silence"):
        apply_chain(np.zeros(SR, dtype=np.float32), SR, ChainSpec(name="t", lufs=-20))


def test_chain_plan_renders_eval_chains_for_held_out_pieces_only(tmp_path):
    from mess_ray.render.sources import list_score_refs

    root = make_asap_folder(tmp_path / "asap")
    refs = list_score_refs(RenderConfig(source="asap", source_path=str(root)))
    plan = plan_tracks(refs, [])
    bare = chain_plan(plan, [DRY], [], set())
    assert [t for _, _, t, _ in bare] == [t for _, _, t in plan]
    held = {refs[0].piece_id}
    full = chain_plan(plan, [DRY, "train-1"], ["eval-1"], held)
    for ref, _, tid, chain in full:
        assert tid.endswith(f"__{chain}")
        assert chain != "eval-1" or ref.piece_id in held
    assert len(full) == 2 * len(plan) + sum(r.piece_id in held for r in refs)


def test_train_piece_chains_render_training_pieces_only(tmp_path):
    from mess_ray.render.sources import list_score_refs

    root = make_asap_folder(tmp_path / "asap")
    refs = list_score_refs(RenderConfig(source="asap", source_path=str(root)))
    plan = plan_tracks(refs, [])
    held = {refs[0].piece_id}
    full = chain_plan(plan, [DRY], ["eval-1"], held, ["train-1", "train-2"])
    for ref, _, tid, chain in full:
        assert tid.endswith(f"__{chain}")
        if chain.startswith("train-"):
            assert ref.piece_id not in held
        if chain.startswith("eval-"):
            assert ref.piece_id in held
    n_held = sum(r.piece_id in held for r in refs)
    assert len(full) == len(plan) + n_held + 2 * (len(plan) - n_held)
    # without eval chains, training-piece chains alone still give every track a chain suffix
    assert all(
        t.endswith(f"__{c}") for _, _, t, c in chain_plan(plan, [DRY], [], held, ["train-1"])
    )


def test_train_piece_chains_are_validated():
    assert RenderConfig(train_piece_chains=["train-3"]).train_piece_chains == ["train-3"]
    with pytest.raises(ValueError, match="training-side"):
        RenderConfig(train_piece_chains=["eval-1"])
    with pytest.raises(ValueError, match="training-side"):
        RenderConfig(train_piece_chains=["dry"])
    with pytest.raises(ValueError, match="already"):
        RenderConfig(chains=["dry", "train-1"], train_piece_chains=["train-1"])


def test_run_render_records_every_chain_in_the_catalog(ray_local, tmp_path):
    root = make_asap_folder(tmp_path / "asap")
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path / 'store'}",
            "render.source=asap",
            f"render.source_path={root}",
            f"render.sample_rate={SR}",
            "render.max_duration_s=2",
        ],
    )
    cfg.render.chains = [DRY, "train-2"]
    cfg.render.eval_chains = ["eval-1"]
    storage = Storage.from_config(cfg.storage)
    manifest = run_render(cfg, storage)
    rows = read_catalog(storage).to_pylist()
    assert manifest["counts"]["failed"] == 0
    by_perf: dict[str, set[str]] = {}
    for row in rows:
        chain = json.loads(row["chain_json"])
        assert row["track_id"] == f"{row['performance_id']}__{chain['name']}"
        assert row["chain_id"] == ChainSpec(
            **{**chain, "soundfont": chain["soundfont"]}
        ).chain_id or row["chain_id"].startswith(chain["name"])
        if chain["name"] != DRY:
            assert chain["room"]["rt60_s"] > 0 and chain["lufs"] is not None
        by_perf.setdefault(row["performance_id"], set()).add(chain["name"])
    assert all({DRY, "train-2"} <= names for names in by_perf.values())
    assert any("eval-1" in names for names in by_perf.values())
    # one performance, several chains: same notes (same MIDI), different audio
    perf = next(p for p, n in by_perf.items() if "eval-1" in n)
    midis = {
        r["track_id"]: pretty_midi.PrettyMIDI(
            str(storage.path("render", manifest["version"], r["midi_path"]))
        )
        for r in rows
        if r["performance_id"] == perf
    }
    notes = [
        sorted((n.start, n.pitch) for i in m.instruments for n in i.notes) for m in midis.values()
    ]
    assert all(n == notes[0] for n in notes)
