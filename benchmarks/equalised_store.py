"""A copy of a store whose latest ingest is equalised per recording (:mod:`mess_ray.spectral_eq`),
to train and evaluate a model on equalised audio with the unchanged stages.

The render artifacts are linked, not copied (a local store only); the ingest artifact is
rewritten file by file (each recording's segments filtered so that its smoothed long-term
spectrum matches the mean over every recording of the source ingest), same segment ids and
schema, and its manifest says where it came from and how it was equalised.

    python -m benchmarks.equalised_store --source STORE --dest STORE_EQ [--per-octave 1]
"""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mess_ray.segments import decode_audio, encode_audio, segment_files, segments_dir
from mess_ray.spectral_eq import apply_gain_db, gain_to_reference, long_term_db
from mess_ray.storage import Storage, new_version


def _track_audio(table: pa.Table) -> tuple[np.ndarray, np.ndarray, int]:
    """(audio [N, T], track ids [N], sample rate) of one segment shard."""
    audio = [decode_audio(b) for b in table.column("audio").to_pylist()]
    rates = set(table.column("sample_rate").to_pylist())
    if len({len(a) for a in audio}) != 1 or len(rates) != 1:
        raise ValueError("segments of unequal length or rate: equalise them one by one")
    tracks = np.asarray(table.column("track_id").to_pylist(), dtype=object)
    return np.stack(audio), tracks, int(rates.pop())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="root of a local store")
    parser.add_argument("--dest", required=True, help="root of the new store (must not exist)")
    parser.add_argument("--per-octave", type=float, default=1.0)
    parser.add_argument("--max-gain-db", type=float, default=24.0)
    args = parser.parse_args(argv)
    if os.path.exists(args.dest):
        parser.error(f"{args.dest} exists: give a new folder")
    started = time.time()
    source = Storage(args.source)
    version = source.require_latest("ingest")
    manifest = source.read_json(posixpath.join("ingest", version, "manifest.json"))
    files = segment_files(source, version)
    ltas: dict[str, list[np.ndarray]] = {}  # each recording's spectrum, per shard it is in
    for path in tqdm(files, desc="long-term spectra", unit="file"):
        table = pq.read_table(path)
        audio, tracks, sr = _track_audio(table)
        for track in dict.fromkeys(tracks.tolist()):
            ltas.setdefault(track, []).append(
                long_term_db(audio[tracks == track], sr, args.per_octave)
            )
    # one spectrum per recording (the mean over its shards, should ingest ever split one)
    track_db = {t: np.mean(v, axis=0) for t, v in ltas.items()}
    reference = np.mean(list(track_db.values()), axis=0)

    os.makedirs(args.dest)
    os.symlink(os.path.abspath(source.path("render")), os.path.join(args.dest, "render"))
    dest = Storage(args.dest)
    out_version = new_version()
    for path in tqdm(files, desc="equalise", unit="file"):
        table = pq.read_table(path)
        audio, tracks, _ = _track_audio(table)
        eq = np.empty_like(audio)
        for track in dict.fromkeys(tracks.tolist()):  # the spectra measured above, not again
            rows = tracks == track
            gain = gain_to_reference(track_db[track], reference, args.max_gain_db)
            eq[rows] = apply_gain_db(audio[rows], gain)
        blobs = pa.array([encode_audio(a) for a in eq], type=table.schema.field("audio").type)
        table = table.set_column(table.schema.get_field_index("audio"), "audio", blobs)
        target = posixpath.join(segments_dir(out_version), posixpath.basename(path))
        with dest.open(target, "wb") as f:
            pq.write_table(table, f)
    files_entry = {}  # the ingest's file tables, copied beside the new segments
    for name, rel in manifest.get("files", {}).items():
        files_entry[name] = posixpath.join("ingest", out_version, posixpath.basename(rel))
        if name != "segments":
            dest.write_bytes(files_entry[name], source.read_bytes(rel))
    keep = {k: v for k, v in manifest.items() if k not in ("stage", "version", "created_at")}
    dest.publish(
        "ingest",
        out_version,
        {
            **keep,
            "files": files_entry,
            "equalised": {
                "from": f"{args.source} ingest {version}",
                "per_octave": args.per_octave,
                "max_gain_db": args.max_gain_db,
                "reference": "mean long-term spectrum of every recording of the source ingest",
            },
        },
    )
    print(
        f"equalised {len(files)} files ({len(ltas)} recordings) into {args.dest} ingest "
        f"{out_version} in {time.time() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
