"""Held-out segments of performances with MIDI and beat annotations (benchmark tasks 2 and 3).

Where a segment's MIDI and beats come from, read from its ``metadata_json``:

* a rendering (render catalog): ``midi_path`` + ``render_version`` name the expressive MIDI
  that was synthesised (already shifted so its first note is at 0 s, like the audio); the
  render parameters (``style_params_json``) carry ASAP's ``performance_annotations_uri`` /
  ``midi_score_annotations_uri`` and ``leading_silence_s``, the shift applied to the beats;
* a recorded performance of an ASAP layout (ingest catalog ``asap``): ``midi_uri``,
  ``annotations_uri`` and ``score_annotations_uri``, already in the audio's time;
* MAESTRO: ``midi_uri`` only (MIDI descriptors, no beats).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from mess_ray.midi_descriptors import (
    MIDI_DESCRIPTOR_NAMES,
    beat_position,
    midi_descriptor_vector,
    read_beat_annotations,
)
from mess_ray.segments import (
    METADATA_COLUMNS,
    decode_audio,
    fit_length,
    segments_dataset,
    split_pieces,
    window_samples,
)
from mess_ray.storage import Storage, make_filesystem
from mess_ray.style_grid import is_grid_style

log = logging.getLogger(__name__)

BEAT_SPAN_TOLERANCE_S = 0.25  # a segment may start/end this far outside the annotated beats


@dataclass(frozen=True)
class TrackSources:
    """Where the MIDI and beats of one recording are, and the beats' shift into audio time."""

    midi_uri: str | None
    beats_uri: str | None
    score_beats_uri: str | None
    beat_offset_s: float = 0.0  # audio time = annotated time - beat_offset_s


def track_sources(metadata: dict[str, Any], storage: Storage | None = None) -> TrackSources:
    """:class:`TrackSources` of a segment from its catalog metadata (see the module docstring)."""
    params: dict[str, Any] = {}
    raw = metadata.get("style_params_json")
    if isinstance(raw, str) and raw:
        try:
            params = json.loads(raw)
        except json.JSONDecodeError:
            params = {}
    midi_uri = metadata.get("midi_uri")
    if metadata.get("midi_path") and metadata.get("render_version") and storage is not None:
        midi_uri = storage.url(
            "render", str(metadata["render_version"]), str(metadata["midi_path"])
        )
    beats_uri = metadata.get("annotations_uri") or params.get("performance_annotations_uri")
    score_uri = metadata.get("score_annotations_uri") or params.get("midi_score_annotations_uri")
    offset = float(params.get("leading_silence_s") or 0.0) if "midi_path" in metadata else 0.0
    return TrackSources(midi_uri or None, beats_uri or None, score_uri or None, offset)


def _read_text(uri: str, endpoint: str | None) -> str:
    fs, path = make_filesystem(uri, endpoint)
    with fs.open(path, "rb") as f:
        return f.read().decode()


def _read_midi(uri: str, endpoint: str | None):
    import io

    import pretty_midi

    fs, path = make_filesystem(uri, endpoint)
    with fs.open(path, "rb") as f:
        return pretty_midi.PrettyMIDI(io.BytesIO(f.read()))


@dataclass
class TrackData:
    midi: Any | None  # pretty_midi.PrettyMIDI
    beats: np.ndarray | None  # performed beats in audio time
    score_beats: np.ndarray | None  # score beats, one per performed beat (None if they disagree)
    problems: list[str] = field(default_factory=list)


