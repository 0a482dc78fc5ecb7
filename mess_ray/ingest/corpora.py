"""Catalogs of known corpus layouts: MAESTRO and ASAP.

MAESTRO: a root folder holding ``maestro-v*.csv`` or ``maestro-v*.json`` (columns
``canonical_composer, canonical_title, split, year, midi_filename, audio_filename, duration``)
with the recordings under their ``audio_filename``. Track id = audio path sans extension,
piece id = ``<composer-slug>--<title-slug>`` (so performances of one piece share it).

ASAP: a root folder holding ``metadata.csv`` (``composer, title, folder, midi_performance,
performance_annotations, ...``); the recording of a performance lies next to its MIDI with
the same stem (e.g. a rendered ``.wav``), or at ``audio_performance`` when that column holds a
plain relative path. Track id = performance MIDI path sans extension, piece id = ``folder``.

Both put every metadata column into ``metadata_json`` and add resolved URIs of the paired MIDI
(and, for ASAP, of the beat annotations). A metadata row whose audio is missing is still
catalogued (size -1), so the ingest job rejects it as unreadable instead of losing it.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import unicodedata
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from mess_ray.ingest.rows import catalog_row, check_unique_track_ids, file_url
from mess_ray.storage import make_filesystem

MAESTRO_REQUIRED = ("canonical_composer", "canonical_title", "audio_filename")
MAESTRO_METADATA = re.compile(r"^maestro-v[\w.\-]*\.(csv|json)$")
ASAP_METADATA = "metadata.csv"
ASAP_REQUIRED = ("midi_performance",)
# Preference order when several recordings share a MIDI file's stem.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".aiff", ".aif")


def slug(text: str) -> str:
    """Lower-case ASCII words joined by '-': 'Frédéric Chopin' -> 'frederic-chopin'."""
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def maestro_piece_id(composer: str, title: str) -> str:
    piece = f"{slug(composer)}--{slug(title)}"
    if piece == "--":
        raise ValueError(f"MAESTRO row has neither composer nor title ({composer!r}, {title!r})")
    return piece


def _read_text_csv(data: bytes) -> list[dict[str, Any]]:
    # Every column as text (ids like "007" stay text); numbers are converted where known.
    names = pacsv.read_csv(io.BytesIO(data)).column_names
    options = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names}, strings_can_be_null=False
    )
    return pacsv.read_csv(io.BytesIO(data), convert_options=options).to_pylist()


def read_metadata_records(fs, path: str) -> list[dict[str, Any]]:
    """Records of a metadata CSV, a JSON list of records, or MAESTRO's column-oriented JSON."""
    with fs.open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(".csv"):
        return _read_text_csv(data)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata {path!r} is not valid JSON: {err}") from err
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(col, dict) for col in obj.values()):
        # MAESTRO v3: {"column": {"0": value, "1": value, ...}, ...}
        index = sorted({k for col in obj.values() for k in col}, key=lambda k: (len(k), k))
        return [{name: col.get(i) for name, col in obj.items()} for i in index]
    raise ValueError(f"metadata {path!r}: expected a list of records or a column-oriented object")


def _columns(records: list[dict[str, Any]]) -> set[str]:
    return set().union(*(r.keys() for r in records)) if records else set()


def _require(records: list[dict[str, Any]], required: tuple[str, ...], where: str) -> None:
    missing = set(required) - _columns(records)
    if missing:
        raise ValueError(
            f"{where} lacks columns {sorted(missing)} (has {sorted(_columns(records))})"
        )


def _number(value: Any, kind: type) -> Any:
    if value in (None, ""):
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return value  # keep what the file says rather than failing on one odd cell


def _root_and_metadata(url: str, s3_endpoint_url: str | None, pick) -> tuple[Any, str, str]:
    """(fs, root folder, metadata path) for a corpus root folder or its metadata file."""
    fs, path = make_filesystem(url, s3_endpoint_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"ingest source {url!r} does not exist")
    if not fs.isdir(path):
        return fs, posixpath.dirname(path), path
    metadata = pick(fs, path)
    if metadata is None:
        raise ValueError(
            f"{url!r} does not look like the expected corpus layout (metadata file not found)"
        )
    return fs, path, metadata


def find_maestro_metadata(fs, root: str) -> str | None:
    """The MAESTRO metadata file in ``root`` (CSV preferred, newest version first)."""
    names = [posixpath.basename(p) for p in fs.ls(root, detail=False)]
    matches = [n for n in names if MAESTRO_METADATA.match(n)]
    csvs = sorted((n for n in matches if n.endswith(".csv")), reverse=True)
    jsons = sorted((n for n in matches if n.endswith(".json")), reverse=True)
    return posixpath.join(root, (csvs + jsons)[0]) if matches else None


def find_asap_metadata(fs, root: str) -> str | None:
    path = posixpath.join(root, ASAP_METADATA)
    return path if fs.exists(path) else None


def _sizes(fs, root: str) -> dict[str, int]:
    """Size of every file under ``root`` by relative path: one listing, not a request per file."""
    return {
        posixpath.relpath(p, root): int(info.get("size") or 0)
        for p, info in fs.find(root, detail=True).items()
        if info.get("type", "file") != "directory"
    }


