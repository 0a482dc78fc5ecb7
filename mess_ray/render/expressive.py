"""Expressive transforms: turn a deadpan score (PrettyMIDI) into a styled performance.

Every function is pure: it works on a deep copy and returns the new MIDI plus a dict of
what it did, so a rendering can be reproduced from its catalog row. Order matters and is
fixed by :func:`apply_style`:

1. timing: global tempo, phrase-arch rubato and random-walk jitter become one monotonic
   time warp (``PrettyMIDI.adjust_times``) of notes, control changes and tempo events;
2. articulation, then truncation to ``max_duration_s`` of *performed* time;
3. dynamics (arc over the excerpt plus beat accents), pedal and timbre (the GM program).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pretty_midi

from mess_ray.config import StyleSpec

# Resolution of the tempo curve in score seconds; fine enough that notes move smoothly.
WARP_STEP_S = 0.05
# Rubato depth 1 slows phrase ends to 1 - RUBATO_SPAN/2 and speeds phrase middles to
# 1 + RUBATO_SPAN/2 of the base tempo (Todd's arch model of phrase timing).
RUBATO_SPAN = 0.6
# Mean reversion of the tempo random walk per beat: keeps the drift bounded.
JITTER_REVERSION = 0.8
ACCENT_VELOCITY = 14
MIN_NOTE_S = 0.03
PEDAL_LIFT_S = 0.06  # pedal goes back down this long after a change (syncopated pedalling)
CC_SUSTAIN = 64


def _pitched(midi: pretty_midi.PrettyMIDI) -> list[pretty_midi.Instrument]:
    return [inst for inst in midi.instruments if not inst.is_drum]


def note_count(midi: pretty_midi.PrettyMIDI) -> int:
    return sum(len(inst.notes) for inst in midi.instruments)


def last_note_end(midi: pretty_midi.PrettyMIDI) -> float:
    return float(max((n.end for inst in midi.instruments for n in inst.notes), default=0.0))


def first_note_start(midi: pretty_midi.PrettyMIDI) -> float:
    return float(min((n.start for inst in midi.instruments for n in inst.notes), default=0.0))


# -- timing ---------------------------------------------------------------------------------
def phrase_boundaries(midi: pretty_midi.PrettyMIDI, phrase_bars: int) -> np.ndarray:
    """Score times where phrases start: every ``phrase_bars`` downbeats, plus the end."""
    if phrase_bars < 1:
        raise ValueError("phrase_bars must be >= 1")
    end = last_note_end(midi)
    downbeats = midi.get_downbeats()
    starts = downbeats[::phrase_bars] if len(downbeats) else np.array([0.0])
    starts = starts[starts < end]
    if len(starts) == 0 or starts[0] > 0:
        starts = np.concatenate([[0.0], starts])
    return np.concatenate([starts, [max(end, starts[-1] + 1e-3)]])


def rubato_factor(score_times: np.ndarray, boundaries: np.ndarray, depth: float) -> np.ndarray:
    """Tempo multiplier along each phrase: slow at its start and end, fastest mid-phrase."""
    if depth == 0:
        return np.ones_like(score_times)
    idx = np.clip(
        np.searchsorted(boundaries, score_times, side="right") - 1, 0, len(boundaries) - 2
    )
    start, stop = boundaries[idx], boundaries[idx + 1]
    position = np.clip((score_times - start) / np.maximum(stop - start, 1e-6), 0.0, 1.0)
    arch = 4.0 * position * (1.0 - position)  # 0 at phrase edges, 1 in the middle
    return 1.0 + depth * RUBATO_SPAN * (arch - 0.5)


def jitter_factor(
    score_times: np.ndarray, beats: np.ndarray, amount: float, rng: np.random.Generator
) -> np.ndarray:
    """Seeded mean-reverting random walk of log-tempo, one step per beat, interpolated."""
    if amount == 0 or len(beats) == 0:
        return np.ones_like(score_times)
    log_tempo = np.zeros(len(beats))
    for i in range(1, len(beats)):
        log_tempo[i] = JITTER_REVERSION * log_tempo[i - 1] + rng.normal(0.0, amount)
    log_tempo = np.clip(log_tempo, -3 * amount, 3 * amount)
    return np.exp(np.interp(score_times, beats, log_tempo))


def tempo_warp(
    midi: pretty_midi.PrettyMIDI, style: StyleSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Score-time grid and the performed time of each grid point.

    Performed time is the integral of 1 / tempo factor, so a factor of 2 plays twice as
    fast; it is strictly increasing, so the order of events never changes.
    """
    end = max(last_note_end(midi), midi.get_end_time()) + 1.0
    grid = np.arange(0.0, end + WARP_STEP_S, WARP_STEP_S)
    boundaries = phrase_boundaries(midi, style.phrase_bars)
    factor = (
        style.tempo_scale
        * rubato_factor(grid, boundaries, style.rubato)
        * jitter_factor(grid, midi.get_beats(), style.tempo_jitter, rng)
    )
    inverse = 1.0 / factor
    performed = np.concatenate(
        [[0.0], np.cumsum(0.5 * (inverse[1:] + inverse[:-1]) * np.diff(grid))]
    )
    info = {
        "phrase_boundaries_s": np.round(np.interp(boundaries, grid, performed), 3).tolist(),
        "tempo_factor_mean": round(float(factor.mean()), 4),
        "tempo_factor_min": round(float(factor.min()), 4),
        "tempo_factor_max": round(float(factor.max()), 4),
    }
    return grid, performed, info


