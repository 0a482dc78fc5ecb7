"""Audio descriptors respond to the expressive dimension each one is meant to measure."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ray.descriptors import (
    DESCRIPTOR_NAMES,
    describe,
    descriptor_embeddings,
    descriptor_vector,
    zscore,
)

SR = 16000


def notes(
    rate_hz: float, amplitude: float = 0.3, seconds: float = 4.0, seed: int = 0
) -> np.ndarray:
    """Decaying harmonic notes (piano-like) at a steady rate, with attack and release ramps."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int((seconds + 1) * SR))
    for j, start in enumerate(np.arange(0.05, seconds, 1 / rate_hz)):
        length = int(0.6 * SR)
        t = np.arange(length) / SR
        env = np.minimum(t / 0.005, 1) * np.exp(-t / 0.3) * np.minimum((t[-1] - t) / 0.05, 1)
        f0 = 220 * 2 ** ((j % 7) / 12)
        i = int(start * SR)
        out[i : i + length] += (
            amplitude * env * sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6))
        )
    return out[: int(seconds * SR)] + 1e-4 * rng.standard_normal(int(seconds * SR))


def clicks(rate_hz: float, seconds: float = 4.0) -> np.ndarray:
    out = np.zeros(int((seconds + 1) * SR))
    n = int(0.03 * SR)
    click = np.exp(-np.arange(n) / (0.005 * SR)) * np.sin(2 * np.pi * 800 * np.arange(n) / SR)
    for start in np.arange(0.1, seconds, 1 / rate_hz):
        out[int(start * SR) : int(start * SR) + n] += 0.5 * click
    return out[: int(seconds * SR)]


def test_vector_has_one_value_per_name():
    vec = descriptor_vector(notes(3), SR)
    assert vec.shape == (len(DESCRIPTOR_NAMES),)
    assert np.all(np.isfinite(vec))
    assert dict(zip(DESCRIPTOR_NAMES, vec)) == pytest.approx(describe(notes(3), SR))


def test_louder_audio_has_higher_loudness_mean():
    quiet, loud = describe(notes(3, 0.05), SR), describe(notes(3, 0.5), SR)
    assert loud["loudness_mean_db"] > quiet["loudness_mean_db"] + 15  # 10x amplitude = +20 dB


def test_crescendo_has_positive_slope_and_diminuendo_negative():
    t = np.arange(4 * SR) / SR
    tone = np.sin(2 * np.pi * 440 * t)
    ramp = np.linspace(0.01, 1.0, t.size)
    assert describe(ramp * tone, SR)["loudness_slope_db_per_s"] > 5
    assert describe(ramp[::-1] * tone, SR)["loudness_slope_db_per_s"] < -5
    assert abs(describe(0.3 * tone, SR)["loudness_slope_db_per_s"]) < 0.5


@pytest.mark.parametrize("make", [clicks, notes])
def test_more_onsets_per_second_give_higher_onset_rate(make):
    rates = [describe(make(r), SR)["onset_rate_hz"] for r in (1, 2, 4, 8)]
    assert rates == sorted(rates) and len(set(rates)) == 4
    assert rates[1] == pytest.approx(2.0, abs=0.5) and rates[3] == pytest.approx(8.0, abs=1.0)


def test_steady_sounds_have_no_onsets():
    rng = np.random.default_rng(0)
    t = np.arange(4 * SR) / SR
    assert describe(0.2 * np.sin(2 * np.pi * 330 * t), SR)["onset_rate_hz"] <= 0.5
    assert describe(0.1 * rng.standard_normal(t.size), SR)["onset_rate_hz"] <= 0.5


def test_steady_timing_is_more_stable_than_irregular_timing():
    rng = np.random.default_rng(3)
    steady = clicks(4)
    irregular = np.zeros(5 * SR)
    n = int(0.03 * SR)
    click = np.exp(-np.arange(n) / (0.005 * SR)) * np.sin(2 * np.pi * 800 * np.arange(n) / SR)
    for start in np.cumsum(rng.uniform(0.1, 0.5, size=12)):
        irregular[int(start * SR) : int(start * SR) + n] += 0.5 * click
    assert describe(irregular[: 4 * SR], SR)["ioi_cv"] > describe(steady, SR)["ioi_cv"] + 0.2


def test_brighter_noise_has_higher_centroid():
    rng = np.random.default_rng(0)
    noise = 0.1 * rng.standard_normal(4 * SR)
    high_passed = np.diff(noise, prepend=0.0)  # first difference: +6 dB/octave tilt
    low_passed = np.convolve(noise, np.ones(8) / 8, mode="same")
    centroids = [describe(x, SR)["centroid_mean_hz"] for x in (low_passed, noise, high_passed)]
    assert centroids == sorted(centroids) and centroids[2] > centroids[1] + 500


def test_silence_and_short_input_are_finite():
    assert np.all(np.isfinite(descriptor_vector(np.zeros(SR), SR)))
    assert np.all(np.isfinite(descriptor_vector(np.full(100, 0.1), SR)))


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="mono"):
        describe(np.zeros((2, 100)), SR)
    with pytest.raises(ValueError, match="NaN"):
        describe(np.array([0.0, np.nan]), SR)
    with pytest.raises(ValueError, match="at least one sample"):
        describe(np.zeros(0), SR)


