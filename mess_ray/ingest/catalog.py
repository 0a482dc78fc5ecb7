"""Catalogs: which recordings to ingest, one row per input file.

A catalog row is ``{source_uri, track_id, piece_id, style, metadata_json, size}``. Sources:
the latest ``render`` artifact (its ``catalog.parquet``), a folder (local or any fsspec URL
such as ``s3://``) listed recursively, a manifest file (CSV or Parquet with a ``path``
column), and the MAESTRO and ASAP layouts (:mod:`mess_ray.ingest.corpora`, detected by
``catalog="auto"``). Every file found is catalogued, audio-looking or not, so
that the ingest job can account for each one (segmented or rejected with a reason).
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mess_ray.config import MessRayConfig
from mess_ray.ingest.corpora import catalog_from_asap, catalog_from_maestro, detect_corpus
from mess_ray.ingest.rows import catalog_row, check_unique_track_ids, file_url
from mess_ray.storage import Storage, _is_remote, make_filesystem

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
# Columns of the render catalog that become segment fields rather than metadata.
_RENDER_FIELDS = {"track_id", "path", "piece_id", "style"}
_MANIFEST_FIELDS = {"path", "track_id", "piece_id", "style"}


def resolve_catalog_kind(source: str | None, catalog: str) -> str:
    """The catalog kind for ``cfg.ingest.source``; "auto" decides by what the source looks like."""
    if catalog != "auto":
        if catalog != "render" and source is None:
            raise ValueError(
                f"ingest.catalog={catalog!r} needs ingest.source (a folder or manifest)"
            )
        return catalog
    if source is None:
        return "render"
    return "manifest" if source.lower().endswith(MANIFEST_SUFFIXES) else "folder"


def catalog_from_render(
    storage: Storage, version: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Rows for the files of a render artifact (default: the latest) and its version."""
    version = version or storage.require_latest("render")
    rel = posixpath.join("render", version, "catalog.parquet")
    if not storage.exists(rel):
        raise FileNotFoundError(
            f"render artifact {version} has no catalog.parquet at {storage.url(rel)}"
        )
    with storage.open(rel) as f:
        table = pq.read_table(f)
    missing = {"track_id", "path"} - set(table.column_names)
    if missing:
        raise ValueError(f"{storage.url(rel)} lacks columns {sorted(missing)}")
    # One listing gives every size (one request on S3 instead of one per file).
    base = storage.path("render", version)
    sizes = {
        posixpath.relpath(p, base): int(info.get("size") or 0)
        for p, info in storage.fs.find(base, detail=True).items()
    }
    rows = []
    for rec in table.to_pylist():
        path = str(rec["path"])
        metadata = {k: v for k, v in rec.items() if k not in _RENDER_FIELDS}
        metadata["render_version"] = version
        rows.append(
            catalog_row(
                storage.url("render", version, path),
                rec["track_id"],
                rec.get("piece_id") or "",
                rec.get("style") or "",
                metadata,
                sizes.get(path, -1),
            )
        )
    check_unique_track_ids(rows, storage.url(rel))
    return rows, version


def _unique_track_ids(rel_paths: list[str]) -> dict[str, str]:
    """Track id per relative path: the path without extension, or with it where that collides."""
    stems: dict[str, list[str]] = {}
    for rel in rel_paths:
        stems.setdefault(posixpath.splitext(rel)[0], []).append(rel)
    ids = {}
    for stem, group in stems.items():
        for rel in group:
            ids[rel] = stem if len(group) == 1 else rel
    return ids


