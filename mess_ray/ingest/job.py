"""The ingest job: catalog -> Ray Data decode/segment/write -> segment table + rejects, versioned.

Every catalogued file ends up either segmented or rejected with a reason, and the manifest
counts reconcile (``files_in == files_segmented + files_rejected``). Ingest is one pass: each
Ray Data task decodes its file in bounded blocks, cuts the segments and writes them straight
to the file's own Parquet shard (``segments/part-<fingerprint>.parquet``, row groups of
~16 MiB), returning only the file's status row. A file that fails mid-stream gets a reject and
its shard is removed, so no partial track is ever published; a task retried after a lost node
rewrites the same shard names, so a retry never duplicates segments. Nothing but status rows
goes through Ray's object store, and the version is published only after every shard is written.

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
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mess_ray.config import MessRayConfig
from mess_ray.ingest.catalog import build_catalog
from mess_ray.ingest.decode import RejectError
from mess_ray.ingest.rows import fingerprint
from mess_ray.ingest.segment import segment_track
from mess_ray.segments import METADATA_COLUMNS, REJECT_SCHEMA, SEGMENT_SCHEMA, segments_dir
from mess_ray.storage import Storage, new_version

log = logging.getLogger(__name__)

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
# Segment rows are written in row groups of about this many audio bytes: bounds a worker's memory.
OUTPUT_BATCH_BYTES = 16 * 2**20
# Parquet options of the segment shards. The audio column is float32 PCM: Snappy gains nothing
# on it (rendered piano: 2,560,223 compressed bytes for 2,560,097 raw), a dictionary never
# applies (every window differs) and min/max statistics of 256 KiB blobs are useless, yet all
# three cost CPU on every row group; the small metadata columns keep the defaults.
SHARD_WRITE_OPTIONS: dict[str, Any] = {
    "compression": {name: "snappy" for name in METADATA_COLUMNS} | {"audio": "none"},
    "use_dictionary": METADATA_COLUMNS,
    "write_statistics": METADATA_COLUMNS,
}
STORAGE_ERROR_MODULES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests"}


def segmentation_settings(cfg: MessRayConfig) -> dict[str, float]:
    """Settings that change the segment table; a previous version is reusable only if equal."""
    return {
        "sample_rate": cfg.audio.sample_rate,
        "window_s": cfg.audio.window_s,
        "hop_s": cfg.audio.hop_s,
        "min_duration_s": cfg.audio.min_duration_s,
    }


def shard_name(row: dict[str, Any]) -> str:
    """The segment shard of one catalog row: deterministic, so a retried task overwrites it."""
    return f"part-{row['fingerprint']}.parquet"


class ShardWriter:
    """Segment rows of one track -> one Parquet file, in row groups of ~OUTPUT_BATCH_BYTES.

    The file is opened at the first row group (a file rejected before its first segment leaves
    nothing behind) and :meth:`discard` removes it (a file rejected mid-stream publishes no
    partial track). With ``storage=None`` the row groups are built and dropped (the
    single-process baseline and the memory probe without a destination).
    """

    def __init__(self, storage: Storage | None, rel: str | None):
        self.storage, self.rel = storage, rel
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self.count = 0
        self._file = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, seg: dict[str, Any]) -> None:
        self.pending.append(seg)
        self.pending_bytes += len(seg["audio"])
        self.count += 1
        if self.pending_bytes >= OUTPUT_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.Table.from_pylist(self.pending, schema=SEGMENT_SCHEMA)
        self.pending, self.pending_bytes = [], 0
        if self.storage is None:
            return
        if self._writer is None:
            self._file = self.storage.open(self.rel, "wb")
            self._writer = pq.ParquetWriter(self._file, SEGMENT_SCHEMA, **SHARD_WRITE_OPTIONS)
        self._writer.write_table(table)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Write what is pending and close the file."""
        self.flush()
        self._close()

    def discard(self) -> None:
        """Close and remove the file (a rejected track)."""
        self.pending, self.pending_bytes = [], 0
        opened = self._writer is not None
        try:
            self._close()
        finally:
            if opened and self.storage.exists(self.rel):
                self.storage.fs.rm(self.storage.path(self.rel))


