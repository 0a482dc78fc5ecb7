"""Catalog rows: the shape every catalog source (render, folder, manifest, MAESTRO, ASAP)
produces, and the helpers they share, so the sources need not import one another."""

from __future__ import annotations

import hashlib
import json
from typing import Any

CATALOG_COLUMNS = ["source_uri", "track_id", "piece_id", "style", "metadata_json", "size"]


def file_url(fs_protocol: str | tuple, path: str) -> str:
    protocol = fs_protocol[0] if isinstance(fs_protocol, tuple) else fs_protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def canonical_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def catalog_row(
    source_uri: str,
    track_id: str,
    piece_id: str = "",
    style: str = "",
    metadata: dict[str, Any] | None = None,
    size: int = -1,
) -> dict[str, Any]:
    if not track_id:
        raise ValueError(f"empty track_id for {source_uri!r}")
    return {
        "source_uri": source_uri,
        "track_id": str(track_id),
        "piece_id": str(piece_id or ""),
        "style": str(style or ""),
        "metadata_json": canonical_json(metadata or {}),
        "size": int(size),
    }


def fingerprint(row: dict[str, Any]) -> str:
    """Identity of an input for incremental runs: the file (uri + size) and its catalog entry."""
    blob = canonical_json({k: row[k] for k in CATALOG_COLUMNS})
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def check_unique_track_ids(rows: list[dict[str, Any]], where: str) -> None:
    seen: dict[str, str] = {}
    for row in rows:
        other = seen.setdefault(row["track_id"], row["source_uri"])
        if other != row["source_uri"]:
            raise ValueError(
                f"{where}: track_id {row['track_id']!r} is used by both "
                f"{other!r} and {row['source_uri']!r}; track ids must be unique"
            )
