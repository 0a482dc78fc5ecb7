"""Content features of every indexed track, computed once in the index job (a Ray Data pass,
one task per track's segment files, no shuffle).

Each track's audio is stitched back together from its ingest segments (``start_sample`` +
samples; nothing is decoded again), and :func:`mess_ray.content.track_features` turns it
into chroma, onset strength and level at ``content.feature_rate``. Stored with the index
version as ``index/<version>/content/*.parquet`` (track_id, segments_digest, rate, frames,
features = npz bytes), each file's SHA-256 in the manifest's ``content.checksums``, so the
service aligns passages without touching the corpus. ``segments_digest`` (a hash of the
track's sorted segment ids) lets reindex carry a track's features over exactly when its
segments are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mess_ray.config import MessRayConfig
from mess_ray.content import FEATURES_VERSION, Features, track_features
from mess_ray.index.faiss_index import sha256_bytes
from mess_ray.segments import SEGMENT_SCHEMA, decode_audio
from mess_ray.storage import Storage

log = logging.getLogger(__name__)

CONTENT_DIR = "content"
CONTENT_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("segments_digest", pa.string()),
        ("rate", pa.float64()),
        ("frames", pa.int64()),
        ("features", pa.binary()),
    ]
)


class ContentIntegrityError(RuntimeError):
    """Stored content features do not match their manifest."""


def segments_digest(segment_ids) -> str:
    """Identity of a track's segmentation: equal digests mean the same audio was indexed."""
    ids = np.sort(np.asarray(segment_ids, dtype=np.int64))
    return hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()[:16]


def track_digests(segments: pa.Table) -> dict[str, str]:
    """Per track of a segment table (segment_id, track_id), its :func:`segments_digest`."""
    by_track: dict[str, list[int]] = {}
    for sid, tid in zip(
        segments.column("segment_id").to_pylist(), segments.column("track_id").to_pylist()
    ):
        by_track.setdefault(tid, []).append(sid)
    return {tid: segments_digest(ids) for tid, ids in by_track.items()}


def stitch(start_samples: np.ndarray, blobs: list[bytes]) -> np.ndarray:
    """A track's mono audio from its (overlapping) segments, placed at their start samples."""
    order = np.argsort(start_samples)
    pieces = [(int(start_samples[i]), decode_audio(blobs[i])) for i in order]
    total = max(s + len(a) for s, a in pieces)
    out = np.zeros(total, dtype=np.float32)
    for start, audio in pieces:
        out[start : start + len(audio)] = audio
    return out


def features_of_group(
    batch: dict[str, np.ndarray], sample_rate: int, feature_rate: float
) -> dict[str, np.ndarray]:
    """Ray Data ``map_groups`` body: all segments of one track -> one row of features."""
    track = str(batch["track_id"][0])
    rates = set(int(r) for r in batch["sample_rate"])
    feats: Features | None = None
    if rates != {sample_rate}:
        log.warning(
            "track %s: segments at %s Hz, expected %d; no features", track, rates, sample_rate
        )
    else:
        audio = stitch(np.asarray(batch["start_sample"]), list(batch["audio"]))
        try:
            feats = track_features(audio, sample_rate, feature_rate)
        except ValueError as err:  # too short: the track is listed as without features
            log.warning("track %s: no content features: %s", track, err)
    return {
        "track_id": np.asarray([track], dtype=object),
        "segments_digest": np.asarray([segments_digest(batch["segment_id"])], dtype=object),
        "rate": np.asarray([feats.rate if feats else 0.0]),
        "frames": np.asarray([feats.frames if feats else 0], dtype=np.int64),
        "features": np.asarray([feats.to_bytes() if feats else b""], dtype=object),
    }


def track_items(
    storage: Storage, ingest_version: str, only_tracks: list[str] | None = None
) -> list[dict[str, str]]:
    """The content pass's work list: one item per set of segment files, naming the tracks held
    wholly by those files (JSON lists; Ray Data's numpy batches keep plain strings as they are).

    The ingest job writes each track to its own shard, so an item is normally one file and one
    track; a track spread over several files (another writer's layout) gets one item with all
    of them. Only the ``track_id`` column is read here."""
    from mess_ray.segments import segments_dataset

    wanted = None if only_tracks is None else set(only_tracks)
    files_of: dict[str, set[str]] = {}
    for fragment in segments_dataset(storage, ingest_version).get_fragments():
        ids = fragment.to_table(columns=["track_id"]).column("track_id").unique().to_pylist()
        for tid in ids:
            if wanted is None or tid in wanted:
                files_of.setdefault(tid, set()).add(fragment.path)
    tracks_of: dict[tuple[str, ...], list[str]] = {}
    for tid, files in files_of.items():
        tracks_of.setdefault(tuple(sorted(files)), []).append(tid)
    return [
        {"files": json.dumps(list(files)), "tracks": json.dumps(sorted(tids))}
        for files, tids in sorted(tracks_of.items())
    ]


