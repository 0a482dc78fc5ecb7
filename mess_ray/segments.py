"""The segment table: the contract between ingest and every later stage.

Ingest writes ``ingest/<version>/segments/*.parquet`` with :data:`SEGMENT_SCHEMA` and
``ingest/<version>/rejects.parquet`` with :data:`REJECT_SCHEMA`. Segment audio lives in the
table itself (``audio``: mono float32 little-endian PCM at ``sample_rate``), so training and
embedding stream rows with Ray Data without reopening source files; the metadata columns
are read on their own (``columns=``) when the audio is not needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mess_ray.storage import Storage

SEGMENT_SCHEMA = pa.schema(
    [
        ("segment_id", pa.int64()),  # stable: hash of (track_id, start_sample)
        ("track_id", pa.string()),
        ("piece_id", pa.string()),  # the musical work ("" if unknown); splits are by piece
        ("style", pa.string()),  # expressive profile label ("" if unknown)
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("start_sample", pa.int64()),
        ("num_samples", pa.int64()),
        ("sample_rate", pa.int32()),
        ("source_uri", pa.string()),  # where the recording lives, for playback
        ("metadata_json", pa.string()),  # catalog metadata carried through to search results
        ("audio", pa.binary()),  # float32 LE mono PCM
    ]
)
METADATA_COLUMNS = [f.name for f in SEGMENT_SCHEMA if f.name != "audio"]

REJECT_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("track_id", pa.string()),
        (
            "reason",
            pa.string(),
        ),  # unreadable | truncated | zero_length | not_audio | too_short | decode_error
        ("detail", pa.string()),
    ]
)


def window_samples(seconds: float, sample_rate: int) -> int:
    """A window (or hop) of ``seconds`` in whole samples at ``sample_rate``, rounded to the
    nearest sample: the one definition ingest, training, indexing, serving and evaluation share,
    so a segment cut by ingest is exactly the length every later stage expects."""
    return int(round(seconds * sample_rate))


def segment_id(track_id: str, start_sample: int) -> int:
    """Stable positive 63-bit id: the same track and start always give the same id."""
    digest = hashlib.blake2b(f"{track_id}\x00{start_sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def mix_to_mono(block: np.ndarray) -> np.ndarray:
    """The channel mean of a (frames, channels) float32 block, as a new contiguous array.

    Bit-identical to ``block.mean(axis=1, dtype=np.float32)`` (the same float32 sums in the same
    order, one division), but summed column by column: NumPy reduces a short inner axis with a
    strided loop, which took a quarter of ingest's CPU (README, ``ingest_throughput --profile``)."""
    mono = block[:, 0].copy()
    for channel in range(1, block.shape[1]):
        mono += block[:, channel]
    if block.shape[1] > 1:
        mono /= np.float32(block.shape[1])
    return mono


def encode_audio(samples: np.ndarray) -> bytes:
    return np.ascontiguousarray(samples, dtype="<f4").tobytes()


