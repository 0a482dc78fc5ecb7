"""Embedding the segment table: pure batch functions plus the Ray Data actor that runs them.

Each actor rebuilds the :class:`~mess_ray.models.Embedder` once from its ``info`` dict (the
same dict the index manifest records, so serving rebuilds the identical model) and turns
batches of segment rows into ``(segment_id int64, embedding fixed_size_list<float32>[D])``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from mess_ray.config import MessRayConfig
from mess_ray.segments import decode_audio, fit_length, window_samples
from mess_ray.storage import Storage


def vector_schema(dim: int) -> pa.Schema:
    return pa.schema([("segment_id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim))])


def segment_audio_matrix(
    audio_blobs: Any, sample_rates: Any, expected_rate: int, length: int
) -> np.ndarray:
    """Decode a batch of segment audio blobs into a [B, length] float32 model input."""
    rates = np.asarray(sample_rates)
    if len(rates) and np.any(rates != expected_rate):
        bad = sorted(set(int(r) for r in rates[rates != expected_rate]))
        raise ValueError(
            f"segments at sample rate(s) {bad} but the model expects {expected_rate} Hz: "
            "re-run ingest with the same audio.sample_rate"
        )
    out = np.zeros((len(audio_blobs), length), dtype=np.float32)
    for row, blob in enumerate(audio_blobs):
        out[row] = fit_length(decode_audio(blob), length)
    return out


def vectors_table(segment_ids: np.ndarray, embeddings: np.ndarray) -> pa.Table:
    """The vector-shard table: one row per segment, embeddings as a fixed-size list column."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(segment_ids):
        raise ValueError(
            f"expected [{len(segment_ids)}, D] embeddings, got {list(embeddings.shape)}"
        )
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("the embedder produced NaN or infinite values")
    dim = embeddings.shape[1]
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array(np.asarray(segment_ids, dtype=np.int64)),
            pa.FixedSizeListArray.from_arrays(flat, dim),
        ],
        schema=vector_schema(dim),
    )


def embed_segment_batch(
    embedder: Any, batch: dict[str, Any], sample_rate: int, length: int
) -> pa.Table:
    """Embed one batch of segment rows (``segment_id``, ``audio``, ``sample_rate`` columns)."""
    audio = segment_audio_matrix(batch["audio"], batch["sample_rate"], sample_rate, length)
    embeddings = embedder.embed(audio) if len(audio) else np.zeros((0, embedder.dim), np.float32)
    return vectors_table(np.asarray(batch["segment_id"]), embeddings)


def table_to_vectors(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, D] float32, segment ids [N] int64) from a vector-shard table."""
    ids = table.column("segment_id").to_numpy().astype(np.int64)
    column = table.column("embedding").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, column.type.list_size), np.float32), ids
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(len(column), column.type.list_size), ids


class SegmentEmbedder:
    """Ray Data callable class: the Embedder is loaded once per actor, not per batch."""

    def __init__(
        self, cfg_json: dict[str, Any], embedder_info: dict[str, Any], progress: Any = None
    ) -> None:
        from mess_ray.models import Embedder

        self.progress = progress
        cfg = MessRayConfig.model_validate(cfg_json)
        storage = Storage.from_config(cfg.storage)
        self.embedder = Embedder.from_info(cfg, storage, embedder_info)
        self.sample_rate = cfg.audio.sample_rate
        self.length = window_samples(cfg.audio.window_s, cfg.audio.sample_rate)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        table = embed_segment_batch(self.embedder, batch, self.sample_rate, self.length)
        if self.progress is not None:  # the driver's console bar: fire and forget
            self.progress.update.remote(add=table.num_rows)
        return table