def ingest_file(
    row: dict[str, Any],
    settings: dict[str, float],
    read_block_s: float,
    s3_endpoint_url: str | None,
    writer: ShardWriter,
) -> dict[str, Any]:
    """Decode, segment and write one catalog row in one pass; returns its :data:`FILES_SCHEMA` row.

    Segments go to ``writer`` as they are cut (bounded memory whatever the file length); a
    rejected file's shard is removed, so it contributes no segments, only its status row."""
    stats: dict[str, Any] = {}
    status = {
        "track_id": row["track_id"],
        "source_uri": row["source_uri"],
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
            writer.add(seg)
        writer.close()
    except RejectError as err:
        writer.discard()
        return {
            **status,
            "status": "rejected",
            "reason": err.reason,
            "detail": err.detail,
            "num_segments": 0,
            "duration_s": float(stats.get("duration_s") or 0.0),
        }
    except Exception as err:  # noqa: BLE001 - a decoder failure on one file must not fail the job
        writer.discard()
        if type(err).__module__.split(".")[0] in STORAGE_ERROR_MODULES:
            raise  # the store is unreachable: retry/fail the task, do not blame the file
        log.warning("decode_error for %s: %r", row["source_uri"], err)
        return {
            **status,
            "status": "rejected",
            "reason": "decode_error",
            "detail": f"{type(err).__name__}: {err}",
            "num_segments": 0,
            "duration_s": 0.0,
        }
    return {
        **status,
        "status": "segmented",
        "reason": "",
        "detail": "",
        "num_segments": writer.count,
        "duration_s": float(stats["duration_s"]),
    }


def ingest_row(
    row: dict[str, Any],
    settings: dict[str, float],
    read_block_s: float,
    s3_endpoint_url: str | None,
    storage: Storage,
    out_dir: str,
) -> dict[str, Any]:
    """One catalog row into its shard ``out_dir/part-<fingerprint>.parquet``; its status row."""
    writer = ShardWriter(storage, posixpath.join(out_dir, shard_name(row)))
    return ingest_file(row, settings, read_block_s, s3_endpoint_url, writer)


def ingest_batch(
    batch: pa.Table,
    settings: dict[str, float],
    read_block_s: float,
    s3_endpoint_url: str | None,
    storage: Storage,
    out_dir: str,
    progress: Any = None,
) -> pa.Table:
    """Ray Data UDF: catalog rows in, their status rows out; the segments are written as a side
    effect, one shard per file (see :func:`ingest_file`), so nothing but status rows travels
    through the object store.

    ``progress``: the console's progress actor (mess_ray.console), told of each finished file."""
    out = []
    for row in batch.to_pylist():
        out.append(ingest_row(row, settings, read_block_s, s3_endpoint_url, storage, out_dir))
        if progress is not None:
            progress.update.remote(add=1)
    return pa.Table.from_pylist(out, schema=FILES_SCHEMA)


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

    began = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(phase: str) -> None:
        nonlocal began
        now = time.perf_counter()
        timings[phase] = round(now - began, 3)
        began = now

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

    lap("catalog")
    ensure_ray(cfg.ray)
    lap("ray_connect")
    version = new_version()
    settings = segmentation_settings(cfg)
    cpus = cfg.ingest.cpus_per_task
    # Resolved on the driver: workers may have been started before AWS_ENDPOINT_URL was set.
    s3_endpoint_url = cfg.storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")

    out_dir = segments_dir(version)
    if storage.protocol == "file":
        storage.fs.makedirs(storage.path(out_dir), exist_ok=True)
    decoded_files = pa.Table.from_pylist([], schema=FILES_SCHEMA)
    from mess_ray import console

    progress = console.progress_handle()
    console.report(progress, total=len(to_decode))
    if to_decode:
        # One pass: each task decodes, segments and writes its files' shards; only the small
        # status rows come back to the driver.
        file_rows = (
            ray.data.from_items(to_decode, override_num_blocks=min(len(to_decode), 256))
            .map_batches(
                ingest_batch,
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=cpus,
                compute=ray.data.TaskPoolStrategy(size=cfg.ingest.max_concurrent_tasks),
                fn_kwargs={
                    "settings": settings,
                    "read_block_s": cfg.ingest.read_block_s,
                    "s3_endpoint_url": s3_endpoint_url,
                    "storage": storage,
                    "out_dir": out_dir,
                    "progress": progress,
                },
            )
            .take_all()
        )
        decoded_files = pa.Table.from_pylist(file_rows, schema=FILES_SCHEMA)
    lap("decode_segment_write")

    carried_files = pa.Table.from_pylist(carried, schema=FILES_SCHEMA)
    files = pa.concat_tables([decoded_files, carried_files]).sort_by("track_id")
    if files.num_rows != len(rows):
        raise RuntimeError(
            f"ingest lost files: {len(rows)} catalogued, {files.num_rows} accounted for"
        )
    counts = reconcile(files)

    carried_segmented = [r["track_id"] for r in carried if r["status"] == "segmented"]
    if carried_segmented:
        read_segments_ray(storage, previous).map_batches(
            keep_tracks,
            batch_format="pyarrow",
            num_cpus=cpus,
            fn_kwargs={"track_ids": carried_segmented},
        ).write_parquet(storage.path(out_dir), filesystem=storage.pyarrow_fs())
    lap("carry_over")
    if counts["segments"] == 0:
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
    lap("tables")
    # Wall seconds by phase (not part of the result: the benchmark reports fixed costs from it).
    manifest["timings_s"] = timings
    json.dumps(manifest)  # fail before publishing if anything is not serialisable
    return storage.publish("ingest", version, manifest)