def test_zscore_and_baseline_embeddings():
    matrix = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    z, mean, std = zscore(matrix)
    np.testing.assert_allclose(z[:, 0], [-1.2247449, 0, 1.2247449], rtol=1e-6)
    np.testing.assert_allclose(z[:, 1], 0)  # constant column: no division by zero
    emb = descriptor_embeddings([notes(2, 0.05), notes(8, 0.5), notes(2, 0.06, seed=1)], SR)
    assert emb.shape == (3, len(DESCRIPTOR_NAMES)) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    # The two slow quiet passages are closer to each other than to the fast loud one.
    assert emb[0] @ emb[2] > emb[0] @ emb[1]


def held_notes(hold_fraction: float, rate_hz: float = 2.0, seconds: float = 4.0) -> np.ndarray:
    """Organ-like notes at a steady rate, each sounding for ``hold_fraction`` of the
    inter-onset interval (0.2: staccato, 1.0: legato), with a 10 ms attack and a 40 ms damper release."""
    out = np.zeros(int((seconds + 1) * SR))
    ioi = 1 / rate_hz
    for j, start in enumerate(np.arange(0.05, seconds, ioi)):
        length = int(hold_fraction * ioi * SR)
        t = np.arange(length + int(0.4 * SR)) / SR
        env = np.minimum(t / 0.01, 1) * np.where(
            t < length / SR, 1.0, np.exp(-(t - length / SR) / 0.04)
        )
        f0 = 262 * 2 ** ((j % 5) * 2 / 12)
        i = int(start * SR)
        out[i : i + t.size] += (
            0.2 * env * sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 4))
        )
    return out[: int(seconds * SR)]


def test_sustain_ratio_orders_staccato_below_legato():
    ratios = [describe(held_notes(f), SR)["sustain_ratio"] for f in (0.15, 0.4, 0.7, 1.0)]
    assert ratios == sorted(ratios) and len(set(ratios)) == 4
    assert ratios[0] < 0.35 and ratios[-1] > 0.85
    # the held fraction plus the ~0.05 s the 40 ms release takes to fall 10 dB (0.1 of a 0.5 s IOI)
    assert ratios[1] == pytest.approx(0.4 + 0.1, abs=0.06)


def test_sustain_ratio_of_a_held_tone_is_one_and_of_silence_defined():
    t = np.arange(2 * SR) / SR
    assert describe(0.3 * np.sin(2 * np.pi * 440 * t), SR)["sustain_ratio"] == pytest.approx(1.0)
    assert np.isfinite(describe(np.zeros(SR), SR)["sustain_ratio"])


def test_sustain_ratio_from_a_hand_made_envelope():
    from mess_ray.descriptors import sustain_ratio

    # 100 frames/s; onsets at 0 and 50; first note holds 0 dB for 20 frames then drops to -40 dB,
    # the second holds for all of its 50 frames (the last note is followed to the end).
    env = np.full(100, -40.0)
    env[:20] = 0.0
    env[50:] = -3.0
    assert sustain_ratio(env, np.array([0, 50]), 100.0) == pytest.approx((20 / 50 + 1.0) / 2)
    with pytest.raises(ValueError):
        sustain_ratio(np.zeros(0), np.array([0]), 100.0)


def test_facet_descriptors_name_known_descriptors_for_every_facet():
    from mess_ray.descriptors import FACET_DESCRIPTORS
    from mess_ray.facets import FACETS

    assert set(FACET_DESCRIPTORS) == set(FACETS)
    for names in FACET_DESCRIPTORS.values():
        assert names and set(names) <= set(DESCRIPTOR_NAMES)
    assert "sustain_ratio" in FACET_DESCRIPTORS["articulation"]


def test_sustain_ratio_orders_fluidsynth_piano_renderings_by_articulation():
    """The real thing: the same two-voice score played staccato to legato on the GM piano."""
    import pretty_midi

    from mess_ray.config import RenderConfig
    from mess_ray.render.expressive import apply_articulation
    from mess_ray.render.synth import render_midi

    score = pretty_midi.PrettyMIDI(initial_tempo=90)
    melody, bass = pretty_midi.Instrument(program=0), pretty_midi.Instrument(program=0)
    beat = 60 / 90
    for i in range(12):
        melody.notes.append(pretty_midi.Note(80, 60 + (i * 7) % 12, i * beat, (i + 1) * beat))
    for i in range(6):
        bass.notes.append(pretty_midi.Note(70, 36 + (i * 5) % 12, 2 * i * beat, 2 * (i + 1) * beat))
    score.instruments += [melody, bass]
    cfg = RenderConfig(sample_rate=SR)
    ratios = []
    for articulation in (0.25, 0.5, 1.0):
        audio = render_midi(apply_articulation(score, articulation), cfg)
        audio = audio if audio.ndim == 1 else audio.mean(axis=1)
        ratios.append(describe(audio[: 6 * SR], SR)["sustain_ratio"])
    assert ratios[0] < ratios[1] - 0.1 and ratios[1] < ratios[2] - 0.1
