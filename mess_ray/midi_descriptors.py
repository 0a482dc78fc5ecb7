"""Expressive descriptors of a passage from its performed MIDI (and beat annotations).

Where a segment has the MIDI that was played (a rendering's expressive MIDI, or a human
performance of a MIDI-aligned corpus such as ASAP), expression can be measured exactly
instead of guessed from audio:

* tempo: performed beats per minute in the passage, and relative to the score (score beat
  span / performed beat span over the same beats: > 1 is faster than written) when the
  performance's beats and the score's beats are annotated one to one (ASAP);
* rubato: how much the beat-to-beat tempo varies within the passage (std of the log2 ratio
  of performed to score beat intervals; with performed beats only, of performed intervals);
* timing deviation: how irregular the inter-onset intervals are (CV of chord-onset IOIs);
* dynamics: velocity level, range (95th - 5th percentile) and slope per second;
* articulation: sounding duration / inter-onset interval (median over notes; < 1 detached,
  > 1 overlapping);
* pedal: the fraction of the passage with the sustain pedal (CC64 >= 64) down.

All functions are pure: a ``pretty_midi.PrettyMIDI`` plus a time span ``[start_s, end_s)``
in the MIDI's own time. Undefined values (no notes, no beats) are NaN, never a made-up 0.
"""

from __future__ import annotations

import math

import numpy as np
import pretty_midi

MIDI_DESCRIPTOR_NAMES: tuple[str, ...] = (
    "tempo_bpm",
    "tempo_ratio_to_score",
    "rubato",
    "timing_deviation",
    "velocity_mean",
    "velocity_range",
    "velocity_slope_per_s",
    "articulation_ratio",
    "pedal_fraction",
    "note_rate_hz",
)

# The descriptors that describe how a passage is played rather than what is played: what
# "expressive proximity" is measured on (note rate and absolute tempo mostly follow the score).
EXPRESSIVE_MIDI_DESCRIPTORS: tuple[str, ...] = (
    "tempo_ratio_to_score",
    "rubato",
    "timing_deviation",
    "velocity_mean",
    "velocity_range",
    "velocity_slope_per_s",
    "articulation_ratio",
    "pedal_fraction",
)

CHORD_WINDOW_S = 0.03  # notes starting this close together are one onset (a chord)
MAX_ARTICULATION = 4.0  # a note held over many later onsets says little more than "held"
SUSTAIN_CC = 64
PEDAL_DOWN = 64


def _check_span(start_s: float, end_s: float) -> None:
    if not (math.isfinite(start_s) and math.isfinite(end_s)) or end_s <= start_s:
        raise ValueError(f"time span must be finite with end > start, got [{start_s}, {end_s})")


def _notes(midi: pretty_midi.PrettyMIDI) -> list[pretty_midi.Note]:
    return [n for inst in midi.instruments if not inst.is_drum for n in inst.notes]


def chord_onsets(starts: np.ndarray, window_s: float = CHORD_WINDOW_S) -> np.ndarray:
    """Sorted distinct onset times: starts within ``window_s`` of a group's first note merge."""
    starts = np.sort(np.asarray(starts, dtype=np.float64))
    groups: list[float] = []
    for t in starts:
        if not groups or t - groups[-1] > window_s:
            groups.append(float(t))
    return np.asarray(groups)


def pedal_fraction(midi: pretty_midi.PrettyMIDI, start_s: float, end_s: float) -> float:
    """Fraction of ``[start_s, end_s)`` with the sustain pedal down (any instrument)."""
    _check_span(start_s, end_s)
    intervals: list[tuple[float, float]] = []
    for inst in midi.instruments:
        events = sorted(
            (c.time, c.value >= PEDAL_DOWN) for c in inst.control_changes if c.number == SUSTAIN_CC
        )
        pressed_at = None
        for time, is_down in events:
            if is_down and pressed_at is None:
                pressed_at = time
            elif not is_down and pressed_at is not None:
                intervals.append((pressed_at, time))
                pressed_at = None
        if pressed_at is not None:
            intervals.append((pressed_at, math.inf))
    if not intervals:
        return 0.0
    # Union of the pedal-down intervals clipped to the span (several instruments may overlap).
    clipped = sorted(
        (max(a, start_s), min(b, end_s)) for a, b in intervals if b > start_s and a < end_s
    )
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return float(total / (end_s - start_s))