def apply_timing(
    midi: pretty_midi.PrettyMIDI, style: StyleSpec, rng: np.random.Generator
) -> tuple[pretty_midi.PrettyMIDI, np.ndarray, np.ndarray, dict[str, Any]]:
    """Warp every note, control change and tempo event; also returns the warp itself."""
    out = copy.deepcopy(midi)
    grid, performed, info = tempo_warp(out, style, rng)
    out.adjust_times(grid, performed)
    return out, grid, performed, info


def shift_to_start(midi: pretty_midi.PrettyMIDI, lead_in_s: float = 0.0) -> pretty_midi.PrettyMIDI:
    """Move everything earlier so the first note starts at ``lead_in_s`` (drops leading silence)."""
    out = copy.deepcopy(midi)
    offset = first_note_start(out) - lead_in_s
    if offset <= 0:
        return out
    end = max(out.get_end_time(), last_note_end(out)) + 1.0
    # Events before the first note (program, pedal set-up) collapse onto time 0.
    out.adjust_times(np.array([0.0, offset, end]), np.array([0.0, 0.0, end - offset]))
    return out


def truncate(
    midi: pretty_midi.PrettyMIDI, max_duration_s: float
) -> tuple[pretty_midi.PrettyMIDI, bool]:
    """Cut at ``max_duration_s``: later notes dropped, sounding ones ended there."""
    if max_duration_s <= 0:
        raise ValueError("max_duration_s must be positive")
    out = copy.deepcopy(midi)
    cut = bool(last_note_end(out) > max_duration_s)
    for inst in out.instruments:
        inst.notes = [n for n in inst.notes if n.start < max_duration_s - MIN_NOTE_S]
        for n in inst.notes:
            n.end = min(n.end, max_duration_s)
        inst.control_changes = [c for c in inst.control_changes if c.time < max_duration_s]
        inst.pitch_bends = [b for b in inst.pitch_bends if b.time < max_duration_s]
    return out, cut


# -- dynamics, articulation, pedal, timbre ---------------------------------------------------
def dynamics_curve(position: np.ndarray, arc: str) -> np.ndarray:
    """Arc shape in [-1, 1] over the excerpt (``position`` in [0, 1])."""
    if arc == "flat":
        return np.zeros_like(position)
    if arc == "crescendo":
        return 2.0 * position - 1.0
    if arc == "diminuendo":
        return 1.0 - 2.0 * position
    if arc == "hairpin":
        return 1.0 - 2.0 * np.abs(2.0 * position - 1.0)
    raise ValueError(f"unknown dynamics arc {arc!r}")


def apply_dynamics(
    midi: pretty_midi.PrettyMIDI, style: StyleSpec, accent_times: np.ndarray
) -> tuple[pretty_midi.PrettyMIDI, dict[str, Any]]:
    """Velocity = level + range * arc(time) (+ accent for notes on accented beats)."""
    out = copy.deepcopy(midi)
    end = max(last_note_end(out), 1e-6)
    accented = 0
    for inst in _pitched(out):
        for n in inst.notes:
            level = style.velocity + style.velocity_range * float(
                dynamics_curve(np.array([n.start / end]), style.dynamics_arc)[0]
            )
            if len(accent_times) and np.min(np.abs(accent_times - n.start)) < 0.04:
                level += ACCENT_VELOCITY
                accented += 1
            n.velocity = int(np.clip(round(level), 1, 127))
    return out, {"accented_notes": accented}


def accent_beats(beats_score: np.ndarray, every: int) -> np.ndarray:
    """Score times of every ``every``-th beat (0 disables accents)."""
    return beats_score[::every] if every > 0 else np.array([])


def apply_articulation(midi: pretty_midi.PrettyMIDI, ratio: float) -> pretty_midi.PrettyMIDI:
    """Scale every note's duration: < 1 detaches (staccato), > 1 overlaps (legato)."""
    if ratio <= 0:
        raise ValueError("articulation ratio must be positive")
    out = copy.deepcopy(midi)
    for inst in _pitched(out):
        for n in inst.notes:
            n.end = n.start + max((n.end - n.start) * ratio, MIN_NOTE_S)
    return out


