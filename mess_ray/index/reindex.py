"""Incremental reindex: bring the latest published index up to date with the latest ingest table.

Only segments the index does not have yet (by segment id) are embedded, with the embedder the
previous index recorded; vectors of segments gone from the ingest table are dropped, the rest
are reused. The result is published as a new index version whose manifest names the previous
version and the added/removed counts.

Crash safety: newly embedded vectors go to ``index/_pending/<key>/added/run-*/`` where ``key``
is derived from (previous index, ingest version, embedder, added ids), so a re-run after a crash
finds the completed shards, drops unreadable (half-written) ones and embeds only what is
missing. Nothing is visible to readers until ``storage.publish`` moves LATEST, which happens
after the index, metadata and vectors are written and their checksums verified. A run that
finds nothing to add or remove publishes nothing and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from dataclasses import replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mess_ray.config import MessRayConfig
from mess_ray.index.faiss_index import (
    IndexSpec,
    build_sharded_index_ray,
    index_from_bytes,
    index_to_bytes,
    load_index,
    merge_indexes,
    sha256_bytes,
)
from mess_ray.index.job import (
    INDEX_FILE,
    METADATA_FILE,
    STAGE,
    VECTORS_DIR,
    IndexIntegrityError,
    build_index_from_files,
    embed_segments,
    read_vector_ids,
    reconcile_ids,
    shard_loaders,
    spec_for,
    write_index_artifact,
)
from mess_ray.segments import read_segment_table
from mess_ray.storage import Storage, new_version

log = logging.getLogger(__name__)

PENDING_DIR = "_pending"
# What identifies an embedder's weights: two infos agreeing on these produce the same vectors.
EMBEDDER_IDENTITY_KEYS = (
    "kind",
    "stage",
    "version",
    "shipped",
    "path",
    "size",
    "seed",
    "layer",
    "sample_rate",
    "content_timeline",
)


# -- pure parts ---------------------------------------------------------------------------
def diff_segment_ids(
    current_ids: np.ndarray, indexed_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(added, removed, kept) sorted int64 ids: in the ingest table only, in the index only, in both."""
    current = np.unique(np.asarray(current_ids, dtype=np.int64))
    indexed = np.unique(np.asarray(indexed_ids, dtype=np.int64))
    if len(current) != len(current_ids):
        raise IndexIntegrityError("the segment table has duplicate segment ids")
    return (
        np.setdiff1d(current, indexed, assume_unique=True),
        np.setdiff1d(indexed, current, assume_unique=True),
        np.intersect1d(current, indexed, assume_unique=True),
    )


def embedder_identity(info: dict[str, Any]) -> dict[str, Any]:
    identity = {key: info.get(key) for key in EMBEDDER_IDENTITY_KEYS if info.get(key) is not None}
    if identity.get("stage"):  # a stage artifact is found by stage + version under the storage root
        identity.pop("path", None)  # (its absolute path changes when the store is moved or copied)
    return identity


def same_embedder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two embedder infos name the same weights (vectors of both can share an index)."""
    ia, ib = embedder_identity(a), embedder_identity(b)
    return (
        {k: ia[k] for k in ia.keys() & ib.keys()} == {k: ib[k] for k in ia.keys() & ib.keys()}
        and ia.get("kind") == ib.get("kind")
        and ia.get("version") == ib.get("version")
        # the content timeline part changes every vector (and its width): compared even when
        # one record lacks it (an index from before the option has none)
        and (a.get("content_timeline") or None) == (b.get("content_timeline") or None)
    )


def pending_key(
    previous_version: str, ingest_version: str, embedder_info: dict[str, Any], added_ids: np.ndarray
) -> str:
    """Stable name of one reindex job's work folder: the same inputs resume the same folder."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [previous_version, ingest_version, embedder_identity(embedder_info)],
            sort_keys=True,
            default=str,
        ).encode()
    )
    digest.update(np.ascontiguousarray(np.sort(np.asarray(added_ids, dtype=np.int64))).tobytes())
    return digest.hexdigest()[:16]


def can_update_in_place(old: IndexSpec, new: IndexSpec) -> bool:
    """Whether the previous index can take the changes (remove + add) instead of a rebuild.

    Same type, mergeable (HNSW graphs cannot drop vectors), in memory, and for IVF a corpus still sized
    for the trained coarse quantizer (within 2x of the list count a fresh build would pick).
    """
    if old.type != new.type or old.dim != new.dim or not old.mergeable or old.type == "hnsw":
        return False
    if (
        old.ondisk or new.ondisk
    ):  # memory-mapped lists are rebuilt by an on-disk merge, never edited in place
        return False
    if old.type in ("ivf", "ivfpq"):
        return 0.5 <= new.nlist / max(1, old.nlist) <= 2.0 and old.pq_m == new.pq_m
    return True


