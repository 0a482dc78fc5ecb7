"""MIDI descriptors on hand-built performances whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pretty_midi
import pytest

from mess_ray.midi_descriptors import (
    MIDI_DESCRIPTOR_NAMES,
    beat_descriptors,
    beat_position,
    beat_time,
    chord_onsets,
    midi_descriptor_vector,
    midi_descriptors,
    pedal_fraction,
    read_beat_annotations,
)


def performance(onsets, durations, velocities, pitches=None, pedal=()) -> pretty_midi.PrettyMIDI:
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    pitches = pitches or [60 + i % 12 for i in range(len(onsets))]
    for t, d, v, p in zip(onsets, durations, velocities, pitches):
        piano.notes.append(pretty_midi.Note(int(v), int(p), float(t), float(t + d)))
    for time, value in pedal:
        piano.control_changes.append(pretty_midi.ControlChange(64, value, time))
    midi.instruments.append(piano)
    return midi


def test_velocity_level_range_and_slope():
    onsets = np.arange(10) * 0.5
    crescendo = performance(onsets, [0.4] * 10, 40 + 5 * np.arange(10))  # +5 per 0.5 s = 10 per s
    d = midi_descriptors(crescendo, 0.0, 5.0)
    assert d["velocity_mean"] == pytest.approx(62.5)
    assert d["velocity_slope_per_s"] == pytest.approx(10.0)
    assert d["velocity_range"] == pytest.approx(
        np.percentile(40 + 5 * np.arange(10), 95) - np.percentile(40 + 5 * np.arange(10), 5)
    )
    assert d["note_rate_hz"] == pytest.approx(2.0)
    # Only notes that start inside the span count.
    assert midi_descriptors(crescendo, 0.0, 1.0)["velocity_mean"] == pytest.approx(42.5)


def test_articulation_ratio_is_sounding_duration_over_ioi():
    onsets = np.arange(8) * 0.5
    staccato = performance(onsets, [0.1] * 8, [64] * 8)
    legato = performance(onsets, [0.6] * 8, [64] * 8)
    assert midi_descriptors(staccato, 0.0, 4.0)["articulation_ratio"] == pytest.approx(0.2)
    assert midi_descriptors(legato, 0.0, 4.0)["articulation_ratio"] == pytest.approx(1.2)
    # A chord is one onset: its notes' IOI is to the next chord, not to each other.
    chords = performance([0, 0.01, 1.0, 1.01, 2.0], [0.5, 0.5, 0.5, 0.5, 0.5], [64] * 5)
    assert midi_descriptors(chords, 0.0, 3.0)["articulation_ratio"] == pytest.approx(0.5, abs=0.01)


def test_timing_deviation_is_zero_for_steady_and_positive_for_rubato():
    steady = performance(np.arange(8) * 0.5, [0.4] * 8, [64] * 8)
    assert midi_descriptors(steady, 0.0, 4.0)["timing_deviation"] == pytest.approx(0.0, abs=1e-9)
    iois = np.array([0.4, 0.6, 0.4, 0.6, 0.4, 0.6])
    uneven = performance(np.concatenate([[0], np.cumsum(iois)]), [0.3] * 7, [64] * 7)
    assert midi_descriptors(uneven, 0.0, 4.0)["timing_deviation"] == pytest.approx(
        iois.std() / iois.mean()
    )


def test_pedal_fraction_from_cc64_intervals():
    midi = performance([0.0, 1.0], [0.5, 0.5], [64, 64], pedal=[(1.0, 127), (2.0, 0), (3.0, 100)])
    assert pedal_fraction(midi, 0.0, 4.0) == pytest.approx(0.5)  # down 1-2 s and from 3 s on
    assert pedal_fraction(midi, 1.5, 2.5) == pytest.approx(0.5)
    assert pedal_fraction(performance([0.0], [1.0], [64]), 0.0, 1.0) == 0.0


def test_tempo_relative_to_the_score_and_rubato_from_beats():
    score = np.arange(9) * 0.5  # written: 120 bpm
    steady_slow = np.arange(9) * 0.6 + 1.0  # played at 100 bpm throughout, starting at 1 s
    d = beat_descriptors(steady_slow, 0.0, 10.0, score)
    assert d["tempo_bpm"] == pytest.approx(100.0)
    assert d["tempo_ratio_to_score"] == pytest.approx(0.5 / 0.6)
    assert d["rubato"] == pytest.approx(0.0, abs=1e-12)
    swaying = np.concatenate([[0.0], np.cumsum([0.4, 0.6, 0.4, 0.6, 0.4, 0.6, 0.4, 0.6])])
    d2 = beat_descriptors(swaying, 0.0, 10.0, score)
    assert d2["tempo_ratio_to_score"] == pytest.approx(1.0)
    assert d2["rubato"] == pytest.approx(np.log2(np.array([0.8, 1.2] * 4)).std())
    # Only beats inside the span; fewer than two there: undefined, not 0.
    assert math.isnan(beat_descriptors(steady_slow, 0.0, 1.5, score)["tempo_bpm"])
    assert math.isnan(beat_descriptors(None, 0.0, 1.0)["tempo_ratio_to_score"])
    with pytest.raises(ValueError, match="one to one"):
        beat_descriptors(steady_slow, 0.0, 10.0, score[:5])


def test_beat_position_and_time_are_inverse_and_extrapolate():
    beats = np.array([1.0, 1.5, 2.0, 3.0])
    assert beat_position(np.array([1.0, 1.25, 2.5, 3.0]), beats) == pytest.approx([0, 0.5, 2.5, 3])
    assert beat_position(np.array([0.0, 4.0]), beats) == pytest.approx([-2.0, 4.0])
    times = np.array([0.0, 1.1, 2.7, 4.5])
    assert beat_time(beat_position(times, beats), beats) == pytest.approx(times)
    with pytest.raises(ValueError):
        beat_position(np.array([1.0]), np.array([1.0]))


def test_vector_order_empty_span_and_bad_input():
    midi = performance([0.0, 0.5], [0.4, 0.4], [50, 70])
    vec = midi_descriptor_vector(midi, 0.0, 1.0)
    assert vec.shape == (len(MIDI_DESCRIPTOR_NAMES),)
    assert dict(zip(MIDI_DESCRIPTOR_NAMES, vec))["velocity_mean"] == 60
    empty = midi_descriptors(midi, 5.0, 6.0)
    assert empty["note_rate_hz"] == 0 and math.isnan(empty["velocity_mean"])
    with pytest.raises(ValueError, match="span"):
        midi_descriptors(midi, 1.0, 1.0)


def test_chord_onsets_and_annotation_parsing():
    assert chord_onsets(np.array([1.0, 0.0, 0.02, 1.01, 2.5])) == pytest.approx([0.0, 1.0, 2.5])
    text = "0.846354\t0.846354\tb,,7\n1.4375\t1.4375\tb\n2.085938\t2.085938\tdb,4/4\n\n"
    assert read_beat_annotations(text) == pytest.approx([0.846354, 1.4375, 2.085938])
    with pytest.raises(ValueError, match="time"):
        read_beat_annotations("beat\tx\n")
    with pytest.raises(ValueError, match="increasing"):
        read_beat_annotations("1.0\t1.0\tb\n0.5\t0.5\tb\n")
