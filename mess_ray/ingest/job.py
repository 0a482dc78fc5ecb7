"""The ingest job: catalog -> Ray Data decode/segment -> segment table + rejects, versioned.

Every catalogued file ends up either segmented or rejected with a reason, and the manifest
counts reconcile (``files_in == files_segmented + files_rejected``). Decoding runs as Ray Data
tasks (one file per task input, output streamed in bounded batches). Each task emits segment
rows and, last, one status row per file; a file that fails mid-stream gets a reject and its
already-emitted segments are dropped before writing, so no partial track is ever published.

Incremental runs: when the previous ingest version read the same source with the same
segmentation settings, files whose catalog entry and size are unchanged are not decoded
again; their segments (and rejects) are carried over from the previous version, and files no
longer in the catalog are dropped, so each version holds the complete segment table.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mess_ray.config import MessRayConfig
from mess_ray.ingest.catalog import build_catalog
from mess_ray.ingest.decode import RejectError
from mess_ray.ingest.rows import fingerprint
from mess_ray.ingest.segment import segment_track
from mess_ray.segments import REJECT_SCHEMA, SEGMENT_SCHEMA, segments_dir
from mess_ray.storage import Storage, new_version

log = logging.getLogger(__name__)

FILE_FIELDS = [
    ("file_track_id", pa.string()),
    ("file_source_uri", pa.string()),
    ("size", pa.int64()),
    ("fingerprint", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("num_segments", pa.int64()),
    ("duration_s", pa.float64()),
]
FILES_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("source_uri", pa.string()),
        ("size", pa.int64()),
        ("fingerprint", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("num_segments", pa.int64()),
        ("duration_s", pa.float64()),
    ]
)
# One stream carries both segment rows (kind="segment") and per-file status rows (kind="file").
STREAM_SCHEMA = pa.schema([("kind", pa.string()), *SEGMENT_SCHEMA, *FILE_FIELDS])
OUTPUT_BATCH_BYTES = 16 * 2**20
STORAGE_ERROR_MODULES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests"}


def segmentation_settings(cfg: MessRayConfig) -> dict[str, float]:
    """Settings that change the segment table; a previous version is reusable only if equal."""
    return {
        "sample_rate": cfg.audio.sample_rate,
        "window_s": cfg.audio.window_s,
        "hop_s": cfg.audio.hop_s,
        "min_duration_s": cfg.audio.min_duration_s,
    }


def _stream_table(segment_rows: list[dict[str, Any]], file_row: dict[str, Any] | None) -> pa.Table:
    rows = [{"kind": "segment", **r} for r in segment_rows]
    if file_row is not None:
        rows.append({"kind": "file", **file_row})
    return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)


def ingest_file(
    row: dict[str, Any],
    settings: dict[str, float],
    read_block_s: float,
    s3_endpoint_url: str | None,
) -> Iterator[pa.Table]:
    """Stream tables for one catalog row: segment rows in bounded batches, then its status row."""
    stats: dict[str, Any] = {}
    pending: list[dict[str, Any]] = []
    pending_bytes = 0
    count = 0
    status = {
        "file_track_id": row["track_id"],
        "file_source_uri": row["source_uri"],
        "size": row["size"],
        "fingerprint": row["fingerprint"],
    }
    try:
        for seg in segment_track(
            row,
            int(settings["sample_rate"]),
            settings["window_s"],
            settings["hop_s"],
            read_block_s,
            settings["min_duration_s"],
            s3_endpoint_url,
            stats,
        ):
            pending.append(seg)
            pending_bytes += len(seg["audio"])
            count += 1
            if pending_bytes >= OUTPUT_BATCH_BYTES:
                yield _stream_table(pending, None)
                pending, pending_bytes = [], 0
    except RejectError as err:
        # Segments already emitted for this track are dropped by the job (status "rejected").
        yield _stream_table(
            [],
            {
                **status,
                "status": "rejected",
                "reason": err.reason,
                "detail": err.detail,
                "num_segments": 0,
                "duration_s": float(stats.get("duration_s") or 0.0),
            },
        )
        return
    except Exception as err:  # noqa: BLE001 - a decoder failure on one file must not fail the job
        if type(err).__module__.split(".")[0] in STORAGE_ERROR_MODULES:
            raise  # the store is unreachable: retry/fail the task, do not blame the file
        log.warning("decode_error for %s: %r", row["source_uri"], err)
        yield _stream_table(
            [],
            {
                **status,
                "status": "rejected",
                "reason": "decode_error",
                "detail": f"{type(err).__name__}: {err}",
                "num_segments": 0,
                "duration_s": 0.0,
            },
        )
        return
    yield _stream_table(
        pending,
        {
            **status,
            "status": "segmented",
            "reason": "",
            "detail": "",
            "num_segments": count,
            "duration_s": float(stats["duration_s"]),
        },
    )


def ingest_batch(
    batch: pa.Table,
    settings: dict[str, float],
    read_block_s: float,
    s3_endpoint_url: str | None,
    progress: Any = None,
) -> Iterator[pa.Table]:
    """Ray Data UDF: catalog rows in, stream tables out (see :func:`ingest_file`).

    ``progress``: the console's progress actor (mess_ray.console), told of each finished file."""
    for row in batch.to_pylist():
        yield from ingest_file(row, settings, read_block_s, s3_endpoint_url)
        if progress is not None:
            progress.update.remote(add=1)