def remove_from_index(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove vectors by segment id; returns how many were removed."""
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    if len(ids) == 0:
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))


def filter_vector_table(table: pa.Table, keep_ids: np.ndarray) -> pa.Table:
    """Rows of a vector-shard table whose segment id is in ``keep_ids``."""
    mask = np.isin(table.column("segment_id").to_numpy(), keep_ids)
    return table.filter(pa.array(mask))


# -- storage helpers ----------------------------------------------------------------------
def parquet_files_under(storage: Storage, rel: str) -> list[str]:
    """All .parquet files below ``rel`` (any depth), sorted; [] when the folder does not exist."""
    if not storage.exists(rel):
        return []
    return sorted(p for p in storage.fs.find(storage.path(rel)) if p.endswith(".parquet"))


def completed_vector_files(storage: Storage, rel: str) -> list[str]:
    """Vector shards of an interrupted run that read back whole; half-written ones are deleted."""
    good = []
    for path in parquet_files_under(storage, rel):
        try:
            pq.read_table(path, columns=["segment_id"], filesystem=storage.pyarrow_fs())
            good.append(path)
        except (OSError, pa.ArrowInvalid) as err:
            log.warning(
                "dropping unreadable vector shard %s from an interrupted run: %s", path, err
            )
            storage.fs.rm(path)
    return good


# -- the job ------------------------------------------------------------------------------
def run_reindex(
    cfg: MessRayConfig, storage: Storage, model_ref: str | None = None
) -> dict[str, Any]:
    """Update the latest index to the latest ingest table; publish a new version if anything changed.

    ``model_ref``: optional check that the previous index was built with this model (vectors
    of different models cannot share an index: run ``mess-ray index`` for a full rebuild).
    """
    from mess_ray.models import Embedder
    from mess_ray.raylocal import ensure_ray

    ingest_version = storage.require_latest("ingest")
    if storage.latest(STAGE) is None:
        raise FileNotFoundError(
            f"no published index under {storage.root}: run `mess-ray index` before reindex"
        )
    previous = storage.manifest(STAGE)
    previous_version = previous["version"]
    embedder_info = previous["model"]
    if model_ref is not None:
        requested = Embedder.from_ref(cfg, storage, model_ref).info
        if not same_embedder(requested, embedder_info):
            raise ValueError(
                f"index {previous_version} was built with {embedder_identity(embedder_info)}, not with "
                f"{model_ref!r} ({embedder_identity(requested)}): run `mess-ray index --model "
                f"{model_ref}` for a full rebuild"
            )

    segments = read_segment_table(storage, ingest_version)
    if segments.num_rows == 0:
        raise ValueError(f"ingest artifact {ingest_version} has no segments: nothing to index")
    previous_meta = _read_verified(storage, previous, METADATA_FILE)
    added, removed, kept = diff_segment_ids(
        segments.column("segment_id").to_numpy(),
        pq.read_table(pa.BufferReader(previous_meta), columns=["segment_id"])
        .column("segment_id")
        .to_numpy(),
    )
    delta = {"added": int(len(added)), "removed": int(len(removed)), "kept": int(len(kept))}
    if not len(added) and not len(removed):
        log.info(
            "reindex: index %s already covers ingest %s: nothing to do, nothing published",
            previous_version,
            ingest_version,
        )
        _clear_pending(storage)
        return {
            "changed": False,
            "version": previous_version,
            "previous_version": previous_version,
            "inputs": {"ingest": ingest_version, "index": previous_version},
            "reindex": delta,
            "message": f"index {previous_version} is up to date with ingest {ingest_version}; nothing published",
        }

    ensure_ray(cfg.ray)
    embedder = Embedder.from_info(cfg, storage, embedder_info)  # also checks the model still exists
    if int(embedder.dim) != int(previous["dim"]):
        raise IndexIntegrityError(
            f"the recorded embedder now produces {embedder.dim}-d vectors, "
            f"index {previous_version} holds {previous['dim']}-d ones"
        )
    log.info("reindex of %s against ingest %s: %s", previous_version, ingest_version, delta)

    # 1. embed the added segments (resuming an interrupted run of the same job)
    pending_rel = posixpath.join(
        STAGE, PENDING_DIR, pending_key(previous_version, ingest_version, embedder_info, added)
    )
    added_rel = posixpath.join(pending_rel, "added")
    done_ids = read_vector_ids(storage, completed_vector_files(storage, added_rel))
    todo = np.setdiff1d(added, done_ids)
    delta["reused_pending"] = int(len(added) - len(todo))
    if len(todo):
        embed_segments(
            cfg,
            storage,
            ingest_version,
            embedder_info,
            posixpath.join(added_rel, f"run-{uuid.uuid4().hex[:8]}"),
            only_ids=todo,
        )
    added_files = completed_vector_files(storage, added_rel)
    reconcile_ids(added, read_vector_ids(storage, added_files))

    # 2. the new version's vector shards: previous vectors of kept segments + the added ones
    version = new_version()
    vectors_rel = posixpath.join(STAGE, version, VECTORS_DIR)
    previous_files = parquet_files_under(
        storage,
        posixpath.join(
            STAGE, previous_version, previous.get("files", {}).get("vectors", VECTORS_DIR)
        ),
    )
    fs = storage.pyarrow_fs()
    for i, path in enumerate(
        tqdm(previous_files, desc="reuse vectors", unit="file", disable=len(previous_files) < 8)
    ):
        kept_table = filter_vector_table(pq.read_table(path, filesystem=fs), kept)
        if kept_table.num_rows:
            with storage.open(posixpath.join(vectors_rel, f"kept-{i:05d}.parquet"), "wb") as f:
                pq.write_table(kept_table, f)
    for i, path in enumerate(added_files):
        with storage.open(posixpath.join(vectors_rel, f"added-{i:05d}.parquet"), "wb") as f:
            pq.write_table(pq.read_table(path, filesystem=fs), f)
    files = parquet_files_under(storage, vectors_rel)
    counts = reconcile_ids(
        segments.column("segment_id").to_numpy(), read_vector_ids(storage, files)
    )

    # 3. the index: update the previous one in place when it still fits, else rebuild
    old_spec = IndexSpec.from_dict(previous["index"])
    new_spec = spec_for(cfg, counts["vectors"], int(embedder.dim))
    if can_update_in_place(old_spec, new_spec):
        spec = replace(
            old_spec, nprobe=min(new_spec.nprobe, old_spec.nlist) if old_spec.nlist else 0
        )
        index = load_index(
            storage,
            posixpath.join(STAGE, previous_version, INDEX_FILE),
            previous.get("checksums", {}).get(INDEX_FILE),
        )
        if remove_from_index(index, removed) != len(removed):
            raise IndexIntegrityError(
                f"index {previous_version} lacks some of the {len(removed)} removed segments"
            )
        empty = index_from_bytes(index_to_bytes(index))
        empty.reset()  # same trained quantizer, no vectors: the template for the added shards
        added_part = build_sharded_index_ray(
            spec, empty, shard_loaders(storage, added_files, cfg.index.shards)
        )
        index = merge_indexes([index, added_part])
        build = "in_place"
    else:
        spec = new_spec
        index = build_index_from_files(cfg, storage, spec, files, counts["vectors"], version)
        build = "rebuild"
    if index.ntotal != counts["vectors"]:
        raise IndexIntegrityError(
            f"updated index holds {index.ntotal} vectors, expected {counts['vectors']}"
        )

    counts.update({"vector_files": len(files), "shards": cfg.index.shards, **delta})
    content_extra = {}
    if cfg.content.features:  # unchanged tracks keep their features, new ones get computed
        from mess_ray.index.content_features import carry_over_content

        content_extra["content"] = carry_over_content(
            cfg, storage, ingest_version, posixpath.join(STAGE, version), segments, previous
        )
    # The same weights (checked above) have the same facets: a layout the rebuilt info lacks is carried over.
    info = {
        **embedder.info,
        "facet_layout": embedder.info.get("facet_layout") or previous.get("facet_layout"),
    }
    manifest = write_index_artifact(
        cfg,
        storage,
        version,
        index,
        spec,
        segments,
        info,
        counts,
        {
            "ingest": ingest_version,
            "model_ref": previous.get("inputs", {}).get("model_ref"),
            "previous_index": previous_version,
        },
        extra={
            "previous_version": previous_version,
            "reindex": {**delta, "build": build},
            "changed": True,
            **content_extra,
        },
    )
    _clear_pending(storage)
    return manifest


def _read_verified(storage: Storage, manifest: dict[str, Any], name: str) -> bytes:
    blob = storage.read_bytes(
        posixpath.join(
            STAGE,
            manifest["version"],
            manifest.get("files", {}).get("metadata" if name == METADATA_FILE else "index", name),
        )
    )
    expected = manifest.get("checksums", {}).get(name)
    if expected is not None and sha256_bytes(blob) != expected:
        raise IndexIntegrityError(
            f"{name} of index {manifest['version']} does not match its manifest checksum"
        )
    return blob


def _clear_pending(storage: Storage) -> None:
    """Work folders are only needed until a publish; a crash leaves them for the next run to reuse."""
    rel = posixpath.join(STAGE, PENDING_DIR)
    if storage.exists(rel):
        storage.fs.rm(storage.path(rel), recursive=True)
