"""Per-recording spectral equalisation removes a chain's filter and gain, keeps the dynamics."""

import numpy as np
import pedalboard as pb
import pytest

from mess_ray.spectral_eq import apply_gain_db, band_matrix, equalise_tracks, long_term_db

SR = 16000


def _recording(seed: int = 0, seconds: float = 12.0) -> np.ndarray:
    """Decaying partials struck every 1.5 s, quiet first half and loud second half."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    tone = sum(np.sin(2 * np.pi * f * t) for f in (220, 440, 660, 1320, 2640, 5280))
    x = tone * np.exp(-(t % 1.5) * 3) * np.where(t < seconds / 2, 0.2, 1.0)
    return (x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _segments(x: np.ndarray) -> np.ndarray:
    return np.stack([x[i : i + 4 * SR] for i in range(0, x.size - 4 * SR + 1, 2 * SR)])


def _chain(x: np.ndarray) -> np.ndarray:
    board = pb.Pedalboard(
        [
            pb.LowShelfFilter(cutoff_frequency_hz=200, gain_db=6),
            pb.PeakFilter(cutoff_frequency_hz=1500, gain_db=-6, q=1),
            pb.HighShelfFilter(cutoff_frequency_hz=5000, gain_db=-9),
            pb.Gain(gain_db=-8),
        ]
    )
    return board(x[None], SR)[0].astype(np.float32)


def test_equalising_removes_a_chains_eq_and_gain():
    x = _recording()
    a, b = _segments(x), _segments(_chain(x))
    before = np.abs(long_term_db(a, SR) - long_term_db(b, SR)).mean()
    eq, reference = equalise_tracks(np.concatenate([a, b]), ["dry"] * len(a) + ["eq"] * len(b), SR)
    after = np.abs(long_term_db(eq[: len(a)], SR) - long_term_db(eq[len(a) :], SR)).mean()
    assert before > 5.0
    assert after < 0.5
    assert reference.shape == long_term_db(a, SR).shape
    assert eq.shape == (2 * len(a), a.shape[1]) and eq.dtype == np.float32


def test_equalising_keeps_the_dynamics_within_a_recording():
    x = _recording()
    segs = _segments(x)
    eq, _ = equalise_tracks(segs, ["t"] * len(segs), SR)
    rms = lambda s: np.sqrt((s.astype(np.float64) ** 2).mean(axis=1))  # noqa: E731
    # quiet first half, loud second half: the level ratio between segments survives
    ratio_before = rms(segs)[-1] / rms(segs)[0]
    ratio_after = rms(eq)[-1] / rms(eq)[0]
    assert ratio_before > 3
    assert ratio_after == pytest.approx(ratio_before, rel=0.05)


def test_a_given_reference_is_used_and_each_track_is_equalised_on_its_own():
    a, b = _segments(_recording(0)), _segments(_chain(_recording(1)))
    ref = long_term_db(a, SR)
    eq, used = equalise_tracks(np.concatenate([a, b]), [1] * len(a) + [2] * len(b), SR, ref)
    assert np.array_equal(used, ref)
    assert np.abs(long_term_db(eq[len(a) :], SR) - ref).mean() < 0.5
    assert np.abs(eq[: len(a)] - a).max() < 0.02  # already at the reference: nearly untouched


def test_zero_gain_is_the_identity_and_bands_average():
    x = _segments(_recording())[:2]
    bins = 1024 // 2 + 1
    assert np.allclose(apply_gain_db(x, np.zeros(bins)), x, atol=1e-5)
    m = band_matrix(1024, SR, 3.0)
    assert m.shape == (bins, bins) and np.allclose(m.sum(axis=1), 1.0)


def test_rows_and_track_ids_must_match():
    with pytest.raises(ValueError, match="one track id per row"):
        equalise_tracks(np.zeros((3, 1000), np.float32), ["a", "b"], SR)


def test_equalise_benchmark_scores_every_system_raw_and_equalised(tmp_path, capsys, monkeypatch):
    import json

    from helpers import tiny_config, write_asap_ingest

    import mess_ray.spectral_eq as spectral_eq
    from benchmarks import protocol_equalise
    from mess_ray.storage import Storage

    calls = []  # (segments, reference given): the evaluated set, then the head's training set

    def spy(audio, track_ids, *args, **kwargs):
        given = kwargs.get("reference_db", args[1] if len(args) > 1 else None)
        calls.append((len(audio), given is not None))
        return equalise_tracks(audio, track_ids, *args, **kwargs)

    monkeypatch.setattr(spectral_eq, "equalise_tracks", spy)

    cfg = tiny_config(str(tmp_path / "store"), audio={"sample_rate": SR})
    write_asap_ingest(
        Storage.from_config(cfg.storage),
        tmp_path / "asap",
        cfg.audio.window_s,
        cfg.audio.hop_s,
        pianists=True,
        pieces=8,
    )
    (tmp_path / "c.yaml").write_text("model:\n  size: tiny\n")
    sets = [f"storage.root={cfg.storage.root}", f"audio.sample_rate={SR}"]
    sets += [f"audio.window_s={cfg.audio.window_s}", f"audio.hop_s={cfg.audio.hop_s}"]
    sets += ["eval.holdout_fraction=0.6", "eval.bootstrap_samples=100"]
    model = "shipped:tiny-asap-v3"  # declares query lags: searched with them, as served
    args = ["--config", str(tmp_path / "c.yaml"), "--model", model, "--per-octave", "1", "3"]
    args += ["--compare", "random", "--reference", "random+eq1"]
    assert protocol_equalise.main([*args, *sum((["--set", s] for s in sets), [])]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    figures = [r for r in rows if r["figure"] == "protocol_equalise"]
    systems = {r["system"] for r in figures}
    for name in (model, "random", "descriptors", "chroma", "mfcc", "descriptor_head"):
        assert {name, f"{name}+eq1", f"{name}+eq3"} <= systems
    assert "chance" in systems and {r["split"] for r in figures} == {"validation"}
    assert {r["reference"] for r in figures if r.get("reference")} == {"random+eq1"}
    run = next(r for r in rows if r["figure"] == "protocol_equalise_run")
    assert run["per_octave"] == [1.0, 3.0] and run["segments"] > 0
    by = {(r["task"], r["chains"], r["metric"], r["system"]): r["value"] for r in figures}
    raw = [v for k, v in by.items() if k[3] == model]
    eq = [by[(*k[:3], f"{model}+eq1")] for k in by if k[3] == model]
    assert raw != eq  # the equalised audio is what the model heard
    # per setting: the evaluated segments (their own reference), then the head's training
    # segments equalised to that same reference
    assert [given for _, given in calls] == [False, True, False, True]
    assert calls[0][0] == run["segments"] and calls[1][0] > 0


def test_equalised_store_rewrites_the_ingest_audio_and_keeps_every_segment(tmp_path, capsys):
    import pyarrow.parquet as pq
    from helpers import write_asap_ingest

    from benchmarks import equalised_store
    from mess_ray.segments import decode_audio, segment_files
    from mess_ray.storage import Storage

    source = Storage(str(tmp_path / "src"))
    version = write_asap_ingest(source, tmp_path / "asap", 2.0, 1.0, pieces=2)
    dest = str(tmp_path / "eq")
    assert equalised_store.main(["--source", source.root, "--dest", dest]) == 0
    out = Storage(dest)
    eq_version = out.require_latest("ingest")
    manifest = out.read_json(f"ingest/{eq_version}/manifest.json")
    assert manifest["equalised"]["per_octave"] == 1.0 and version in manifest["equalised"]["from"]
    before = pq.read_table(segment_files(source, version)).sort_by("segment_id")
    after = pq.read_table(segment_files(out, eq_version)).sort_by("segment_id")
    assert before.column("segment_id").equals(after.column("segment_id"))
    assert before.drop(["audio"]).equals(after.drop(["audio"]))
    a = np.stack([decode_audio(b) for b in before.column("audio").to_pylist()])
    b = np.stack([decode_audio(x) for x in after.column("audio").to_pylist()])
    assert a.shape == b.shape and not np.allclose(a, b)
    with pytest.raises(SystemExit):  # never over an existing store
        equalised_store.main(["--source", source.root, "--dest", dest])
