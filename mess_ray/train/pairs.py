"""Cross-chain positives for fine-tuning: the same performance at the same time through two
recording chains.

The renderer plays one performed MIDI through every chain of a performance
(:mod:`mess_ray.render.chains`), and ingest cuts every rendering at the same hop from its start,
so two segments with the same performance id and the same start sample are the same notes
played the same way, heard through another piano, room and microphone: a positive pair given
for free by the renderer. Segments of one performance at another time, or of another
performance, never pair.

The training data then reads one *performance* per Ray Data block (all of its chains' rows
together, so the partner is at hand without a shuffle): every training row carries one partner's
audio (``partner_audio``, empty when no other chain holds that moment) and its moment key
(``moment``), which the collate turns into an extra positive view and a shared label.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mess_ray.storage import Storage

PAIR_COLUMNS = ["segment_id", "track_id", "piece_id", "style", "start_sample", "metadata_json"]


def recording_of(metadata_json: str | None, track_id: str) -> tuple[str, str]:
    """(performance id, chain name) from a segment's catalog metadata: rendered tracks carry
    both; anything else is its own performance in an unnamed chain."""
    try:
        meta = json.loads(metadata_json or "{}")
    except json.JSONDecodeError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    performance = meta.get("performance_id") or track_id
    chain = ""
    raw = meta.get("chain_json")
    if isinstance(raw, str) and raw:
        try:
            chain = json.loads(raw).get("name") or ""
        except (json.JSONDecodeError, AttributeError):
            chain = ""
    return str(performance), str(chain or track_id)


def moment_key(performance: str, start_sample: int) -> int:
    """A stable integer for (performance, start sample): the same on every worker."""
    return zlib.crc32(f"{performance}\x00{int(start_sample)}".encode()) & 0x7FFFFFFF


def cross_chain_partners(performances, starts, chains, segment_ids, seed: int = 0) -> np.ndarray:
    """Per row, the index of one partner row: same performance, same start sample, another
    chain (a seeded choice when several chains hold that moment); -1 when none does."""
    performances = np.asarray(performances, dtype=object)
    starts = np.asarray(starts, dtype=np.int64)
    chains = np.asarray(chains, dtype=object)
    segment_ids = np.asarray(segment_ids, dtype=np.int64)
    n = len(performances)
    if not (len(starts) == len(chains) == len(segment_ids) == n):
        raise ValueError("performances, starts, chains and segment ids disagree on their length")
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i in range(n):
        groups[(performances[i], int(starts[i]))].append(i)
    out = np.full(n, -1, dtype=np.int64)
    for members in groups.values():
        for i in members:
            others = [j for j in members if chains[j] != chains[i]]
            if not others:
                continue
            rng = np.random.default_rng([seed, int(segment_ids[i]) & 0xFFFFFFFF])
            out[i] = others[int(rng.integers(len(others)))]
    return out


def performance_items(
    storage: Storage, version: str, train_pieces: list[str]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One item per training performance: the segment files that hold its tracks (in any
    chain) and those track ids (JSON lists); plus counts (performances, with several chains,
    tracks). A performance's files are listed in the order of the tracks they hold, not of
    their names: a one-pass ingest names a shard by its fingerprint, which hashes the source
    URI (storage root, render version), so a name order would change the rows' order, and the
    trained weights, from one identical run to the next (as :func:`mess_ray.segments.segment_files`
    does for the other readers)."""
    from mess_ray.segments import segments_dataset

    dataset = segments_dataset(storage, version)
    wanted = set(train_pieces)
    tracks_of: dict[str, set[str]] = defaultdict(set)
    chains_of: dict[str, set[str]] = defaultdict(set)
    files_of: dict[str, set[str]] = defaultdict(set)
    first_track: dict[str, str] = {}  # file -> the smallest track id it holds
    for fragment in dataset.get_fragments():
        table = fragment.to_table(columns=["track_id", "piece_id", "metadata_json"])
        seen: set[str] = set()
        for tid, piece, meta in zip(
            table["track_id"].to_pylist(),
            table["piece_id"].to_pylist(),
            table["metadata_json"].to_pylist(),
        ):
            if piece not in wanted or tid in seen:
                continue
            seen.add(tid)
            performance, chain = recording_of(meta, tid)
            tracks_of[performance].add(tid)
            chains_of[performance].add(chain)
            files_of[performance].add(fragment.path)
            first_track[fragment.path] = min(first_track.get(fragment.path, tid), tid)
    # Lists travel as JSON text: Ray Data's numpy batches keep plain strings as they are.
    items = [
        {
            "performance": p,
            "tracks": json.dumps(sorted(tracks_of[p])),
            "files": json.dumps(sorted(files_of[p], key=lambda f: (first_track[f], f))),
        }
        for p in sorted(tracks_of)
    ]
    counts = {
        "performances": len(items),
        "performances_with_several_chains": sum(len(chains_of[p]) > 1 for p in tracks_of),
        "tracks": sum(len(t) for t in tracks_of.values()),
    }
    return items, counts