def load_track(sources: TrackSources, endpoint: str | None = None) -> TrackData:
    """Read what exists of a track's MIDI and beats; what cannot be read is noted, not fatal."""
    data = TrackData(None, None, None)
    if sources.midi_uri:
        try:
            data.midi = _read_midi(sources.midi_uri, endpoint)
        except (
            Exception
        ) as err:  # a missing or corrupt file drops this track from tasks needing MIDI
            data.problems.append(f"midi {sources.midi_uri}: {err}")
    if sources.beats_uri:
        try:
            beats = (
                read_beat_annotations(_read_text(sources.beats_uri, endpoint))
                - sources.beat_offset_s
            )
            data.beats = beats if beats.size >= 2 else None
        except Exception as err:
            data.problems.append(f"beats {sources.beats_uri}: {err}")
    if data.beats is not None and sources.score_beats_uri:
        try:
            score = read_beat_annotations(_read_text(sources.score_beats_uri, endpoint))
            # The annotations are one to one when complete; otherwise tempo relative to the
            # score is unknown for this track (ASAP has a few such performances).
            if score.size == data.beats.size:
                data.score_beats = score
            else:
                data.problems.append(
                    f"score beats {score.size} != performed beats {data.beats.size}"
                )
        except Exception as err:
            data.problems.append(f"score beats {sources.score_beats_uri}: {err}")
    return data


def segment_beat_span(
    start_s: float, end_s: float, beats: np.ndarray | None
) -> tuple[float, float]:
    """Fractional beat indices of a segment's start and end; NaN when it is not within the beats."""
    if beats is None or beats.size < 2:
        return math.nan, math.nan
    if start_s < beats[0] - BEAT_SPAN_TOLERANCE_S or end_s > beats[-1] + BEAT_SPAN_TOLERANCE_S:
        return math.nan, math.nan
    b0, b1 = beat_position(np.array([start_s, end_s]), beats)
    return float(b0), float(b1)


@dataclass
class PerformanceSet:
    """Held-out segments with MIDI and/or beats, in segment_id order."""

    segment_ids: np.ndarray  # int64 [N]
    track_ids: np.ndarray  # object [N]
    piece_ids: np.ndarray  # object [N]
    start_s: np.ndarray  # float [N]
    end_s: np.ndarray  # float [N]
    beat_spans: np.ndarray  # float [N, 2], NaN where no beats
    midi_descriptors: np.ndarray  # float [N, len(MIDI_DESCRIPTOR_NAMES)], NaN where unknown
    has_midi: np.ndarray  # bool [N]
    audio: np.ndarray  # float32 [N, window]
    beats: dict[str, np.ndarray]  # performed beats per track, audio time
    holdout_pieces: list[str]
    train_pieces: list[str]
    problems: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.segment_ids.size)

    @property
    def has_beats(self) -> np.ndarray:
        return ~np.isnan(self.beat_spans[:, 0])

    def subset(self, mask: np.ndarray) -> PerformanceSet:
        mask = np.asarray(mask, dtype=bool)
        tracks = set(self.track_ids[mask])
        return PerformanceSet(
            self.segment_ids[mask],
            self.track_ids[mask],
            self.piece_ids[mask],
            self.start_s[mask],
            self.end_s[mask],
            self.beat_spans[mask],
            self.midi_descriptors[mask],
            self.has_midi[mask],
            self.audio[mask],
            {t: b for t, b in self.beats.items() if t in tracks},
            self.holdout_pieces,
            self.train_pieces,
            self.problems,
        )


