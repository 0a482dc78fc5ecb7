"""The content view: chroma features, subsequence alignment and expression curves on generated audio."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SR, melody, render_melody

from mess_ray.content import (
    Features,
    align_passage,
    curve_distance,
    expression_curves,
    feature_hop,
    shingles,
    track_features,
)


@pytest.fixture(scope="module")
def two_tempi():
    tune = melody()
    slow, slow_on = render_melody(tune, 0.5)
    fast, fast_on = render_melody(tune, 0.4, lead_s=1.3, seed=1)
    return tune, (slow, slow_on), (fast, fast_on)


def test_feature_rate_is_the_nearest_cqt_hop():
    assert feature_hop(16000, 20.0) % 64 == 0
    assert abs(16000 / feature_hop(16000, 20.0) - 20.0) < 1.0
    with pytest.raises(ValueError):
        feature_hop(16000, 0)


def test_features_round_trip_through_bytes(two_tempi):
    _, (slow, _), _ = two_tempi
    f = track_features(slow, SR)
    g = Features.from_bytes(f.to_bytes())
    assert g.frames == f.frames and g.rate == pytest.approx(f.rate)
    assert np.allclose(g.chroma, f.chroma, atol=1e-2)
    assert np.allclose(np.linalg.norm(f.chroma[:, 10:-10], axis=0), 1.0, atol=1e-3)


def test_passage_found_in_a_faster_performance_with_small_start_and_end_error(two_tempi):
    _, (slow, slow_on), (fast, fast_on) = two_tempi
    q0, q1 = 10, 30  # the query spans notes 10..29 of the slow version
    query = track_features(slow, SR).slice(slow_on[q0], slow_on[q1])
    result = align_passage(query, track_features(fast, SR))
    assert abs(result.start_s - fast_on[q0]) < 0.15
    assert abs(result.end_s - fast_on[q1]) < 0.15
    assert 0.0 <= result.cost < 0.2


def test_tempo_ratio_is_recovered_from_the_warping_path(two_tempi):
    _, (slow, slow_on), (fast, _) = two_tempi
    query = track_features(slow, SR).slice(slow_on[8], slow_on[36])
    cand = track_features(fast, SR)
    curves = expression_curves(query, cand, align_passage(query, cand))
    inner = curves["tempo"][5:-5]
    assert np.median(inner) == pytest.approx(0.5 / 0.4, rel=0.06)
    self_curves = expression_curves(query, query, None)
    assert np.allclose(self_curves["tempo"], 1.0)


def test_unrelated_music_aligns_with_a_higher_cost(two_tempi):
    _, (slow, slow_on), (fast, _) = two_tempi
    other, _ = render_melody(melody(seed=7), 0.45)
    query = track_features(slow, SR).slice(slow_on[10], slow_on[30])
    same = align_passage(query, track_features(fast, SR)).cost
    different = align_passage(query, track_features(other, SR)).cost
    assert different > same + 0.1


def test_loudness_shape_ranks_the_version_played_alike_first():
    tune = melody(seed=3, notes=40)
    swell = np.linspace(0.3, 1.0, len(tune))  # a crescendo through the passage
    query_audio, on = render_melody(tune, 0.5, loud=swell)
    alike, _ = render_melody(tune, 0.45, loud=swell * 0.7, seed=2)  # quieter overall, same shape
    unlike, _ = render_melody(tune, 0.45, loud=swell[::-1], seed=3)  # a diminuendo
    q = track_features(query_audio, SR).slice(on[5], on[35])
    mine = expression_curves(q, q, None)
    dist = {}
    for name, audio in (("alike", alike), ("unlike", unlike)):
        cand = track_features(audio, SR)
        dist[name] = curve_distance(mine, expression_curves(q, cand, align_passage(q, cand)))
    assert dist["alike"]["loudness"] < dist["unlike"]["loudness"]
    assert dist["alike"]["combined"] < dist["unlike"]["combined"]


def test_bad_input_is_refused_with_a_clear_error(two_tempi):
    _, (slow, _), _ = two_tempi
    f = track_features(slow, SR)
    with pytest.raises(ValueError, match="too short"):
        align_passage(f.slice(1.0, 1.1), f)
    with pytest.raises(ValueError, match="too short"):
        track_features(np.zeros(100, np.float32), SR)
    with pytest.raises(ValueError, match="mono"):
        track_features(np.zeros((2, 32000), np.float32), SR)


def test_shingles_of_the_same_piece_are_closer_than_of_another(two_tempi):
    _, (slow, _), (fast, _) = two_tempi
    other, _ = render_melody(melody(seed=9), 0.5)
    a = shingles(track_features(slow, SR))
    b = shingles(track_features(fast, SR))
    c = shingles(track_features(other, SR))
    assert (a @ b.T).max(axis=1).mean() > (a @ c.T).max(axis=1).mean()


def test_coarse_to_fine_finds_the_same_span_in_a_long_recording(two_tempi):
    tune, (slow, slow_on), (fast, fast_on) = two_tempi
    other, _ = render_melody(melody(seed=5, notes=60), 0.5, seed=4)
    long = np.concatenate([other, fast, other])  # the performance in the middle of 60+ s
    lead = len(other) / SR
    cand = track_features(long, SR)
    query = track_features(slow, SR).slice(slow_on[10], slow_on[30])
    fine = align_passage(query, cand, coarse_factor=1)
    coarse = align_passage(query, cand)
    assert cand.duration_s > 30 and query.frames * 4 < cand.frames  # the coarse pass runs
    assert abs(coarse.start_s - (lead + fast_on[10])) < 0.15
    assert abs(coarse.start_s - fine.start_s) < 0.05 and abs(coarse.end_s - fine.end_s) < 0.05


def test_the_configs_alignment_settings_are_align_passages_defaults():
    # The service and the benchmark pass content.*; other callers get the same tuning by default.
    import inspect

    from mess_ray.config import ContentConfig

    params = inspect.signature(align_passage).parameters
    for name, value in ContentConfig().align_kwargs().items():
        assert params[name].default == value, name


def test_a_higher_step_weight_keeps_the_path_nearer_a_constant_tempo(two_tempi):
    _, (slow, slow_on), (fast, fast_on) = two_tempi
    query = track_features(slow, SR).slice(slow_on[10], slow_on[30])
    cand = track_features(fast, SR)

    def tempo_steps(path):
        steps = np.diff(path, axis=0)
        return int((steps[:, 0] != steps[:, 1]).sum())

    free = align_passage(query, cand, step_weight=1.0)
    stiff = align_passage(query, cand, step_weight=10.0)
    assert tempo_steps(stiff.path) < tempo_steps(free.path)
    assert abs(stiff.start_s - fast_on[10]) < 0.15 and abs(stiff.end_s - fast_on[30]) < 0.15
    with pytest.raises(ValueError, match="step_weight"):
        align_passage(query, cand, step_weight=0.5)
    with pytest.raises(ValueError, match="coarse_factor"):
        align_passage(query, cand, coarse_factor=0)


def test_timelines_of_a_batch_equal_each_segment_computed_alone(monkeypatch):
    """The time-ordered passage vectors are computed a batch of segments per librosa call (the
    CQT filters are built once per call); every segment must come out as if computed alone,
    loud, quiet and half-silent ones alike, across batch boundaries."""
    import librosa
    from scipy.ndimage import gaussian_filter1d

    import mess_ray.content as content

    monkeypatch.setattr(content, "TIMELINE_BATCH", 3)
    rng = np.random.default_rng(0)
    t = np.arange(int(2.0 * SR)) / SR
    audio = np.stack(
        [
            sum(
                np.sin(2 * np.pi * f * t) * np.exp(-t * (1 + i % 3))
                for f in rng.uniform(60, 2e3, 4)
            )
            for i in range(7)
        ]
    ).astype(np.float32)
    audio += 1e-3 * rng.standard_normal(audio.shape).astype(np.float32)
    audio[1] *= 1e-3  # quiet: the silence floor is the segment's own, not the batch's
    audio[4, : len(t) // 2] = 0.0

    chroma = content.chroma_timeline(audio, SR, 20.0)
    alone = [content.centred(track_features(x, SR, 20.0).chroma).ravel() for x in audio]
    # Equal to float32 rounding: a batched FFT may take another SIMD path than a single row's
    # on some CPUs (3e-7 apart on one machine, bit-identical on others).
    np.testing.assert_allclose(chroma, np.stack(alone), rtol=0, atol=2e-6)

    hop = round(SR / 50.0)
    onset = content.onset_timeline(audio, SR, 50.0)
    for x, row in zip(audio, onset):
        env = librosa.onset.onset_strength(y=x, sr=SR, hop_length=hop, n_mels=64)
        env = gaussian_filter1d(np.log1p(env), content.TIMELINE_ONSET_SMOOTH_S * SR / hop)
        np.testing.assert_allclose(row, env - env.mean(), atol=1e-5)
    assert np.abs(onset[1]).max() > 0.01  # the quiet segment keeps its own envelope
    with pytest.raises(ValueError, match="too short"):
        content.chroma_timeline(audio[:, :100], SR)


def test_a_delayed_recording_lines_up_at_the_query_lag_that_undoes_the_delay():
    """A recording chain delays the sound (a far microphone, a codec): the timelines of the
    same passage recorded 60 ms later agree best once the query is moved by that lag, and
    ``timeline_variants`` gives the timelines of the shifted audio: read from one padded
    computation where the lags fit its grid (equal but for a window's edges), computed lag by
    lag where they do not (exactly)."""
    import mess_ray.content as content

    assert content.query_shifts_ms(60, 20) == (0.0, -20.0, 20.0, -40.0, 40.0, -60.0, 60.0)
    assert content.query_shifts_ms(0, 20) == (0.0,)
    with pytest.raises(ValueError):
        content.query_shifts_ms(50, 0)
    x = np.arange(1, 6, dtype=np.float32)[None]
    np.testing.assert_array_equal(content.shift_segments(x, 2), [[3, 4, 5, 0, 0]])
    np.testing.assert_array_equal(content.shift_segments(x, -2), [[0, 0, 1, 2, 3]])
    np.testing.assert_array_equal(content.shift_segments(x, 9), [[0, 0, 0, 0, 0]])

    y, _ = render_melody(melody(seed=3), 0.3)
    n, lag = 4 * SR, int(0.06 * SR)
    early = y[SR : SR + n].astype(np.float32)
    late = y[SR - lag : SR - lag + n].astype(np.float32)  # the same moment 60 ms later
    shifts = content.query_shifts_ms(100, 20)
    samples = [int(round(ms * SR / 1000)) for ms in shifts]
    variants = content.timeline_variants(late[None], SR, shifts)
    assert variants.shape[:2] == (len(shifts), 1)
    k = shifts.index(60.0)
    each = np.stack([content.timelines(content.shift_segments(late[None], s), SR) for s in samples])
    cos = (
        np.sum(variants * each, -1)
        / np.linalg.norm(variants, axis=-1)
        / np.linalg.norm(each, axis=-1)
    )
    assert cos.min() > 0.995, cos.ravel()
    np.testing.assert_allclose(variants[0], each[0], atol=1e-3)
    exact = content.timeline_variants(late[None], SR, shifts, on_grid=False)
    np.testing.assert_allclose(exact, each, atol=1e-6)
    # 20 ms lags at 16 kHz: both timelines on a grid (the CQT's every 64 samples, the onsets')
    assert content._lagged_chroma(late[None], SR, samples, content.TIMELINE_CHROMA_RATE) is not None
    assert content._lagged_onsets(late[None], SR, samples, content.TIMELINE_ONSET_RATE) is not None
    # 7 ms lags fit no CQT grid (its hop divides by 64 samples): computed lag by lag, exactly.
    odd = content.timeline_variants(late[None], SR, (0.0, 7.0, -7.0))
    for v, ms in zip(odd, (0.0, 7.0, -7.0)):
        moved = content.shift_segments(late[None], int(round(ms * SR / 1000)))
        np.testing.assert_allclose(v, content.timelines(moved, SR), atol=1e-6)
    target = content.timelines(early[None], SR)[0]
    cos = variants[:, 0] @ target / np.linalg.norm(variants[:, 0], axis=1) / np.linalg.norm(target)
    assert int(np.argmax(cos)) == k
    assert cos[k] > cos[0] + 0.2


def test_the_chain_lag_benchmark_measures_a_known_delay_between_two_recordings():
    """``benchmarks.chain_lag``: the onset envelopes of a passage and of the same passage 35 ms
    later cross-correlate best at 35 ms (7 frames at 200 per second), whichever is first."""
    from benchmarks.chain_lag import ENVELOPE_RATE, best_lag
    from mess_ray.content import onset_timeline

    y, _ = render_melody(melody(seed=4), 0.3)
    n, lag = 4 * SR, int(0.035 * SR)
    early = y[SR : SR + n].astype(np.float32)
    late = y[SR - lag : SR - lag + n].astype(np.float32)
    env = onset_timeline(np.stack([early, late]), SR, rate=ENVELOPE_RATE, smooth_s=0.0)
    frames = round(0.035 * ENVELOPE_RATE)
    assert best_lag(env[0], env[1], 40) == frames
    assert best_lag(env[1], env[0], 40) == -frames
