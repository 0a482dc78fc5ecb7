"""Request handling of the search service, free of Ray and HTTP (the FastAPI layer maps errors).

:class:`SearchService` holds a loaded :class:`~mess_ray.index.SearchIndex` and the Embedder
rebuilt from the index manifest, and turns uploads (any rate, any channel count, WAV/FLAC/
MP3/OGG) into query vectors: decode with soundfile, downmix, resample with soxr to
``cfg.audio.sample_rate``, cut into model windows, embed, average.

Errors: :class:`PayloadTooLarge` (413), :class:`UnsupportedMedia` (415), ``ValueError`` (422),
``KeyError``/``FileNotFoundError`` (404).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from mess_ray.config import MessRayConfig
from mess_ray.index.searcher import Hit, SearchIndex, normalize
from mess_ray.storage import Storage, make_filesystem

# Longest passage /audio returns: enough for whole tracks, bounded so one request cannot
# pull an hour of PCM into memory.
MAX_PASSAGE_S = 900.0


class PayloadTooLarge(ValueError):
    """Upload above cfg.serve.max_upload_mb."""


class UnsupportedMedia(ValueError):
    """The upload is not decodable audio."""


def decode_upload(data: bytes, target_rate: int, max_bytes: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode an uploaded audio file to mono float32 at ``target_rate``; returns (samples, info)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(f"upload of {len(data) / 2**20:.1f} MiB exceeds the {max_bytes / 2**20:.1f} MiB limit")
    if not data:
        raise UnsupportedMedia("the upload is empty: send a WAV, FLAC, MP3 or OGG file")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise UnsupportedMedia(f"could not decode the upload as audio (WAV, FLAC, MP3 or OGG expected): {err}") from None
    if samples.size == 0:
        raise UnsupportedMedia("the uploaded audio contains no samples")
    mono = samples.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise UnsupportedMedia("the uploaded audio contains NaN or infinite samples")
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate)
    info = {"source_sample_rate": int(rate), "channels": int(samples.shape[1]),
            "duration_s": round(len(mono) / target_rate, 3)}
    return np.ascontiguousarray(mono, dtype=np.float32), info


def clip_windows(samples: np.ndarray, window: int, hop: int) -> np.ndarray:
    """[N, window] frames covering the clip (the last one zero-padded; a short clip gives one)."""
    if len(samples) <= window:
        return np.pad(samples, (0, window - len(samples)))[None, :]
    starts = list(range(0, len(samples) - window + 1, hop))
    if starts[-1] + window < len(samples):
        starts.append(len(samples) - window)  # cover the tail instead of dropping it
    return np.stack([samples[s:s + window] for s in starts])


def read_passage(uri: str, start_s: float, end_s: float | None, s3_endpoint_url: str | None = None) -> bytes:
    """A WAV of [start_s, end_s) of the recording at ``uri`` (local path or fsspec URL)."""
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
                    raise ValueError(f"start_s {start_s} is past the end of the recording ({sound.frames / rate:.2f} s)")
                stop_s = min(end_s if end_s is not None else sound.frames / rate, start_s + MAX_PASSAGE_S)
                sound.seek(first)
                pcm = sound.read(int(round(stop_s * rate)) - first, dtype="float32", always_2d=True)
        except sf.LibsndfileError as err:
            raise FileNotFoundError(f"source audio {uri} cannot be decoded: {err}") from None
    out = io.BytesIO()
    sf.write(out, pcm, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


class SearchService:
    """A loaded index + embedder answering search requests."""

    def __init__(self, cfg: MessRayConfig, index: SearchIndex, embedder: Any) -> None:
        built_rate = index.manifest.get("audio", {}).get("sample_rate")
        if built_rate is not None and int(built_rate) != cfg.audio.sample_rate:
            raise ValueError(f"index was built at {built_rate} Hz but audio.sample_rate is {cfg.audio.sample_rate}")
        if int(embedder.dim) != index.dim:
            raise ValueError(f"embedder dimension {embedder.dim} does not match the index ({index.dim})")
        self.cfg = cfg
        self.index = index
        self.embedder = embedder
        self.window = int(round(cfg.audio.window_s * cfg.audio.sample_rate))
        self.hop = int(round(cfg.audio.hop_s * cfg.audio.sample_rate))

    @classmethod
    def from_config(cls, cfg: MessRayConfig, storage: Storage | None = None) -> "SearchService":
        """Load the served index version and rebuild its Embedder from the manifest."""
        from mess_ray.models import Embedder

        storage = storage or Storage.from_config(cfg.storage)
        index = SearchIndex.load(storage, cfg.serve.index_version)
        embedder = Embedder.from_info(cfg, storage, index.manifest["model"])
        return cls(cfg, index, embedder)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.cfg.serve.max_upload_mb * 2**20)

    def describe(self) -> dict[str, Any]:
        m = self.index.manifest
        return {"index_version": self.index.version, "count": len(self.index), "dim": self.index.dim,
                "index_type": self.index.spec.type, "model": m.get("model", {})}

    def embed_clip(self, samples: np.ndarray) -> np.ndarray:
        """Query vector of a clip: the mean of its window embeddings, re-normalised."""
        frames = clip_windows(samples, self.window, self.hop)
        return normalize(self.embedder.embed(frames).mean(axis=0))

    def search_upload(self, data: bytes, k: int | None = None, exclude_track: str | None = None,
                      min_gap_s: float = 0.0) -> dict[str, Any]:
        started = time.perf_counter()
        samples, info = decode_upload(data, self.cfg.audio.sample_rate, self.max_upload_bytes)
        max_samples = int(self.cfg.serve.max_query_s * self.cfg.audio.sample_rate)
        info["truncated"] = len(samples) > max_samples
        samples = samples[:max_samples]
        hits = self.index.search(self.embed_clip(samples), k or self.cfg.serve.default_k, exclude_track, min_gap_s)
        return self._response({"kind": "upload", **info}, hits, started)

    def search_by_track(self, track_id: str, start_s: float, end_s: float | None = None, k: int | None = None,
                        exclude_track: str | None = None, min_gap_s: float = 0.0) -> dict[str, Any]:
        started = time.perf_counter()
        segment_ids, hits = self.index.search_by_track(track_id, start_s, end_s, k or self.cfg.serve.default_k,
                                                       exclude_track, min_gap_s)
        query = {"kind": "track", "track_id": track_id, "start_s": start_s, "end_s": end_s,
                 "segment_ids": segment_ids}
        return self._response(query, hits, started)

    def audio(self, track_id: str, start_s: float = 0.0, end_s: float | None = None) -> bytes:
        track = self.index.track(track_id)  # KeyError for unknown tracks
        return read_passage(track["source_uri"], start_s, end_s, self.cfg.storage.s3_endpoint_url)

    def _response(self, query: dict[str, Any], hits: list[Hit], started: float) -> dict[str, Any]:
        return {"query": query, "hits": [h.to_dict() for h in hits], "index_version": self.index.version,
                "took_ms": round(1000 * (time.perf_counter() - started), 2)}