def load_performance_set(
    storage: Storage,
    version: str,
    holdout_fraction: float,
    seed: int,
    sample_rate: int,
    window_s: float,
    pieces: str = "holdout",
    with_audio: bool = True,
) -> PerformanceSet | None:
    """Held-out segments whose track has MIDI or beat annotations; None when no track has any.
    Style-grid renderings (:mod:`mess_ray.style_grid`) are left out.

    The split is the benchmark's (:func:`mess_ray.segments.split_pieces` over every known piece),
    so a piece held out for style retrieval is held out here too. ``pieces="train"`` gives the
    training pieces' segments instead (fine-tuning's MIDI-descriptor targets); without
    ``with_audio`` the audio column is not read (``audio`` is then [N, 0]).
    """
    if pieces not in ("holdout", "train"):
        raise ValueError(f"pieces must be 'holdout' or 'train', got {pieces!r}")
    dataset = segments_dataset(storage, version)
    meta = dataset.to_table(columns=["track_id", "piece_id", "style", "metadata_json"])
    all_pieces = [p for p in pc.unique(meta["piece_id"]).to_pylist() if p]
    if len(all_pieces) < 2:
        return None
    train_pieces, holdout_pieces = split_pieces(all_pieces, holdout_fraction, seed)
    first_meta: dict[str, tuple[str, str]] = {}
    wanted = set(holdout_pieces if pieces == "holdout" else train_pieces)
    for tid, piece, style, blob in zip(
        *(meta[c].to_pylist() for c in ("track_id", "piece_id", "style", "metadata_json"))
    ):
        # Style-grid renderings are the style_parameters task's own set (mess_ray.style_grid).
        if piece in wanted and tid not in first_meta and not is_grid_style(style):
            first_meta[tid] = (piece, blob)
    tracks: dict[str, TrackData] = {}
    problems: dict[str, list[str]] = {}
    for tid, (_, blob) in sorted(first_meta.items()):
        sources = track_sources(json.loads(blob or "{}"), storage)
        if not (sources.midi_uri or sources.beats_uri):
            continue
        data = load_track(sources, storage.s3_endpoint_url)
        if data.problems:
            problems[tid] = data.problems
            log.warning("track %s: %s", tid, "; ".join(data.problems))
        if data.midi is not None or data.beats is not None:
            tracks[tid] = data
    if not tracks:
        return None
    table = dataset.to_table(
        columns=[*METADATA_COLUMNS, *(["audio"] if with_audio else [])],
        filter=pc.field("track_id").isin(sorted(tracks)),
    ).sort_by("segment_id")
    rates = set(pc.unique(table["sample_rate"]).to_pylist())
    if rates != {sample_rate}:
        raise ValueError(
            f"segments are at {sorted(rates)} Hz but audio.sample_rate is {sample_rate}"
        )
    window = window_samples(window_s, sample_rate)
    track_ids = np.asarray(table["track_id"].to_pylist(), dtype=object)
    starts = np.asarray(table["start_s"].to_numpy(), dtype=np.float64)
    ends = np.asarray(table["end_s"].to_numpy(), dtype=np.float64)
    spans = np.full((len(track_ids), 2), np.nan)
    descriptors = np.full((len(track_ids), len(MIDI_DESCRIPTOR_NAMES)), np.nan)
    has_midi = np.zeros(len(track_ids), dtype=bool)
    for i, (tid, start, end) in enumerate(zip(track_ids, starts, ends)):
        data = tracks[tid]
        spans[i] = segment_beat_span(start, end, data.beats)
        if data.midi is not None:
            # The MIDI is in audio time (renderings are shifted with their audio); the beats
            # were shifted into audio time on loading.
            descriptors[i] = midi_descriptor_vector(
                data.midi, start, end, data.beats, data.score_beats
            )
            has_midi[i] = True
    audio = (
        np.stack([fit_length(decode_audio(b), window) for b in table["audio"].to_pylist()])
        if with_audio
        else np.zeros((len(track_ids), 0), dtype=np.float32)
    )
    return PerformanceSet(
        segment_ids=np.asarray(table["segment_id"].to_numpy(), dtype=np.int64),
        track_ids=track_ids,
        piece_ids=np.asarray(table["piece_id"].to_pylist(), dtype=object),
        start_s=starts,
        end_s=ends,
        beat_spans=spans,
        midi_descriptors=descriptors,
        has_midi=has_midi,
        audio=audio.astype(np.float32, copy=False),
        beats={t: d.beats for t, d in tracks.items() if d.beats is not None},
        holdout_pieces=holdout_pieces,
        train_pieces=train_pieces,
        problems=problems,
    )


def performance_table_summary(perf: PerformanceSet) -> dict[str, int]:
    return {
        "segments": len(perf),
        "tracks": int(len(set(perf.track_ids))),
        "pieces": int(len(set(perf.piece_ids))),
        "segments_with_beats": int(perf.has_beats.sum()),
        "segments_with_midi": int(perf.has_midi.sum()),
    }