def select_segments(batch: pa.Table, rejected_tracks: list[str]) -> pa.Table:
    """Segment rows of files that were not rejected, in :data:`SEGMENT_SCHEMA`."""
    keep = pc.equal(batch["kind"], "segment")
    if rejected_tracks:
        keep = pc.and_(
            keep, pc.invert(pc.is_in(batch["track_id"], pa.array(rejected_tracks, pa.string())))
        )
    return batch.filter(keep).select(SEGMENT_SCHEMA.names).cast(SEGMENT_SCHEMA)


def select_file_rows(batch: pa.Table) -> pa.Table:
    rows = batch.filter(pc.equal(batch["kind"], "file"))
    rows = rows.select([name for name, _ in FILE_FIELDS])
    return rows.rename_columns(FILES_SCHEMA.names).cast(FILES_SCHEMA)


def keep_tracks(batch: pa.Table, track_ids: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch["track_id"], pa.array(track_ids, pa.string()))).cast(
        SEGMENT_SCHEMA
    )


def plan_incremental(
    rows: list[dict[str, Any]], previous_files: pa.Table | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to decode, previous file records to carry over) by fingerprint (uri, size, catalog entry)."""
    if previous_files is None:
        return rows, []
    previous = {rec["fingerprint"]: rec for rec in previous_files.to_pylist()}
    to_decode, carried = [], []
    for row in rows:
        rec = previous.get(row["fingerprint"])
        if rec is not None and rec["track_id"] == row["track_id"]:
            carried.append(rec)
        else:
            to_decode.append(row)
    return to_decode, carried


def reconcile(files: pa.Table) -> dict[str, Any]:
    """Manifest counts from the per-file table; raises if a file is neither segmented nor rejected."""
    status = files["status"].to_pylist()
    unknown = set(status) - {"segmented", "rejected"}
    if unknown:
        raise ValueError(f"files with unexpected status {sorted(unknown)}")
    segmented = [r for r in files.to_pylist() if r["status"] == "segmented"]
    rejected = [r for r in files.to_pylist() if r["status"] == "rejected"]
    return {
        "files_in": files.num_rows,
        "files_segmented": len(segmented),
        "files_rejected": len(rejected),
        "segments": int(sum(r["num_segments"] for r in segmented)),
        "seconds_audio": round(float(sum(r["duration_s"] for r in segmented)), 3),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
    }


def _write_table(storage: Storage, rel: str, table: pa.Table) -> None:
    with storage.open(rel, "wb") as f:
        pq.write_table(table, f)


def _read_table(storage: Storage, rel: str) -> pa.Table:
    with storage.open(rel, "rb") as f:
        return pq.read_table(f)


def _previous_for_reuse(
    cfg: MessRayConfig, storage: Storage, source_key: str
) -> tuple[str | None, pa.Table | None]:
    previous = storage.latest("ingest")
    if previous is None or not cfg.ingest.incremental:
        return None, None
    manifest = storage.manifest("ingest", previous)
    same_source = manifest.get("inputs", {}).get("source_key") == source_key
    same_settings = manifest.get("segmentation") == segmentation_settings(cfg)
    files_rel = posixpath.join("ingest", previous, "files.parquet")
    if not (same_source and same_settings and storage.exists(files_rel)):
        return None, None
    return previous, _read_table(storage, files_rel)


def run_ingest(cfg: MessRayConfig, storage: Storage) -> dict[str, Any]:
    """Ingest the configured source into a new published "ingest" version; returns its manifest."""
    import ray

    from mess_ray.raylocal import ensure_ray
    from mess_ray.segments import read_segments_ray

    rows, source = build_catalog(cfg, storage)
    if not rows:
        raise ValueError(f"the ingest source ({source}) lists no files")
    for row in rows:
        row["fingerprint"] = fingerprint(row)
    previous, previous_files = _previous_for_reuse(cfg, storage, source["key"])
    to_decode, carried = plan_incremental(rows, previous_files)
    log.info(
        "ingest: %d files (%d to decode, %d unchanged from %s)",
        len(rows),
        len(to_decode),
        len(carried),
        previous,
    )

    ensure_ray(cfg.ray)
    version = new_version()
    settings = segmentation_settings(cfg)
    cpus = cfg.ingest.cpus_per_task
    # Resolved on the driver: workers may have been started before AWS_ENDPOINT_URL was set.
    s3_endpoint_url = cfg.storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")

    decoded_files = pa.Table.from_pylist([], schema=FILES_SCHEMA)
    new_segments = None
    from mess_ray import console

    progress = console.progress_handle()
    console.report(progress, total=len(to_decode))
    if to_decode:
        stream = (
            ray.data.from_items(to_decode, override_num_blocks=min(len(to_decode), 256))
            .map_batches(
                ingest_batch,
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=cpus,
                fn_kwargs={
                    "settings": settings,
                    "read_block_s": cfg.ingest.read_block_s,
                    "s3_endpoint_url": s3_endpoint_url,
                    "progress": progress,
                },
            )
            .materialize()
        )  # decode once; the status rows and the segments are both read from it
        file_rows = stream.map_batches(
            select_file_rows, batch_format="pyarrow", num_cpus=cpus
        ).take_all()
        decoded_files = pa.Table.from_pylist(file_rows, schema=FILES_SCHEMA)
        rejected_tracks = [
            r["track_id"] for r in decoded_files.to_pylist() if r["status"] == "rejected"
        ]
        new_segments = stream.map_batches(
            select_segments,
            batch_format="pyarrow",
            num_cpus=cpus,
            fn_kwargs={"rejected_tracks": rejected_tracks},
        )

    carried_files = pa.Table.from_pylist(carried, schema=FILES_SCHEMA)
    files = pa.concat_tables([decoded_files, carried_files]).sort_by("track_id")
    if files.num_rows != len(rows):
        raise RuntimeError(
            f"ingest lost files: {len(rows)} catalogued, {files.num_rows} accounted for"
        )
    counts = reconcile(files)

    parts = [new_segments] if new_segments is not None else []
    carried_segmented = [r["track_id"] for r in carried if r["status"] == "segmented"]
    if carried_segmented:
        parts.append(
            read_segments_ray(storage, previous).map_batches(
                keep_tracks,
                batch_format="pyarrow",
                num_cpus=cpus,
                fn_kwargs={"track_ids": carried_segmented},
            )
        )

    out_dir = segments_dir(version)
    if counts["segments"] > 0:
        segments = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        segments.write_parquet(storage.path(out_dir), filesystem=storage.pyarrow_fs())
    else:
        # Readers open the folder as a dataset: an all-rejected run still has a (empty) table.
        _write_table(
            storage, posixpath.join(out_dir, "empty.parquet"), SEGMENT_SCHEMA.empty_table()
        )

    rejected = files.filter(pc.equal(files["status"], "rejected"))
    rejects = rejected.select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA)
    _write_table(storage, posixpath.join("ingest", version, "rejects.parquet"), rejects)
    _write_table(storage, posixpath.join("ingest", version, "files.parquet"), files)

    counts["files_decoded"] = len(to_decode)
    counts["files_reused"] = len(carried)
    inputs: dict[str, Any] = {"source_key": source["key"], "catalog": source["kind"]}
    if "render" in source:
        inputs["render"] = source["render"]
    if "url" in source:
        inputs["source"] = source["url"]
    if previous is not None:
        inputs["reused_from"] = previous
    manifest = {
        "inputs": inputs,
        "counts": counts,
        "segmentation": settings,
        "config_digest": cfg.digest(),
        "files": {
            "segments": out_dir,
            "rejects": posixpath.join("ingest", version, "rejects.parquet"),
            "files": posixpath.join("ingest", version, "files.parquet"),
        },
    }
    json.dumps(manifest)  # fail before publishing if anything is not serialisable
    return storage.publish("ingest", version, manifest)