def read_performance_rows(
    batch: dict[str, Any],
    storage_cfg: dict[str, Any],
    train_pieces: list[str],
    mined: dict[int, str] | None,
    with_midi: set[int] | None,
    seed: int,
    left_out_tracks=(),
) -> pa.Table:
    """Ray Data ``map_batches`` over :func:`performance_items`: the training rows of the
    batch's performances (``filter_training_rows``), each with its moment key and one
    cross-chain partner's audio (``b''`` when it has none); never a row of ``left_out_tracks``."""
    from mess_ray.config import StorageConfig
    from mess_ray.segments import SEGMENT_SCHEMA
    from mess_ray.train.targets import filter_training_rows

    storage = Storage.from_config(StorageConfig(**storage_cfg))
    fs = storage.pyarrow_fs()
    columns = [*PAIR_COLUMNS, "audio"]
    schema = pa.schema([SEGMENT_SCHEMA.field(c) for c in columns])
    out = []
    for tracks_json, files_json in zip(batch["tracks"], batch["files"]):
        tracks, files = set(json.loads(str(tracks_json))), json.loads(str(files_json))
        parts = [pq.read_table(path, columns=columns, filesystem=fs) for path in files]
        table = pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()
        keep = pa.array([t in tracks for t in table["track_id"].to_pylist()], pa.bool_())
        table = filter_training_rows(
            table.filter(keep), train_pieces, mined, with_midi, left_out_tracks
        )
        recordings = [
            recording_of(m, t)
            for m, t in zip(table["metadata_json"].to_pylist(), table["track_id"].to_pylist())
        ]
        performances = [r[0] for r in recordings]
        starts = table["start_sample"].to_numpy()
        partners = cross_chain_partners(
            performances,
            starts,
            [r[1] for r in recordings],
            table["segment_id"].to_numpy(),
            seed,
        )
        audio = table["audio"].to_pylist()
        out.append(
            pa.table(
                {
                    "segment_id": table["segment_id"],
                    "audio": table["audio"],
                    "style": table["style"],
                    "piece_id": table["piece_id"],
                    "moment": pa.array(
                        [moment_key(p, s) for p, s in zip(performances, starts)], pa.int64()
                    ),
                    "partner_audio": pa.array(
                        [audio[j] if j >= 0 else b"" for j in partners], pa.binary()
                    ),
                }
            )
        )
    if not out:
        return pa.table(
            {
                "segment_id": pa.array([], pa.int64()),
                "audio": pa.array([], pa.binary()),
                "style": pa.array([], pa.string()),
                "piece_id": pa.array([], pa.string()),
                "moment": pa.array([], pa.int64()),
                "partner_audio": pa.array([], pa.binary()),
            }
        )
    return pa.concat_tables(out)
