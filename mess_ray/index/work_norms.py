"""Per-work norms of an index's vectors (mess_ray.work_relative), stored in the index artifact.

The index job streams its vector shards through :class:`mess_ray.work_relative.NormAccumulator`
(work: the segment's ``piece_id``; performance: the catalog's ``performance_id``, else the
track), writes ``work_norms.json`` beside ``index.faiss`` and records it in the manifest
(``work_norms``: file, schema, sha256, mode, works). :func:`load_work_norms` reads it back,
checksum verified; an index built before this (no ``work_norms``) loads with None.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mess_ray.index.embed import table_to_vectors
from mess_ray.index.faiss_index import sha256_bytes
from mess_ray.storage import Storage
from mess_ray.work_relative import SCHEMA, NormAccumulator, WorkNorms

WORK_NORMS_FILE = "work_norms.json"


def performance_of(metadata_json: str | None, track_id: str) -> str:
    """The performance a segment belongs to, whatever chain recorded it."""
    try:
        meta = json.loads(metadata_json or "{}")
    except json.JSONDecodeError:
        meta = {}
    return str(meta.get("performance_id") or track_id) if isinstance(meta, dict) else track_id


def segment_works(segments: pa.Table) -> dict[int, tuple[str, str]]:
    """segment_id -> (work, performance) from the segment table."""
    ids = segments.column("segment_id").to_pylist()
    tracks = segments.column("track_id").to_pylist()
    pieces = segments.column("piece_id").to_pylist()
    metas = (
        segments.column("metadata_json").to_pylist()
        if "metadata_json" in segments.column_names
        else [None] * len(ids)
    )
    return {
        int(s): (str(p or ""), performance_of(m, str(t)))
        for s, t, p, m in zip(ids, tracks, pieces, metas)
    }


def fit_from_files(storage: Storage, files: list[str], segments: pa.Table, wcfg) -> WorkNorms:
    """Norms of the vectors in ``files`` (vector parquet shards), one shard at a time."""
    owner = segment_works(segments)
    acc = NormAccumulator()
    for path in files:
        vectors, ids = table_to_vectors(pq.read_table(path, filesystem=storage.pyarrow_fs()))
        if len(ids) == 0:
            continue
        pairs = [owner.get(int(i), ("", str(i))) for i in ids]
        acc.add(np.asarray(vectors, dtype=np.float64), [w for w, _ in pairs], [p for _, p in pairs])
    return acc.finish(min_performances=wcfg.min_performances, mode=wcfg.mode)


def write_work_norms(storage: Storage, base: str, norms: WorkNorms) -> dict[str, Any]:
    """Write ``work_norms.json`` under ``base``; the manifest entry that describes it."""
    blob = json.dumps(norms.to_dict(), sort_keys=True).encode()
    storage.write_bytes(posixpath.join(base, WORK_NORMS_FILE), blob)
    if sha256_bytes(storage.read_bytes(posixpath.join(base, WORK_NORMS_FILE))) != sha256_bytes(
        blob
    ):
        raise OSError(f"{WORK_NORMS_FILE} read back differently from what was written")
    return {
        "file": WORK_NORMS_FILE,
        "schema": SCHEMA,
        "sha256": sha256_bytes(blob),
        "mode": norms.mode,
        "min_performances": norms.min_performances,
        "works": len(norms.works),
        "performances": int(norms.corpus.performances),
    }


def load_work_norms(storage: Storage, manifest: dict[str, Any]) -> WorkNorms | None:
    """The index's work norms (None when the index was built without them)."""
    entry = manifest.get("work_norms")
    if not entry:
        return None
    if entry.get("schema") != SCHEMA:
        raise ValueError(
            f"index {manifest.get('version')} has work norms of schema {entry.get('schema')!r}, "
            f"this code reads schema {SCHEMA}: rebuild the index"
        )
    rel = posixpath.join("index", manifest["version"], entry["file"])
    blob = storage.read_bytes(rel)
    if sha256_bytes(blob) != entry.get("sha256"):
        raise ValueError(f"checksum mismatch for {entry['file']} of index {manifest['version']}")
    return WorkNorms.from_dict(json.loads(blob))