def features_of_items(
    batch: dict[str, np.ndarray],
    storage_cfg: dict[str, Any],
    sample_rate: int,
    feature_rate: float,
) -> pa.Table:
    """Ray Data ``map_batches`` body over :func:`track_items`: read each item's files (metadata
    and audio of its tracks only) and turn every track into one row of features."""
    from mess_ray.config import StorageConfig

    fs = Storage.from_config(StorageConfig(**storage_cfg)).pyarrow_fs()
    columns = ["segment_id", "track_id", "start_sample", "sample_rate", "audio"]
    rows = []
    for files_json, tracks_json in zip(batch["files"], batch["tracks"]):
        tracks = json.loads(str(tracks_json))
        keep = pc.field("track_id").isin(tracks)
        table = pa.concat_tables(
            pq.read_table(path, columns=columns, filesystem=fs, filters=keep).cast(
                pa.schema([SEGMENT_SCHEMA.field(c) for c in columns])
            )
            for path in json.loads(str(files_json))
        )
        ids = table.column("track_id").to_numpy(zero_copy_only=False)
        for track in tracks:
            group = table.filter(pa.array(ids == track))
            rows.append(
                features_of_group(
                    {name: group.column(name).to_numpy(zero_copy_only=False) for name in columns},
                    sample_rate,
                    feature_rate,
                )
            )
    if not rows:
        return CONTENT_SCHEMA.empty_table()
    return pa.table(
        {name: np.concatenate([row[name] for row in rows]) for name in CONTENT_SCHEMA.names}
    ).cast(CONTENT_SCHEMA)


def compute_content(
    cfg: MessRayConfig,
    storage: Storage,
    ingest_version: str,
    out_rel: str,
    only_tracks: list[str] | None = None,
) -> None:
    """Ray Data: one task per track's segment files -> features rows -> Parquet files under
    ``out_rel``. No shuffle: each track's segments are read where the ingest job stored them
    (a ``groupby("track_id")`` would move every segment's audio through the object store, and
    its aggregator actors cost seconds to start even on a handful of tracks)."""
    import ray.data

    items = track_items(storage, ingest_version, only_tracks)
    if not items:
        return
    # As many blocks as tasks can run at once (each task then takes its block's items one
    # after the other): more blocks than that only starts more short-lived worker processes,
    # each importing the feature stack again.
    slots = int(ray.cluster_resources().get("CPU", 1) / cfg.content.cpus_per_task)
    blocks = max(1, min(len(items), slots))
    rows = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        features_of_items,
        batch_size=1,
        fn_kwargs={
            "storage_cfg": storage.config().model_dump(),
            "sample_rate": cfg.audio.sample_rate,
            "feature_rate": cfg.content.feature_rate,
        },
        batch_format="numpy",
        num_cpus=cfg.content.cpus_per_task,
    )
    rows.write_parquet(storage.path(out_rel), filesystem=storage.pyarrow_fs())


def _files(storage: Storage, rel: str) -> list[str]:
    if not storage.exists(rel):
        return []
    return sorted(name for name in storage.listdir(rel) if name.endswith(".parquet"))


def finish_content(
    storage: Storage, base: str, digests: dict[str, str], feature_rate: float
) -> dict[str, Any]:
    """Checksum the content files of ``index/<version>`` and describe them for the manifest."""
    rel = posixpath.join(base, CONTENT_DIR)
    checksums: dict[str, str] = {}
    tracks: set[str] = set()
    empty: set[str] = set()
    for name in _files(storage, rel):
        blob = storage.read_bytes(posixpath.join(rel, name))
        checksums[name] = sha256_bytes(blob)
        table = pq.read_table(io.BytesIO(blob), columns=["track_id", "frames"])
        ids = table.column("track_id").to_pylist()
        if tracks.intersection(ids) or len(set(ids)) != len(ids):
            raise ContentIntegrityError(f"content features of a track are stored twice ({name})")
        tracks.update(ids)
        empty.update(t for t, f in zip(ids, table.column("frames").to_pylist()) if not f)
    unknown = tracks - set(digests)
    if unknown:
        raise ContentIntegrityError(
            f"content features for tracks not in the index: {sorted(unknown)[:3]}"
        )
    return {
        "dir": CONTENT_DIR,
        "feature_rate": feature_rate,
        "features_version": FEATURES_VERSION,
        "tracks": len(tracks - empty),
        "tracks_without_features": sorted((set(digests) - tracks) | empty),
        "checksums": checksums,
    }


