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

import io
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from mess_ray.config import MessRayConfig
from mess_ray.descriptors import describe
from mess_ray.index.searcher import STAGE as INDEX_STAGE
from mess_ray.index.searcher import Hit, SearchIndex, normalize
from mess_ray.segments import window_samples
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


def decode_upload(
    data: bytes, target_rate: int, max_bytes: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode an uploaded audio file to mono float32 at ``target_rate``; returns (samples, info)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(
            f"upload of {len(data) / 2**20:.1f} MiB exceeds the {max_bytes / 2**20:.1f} MiB limit"
        )
    if not data:
        raise UnsupportedMedia("the upload is empty: send a WAV, FLAC, MP3 or OGG file")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise UnsupportedMedia(
            f"could not decode the upload as audio (WAV, FLAC, MP3 or OGG expected): {err}"
        ) from None
    if samples.size == 0:
        raise UnsupportedMedia("the uploaded audio contains no samples")
    mono = samples.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise UnsupportedMedia("the uploaded audio contains NaN or infinite samples")
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate)
    info = {
        "source_sample_rate": int(rate),
        "channels": int(samples.shape[1]),
        "duration_s": round(len(mono) / target_rate, 3),
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


def read_passage_samples(
    uri: str, start_s: float, end_s: float | None, s3_endpoint_url: str | None = None
) -> tuple[np.ndarray, int]:
    """[frames, channels] float32 PCM of [start_s, end_s) of the recording at ``uri``, and its rate."""
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    if end_s is not None and end_s <= start_s:
        raise ValueError(f"end_s ({end_s}) must be greater than start_s ({start_s})")
    fs, path = make_filesystem(uri, s3_endpoint_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"source audio {uri} is not available")
    with fs.open(path, "rb") as f:
        try:
            with sf.SoundFile(f) as sound:
                rate = sound.samplerate
                first = int(round(start_s * rate))
                if first >= sound.frames:
                    raise ValueError(
                        f"start_s {start_s} is past the end of the recording ({sound.frames / rate:.2f} s)"
                    )
                stop_s = min(
                    end_s if end_s is not None else sound.frames / rate, start_s + MAX_PASSAGE_S
                )
                sound.seek(first)
                pcm = sound.read(int(round(stop_s * rate)) - first, dtype="float32", always_2d=True)
        except sf.LibsndfileError as err:
            raise FileNotFoundError(f"source audio {uri} cannot be decoded: {err}") from None
    return pcm, rate


def read_passage(
    uri: str, start_s: float, end_s: float | None, s3_endpoint_url: str | None = None
) -> bytes:
    """A WAV of [start_s, end_s) of the recording at ``uri`` (local path or fsspec URL)."""
    pcm, rate = read_passage_samples(uri, start_s, end_s, s3_endpoint_url)
    out = io.BytesIO()
    sf.write(out, pcm, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def waveform_peaks(samples: np.ndarray, points: int) -> tuple[list[float], list[float]]:
    """Min and max of ``points`` equal bins of a mono signal (what a waveform view draws)."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    edges = np.linspace(0, len(samples), min(points, max(1, len(samples))) + 1).astype(int)
    lows = [float(samples[a:b].min()) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])]
    highs = [float(samples[a:b].max()) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])]
    return lows, highs


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
        self.waveform_cache = LRUCache(64)

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
            "model": m.get("model", {}),
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

    # -- embedding -------------------------------------------------------------------------
    def prepare_upload(self, data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode an upload and cut it to serve.max_query_s (the part done outside the embedding batch)."""
        samples, info = decode_upload(data, self.cfg.audio.sample_rate, self.max_upload_bytes)
        max_samples = int(self.cfg.serve.max_query_s * self.cfg.audio.sample_rate)
        info["truncated"] = len(samples) > max_samples
        return samples[:max_samples], info

    def embed_clips(self, clips: list[np.ndarray]) -> tuple[list[np.ndarray], IndexState]:
        """Query vectors of several clips in one model call, and the state whose embedder made them.

        Each clip's vector is the mean of its window embeddings, re-normalised.
        """
        state = self._state
        frames = [clip_windows(c, self.window, self.hop) for c in clips]
        vectors = (
            state.embedder.embed(np.concatenate(frames))
            if frames
            else np.zeros((0, state.index.dim))
        )
        self.stats.record_batch(len(clips))
        self.metrics.record_batch(len(clips))
        out, at = [], 0
        for f in frames:
            out.append(normalize(vectors[at : at + len(f)].mean(axis=0)))
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
        hits = state.index.search(vector, **options.search_kwargs(self.cfg.serve))
        return self._response(
            state, query, hits, query_samples if options.explain else None, started
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
        segment_ids, hits = state.index.search_by_track(
            track_id, start_s, end_s, **options.search_kwargs(self.cfg.serve)
        )
        query = {
            "kind": "track",
            "track_id": track_id,
            "start_s": start_s,
            "end_s": end_s,
            "segment_ids": segment_ids,
        }
        query_samples = None
        if options.explain:
            rows = [state.index.segment(s) for s in segment_ids]
            span = (min(r["start_s"] for r in rows), max(r["end_s"] for r in rows))
            try:
                query_samples = self._passage(rows[0]["source_uri"], *span)
            except (FileNotFoundError, ValueError):
                query_samples = None  # the query's audio is gone: results without explanations
        return self._response(state, query, hits, query_samples, started)

    # -- audio -----------------------------------------------------------------------------
    def audio(self, track_id: str, start_s: float = 0.0, end_s: float | None = None) -> bytes:
        track = self.index.track(track_id)  # KeyError for unknown tracks
        return read_passage(track["source_uri"], start_s, end_s, self.cfg.storage.s3_endpoint_url)

    def waveform(self, track_id: str, points: int = 800) -> dict[str, Any]:
        """Min/max peaks of a whole track for drawing (cached per track and resolution)."""
        track = self.index.track(track_id)

        def compute() -> dict[str, Any]:
            pcm, rate = read_passage_samples(
                track["source_uri"], 0.0, None, self.cfg.storage.s3_endpoint_url
            )
            mono = pcm.mean(axis=1)
            lows, highs = waveform_peaks(mono, points)
            return {
                "track_id": track_id,
                "duration_s": round(len(mono) / rate, 3),
                "points": len(lows),
                "min": [round(v, 4) for v in lows],
                "max": [round(v, 4) for v in highs],
            }

        return self.waveform_cache.get_or_compute((track["source_uri"], points), compute)

    # -- explanations ----------------------------------------------------------------------
    def _passage(self, uri: str, start_s: float, end_s: float) -> np.ndarray:
        pcm, rate = read_passage_samples(uri, start_s, end_s, self.cfg.storage.s3_endpoint_url)
        mono = pcm.mean(axis=1)
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