def bass_change_times(midi: pretty_midi.PrettyMIDI) -> np.ndarray:
    """Onsets where the lowest sounding pitch class changes: a cheap harmony-change proxy."""
    notes = sorted((n for inst in _pitched(midi) for n in inst.notes), key=lambda n: n.start)
    onsets = sorted({round(n.start, 3) for n in notes})
    changes, previous = [], None
    active: list[pretty_midi.Note] = []  # sweep: only notes that may still sound
    next_note = 0
    for t in onsets:
        while next_note < len(notes) and notes[next_note].start <= t + 1e-3:
            active.append(notes[next_note])
            next_note += 1
        active = [n for n in active if n.end > t + 1e-3]
        sounding = [n.pitch for n in active]
        if not sounding:
            continue
        bass = min(sounding) % 12
        if bass != previous:
            changes.append(t)
            previous = bass
    return np.array(changes)


def apply_pedal(
    midi: pretty_midi.PrettyMIDI, change_times: np.ndarray
) -> tuple[pretty_midi.PrettyMIDI, int]:
    """Sustain pedal (CC64): lift at each change, press again just after, lift at the end."""
    out = copy.deepcopy(midi)
    end = last_note_end(out)
    changes = np.unique(np.asarray(change_times, dtype=float))
    changes = changes[changes < end]
    for inst in _pitched(out):
        inst.control_changes = [c for c in inst.control_changes if c.number != CC_SUSTAIN]
        for t in changes:
            inst.control_changes.append(pretty_midi.ControlChange(CC_SUSTAIN, 0, float(t)))
            inst.control_changes.append(
                pretty_midi.ControlChange(CC_SUSTAIN, 127, float(t) + PEDAL_LIFT_S)
            )
        inst.control_changes.append(pretty_midi.ControlChange(CC_SUSTAIN, 0, end))
        inst.control_changes.sort(key=lambda c: c.time)
    return out, len(changes)


def apply_timbre(midi: pretty_midi.PrettyMIDI, program: int) -> pretty_midi.PrettyMIDI:
    """Set the General MIDI program of every pitched part. (No CC74 "brightness": FluidSynth
    renders it bit-identically with every chain SoundFont, benchmarks/brightness_centroid.py.)"""
    if not 0 <= program <= 127:
        raise ValueError("program must be in 0..127")
    out = copy.deepcopy(midi)
    for inst in _pitched(out):
        inst.program = program
    return out


# -- the whole style ------------------------------------------------------------------------
def apply_style(
    midi: pretty_midi.PrettyMIDI, style: StyleSpec, seed: int, max_duration_s: float | None = None
) -> tuple[pretty_midi.PrettyMIDI, dict[str, Any]]:
    """Perform ``midi`` in ``style``; returns the new MIDI and every parameter applied."""
    if note_count(midi) == 0:
        raise ValueError("cannot apply a style to a MIDI file without notes")
    rng = np.random.default_rng(seed)
    # Beat grid and harmony changes come from the score, then follow the same warp.
    score = shift_to_start(midi)
    beats_score = score.get_beats()
    downbeats_score = score.get_downbeats()
    harmony_score = (
        bass_change_times(score) if style.pedal and style.pedal_mode == "harmony" else np.array([])
    )

    performed, grid, warp, timing = apply_timing(score, style, rng)

    def to_performed(times: np.ndarray) -> np.ndarray:
        return np.interp(times, grid, warp) if len(times) else np.array([])

    # Articulation first: legato lengthens notes, and the excerpt must still end in time.
    performed = apply_articulation(performed, style.articulation)
    truncated = False
    if max_duration_s is not None:
        performed, truncated = truncate(performed, max_duration_s)
    if note_count(performed) == 0:
        raise ValueError("no notes left after timing and truncation")

    accents = to_performed(accent_beats(beats_score, style.accent_every))
    performed, dyn_info = apply_dynamics(performed, style, accents)
    pedal_changes = 0
    if style.pedal:
        changes = to_performed(harmony_score if style.pedal_mode == "harmony" else downbeats_score)
        performed, pedal_changes = apply_pedal(performed, changes)
    performed = apply_timbre(performed, style.program)

    params: dict[str, Any] = {
        "style": style.model_dump(mode="json"),
        "seed": seed,
        "max_duration_s": max_duration_s,
        "truncated": truncated,
        "duration_s": round(last_note_end(performed), 4),
        "notes": note_count(performed),
        "pedal_changes": pedal_changes,
        **timing,
        **dyn_info,
    }
    return performed, params


def as_played(
    midi: pretty_midi.PrettyMIDI, max_duration_s: float | None = None
) -> tuple[pretty_midi.PrettyMIDI, dict[str, Any]]:
    """A human performance kept as played: only leading silence removed and truncation."""
    if note_count(midi) == 0:
        raise ValueError("cannot render a MIDI file without notes")
    out = shift_to_start(midi)
    truncated = False
    if max_duration_s is not None:
        out, truncated = truncate(out, max_duration_s)
    return out, {
        "style": None,
        "max_duration_s": max_duration_s,
        "truncated": truncated,
        "leading_silence_s": round(first_note_start(midi), 4),
        "duration_s": round(last_note_end(out), 4),
        "notes": note_count(out),
    }
