"""Decoding: stream a recording as mono blocks at the target rate, or say why it cannot be.

A file is opened through fsspec (local path or any URL, e.g. ``s3://``) and read by
``soundfile`` from the file object in blocks of ``read_block_s`` seconds, so memory is bounded
by the block size whatever the file length. Blocks are mixed down to mono (channel mean) and
resampled with ``soxr.ResampleStream``; levels are kept as recorded (no normalisation, since
dynamics are part of how music is played).

Failures raise :class:`RejectError` with one of :data:`REJECT_REASONS` and a detail message.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from mess_ray.segments import mix_to_mono
from mess_ray.storage import make_filesystem

REJECT_REASONS = (
    "unreadable",
    "truncated",
    "zero_length",
    "not_audio",
    "too_short",
    "decode_error",
)
SNIFF_BYTES = 65536
# Formats whose header states the exact frame count, so reading fewer frames means truncation.
EXACT_LENGTH_FORMATS = {"WAV", "WAVEX", "RF64", "W64", "AIFF", "AIFC", "FLAC", "CAF", "AU", "WVE"}
# MP3 lengths come from a Xing/Info header or a bitrate estimate: allow encoder slack.
MP3_LENGTH_TOLERANCE = 0.98
FSSPEC_BLOCK_SIZE = 4 * 2**20  # bounded read-ahead for remote files


class RejectError(Exception):
    """A recording that cannot be ingested, with a reason from :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_MAGIC_AUDIO = [
    (b"RIFF", "wav"),
    (b"RF64", "wav"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
    (b"ID3", "mp3"),
    (b"FORM", "aiff"),
    (b".snd", "au"),
    (b"caff", "caf"),
]
_MAGIC_OTHER = [
    (b"MThd", "MIDI file (symbolic music, not audio)"),
    (b"%PDF", "PDF document"),
    (b"\x89PNG", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"PK\x03\x04", "zip archive"),
    (b"PAR1", "Parquet file"),
    (b"\x1f\x8b", "gzip archive"),
    (b"GIF8", "GIF image"),
]


def sniff(head: bytes) -> tuple[str, str]:
    """("audio"|"other"|"text"|"unknown", what) from the first bytes of a file."""
    for magic, name in _MAGIC_AUDIO:
        if head.startswith(magic):
            return "audio", name
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "audio", "mp3"  # MPEG audio frame sync
    for magic, name in _MAGIC_OTHER:
        if head.startswith(magic):
            return "other", name
    sample = head[:4096]
    if sample and b"\x00" not in sample:
        try:
            sample.decode("utf-8")
            return "text", "text file"
        except UnicodeDecodeError as err:
            if err.start >= len(sample) - 3:  # a multi-byte character cut by the sample boundary
                return "text", "text file"
    return "unknown", "unrecognised bytes"


def wav_truncation(head: bytes, file_size: int) -> str | None:
    """Detail message if a RIFF/WAVE header declares more data than the file holds.

    libsndfile silently clamps the frame count of a truncated WAV, so the header is checked
    here: a cut-off upload must not pass as a shorter recording.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, chunk_size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk_id == b"data":
            end = pos + 8 + chunk_size
            if end > file_size:
                return (
                    f"WAV data chunk declares {chunk_size} bytes but only {file_size - pos - 8} "
                    f"are present ({file_size} byte file)"
                )
            return None
        pos += 8 + chunk_size + (chunk_size & 1)  # chunks are word aligned
    if len(head) >= file_size:
        # The whole file was scanned without finding the data chunk: cut inside the header.
        return f"WAV file of {file_size} bytes ends before its data chunk"
    return None


@dataclass
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str


@contextlib.contextmanager
def open_source(uri: str, s3_endpoint_url: str | None = None):
    """A binary file object for a local path or fsspec URL; I/O failures become 'unreadable'."""
    try:
        fs, path = make_filesystem(uri, s3_endpoint_url)
        options = (
            {} if fs.protocol in ("file", ("file", "local")) else {"block_size": FSSPEC_BLOCK_SIZE}
        )
        handle = fs.open(path, "rb", **options)
    except FileNotFoundError as err:
        raise RejectError("unreadable", f"file not found: {uri} ({err})") from err
    except (OSError, ValueError) as err:
        raise RejectError("unreadable", f"cannot open {uri}: {type(err).__name__}: {err}") from err
    with handle:
        yield handle


def _read_head(fobj, uri: str) -> tuple[bytes, int]:
    try:
        fobj.seek(0, 2)
        size = fobj.tell()
        fobj.seek(0)
        head = fobj.read(SNIFF_BYTES)
        fobj.seek(0)
    except OSError as err:
        raise RejectError("unreadable", f"cannot read {uri}: {err}") from err
    return head, size


def check_container(fobj, uri: str) -> None:
    """Reject empty, non-audio and truncated-WAV files before decoding."""
    head, size = _read_head(fobj, uri)
    if size == 0:
        raise RejectError("zero_length", "file is empty (0 bytes)")
    kind, what = sniff(head)
    if kind in ("other", "text"):
        raise RejectError("not_audio", f"{what}, not an audio recording")
    detail = wav_truncation(head, size)
    if detail:
        raise RejectError("truncated", detail)


def _open_soundfile(fobj, uri: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(fobj)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        fobj.seek(0)
        kind, what = sniff(fobj.read(SNIFF_BYTES))
        if kind == "audio":
            raise RejectError(
                "unreadable", f"{what} header found but libsndfile cannot open it: {err}"
            ) from err
        raise RejectError("unreadable", f"not a recognised audio format ({what}): {err}") from err


def mono_blocks(snd: sf.SoundFile, block_frames: int) -> Iterator[np.ndarray]:
    """Consecutive float32 mono blocks of at most ``block_frames`` frames."""
    while True:
        block = snd.read(frames=block_frames, dtype="float32", always_2d=True)
        if len(block) == 0:
            return
        yield mix_to_mono(block)


def resample_blocks(
    blocks: Iterator[np.ndarray], in_rate: int, out_rate: int, counter: dict[str, int] | None = None
) -> Iterator[np.ndarray]:
    """Stream-resample blocks; the total output length is exactly round(n_in * out / in).

    One block of look-ahead tells which block is the last, so the resampler is flushed
    exactly once and the final chunk can be trimmed/padded to the exact length.
    ``counter['in']`` holds the number of input frames consumed.
    """
    counter = counter if counter is not None else {}
    counter["in"] = 0
    stream = (
        soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
        if in_rate != out_rate
        else None
    )
    produced = 0
    iterator = iter(blocks)
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        counter["in"] += len(current)
        last = following is None
        out = current if stream is None else stream.resample_chunk(current, last=last)
        if last:
            expected = round(counter["in"] * out_rate / in_rate)
            missing = expected - (produced + len(out))
            out = np.pad(out, (0, missing)) if missing > 0 else out[: len(out) + missing]
        produced += len(out)
        if len(out):
            yield np.asarray(out, dtype=np.float32)
        current = following


def open_audio_info(snd: sf.SoundFile) -> AudioInfo:
    return AudioInfo(
        int(snd.samplerate), int(snd.channels), int(snd.frames), snd.format, snd.subtype
    )


def decode_stream(
    uri: str,
    sample_rate: int,
    read_block_s: float,
    min_duration_s: float = 0.0,
    s3_endpoint_url: str | None = None,
    stats: dict | None = None,
) -> Iterator[np.ndarray]:
    """Mono float32 blocks of ``uri`` at ``sample_rate``, read ``read_block_s`` seconds at a time.

    Raises :class:`RejectError` (possibly after some blocks were yielded, e.g. a file that is
    cut short mid-stream). ``stats`` receives the source info and the decoded duration.
    """
    if read_block_s <= 0:
        raise ValueError("read_block_s must be > 0")
    stats = stats if stats is not None else {}
    with open_source(uri, s3_endpoint_url) as fobj:
        check_container(fobj, uri)
        with _open_soundfile(fobj, uri) as snd:
            info = open_audio_info(snd)
            stats["info"] = info
            if info.sample_rate <= 0 or info.channels <= 0:
                raise RejectError(
                    "decode_error",
                    f"invalid stream: {info.sample_rate} Hz, {info.channels} channels",
                )
            if info.frames == 0:
                raise RejectError("zero_length", f"{info.format} file holds no audio frames")
            if (
                info.frames > 0
                and info.format != "MP3"
                and info.frames / info.sample_rate < min_duration_s
            ):
                raise RejectError(
                    "too_short",
                    f"{info.frames / info.sample_rate:.4f} s < min_duration_s={min_duration_s} s",
                )
            block_frames = max(1, round(read_block_s * info.sample_rate))
            counter: dict[str, int] = {}
            try:
                yield from resample_blocks(
                    mono_blocks(snd, block_frames), info.sample_rate, sample_rate, counter
                )
            except (sf.LibsndfileError, RuntimeError, OSError) as err:
                raise RejectError(
                    "decode_error", f"failed after {counter.get('in', 0)} frames: {err}"
                ) from err
            frames_read = counter.get("in", 0)
    stats["frames_read"] = frames_read
    stats["duration_s"] = frames_read / info.sample_rate
    if frames_read == 0:
        raise RejectError("zero_length", f"{info.format} file decoded to 0 frames")
    declared = info.frames
    if info.format in EXACT_LENGTH_FORMATS and 0 < frames_read < declared:
        raise RejectError(
            "truncated", f"decoded {frames_read} of {declared} frames declared by the header"
        )
    if info.format == "MP3" and frames_read < MP3_LENGTH_TOLERANCE * declared:
        raise RejectError("truncated", f"decoded {frames_read} of ~{declared} MP3 frames declared")
    if stats["duration_s"] < min_duration_s:
        raise RejectError(
            "too_short", f"{stats['duration_s']:.4f} s < min_duration_s={min_duration_s} s"
        )