def _beat_grid(beats: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Validated beat times, their indices, and the first and last beat intervals (used to
    extrapolate outside the annotated beats)."""
    beats = np.asarray(beats, dtype=np.float64)
    if beats.ndim != 1 or beats.size < 2 or np.any(np.diff(beats) <= 0):
        raise ValueError("beats must be >= 2 strictly increasing times")
    index = np.arange(beats.size, dtype=np.float64)
    return beats, index, float(beats[1] - beats[0]), float(beats[-1] - beats[-2])


def beat_position(times: np.ndarray, beats: np.ndarray) -> np.ndarray:
    """Fractional beat index of each time (0 = first annotated beat), linear between beats and
    extrapolated with the nearest beat interval outside them."""
    beats, index, first, last = _beat_grid(beats)
    times = np.asarray(times, dtype=np.float64)
    pos = np.interp(times, beats, index)
    pos = np.where(times < beats[0], (times - beats[0]) / first, pos)
    return np.where(times > beats[-1], index[-1] + (times - beats[-1]) / last, pos)


def beat_time(positions: np.ndarray, beats: np.ndarray) -> np.ndarray:
    """Inverse of :func:`beat_position`: the time of fractional beat indices."""
    beats, index, first, last = _beat_grid(beats)
    positions = np.asarray(positions, dtype=np.float64)
    t = np.interp(positions, index, beats)
    t = np.where(positions < 0, beats[0] + positions * first, t)
    return np.where(positions > index[-1], beats[-1] + (positions - index[-1]) * last, t)


def beat_descriptors(
    beats: np.ndarray | None, start_s: float, end_s: float, score_beats: np.ndarray | None = None
) -> dict[str, float]:
    """Tempo (bpm), tempo relative to the score and rubato from the beats inside the span."""
    _check_span(start_s, end_s)
    out = {"tempo_bpm": math.nan, "tempo_ratio_to_score": math.nan, "rubato": math.nan}
    if beats is None:
        return out
    beats = np.asarray(beats, dtype=np.float64)
    if score_beats is not None:
        score_beats = np.asarray(score_beats, dtype=np.float64)
        if score_beats.shape != beats.shape:
            raise ValueError(
                f"performance has {beats.size} beats but the score {score_beats.size}: "
                "they must be annotated one to one"
            )
    inside = np.flatnonzero((beats >= start_s) & (beats < end_s))
    if inside.size < 2:
        return out
    performed = np.diff(beats[inside])
    if np.any(performed <= 0):
        raise ValueError("beat times must be strictly increasing")
    out["tempo_bpm"] = float(60.0 / np.mean(performed))
    if score_beats is not None:
        written = np.diff(score_beats[inside])
        valid = written > 0
        if valid.sum() >= 1:
            out["tempo_ratio_to_score"] = float(written[valid].sum() / performed[valid].sum())
            ratios = np.log2(performed[valid] / written[valid])
            out["rubato"] = float(ratios.std()) if ratios.size >= 2 else math.nan
    else:
        out["rubato"] = float(np.log2(performed).std()) if performed.size >= 2 else math.nan
    return out


def midi_descriptors(
    midi: pretty_midi.PrettyMIDI,
    start_s: float,
    end_s: float,
    beats: np.ndarray | None = None,
    score_beats: np.ndarray | None = None,
) -> dict[str, float]:
    """Named descriptors (:data:`MIDI_DESCRIPTOR_NAMES`) of the notes starting in ``[start_s, end_s)``."""
    _check_span(start_s, end_s)
    out = dict.fromkeys(MIDI_DESCRIPTOR_NAMES, math.nan)
    out.update(beat_descriptors(beats, start_s, end_s, score_beats))
    out["pedal_fraction"] = pedal_fraction(midi, start_s, end_s)
    notes = _notes(midi)
    starts_all = np.array([n.start for n in notes], dtype=np.float64)
    inside = [n for n in notes if start_s <= n.start < end_s]
    out["note_rate_hz"] = len(inside) / (end_s - start_s)
    if not inside:
        return out
    starts = np.array([n.start for n in inside])
    velocities = np.array([n.velocity for n in inside], dtype=np.float64)
    out["velocity_mean"] = float(velocities.mean())
    out["velocity_range"] = float(np.percentile(velocities, 95) - np.percentile(velocities, 5))
    out["velocity_slope_per_s"] = (
        float(np.polyfit(starts, velocities, 1)[0])
        if np.ptp(starts) > 0 and len(inside) >= 2
        else math.nan
    )

    # Onsets of the whole piece: a note's IOI may reach past the span's end.
    onsets = chord_onsets(starts_all)
    span_onsets = onsets[(onsets >= start_s) & (onsets < end_s)]
    iois = np.diff(span_onsets)
    out["timing_deviation"] = float(iois.std() / iois.mean()) if iois.size >= 2 else math.nan
    ratios = []
    for note in inside:
        later = np.searchsorted(onsets, note.start + CHORD_WINDOW_S, side="right")
        if later < onsets.size:
            ioi = onsets[later] - note.start
            ratios.append(min((note.end - note.start) / ioi, MAX_ARTICULATION))
    out["articulation_ratio"] = float(np.median(ratios)) if ratios else math.nan
    return out


def midi_descriptor_vector(
    midi: pretty_midi.PrettyMIDI,
    start_s: float,
    end_s: float,
    beats: np.ndarray | None = None,
    score_beats: np.ndarray | None = None,
    names: tuple[str, ...] = MIDI_DESCRIPTOR_NAMES,
) -> np.ndarray:
    values = midi_descriptors(midi, start_s, end_s, beats, score_beats)
    return np.array([values[n] for n in names], dtype=np.float64)


def read_beat_annotations(text: str) -> np.ndarray:
    """Beat times from an ASAP annotation file (``time<TAB>time<TAB>label`` per line)."""
    times = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        field = line.split("\t")[0].split()[0]
        try:
            times.append(float(field))
        except ValueError:
            raise ValueError(
                f"beat annotation line {number} does not start with a time: {line!r}"
            ) from None
    beats = np.asarray(times, dtype=np.float64)
    if np.any(np.diff(beats) <= 0):
        raise ValueError("beat annotation times are not strictly increasing")
    return beats


def expressive_matrix(
    descriptors: np.ndarray,
    names: tuple[str, ...] = MIDI_DESCRIPTOR_NAMES,
    use: tuple[str, ...] = EXPRESSIVE_MIDI_DESCRIPTORS,
) -> tuple[np.ndarray, list[str]]:
    """Z-scored expressive columns with NaN imputed by the column mean (0); columns that are
    unknown everywhere or constant are dropped. Returns (matrix [N, D], column names)."""
    descriptors = np.asarray(descriptors, dtype=np.float64)
    if descriptors.ndim != 2 or descriptors.shape[1] != len(names):
        raise ValueError(f"descriptors must be [N, {len(names)}], got {descriptors.shape}")
    columns, kept = [], []
    for name in use:
        col = descriptors[:, names.index(name)]
        known = col[~np.isnan(col)]
        if known.size < 2 or known.std() < 1e-12:
            continue
        z = (col - known.mean()) / known.std()
        columns.append(np.where(np.isnan(z), 0.0, z))
        kept.append(name)
    if not columns:
        raise ValueError("no expressive descriptor varies over these segments")
    return np.stack(columns, axis=1), kept
