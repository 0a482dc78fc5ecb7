"""Cutting a decoded stream into timestamped, overlapping windows.

Windows of ``window`` samples start every ``hop`` samples. The last segment always ends
exactly at the end of the track: when the hop grid stops short of it, a final window
``[total - window, total]`` is added, and a track shorter than one window gives one short
segment ``[0, total]``. The :class:`Segmenter` holds at most one window plus one block, so a
track of any length is cut with bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mess_ray.ingest.decode import decode_stream
from mess_ray.segments import encode_audio, segment_id, window_samples


def window_starts(total: int, window: int, hop: int) -> list[int]:
    """Start samples of every segment of a ``total``-sample track (reference for the Segmenter)."""
    if window <= 0 or hop <= 0 or hop > window:
        raise ValueError(f"need 0 < hop <= window, got window={window} hop={hop}")
    if total <= 0:
        return []
    if total <= window:
        return [0]
    starts = list(range(0, total - window + 1, hop))
    if starts[-1] + window < total:
        starts.append(total - window)
    return starts


@dataclass(frozen=True)
class Cut:
    start_sample: int
    samples: np.ndarray


class Segmenter:
    """Incremental windowing: ``push`` blocks, then ``finish``; returns :class:`Cut` s in order."""

    def __init__(self, window: int, hop: int):
        if window <= 0 or hop <= 0 or hop > window:
            raise ValueError(f"need 0 < hop <= window, got window={window} hop={hop}")
        self.window, self.hop = window, hop
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # absolute sample index of _buffer[0]
        self._next_start = 0  # next grid start to emit
        self._last_emitted: int | None = None
        self.total = 0

    def push(self, block: np.ndarray) -> list[Cut]:
        """Add a block; returns the windows it completed (eager, so no block is ever skipped)."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self._buffer = np.concatenate([self._buffer, block]) if len(self._buffer) else block
        self.total += len(block)
        cuts = []
        while self._next_start + self.window <= self.total:
            offset = self._next_start - self._buffer_start
            cuts.append(Cut(self._next_start, self._buffer[offset : offset + self.window].copy()))
            self._last_emitted = self._next_start
            self._next_start += self.hop
        # Keep only what a later window can still need: the last `window` samples cover the
        # final-window case, and everything from the next grid start on.
        keep_from = min(self._next_start, max(0, self.total - self.window))
        if keep_from > self._buffer_start:
            self._buffer = self._buffer[keep_from - self._buffer_start :]
            self._buffer_start = keep_from
        return cuts

    def finish(self) -> list[Cut]:
        """The closing window, if the track end is not covered yet."""
        if self.total == 0:
            return []
        if self.total <= self.window:
            return [Cut(0, self._buffer[: self.total].copy())] if self._last_emitted is None else []
        if self._last_emitted is None or self._last_emitted + self.window < self.total:
            start = self.total - self.window
            offset = start - self._buffer_start
            return [Cut(start, self._buffer[offset : offset + self.window].copy())]
        return []


def segment_blocks(blocks: Iterable[np.ndarray], window: int, hop: int) -> Iterator[Cut]:
    segmenter = Segmenter(window, hop)
    for block in blocks:
        yield from segmenter.push(block)
    yield from segmenter.finish()


def segment_track(
    row: dict[str, Any],
    sample_rate: int,
    window_s: float,
    hop_s: float,
    read_block_s: float,
    min_duration_s: float = 0.0,
    s3_endpoint_url: str | None = None,
    stats: dict | None = None,
) -> Iterator[dict[str, Any]]:
    """Segment rows (:data:`mess_ray.segments.SEGMENT_SCHEMA`) for one catalog row.

    Raises :class:`mess_ray.ingest.decode.RejectError` when the file cannot be ingested;
    rows yielded before such an error belong to a rejected track and must be discarded.
    """
    window, hop = window_samples(window_s, sample_rate), window_samples(hop_s, sample_rate)
    blocks = decode_stream(
        row["source_uri"], sample_rate, read_block_s, min_duration_s, s3_endpoint_url, stats
    )
    for cut in segment_blocks(blocks, window, hop):
        n = len(cut.samples)
        yield {
            "segment_id": segment_id(row["track_id"], cut.start_sample),
            "track_id": row["track_id"],
            "piece_id": row.get("piece_id") or "",
            "style": row.get("style") or "",
            "start_s": cut.start_sample / sample_rate,
            "end_s": (cut.start_sample + n) / sample_rate,
            "start_sample": cut.start_sample,
            "num_samples": n,
            "sample_rate": sample_rate,
            "source_uri": row["source_uri"],
            "metadata_json": row.get("metadata_json") or "{}",
            "audio": encode_audio(cut.samples),
        }