def decode_audio(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Crop or zero-pad to ``length`` samples (the last segment of a track can be short)."""
    if len(samples) >= length:
        return samples[:length]
    return np.pad(samples, (0, length - len(samples)))


def segments_dir(version: str) -> str:
    return posixpath.join("ingest", version, "segments")


def segment_files(storage: Storage, version: str) -> list[str]:
    """The segment shards of an ingest version, as storage paths, in track-id order.

    Readers get the rows in the catalog's (track-id) order whatever the shards are named: a
    one-pass ingest names each file's shard by its fingerprint, which hashes the source URI
    (storage root, render version), so a name order would change the training data order
    (and the trained weights) from one identical run to the next. Shards not named after a
    file record (carried-over tracks, older layouts) follow in name order."""
    rel = segments_dir(version)
    names = sorted(n for n in storage.listdir(rel) if n.endswith(".parquet"))
    files_rel = posixpath.join("ingest", version, "files.parquet")
    track_of: dict[str, str] = {}
    if storage.exists(files_rel):
        with storage.open(files_rel, "rb") as f:
            records = pq.read_table(f, columns=["fingerprint", "track_id"]).to_pylist()
        track_of = {f"part-{r['fingerprint']}.parquet": r["track_id"] for r in records}
    names.sort(key=lambda n: (0, track_of[n], n) if n in track_of else (1, "", n))
    return [storage.path(rel, n) for n in names]


def segments_dataset(storage: Storage, version: str | None = None) -> pads.Dataset:
    version = version or storage.require_latest("ingest")
    return pads.dataset(
        segment_files(storage, version),
        format="parquet",
        filesystem=storage.pyarrow_fs(),
        schema=SEGMENT_SCHEMA,
    )


def read_segment_table(
    storage: Storage, version: str | None = None, columns: list[str] | None = None
) -> pa.Table:
    """The segment table (metadata only unless ``columns`` asks for audio), sorted by id."""
    table = segments_dataset(storage, version).to_table(columns=columns or METADATA_COLUMNS)
    if "segment_id" in table.column_names:
        table = table.sort_by("segment_id")
    return table


def read_segments_ray(
    storage: Storage, version: str | None = None, columns: list[str] | None = None
):
    """The segment table as a Ray Dataset (streams; used by training and embedding)."""
    import ray.data

    version = version or storage.require_latest("ingest")
    files = segment_files(storage, version)
    with _footer_readers(len(files)):
        return ray.data.read_parquet(
            files, filesystem=storage.pyarrow_fs(), columns=columns, schema=SEGMENT_SCHEMA
        )


# Ray Data lists a Parquet read by reading the files' footers on a pool of actors, 32 of them
# unless RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise, each a new process that imports
# Ray Data. For the few shards of a small corpus, starting them costs more than the read
# itself (benchmarks/train_throughput.py, `parquet_listing`). Ray hands the actors footers in
# batches of RAY_DATA_PARQUET_FOOTER_BATCH_SIZE files (10): more actors than batches idle.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FOOTER_BATCH_FILES = 10
_FOOTER_ACTORS_MAX = 32


def footer_readers(num_files: int) -> int:
    """How many footer-reading actors a Parquet read of ``num_files`` files needs: one per
    batch of footers, at least one, at most Ray's default pool."""
    return max(1, min(_FOOTER_ACTORS_MAX, math.ceil(num_files / _FOOTER_BATCH_FILES)))


@contextlib.contextmanager
def _footer_readers(num_files: int):
    """Size Ray Data's footer-reader pool for one read (Ray reads the variable when the read
    is planned, on this process); a value the user set in the environment wins."""
    if FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(footer_readers(num_files))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)


def _piece_score(piece_id: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{piece_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_pieces(piece_ids, fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (train, holdout) split by piece: no piece is on both sides.

    A piece is held out when its seeded hash score is below ``fraction``, so adding pieces
    never moves an existing piece across the split. Small corpora are clamped so that each
    side keeps at least two pieces (one when there are fewer than four): retrieval "across
    different pieces" needs two pieces on the evaluated side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    pieces = sorted(set(piece_ids), key=lambda p: (_piece_score(p, seed), p))
    n = len(pieces)
    if n < 2:
        return pieces, []
    floor = 2 if n >= 4 else 1
    n_holdout = sum(_piece_score(p, seed) < fraction for p in pieces)
    n_holdout = min(max(n_holdout, floor), n - floor)
    return sorted(pieces[n_holdout:]), sorted(pieces[:n_holdout])


def pool_neighbours(
    vectors: np.ndarray,
    track_ids,
    starts_s,
    hop_s: float,
    neighbours: int,
    decay: float = 0.5,
) -> np.ndarray:
    """Phrase-level context: each segment's unit vector averaged with those of its
    ``neighbours`` segments on each side *in the same recording* (weight ``decay`` ** steps
    away), re-normalised. ``neighbours=0`` returns the unit vectors. Segments of other
    recordings never mix."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(track_ids) or len(x) != len(starts_s):
        raise ValueError("vectors, track ids and start times disagree on the number of segments")
    if neighbours < 0 or hop_s <= 0 or not 0 <= decay <= 1:
        raise ValueError("pool_neighbours needs neighbours >= 0, hop_s > 0 and 0 <= decay <= 1")
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if neighbours == 0:
        return unit
    tracks = np.asarray(track_ids, dtype=object)
    steps = np.round(np.asarray(starts_s, dtype=np.float64) / hop_s).astype(np.int64)
    out = np.zeros_like(unit)
    for track in dict.fromkeys(tracks.tolist()):
        rows = np.flatnonzero(tracks == track)
        distance = np.abs(steps[rows, None] - steps[None, rows])
        weights = np.where(distance <= neighbours, float(decay) ** distance, 0.0)
        out[rows] = weights @ unit[rows]
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