def catalog_from_folder(url: str, s3_endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Every file under a folder, recursively; track id and piece id = relative path sans extension."""
    fs, base = make_filesystem(url, s3_endpoint_url)
    if not fs.exists(base):
        raise FileNotFoundError(f"ingest source folder {url!r} does not exist")
    if not fs.isdir(base):
        raise ValueError(
            f"ingest source {url!r} is a file; use a folder or a .csv/.parquet manifest"
        )
    found = {
        posixpath.relpath(p, base): info
        for p, info in fs.find(base, detail=True).items()
        if info.get("type", "file") != "directory"
    }
    ids = _unique_track_ids(sorted(found))
    rows = []
    for rel in sorted(found):
        ext = posixpath.splitext(rel)[1].lower().lstrip(".")
        rows.append(
            catalog_row(
                file_url(fs.protocol, posixpath.join(base, rel)),
                ids[rel],
                ids[rel],
                "",
                {"relative_path": rel, "extension": ext},
                int(found[rel].get("size") or 0),
            )
        )
    return rows


def _read_manifest_table(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(".csv"):
        # Every column as text: ids like "007" must not become numbers.
        names = pacsv.read_csv(io.BytesIO(data)).column_names
        options = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names}, strings_can_be_null=False
        )
        return pacsv.read_csv(io.BytesIO(data), convert_options=options)
    return pq.read_table(io.BytesIO(data))


def catalog_from_manifest(url: str, s3_endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Rows from a CSV/Parquet manifest; relative paths are relative to the manifest's folder."""
    fs, path = make_filesystem(url, s3_endpoint_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"ingest manifest {url!r} does not exist")
    table = _read_manifest_table(fs, path)
    if "path" not in table.column_names:
        raise ValueError(f"manifest {url!r} needs a 'path' column (has {table.column_names})")
    folder = posixpath.dirname(path)
    rows = []
    for i, rec in enumerate(table.to_pylist()):
        entry = rec["path"]
        if not entry:
            raise ValueError(f"manifest {url!r} row {i}: empty path")
        entry = str(entry)
        if _is_remote(entry):
            file_fs, file_path = make_filesystem(entry, s3_endpoint_url)
            uri, default_id = entry, posixpath.splitext(posixpath.basename(file_path))[0]
        else:
            file_fs = fs
            file_path = (
                entry
                if posixpath.isabs(entry)
                else posixpath.normpath(posixpath.join(folder, entry))
            )
            uri = file_url(fs.protocol, file_path)
            default_id = (
                posixpath.splitext(entry)[0]
                if not posixpath.isabs(entry)
                else posixpath.splitext(posixpath.basename(entry))[0]
            )
        try:
            size = int(file_fs.size(file_path) or 0)
        except FileNotFoundError:
            size = -1  # ingest rejects it as unreadable, with the reason
        track_id = rec.get("track_id") or default_id
        metadata = {k: v for k, v in rec.items() if k not in _MANIFEST_FIELDS}
        rows.append(
            catalog_row(
                uri,
                track_id,
                rec.get("piece_id") or track_id,
                rec.get("style") or "",
                metadata,
                size,
            )
        )
    check_unique_track_ids(rows, url)
    return rows


def build_catalog(
    cfg: MessRayConfig, storage: Storage
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Catalog rows (sorted by track id, cut to ``max_files``) and a description of the source."""

    kind = resolve_catalog_kind(cfg.ingest.source, cfg.ingest.catalog)
    if cfg.ingest.catalog == "auto" and cfg.ingest.source is not None:
        kind = detect_corpus(cfg.ingest.source, cfg.storage.s3_endpoint_url) or kind
    if kind == "render":
        rows, version = catalog_from_render(storage)
        source = {"kind": "render", "render": version, "key": f"render:{storage.root}"}
    elif kind == "folder":
        rows = catalog_from_folder(cfg.ingest.source, cfg.storage.s3_endpoint_url)
        source = {"kind": "folder", "url": cfg.ingest.source, "key": f"folder:{cfg.ingest.source}"}
    elif kind == "manifest":
        rows = catalog_from_manifest(cfg.ingest.source, cfg.storage.s3_endpoint_url)
        source = {
            "kind": "manifest",
            "url": cfg.ingest.source,
            "key": f"manifest:{cfg.ingest.source}",
        }
    elif kind in ("maestro", "asap"):
        reader = catalog_from_maestro if kind == "maestro" else catalog_from_asap
        rows = reader(cfg.ingest.source, cfg.storage.s3_endpoint_url)
        source = {"kind": kind, "url": cfg.ingest.source, "key": f"{kind}:{cfg.ingest.source}"}
    else:  # pragma: no cover - guarded by the config's Literal
        raise ValueError(f"unknown catalog kind {kind!r}")
    rows.sort(key=lambda r: r["track_id"])
    if cfg.ingest.max_files is not None:
        rows = rows[: cfg.ingest.max_files]
    return rows, source
