"""Request handling of the search service, free of Ray and HTTP (the FastAPI layer maps errors).

:class:`SearchService` holds a loaded :class:`~mess_ray.index.SearchIndex` and the Embedder
rebuilt from the index manifest, and turns uploads (any rate, any channel count, WAV/FLAC/
MP3/OGG) into query vectors: decode with soundfile, downmix, resample with soxr to
``cfg.audio.sample_rate``, cut into model windows, embed, average.

The loaded index and embedder form one immutable :class:`IndexState`; every request reads
the state once and uses it throughout, and :meth:`SearchService.reload_if_changed` swaps in a
newly published index version by replacing that one reference (hot updates never mix two
versions within a request, and in-flight requests finish on the state they started with).

Errors: :class:`PayloadTooLarge` (413), :class:`UnsupportedMedia` (415), ``ValueError`` (422),
``KeyError``/``FileNotFoundError`` (404).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import posixpath
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from mess_ray.config import MessRayConfig
from mess_ray.descriptors import describe
from mess_ray.index.searcher import STAGE as INDEX_STAGE
from mess_ray.index.searcher import Hit, SearchIndex, normalize
from mess_ray.segments import fit_length, mix_to_mono, window_samples
from mess_ray.serve.explain import explain_hit
from mess_ray.serve.metrics import ServiceMetrics
from mess_ray.storage import Storage, make_filesystem

log = logging.getLogger(__name__)

# Longest passage /audio returns: enough for whole tracks, bounded so one request cannot
# pull an hour of PCM into memory.
MAX_PASSAGE_S = 900.0


class PayloadTooLarge(ValueError):
    """Upload above cfg.serve.max_upload_mb."""


class UnsupportedMedia(ValueError):
    """The upload is not decodable audio."""


class SourceNotAllowed(FileNotFoundError):
    """A source_uri outside the storage root and the configured source prefixes (answered as 404)."""


_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


def _plain(err: BaseException | str) -> str:
    """An error message without Python object reprs (``<_io.BytesIO object at 0x...>``)."""
    return _OBJECT_REPR.sub("the upload", str(err))


@dataclass(frozen=True)
class DecodeLimits:
    """What an upload may declare and how much of it is decoded (see ServeConfig)."""

    min_rate: int = 4000
    max_rate: int = 384000
    max_channels: int = 8
    max_decode_samples: int = 8_000_000
    block_samples: int = 2**18  # samples (frames x channels) per soundfile read

    @classmethod
    def from_config(cls, serve_cfg: Any) -> DecodeLimits:
        return cls(
            min_rate=serve_cfg.min_upload_rate_hz,
            max_rate=serve_cfg.max_upload_rate_hz,
            max_channels=serve_cfg.max_upload_channels,
            max_decode_samples=serve_cfg.max_decode_samples,
        )


def decode_upload(
    data: bytes,
    target_rate: int,
    max_bytes: int | None = None,
    max_seconds: float | None = None,
    limits: DecodeLimits | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode an uploaded audio file to mono float32 at ``target_rate``; returns (samples, info).

    Only what the query needs is decoded: the file is read in blocks and reading stops after
    ``max_seconds`` of audio or ``limits.max_decode_samples`` source samples (frames x
    channels), whichever comes first, so memory and time depend on these bounds, not on what
    the header declares. Declared rates and channel counts outside ``limits`` are refused
    (:class:`UnsupportedMedia`) before any sample is read.
    """
    limits = limits or DecodeLimits()
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(
            f"upload of {len(data) / 2**20:.1f} MiB exceeds the {max_bytes / 2**20:.1f} MiB limit"
        )
    if not data:
        raise UnsupportedMedia("the upload is empty: send a WAV, FLAC, MP3 or OGG file")
    try:
        sound = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise UnsupportedMedia(
            f"could not decode the upload as audio (WAV, FLAC, MP3 or OGG expected): {_plain(err)}"
        ) from None
    with sound:
        rate, channels = int(sound.samplerate), int(sound.channels)
        if not limits.min_rate <= rate <= limits.max_rate:
            raise UnsupportedMedia(
                f"the upload declares a sample rate of {rate} Hz; accepted: "
                f"{limits.min_rate}..{limits.max_rate} Hz"
            )
        if not 1 <= channels <= limits.max_channels:
            raise UnsupportedMedia(
                f"the upload declares {channels} channels; accepted: 1..{limits.max_channels}"
            )
        # Frames to read: the query's length at the declared rate, within the sample budget.
        wanted = limits.max_decode_samples // channels
        if max_seconds is not None:
            wanted = min(wanted, int(math.ceil(max_seconds * rate)))
        block = max(1, min(wanted, limits.block_samples // channels))
        pieces, read = [], 0
        try:
            while read < wanted:
                chunk = sound.read(min(block, wanted - read), dtype="float32", always_2d=True)
                if len(chunk) == 0:
                    break
                read += len(chunk)
                pieces.append(mix_to_mono(chunk))
            more = len(sound.read(1, dtype="float32", always_2d=True)) > 0 if read else False
        except (sf.LibsndfileError, RuntimeError, ValueError) as err:
            raise UnsupportedMedia(f"the upload's audio data is corrupt: {_plain(err)}") from None
    if read == 0:
        raise UnsupportedMedia("the uploaded audio contains no samples")
    mono = np.concatenate(pieces) if len(pieces) > 1 else np.ascontiguousarray(pieces[0])
    del pieces
    if not np.all(np.isfinite(mono)):
        raise UnsupportedMedia("the uploaded audio contains NaN or infinite samples")
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate)
    info = {
        "source_sample_rate": rate,
        "channels": channels,
        "duration_s": round(len(mono) / target_rate, 3),
        "truncated": bool(more),
    }
    return np.ascontiguousarray(mono, dtype=np.float32), info


def clip_windows(samples: np.ndarray, window: int, hop: int) -> np.ndarray:
    """[N, window] frames covering the clip (the last one zero-padded; a short clip gives one)."""
    if len(samples) <= window:
        return np.pad(samples, (0, window - len(samples)))[None, :]
    starts = list(range(0, len(samples) - window + 1, hop))
    if starts[-1] + window < len(samples):
        starts.append(len(samples) - window)  # cover the tail instead of dropping it
    return np.stack([samples[s : s + window] for s in starts])


WAV_HEADER_BYTES = 44  # what libsndfile writes for PCM_16 WAV (checked by the tests)
# Fixed resolution of the cached waveform of a track; each `points` value is drawn from it.
WAVEFORM_BINS = 4000


@contextlib.contextmanager
def open_sound(uri: str, s3_endpoint_url: str | None = None):
    """The recording at ``uri`` as an open :class:`soundfile.SoundFile` (404-style errors)."""
    fs, path = make_filesystem(uri, s3_endpoint_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"source audio {uri} is not available")
    with fs.open(path, "rb") as f:
        try:
            sound = sf.SoundFile(f)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise FileNotFoundError(
                f"source audio {uri} cannot be decoded: {_plain(err)}"
            ) from None
        with sound:
            yield sound


@dataclass(frozen=True)
class PassageSpan:
    """Frames [first, first + frames) of a recording, served as a PCM_16 WAV."""

    rate: int
    channels: int
    first: int
    frames: int

    @property
    def frame_bytes(self) -> int:
        return 2 * self.channels

    @property
    def size(self) -> int:
        return WAV_HEADER_BYTES + self.frames * self.frame_bytes

    def header(self) -> bytes:
        out = io.BytesIO()
        sf.write(
            out,
            np.zeros((0, self.channels), np.float32),
            self.rate,
            format="WAV",
            subtype="PCM_16",
        )
        header = bytearray(out.getvalue())
        data = self.frames * self.frame_bytes
        header[4:8] = (WAV_HEADER_BYTES - 8 + data).to_bytes(4, "little")
        header[40:44] = data.to_bytes(4, "little")
        return bytes(header)


def passage_span(sound: sf.SoundFile, start_s: float, end_s: float | None) -> PassageSpan:
    """The frames of [start_s, end_s) (at most MAX_PASSAGE_S) of an open recording."""
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    if end_s is not None and end_s <= start_s:
        raise ValueError(f"end_s ({end_s}) must be greater than start_s ({start_s})")
    rate = sound.samplerate
    first = int(round(start_s * rate))
    if first >= sound.frames:
        raise ValueError(
            f"start_s {start_s} is past the end of the recording ({sound.frames / rate:.2f} s)"
        )
    stop_s = min(end_s if end_s is not None else sound.frames / rate, start_s + MAX_PASSAGE_S)
    stop = min(int(round(stop_s * rate)), sound.frames)
    return PassageSpan(rate, sound.channels, first, max(0, stop - first))


def _read_frames(sound: sf.SoundFile, first: int, count: int) -> np.ndarray:
    """[count, channels] float32 from frame ``first`` (zero-padded where the file ends early)."""
    sound.seek(first)
    pcm = sound.read(count, dtype="float32", always_2d=True)
    if len(pcm) < count:
        pcm = np.pad(pcm, ((0, count - len(pcm)), (0, 0)))
    return pcm


def read_passage_samples(
    uri: str, start_s: float, end_s: float | None, s3_endpoint_url: str | None = None
) -> tuple[np.ndarray, int]:
    """[frames, channels] float32 PCM of [start_s, end_s) of the recording at ``uri``, and its rate."""
    with open_sound(uri, s3_endpoint_url) as sound:
        span = passage_span(sound, start_s, end_s)
        try:
            return _read_frames(sound, span.first, span.frames), span.rate
        except (sf.LibsndfileError, RuntimeError) as err:
            raise FileNotFoundError(
                f"source audio {uri} cannot be decoded: {_plain(err)}"
            ) from None


def passage_size(
    uri: str, start_s: float, end_s: float | None, s3_endpoint_url: str | None = None
) -> int:
    """Bytes of the WAV :func:`read_passage` returns (from the header alone: nothing decoded)."""
    with open_sound(uri, s3_endpoint_url) as sound:
        return passage_span(sound, start_s, end_s).size


def read_passage(
    uri: str,
    start_s: float,
    end_s: float | None,
    s3_endpoint_url: str | None = None,
    byte_span: tuple[int, int] | None = None,
) -> tuple[bytes, int]:
    """Bytes ``byte_span`` = [first, last] (default: all) of a PCM_16 WAV of [start_s, end_s)
    of the recording at ``uri``, and the WAV's total size.

    Only the frames under the requested bytes are decoded (seek, then read): a 1 KiB range
    of a long passage costs a 1 KiB read, not the passage.
    """
    with open_sound(uri, s3_endpoint_url) as sound:
        span = passage_span(sound, start_s, end_s)
        first_b, last_b = byte_span if byte_span is not None else (0, span.size - 1)
        last_b = min(last_b, span.size - 1)
        out = bytearray()
        if first_b < WAV_HEADER_BYTES:
            out += span.header()[first_b : last_b + 1]
        if last_b >= WAV_HEADER_BYTES:
            from_b = max(first_b, WAV_HEADER_BYTES) - WAV_HEADER_BYTES
            f0 = from_b // span.frame_bytes
            f1 = (last_b - WAV_HEADER_BYTES) // span.frame_bytes + 1
            try:
                pcm = _read_frames(sound, span.first + f0, f1 - f0)
            except (sf.LibsndfileError, RuntimeError) as err:
                raise FileNotFoundError(
                    f"source audio {uri} cannot be decoded: {_plain(err)}"
                ) from None
            raw = io.BytesIO()
            sf.write(raw, pcm, span.rate, format="RAW", subtype="PCM_16")
            offset = f0 * span.frame_bytes
            out += raw.getvalue()[from_b - offset : last_b + 1 - WAV_HEADER_BYTES - offset]
    return bytes(out), span.size


def passage_chunks(
    uri: str,
    start_s: float,
    end_s: float | None,
    s3_endpoint_url: str | None = None,
    byte_span: tuple[int, int] | None = None,
    block_frames: int = 2**16,
    slot: Callable[[], Any] = contextlib.nullcontext,
) -> Iterator[bytes]:
    """The same bytes as :func:`read_passage`, decoded and yielded a block at a time.

    A whole passage (up to MAX_PASSAGE_S) is streamed: memory is one block, whatever its
    length. ``slot`` is entered around each block's decode (the replica's decode slots).
    """
    with open_sound(uri, s3_endpoint_url) as sound:
        span = passage_span(sound, start_s, end_s)
        first_b, last_b = byte_span if byte_span is not None else (0, span.size - 1)
        last_b = min(last_b, span.size - 1)
        if first_b < WAV_HEADER_BYTES:
            yield span.header()[first_b : last_b + 1]
        if last_b < WAV_HEADER_BYTES:
            return
        f = (max(first_b, WAV_HEADER_BYTES) - WAV_HEADER_BYTES) // span.frame_bytes
        stop = (last_b - WAV_HEADER_BYTES) // span.frame_bytes + 1
        while f < stop:
            n = min(block_frames, stop - f)
            try:
                with slot():
                    pcm = _read_frames(sound, span.first + f, n)
            except (sf.LibsndfileError, RuntimeError) as err:
                raise FileNotFoundError(
                    f"source audio {uri} cannot be decoded: {_plain(err)}"
                ) from None
            raw = io.BytesIO()
            sf.write(raw, pcm, span.rate, format="RAW", subtype="PCM_16")
            at = WAV_HEADER_BYTES + f * span.frame_bytes  # byte offset of this block
            yield raw.getvalue()[max(first_b, at) - at : last_b + 1 - at]
            f += n


def track_peaks(
    uri: str,
    s3_endpoint_url: str | None = None,
    bins: int = WAVEFORM_BINS,
    block_frames: int = 2**20,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Min and max of ``bins`` equal bins of a whole recording (mono), and its duration.

    Streams the file in blocks of about ``block_frames``: memory does not grow with its length.
    """
    with open_sound(uri, s3_endpoint_url) as sound:
        total, rate = int(sound.frames), int(sound.samplerate)
        edges = np.linspace(0, total, min(bins, max(1, total)) + 1).astype(np.int64)
        n = len(edges) - 1
        lows, highs = np.zeros(n, np.float32), np.zeros(n, np.float32)
        i = 0
        try:
            while i < n and total > 0:
                j = int(np.searchsorted(edges, edges[i] + block_frames, side="right")) - 1
                j = min(n, max(i + 1, j))
                mono = mix_to_mono(_read_frames(sound, int(edges[i]), int(edges[j] - edges[i])))
                starts = edges[i:j] - edges[i]
                lows[i:j] = np.minimum.reduceat(mono, starts)
                highs[i:j] = np.maximum.reduceat(mono, starts)
                i = j
        except (sf.LibsndfileError, RuntimeError) as err:
            raise FileNotFoundError(
                f"source audio {uri} cannot be decoded: {_plain(err)}"
            ) from None
    return lows, highs, total / rate


def downsample_peaks(
    lows: np.ndarray, highs: np.ndarray, points: int
) -> tuple[list[float], list[float]]:
    """``points`` bins of min/max peaks from finer ones (min of mins, max of maxes)."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    if points >= len(lows):
        return [float(v) for v in lows], [float(v) for v in highs]
    starts = np.linspace(0, len(lows), points + 1).astype(np.int64)[:-1]
    return (
        [float(v) for v in np.minimum.reduceat(lows, starts)],
        [float(v) for v in np.maximum.reduceat(highs, starts)],
    )


def _local_path(uri: str) -> str | None:
    """The real path of a local ``uri`` (plain path or file://); None for other schemes."""
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif "://" in uri or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return None
    return os.path.realpath(uri)


def _under(uri: str, prefix: str) -> str | None:
    """``uri`` relative to ``prefix`` when it lies under it (no ``..`` escapes); else None."""
    local, base = _local_path(uri), _local_path(prefix)
    if local is not None and base is not None:
        return os.path.relpath(local, base) if os.path.commonpath([local, base]) == base else None
    if local is not None or base is not None:
        return None
    scheme, _, rest = uri.partition("://")
    pscheme, _, prest = prefix.partition("://")
    if scheme.lower() != pscheme.lower() or not rest or not prest:
        return None
    rest, prest = posixpath.normpath(rest), posixpath.normpath(prest).rstrip("/")
    return rest[len(prest) + 1 :] if rest.startswith(prest + "/") else None


class SourcePolicy:
    """Which ``source_uri``s the service may read: under the storage root, ingest.source or
    serve.source_prefixes.

    A tampered index must not make the service fetch ``http://127.0.0.1:...`` or read files
    outside these folders; responses show sources relative to the prefix they lie under.
    """

    def __init__(self, prefixes: list[str]) -> None:
        self.prefixes = [p for p in prefixes if p]

    @classmethod
    def from_config(cls, cfg: MessRayConfig) -> SourcePolicy:
        # The ingested folder (ingest.source) is where an index's recordings usually live; a
        # manifest file names recordings beside it.
        ingested = cfg.ingest.source or ""
        if ingested and os.path.isfile(ingested):
            ingested = os.path.dirname(ingested)
        return cls([cfg.storage.root, ingested, *cfg.serve.source_prefixes])

    def relative(self, uri: str) -> str | None:
        for prefix in self.prefixes:
            rel = _under(uri, prefix)
            if rel is not None:
                return rel
        return None

    def check(self, uri: str) -> str:
        if self.relative(uri) is None:
            raise SourceNotAllowed(
                f"source audio {self.display(uri)} lies outside the storage root and "
                "serve.source_prefixes"
            )
        return uri

    def display(self, uri: str) -> str:
        """What responses show for ``uri``: its path under an allowed prefix, else its file name."""
        rel = self.relative(uri)
        return rel if rel is not None else posixpath.basename(uri.rstrip("/"))


class LRUCache:
    """A small thread-safe LRU map with hit/miss counts (descriptors of hit passages, waveforms)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
        value = (
            compute()
        )  # outside the lock: computing reads audio; two threads may both compute once
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def info(self) -> dict[str, int]:
        with self._lock:
            return {
                "size": len(self._data),
                "maxsize": self.maxsize,
                "hits": self.hits,
                "misses": self.misses,
            }


@dataclass(frozen=True)
class IndexState:
    """One served index version and the embedder that built it (swapped as a whole)."""

    index: SearchIndex
    embedder: Any

    @property
    def version(self) -> str | None:
        return self.index.version


@dataclass
class SearchOptions:
    """What a search request may ask for besides the query itself."""

    k: int | None = None
    exclude_track: str | None = None
    min_gap_s: float = 0.0
    facet_weights: dict[str, float] | None = None
    filters: dict[str, str] | None = None
    mmr_lambda: float | None = None
    explain: bool = True
    # relative to the query's work (SearchIndex.search_work_relative); facet weights and MMR
    # do not apply there
    work_relative: bool = False

    def search_kwargs(self, serve_cfg: Any) -> dict[str, Any]:
        return {
            "k": self.k or serve_cfg.default_k,
            "exclude_track": self.exclude_track,
            "min_gap_s": self.min_gap_s,
            "facet_weights": self.facet_weights or None,
            "filters": self.filters or None,
            "mmr_lambda": self.mmr_lambda,
            "mmr_pool": serve_cfg.mmr_pool,
        }


@dataclass
class ServiceStats:
    """Counters of this replica (also exported through Ray metrics by the app layer)."""

    batch_sizes: Counter = field(default_factory=Counter)
    reloads: int = 0
    reload_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_batch(self, size: int) -> None:
        with self.lock:
            self.batch_sizes[size] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            sizes = dict(sorted(self.batch_sizes.items()))
        return {
            "embed_batches": sum(sizes.values()),
            "embed_batch_sizes": {str(k): v for k, v in sizes.items()},
            "max_embed_batch": max(sizes, default=0),
            "reloads": self.reloads,
            "reload_errors": self.reload_errors,
        }


def _span(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """The time span (s) that indexed segments cover together."""
    return min(r["start_s"] for r in rows), max(r["end_s"] for r in rows)


class SearchService:
    """A loaded index + embedder answering search requests (thread-safe; hot-reloadable)."""

    def __init__(
        self, cfg: MessRayConfig, index: SearchIndex, embedder: Any, storage: Storage | None = None
    ) -> None:
        self.cfg = cfg
        self.storage = storage
        self.window = window_samples(cfg.audio.window_s, cfg.audio.sample_rate)
        self.hop = window_samples(cfg.audio.hop_s, cfg.audio.sample_rate)
        self._state = self._check_state(IndexState(index, embedder))
        self._reload_lock = threading.Lock()
        self._reloader: threading.Thread | None = None
        self._stop = threading.Event()
        self.stats = ServiceStats()
        self.metrics = ServiceMetrics()
        self.descriptor_cache = LRUCache(cfg.serve.descriptor_cache_size)
        # One fixed-resolution waveform per track; every `points` value is drawn from it.
        self.waveform_cache = LRUCache(256)
        self.limits = DecodeLimits.from_config(cfg.serve)
        self.sources = SourcePolicy.from_config(cfg)
        # Decoding (uploads, passages, waveforms) is the costly part of a request: at most
        # serve.max_concurrent_decodes at once per replica, the others wait their turn.
        self._decode_slots = threading.BoundedSemaphore(cfg.serve.max_concurrent_decodes)
        # (samples) -> the work an uploaded passage is from, or None; set by the passage routes
        # (the content view's chroma-shingle identification)
        self.identify_work: Any = None

    @contextlib.contextmanager
    def decoding(self):
        """Hold one of the replica's decode slots."""
        with self._decode_slots:
            yield

    def _check_state(self, state: IndexState) -> IndexState:
        built_rate = state.index.manifest.get("audio", {}).get("sample_rate")
        if built_rate is not None and int(built_rate) != self.cfg.audio.sample_rate:
            raise ValueError(
                f"index was built at {built_rate} Hz but audio.sample_rate is {self.cfg.audio.sample_rate}"
            )
        if int(state.embedder.dim) != state.index.dim:
            raise ValueError(
                f"embedder dimension {state.embedder.dim} does not match the index ({state.index.dim})"
            )
        return state

    @classmethod
    def from_config(cls, cfg: MessRayConfig, storage: Storage | None = None) -> SearchService:
        """Load the served index version and rebuild its Embedder from the manifest."""
        storage = storage or Storage.from_config(cfg.storage)
        index = SearchIndex.load(
            storage, cfg.serve.index_version, cfg.index.nprobe, cfg.index.ef_search
        )
        return cls(cfg, index, _embedder_for(cfg, storage, index), storage)

    # -- state -----------------------------------------------------------------------------
    @property
    def state(self) -> IndexState:
        return self._state

    @property
    def index(self) -> SearchIndex:
        return self._state.index

    @property
    def embedder(self) -> Any:
        return self._state.embedder

    def reload_if_changed(self) -> bool:
        """Swap to the version LATEST names if it differs from the served one; True when swapped.

        A pinned ``serve.index_version`` never reloads. Loading happens beside the served state;
        the swap is one reference assignment, so requests in flight finish on the old state.
        """
        if self.cfg.serve.index_version is not None or self.storage is None:
            return False
        with self._reload_lock:
            latest = self.storage.latest(INDEX_STAGE)
            current = self._state
            if latest is None or latest == current.version:
                return False
            try:
                index = SearchIndex.load(
                    self.storage, latest, self.cfg.index.nprobe, self.cfg.index.ef_search
                )
                embedder = (
                    current.embedder
                    if index.manifest.get("model") == current.index.manifest.get("model")
                    else _embedder_for(self.cfg, self.storage, index)
                )
                self._state = self._check_state(IndexState(index, embedder))
            except Exception:
                self.stats.reload_errors += 1
                log.exception("could not load index %s; still serving %s", latest, current.version)
                return False
            self.stats.reloads += 1
            log.info("now serving index %s (was %s)", latest, current.version)
            return True

    def start_reloader(self, interval_s: float | None = None) -> None:
        """Poll LATEST every ``interval_s`` (default serve.reload_interval_s; 0 disables) in a daemon thread."""
        interval = self.cfg.serve.reload_interval_s if interval_s is None else interval_s
        if interval <= 0 or self._reloader is not None or self.cfg.serve.index_version is not None:
            return

        def poll() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reload_if_changed()
                except Exception:  # a storage hiccup must not kill the poller
                    log.exception("index reload poll failed")

        self._reloader = threading.Thread(target=poll, name="index-reloader", daemon=True)
        self._reloader.start()

    def stop_reloader(self) -> None:
        self._stop.set()
        if self._reloader is not None:
            self._reloader.join(timeout=5)
            self._reloader = None
        self._stop = threading.Event()

    # -- info ------------------------------------------------------------------------------
    @property
    def max_upload_bytes(self) -> int:
        return int(self.cfg.serve.max_upload_mb * 2**20)

    def describe(self) -> dict[str, Any]:
        index = self.index
        m = index.manifest
        return {
            "index_version": index.version,
            "count": len(index),
            "dim": index.dim,
            "index_type": index.spec.type,
            "model": self._public(m.get("model", {})),
            "facet_layout": {k: list(v) for k, v in index.facet_layout.items()}
            if index.facet_layout
            else None,
            "filter_fields": index.filter_fields(),
            "stats": {
                **self.stats.snapshot(),
                **self.metrics.snapshot(),
                "descriptor_cache": self.descriptor_cache.info(),
            },
        }

    def _public(self, value: Any) -> Any:
        """``value`` with absolute paths and URLs (checkpoints, sources) shown by name only."""
        if isinstance(value, dict):
            return {k: self._public(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._public(v) for v in value]
        if isinstance(value, str) and (value.startswith("/") or "://" in value):
            return self.sources.display(value)
        return value

    def _public_track(self, track: dict[str, Any]) -> dict[str, Any]:
        return {**track, "source_uri": self.sources.display(track["source_uri"])}

    def tracks(self) -> list[dict[str, Any]]:
        """Indexed tracks, sources shown relative to the folder they lie in."""
        return [self._public_track(t) for t in self.index.tracks()]

    def track(self, track_id: str) -> dict[str, Any]:
        return self._public_track(self.index.track(track_id))

    # -- embedding -------------------------------------------------------------------------
    def prepare_upload(self, data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode an upload and cut it to serve.max_query_s (the part done outside the embedding batch).

        Decoding stops at max_query_s of audio or serve.max_decode_samples source samples
        (see :func:`decode_upload`), so what an upload declares does not set its cost.
        """
        with self.decoding():
            samples, info = decode_upload(
                data,
                self.cfg.audio.sample_rate,
                self.max_upload_bytes,
                max_seconds=self.cfg.serve.max_query_s,
                limits=self.limits,
            )
        max_samples = int(self.cfg.serve.max_query_s * self.cfg.audio.sample_rate)
        info["truncated"] = info["truncated"] or len(samples) > max_samples
        return samples[:max_samples], info

    def embed_clips(self, clips: list[np.ndarray]) -> tuple[list[np.ndarray], IndexState]:
        """Query vectors of several clips in one model call, and the state whose embedder made them.

        Each clip's vector is the mean of its window embeddings, re-normalised: [D]; or, for a
        model that tries its content timeline at several lags (``Embedder.query_shifts_ms``),
        one such vector per lag, [K, D] (the index scores each hit at its best lag).
        """
        state = self._state
        frames = [clip_windows(c, self.window, self.hop) for c in clips]
        variants = (
            state.embedder.embed_query(np.concatenate(frames))
            if frames
            else np.zeros((1, 0, state.index.dim))
        )
        self.stats.record_batch(len(clips))
        self.metrics.record_batch(len(clips))
        out, at = [], 0
        for f in frames:
            v = normalize(variants[:, at : at + len(f)].mean(axis=1))
            out.append(v[0] if len(v) == 1 else v)
            at += len(f)
        return out, state

    def embed_clip(self, samples: np.ndarray) -> np.ndarray:
        """Query vector of one clip."""
        return self.embed_clips([samples])[0][0]

    # -- search ----------------------------------------------------------------------------
    def search_upload(self, data: bytes, options: SearchOptions | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        samples, info = self.prepare_upload(data)
        (vector,), state = self.embed_clips([samples])
        return self.search_vector(
            vector, state, options or SearchOptions(), {"kind": "upload", **info}, samples, started
        )

    def search_vector(
        self,
        vector: np.ndarray,
        state: IndexState,
        options: SearchOptions,
        query: dict[str, Any],
        query_samples: np.ndarray | None,
        started: float,
    ) -> dict[str, Any]:
        """Search ``state``'s index with a query vector and explain the hits with the query's audio."""
        if options.work_relative:
            work = None
            if query_samples is not None and self.identify_work is not None:
                work = self.identify_work(query_samples)
            query = {**query, "work": work}
            hits = self._work_relative(state, vector, work, options)
        else:
            hits = state.index.search(vector, **options.search_kwargs(self.cfg.serve))
        return self._response(
            state, query, hits, query_samples if options.explain else None, started
        )

    def _work_relative(self, state, vector, work, options: SearchOptions, exclude=()) -> list:
        kw = options.search_kwargs(self.cfg.serve)
        return state.index.search_work_relative(
            vector,
            work,
            kw["k"],
            kw["exclude_track"],
            kw["min_gap_s"],
            exclude_segments=exclude,
            filters=kw["filters"],
        )

    def search_by_track(
        self,
        track_id: str,
        start_s: float,
        end_s: float | None = None,
        options: SearchOptions | None = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        options = options or SearchOptions()
        state = self._state
        if options.work_relative:
            vector, segment_ids = state.index.span_vector(track_id, start_s, end_s)
            hits = self._work_relative(
                state, vector, state.index.track(track_id)["piece_id"], options, segment_ids
            )
            lags, query_samples = {}, None
        else:
            vector, segment_ids, lags, query_samples = self._track_query(
                state, track_id, start_s, end_s
            )
            hits = state.index.search(
                vector, exclude_segments=segment_ids, **options.search_kwargs(self.cfg.serve)
            )
        query = {
            "kind": "track",
            "track_id": track_id,
            "start_s": start_s,
            "end_s": end_s,
            "segment_ids": segment_ids,
            **lags,
        }
        if not options.explain:
            query_samples = None
        elif query_samples is None:
            rows = [state.index.segment(s) for s in segment_ids]
            try:
                query_samples = self._passage(rows[0]["source_uri"], *_span(rows))
            except (FileNotFoundError, ValueError):
                query_samples = None  # the query's audio is gone: results without explanations
        return self._response(state, query, hits, query_samples, started)

    def _track_query(
        self, state: IndexState, track_id: str, start_s: float, end_s: float | None
    ) -> tuple[np.ndarray, list[int], dict[str, Any], np.ndarray | None]:
        """The query of a span of an indexed track: its segments' stored vectors averaged [D];
        for a model that tries queries at several lags, one such vector per lag [K, D], the
        timeline part recomputed from the segments' audio read back from the source (as an
        upload's is). If that audio cannot be read, the stored vectors alone, and the reason.
        Also the span's audio when it was read (once, for all its overlapping segments; the
        explanations use it too), else None."""
        vector, ids = state.index.span_vector(track_id, start_s, end_s)
        shifts = getattr(state.embedder, "query_shifts_ms", (0.0,))  # any embedder: one lag
        if len(shifts) == 1:
            return vector, ids, {}, None
        rows = [state.index.segment(s) for s in ids]
        span = _span(rows)
        try:
            passage = self._passage(rows[0]["source_uri"], *span)
        except (FileNotFoundError, ValueError) as err:  # SourceNotAllowed among them
            where = self.sources.display(rows[0]["source_uri"])
            lags = {"query_lags": 1, "query_lags_skipped": f"{where}: {type(err).__name__}"}
            return vector, ids, lags, None
        stored = np.stack([state.index.vector(s) for s in ids])
        window, rate = state.embedder.window_samples, self.cfg.audio.sample_rate
        windows = [
            fit_length(passage[max(0, round((r["start_s"] - span[0]) * rate)) :][:window], window)
            for r in rows
        ]
        variants = state.embedder.query_variants(stored, np.stack(windows))
        return normalize(variants.mean(axis=1)), ids, {"query_lags": len(shifts)}, passage

    # -- audio -----------------------------------------------------------------------------
    def _source(self, track_id: str) -> str:
        """The readable source of a track (KeyError: unknown; SourceNotAllowed: outside the roots)."""
        return self.sources.check(self.index.track(track_id)["source_uri"])

    def audio(
        self,
        track_id: str,
        start_s: float = 0.0,
        end_s: float | None = None,
        byte_span: tuple[int, int] | None = None,
    ) -> tuple[bytes, int]:
        """Bytes ``byte_span`` (default: all) of the passage's WAV, and the WAV's total size."""
        uri = self._source(track_id)
        with self.decoding():
            return read_passage(uri, start_s, end_s, self.cfg.storage.s3_endpoint_url, byte_span)

    def audio_stream(
        self,
        track_id: str,
        start_s: float = 0.0,
        end_s: float | None = None,
        byte_span: tuple[int, int] | None = None,
    ) -> Iterator[bytes]:
        """The passage's WAV (or bytes ``byte_span`` of it) in blocks, each decoded in a slot."""
        uri = self._source(track_id)
        return passage_chunks(
            uri,
            start_s,
            end_s,
            self.cfg.storage.s3_endpoint_url,
            byte_span,
            slot=self.decoding,
        )

    def audio_size(self, track_id: str, start_s: float = 0.0, end_s: float | None = None) -> int:
        """Size of the passage's WAV, read from the source's header (nothing decoded)."""
        return passage_size(
            self._source(track_id), start_s, end_s, self.cfg.storage.s3_endpoint_url
        )

    def waveform(self, track_id: str, points: int = 800) -> dict[str, Any]:
        """Min/max peaks of a whole track for drawing.

        The track is decoded once (streamed) into WAVEFORM_BINS bins, cached per track;
        each ``points`` value is drawn from those bins.
        """
        uri = self._source(track_id)

        def compute() -> tuple[np.ndarray, np.ndarray, float]:
            with self.decoding():
                return track_peaks(uri, self.cfg.storage.s3_endpoint_url)

        lows, highs, duration = self.waveform_cache.get_or_compute(uri, compute)
        low, high = downsample_peaks(lows, highs, points)
        return {
            "track_id": track_id,
            "duration_s": round(duration, 3),
            "points": len(low),
            "min": [round(v, 4) for v in low],
            "max": [round(v, 4) for v in high],
        }

    # -- explanations ----------------------------------------------------------------------
    def _passage(self, uri: str, start_s: float, end_s: float) -> np.ndarray:
        self.sources.check(uri)
        with self.decoding():
            pcm, rate = read_passage_samples(uri, start_s, end_s, self.cfg.storage.s3_endpoint_url)
        mono = mix_to_mono(pcm)
        if rate != self.cfg.audio.sample_rate:
            mono = soxr.resample(mono, rate, self.cfg.audio.sample_rate)
        return np.ascontiguousarray(mono, dtype=np.float32)

    def passage_descriptors(self, uri: str, start_s: float, end_s: float) -> dict[str, float]:
        """Descriptors of an indexed passage, LRU-cached: popular hits come back often."""
        return self.descriptor_cache.get_or_compute(
            (uri, round(start_s, 4), round(end_s, 4)),
            lambda: describe(self._passage(uri, start_s, end_s), self.cfg.audio.sample_rate),
        )

    def explain(
        self, query_samples: np.ndarray, hits: list[Hit]
    ) -> list[list[dict[str, Any]] | None]:
        """Per hit, its facet comparison with the query clip (None where the hit's audio is unreadable)."""
        query = describe(query_samples, self.cfg.audio.sample_rate)
        out: list[list[dict[str, Any]] | None] = []
        for hit in hits:
            try:
                values = self.passage_descriptors(hit.source_uri, hit.start_s, hit.end_s)
            except (FileNotFoundError, ValueError) as err:
                log.warning("no explanation for hit %s: %s", hit.segment_id, err)
                out.append(None)
                continue
            out.append(explain_hit(query, values, hit.facet_similarities or None))
        return out

    def _response(
        self,
        state: IndexState,
        query: dict[str, Any],
        hits: list[Hit],
        query_samples: np.ndarray | None,
        started: float,
    ) -> dict[str, Any]:
        explanations = (
            self.explain(query_samples, hits)
            if query_samples is not None and hits
            else [None] * len(hits)
        )
        rows = []
        for hit, explanation in zip(hits, explanations):
            row = hit.to_dict()
            row["source_uri"] = self.sources.display(row["source_uri"])
            row["explanation"] = explanation
            rows.append(row)
        return {
            "query": query,
            "hits": rows,
            "index_version": state.version,
            "took_ms": round(1000 * (time.perf_counter() - started), 2),
        }


def _embedder_for(cfg: MessRayConfig, storage: Storage, index: SearchIndex) -> Any:
    from mess_ray.models import Embedder

    return Embedder.from_info(cfg, storage, index.manifest["model"])