def build_content(
    cfg: MessRayConfig, storage: Storage, ingest_version: str, base: str, segments: pa.Table
) -> dict[str, Any]:
    """The index job's feature pass for every track; returns the manifest's ``content`` entry."""
    digests = track_digests(segments)
    compute_content(cfg, storage, ingest_version, posixpath.join(base, CONTENT_DIR))
    info = finish_content(storage, base, digests, cfg.content.feature_rate)
    info["computed"] = len(digests)
    info["reused"] = 0
    return info


def carry_over_content(
    cfg: MessRayConfig,
    storage: Storage,
    ingest_version: str,
    base: str,
    segments: pa.Table,
    previous: dict[str, Any],
) -> dict[str, Any]:
    """Reindex: reuse the previous version's features of unchanged tracks, compute the rest."""
    digests = track_digests(segments)
    out_rel = posixpath.join(base, CONTENT_DIR)
    reusable: list[pa.Table] = []
    prev_info = previous.get("content")
    same_rate = (
        prev_info is not None
        and float(prev_info.get("feature_rate", -1)) == float(cfg.content.feature_rate)
        and prev_info.get("features_version", 1) == FEATURES_VERSION
    )
    if same_rate:
        table = read_content_table(storage, previous)
        keep = [
            digests.get(t) == d
            for t, d in zip(
                table.column("track_id").to_pylist(), table.column("segments_digest").to_pylist()
            )
        ]
        kept = table.filter(pa.array(keep, type=pa.bool_()))
        if kept.num_rows:
            reusable.append(kept)
    reused = set(reusable[0].column("track_id").to_pylist()) if reusable else set()
    if reusable:
        buffer = io.BytesIO()
        pq.write_table(reusable[0], buffer)
        storage.write_bytes(posixpath.join(out_rel, "kept-00000.parquet"), buffer.getvalue())
    todo = sorted(set(digests) - reused)
    if todo:
        compute_content(cfg, storage, ingest_version, out_rel, only_tracks=todo)
    info = finish_content(storage, base, digests, cfg.content.feature_rate)
    info["reused"] = len(reused)
    info["computed"] = len(todo)
    return info


def read_content_table(storage: Storage, manifest: dict[str, Any]) -> pa.Table:
    """All content rows of an index version, each file checked against the manifest."""
    info = manifest.get("content")
    if not info:
        raise FileNotFoundError(
            f"index {manifest.get('version')} has no content features: rebuild it with "
            "content.features on (`mess-ray index`)"
        )
    if info.get("features_version", 1) != FEATURES_VERSION:
        raise ContentIntegrityError(
            f"index {manifest['version']} holds content features of version "
            f"{info.get('features_version', 1)}, this release computes version {FEATURES_VERSION}: "
            "rebuild it (`mess-ray index` or `mess-ray reindex`)"
        )
    rel = posixpath.join("index", manifest["version"], info.get("dir", CONTENT_DIR))
    checksums = info.get("checksums", {})
    names = _files(storage, rel)
    if set(names) != set(checksums):
        raise ContentIntegrityError(
            f"content files of index {manifest['version']} differ from its manifest"
        )
    tables = []
    for name in names:
        blob = storage.read_bytes(posixpath.join(rel, name))
        if sha256_bytes(blob) != checksums[name]:
            raise ContentIntegrityError(f"checksum mismatch for {storage.url(rel, name)}")
        tables.append(pq.read_table(io.BytesIO(blob)).cast(CONTENT_SCHEMA))
    return pa.concat_tables(tables) if tables else CONTENT_SCHEMA.empty_table()


def load_content(storage: Storage, manifest: dict[str, Any]) -> dict[str, Features]:
    """Track id -> :class:`Features` of an index version (checksums verified)."""
    table = read_content_table(storage, manifest)
    return {
        tid: Features.from_bytes(blob)
        for tid, frames, blob in zip(
            table.column("track_id").to_pylist(),
            table.column("frames").to_pylist(),
            table.column("features").to_pylist(),
        )
        if frames
    }