def _open_layout(url: str, s3_endpoint_url: str | None, find_metadata, required, corpus: str):
    """(fs, root, metadata records, error-message prefix, file sizes) of a corpus layout."""
    fs, root, meta_path = _root_and_metadata(url, s3_endpoint_url, find_metadata)
    records = read_metadata_records(fs, meta_path)
    where = f"{corpus} metadata {meta_path!r}"
    _require(records, required, where)
    return fs, root, records, where, _sizes(fs, root)


def catalog_from_maestro(url: str, s3_endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Rows for a MAESTRO layout: ``url`` is its root folder or its metadata CSV/JSON."""
    fs, root, records, where, sizes = _open_layout(
        url, s3_endpoint_url, find_maestro_metadata, MAESTRO_REQUIRED, "MAESTRO"
    )
    rows = []
    for i, rec in enumerate(records):
        audio = str(rec.get("audio_filename") or "")
        if not audio:
            raise ValueError(f"{where} row {i}: empty audio_filename")
        metadata = {k: v for k, v in rec.items()}
        metadata.update(
            composer=rec.get("canonical_composer"),
            title=rec.get("canonical_title"),
            split=rec.get("split"),
            year=_number(rec.get("year"), int),
            duration=_number(rec.get("duration"), float),
            corpus="maestro",
        )
        midi = rec.get("midi_filename")
        metadata["midi_uri"] = file_url(fs.protocol, posixpath.join(root, midi)) if midi else None
        rows.append(
            catalog_row(
                file_url(fs.protocol, posixpath.join(root, audio)),
                posixpath.splitext(audio)[0],
                maestro_piece_id(
                    rec.get("canonical_composer") or "", rec.get("canonical_title") or ""
                ),
                "",
                metadata,
                sizes.get(posixpath.normpath(audio), -1),
            )
        )
    check_unique_track_ids(rows, where)
    return rows


def _asap_audio(rec: dict[str, Any], sizes: dict[str, int]) -> str:
    """Relative path of the recording of an ASAP performance (see the module docstring)."""
    explicit = str(rec.get("audio_performance") or "")
    if explicit and "{" not in explicit and "://" not in explicit:
        return posixpath.normpath(explicit)  # "{maestro}/..." placeholders point outside the layout
    stem = posixpath.splitext(posixpath.normpath(str(rec["midi_performance"])))[0]
    for ext in AUDIO_EXTENSIONS:
        if stem + ext in sizes:
            return stem + ext
    return stem + AUDIO_EXTENSIONS[0]  # absent: catalogued anyway, rejected as unreadable


def catalog_from_asap(url: str, s3_endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Rows for an ASAP-style layout: ``url`` is its root folder or its ``metadata.csv``."""
    fs, root, records, where, sizes = _open_layout(
        url, s3_endpoint_url, find_asap_metadata, ASAP_REQUIRED, "ASAP"
    )
    rows = []
    for i, rec in enumerate(records):
        midi = str(rec.get("midi_performance") or "")
        if not midi:
            raise ValueError(f"{where} row {i}: empty midi_performance")
        audio = _asap_audio(rec, sizes)
        piece = str(rec.get("folder") or posixpath.dirname(posixpath.normpath(midi)))
        metadata = dict(rec)
        metadata.update(corpus="asap", midi_uri=file_url(fs.protocol, posixpath.join(root, midi)))
        annotations = rec.get("performance_annotations")
        metadata["annotations_uri"] = (
            file_url(fs.protocol, posixpath.join(root, annotations)) if annotations else None
        )
        score_annotations = rec.get("midi_score_annotations")
        metadata["score_annotations_uri"] = (
            file_url(fs.protocol, posixpath.join(root, score_annotations))
            if score_annotations
            else None
        )
        rows.append(
            catalog_row(
                file_url(fs.protocol, posixpath.join(root, audio)),
                posixpath.splitext(midi)[0],
                piece,
                "",
                metadata,
                sizes.get(audio, -1),
            )
        )
    check_unique_track_ids(rows, where)
    return rows


def detect_corpus(url: str, s3_endpoint_url: str | None = None) -> str | None:
    """ "maestro" or "asap" when ``url`` (folder or metadata file) has that layout, else None."""
    fs, path = make_filesystem(url, s3_endpoint_url)
    if not fs.exists(path):
        return None
    if fs.isdir(path):
        if find_maestro_metadata(fs, path):
            return "maestro"
        asap = find_asap_metadata(fs, path)
        if asap and "midi_performance" in _columns(read_metadata_records(fs, asap)[:1]):
            return "asap"
        return None
    if not path.lower().endswith((".csv", ".json")):
        return None
    columns = _columns(read_metadata_records(fs, path)[:1])
    if "path" in columns:
        return None  # a user manifest (its 'path' column names the recordings)
    if set(MAESTRO_REQUIRED) <= columns:
        return "maestro"
    if "midi_performance" in columns:
        return "asap"
    return None
