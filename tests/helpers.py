"""Test helpers shared across test files: the tiny config and tiny ingest / index builders.

Test files import these from here (``from helpers import ...``), never from each other.
"""

from __future__ import annotations

import io
import json
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from mess_ray.config import MessRayConfig, load_config
from mess_ray.facets import compose
from mess_ray.index.faiss_index import (
    IndexSpec,
    build_index,
)
from mess_ray.index.job import (
    INDEX_METADATA_COLUMNS,
    write_index_artifact,
)
from mess_ray.models import Embedder
from mess_ray.segments import SEGMENT_SCHEMA, encode_audio, segment_id
from mess_ray.storage import Storage, new_version


def tiny_config(root: str, **sections) -> MessRayConfig:
    """The smallest config that still exercises every stage (used by integration tests)."""
    overrides = [
        f"storage.root={root}",
        "audio.window_s=2.0",
        "audio.hop_s=1.0",
        "render.num_pieces=4",
        "render.max_duration_s=8",
        "pretrain.steps=4",
        "pretrain.batch_size=4",
        "pretrain.num_clusters=8",
        "pretrain.checkpoint_every=2",
        "pretrain.kmeans_sample_frames=2000",
        "finetune.steps=6",
        "finetune.batch_size=8",
        "finetune.checkpoint_every=3",
        "index.shards=2",
    ]
    cfg = load_config(None, overrides)
    # Tests keep recordings beside the store (root/../audio): the service may read them.
    if "://" not in cfg.storage.root:
        cfg.serve.source_prefixes = [str(Path(cfg.storage.root).parent)]
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def tone_track(seconds: float, rate: int, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(len(t)) * 0.01
    return (
        0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t)) + noise
    ).astype(np.float32)


def publish_tiny_ingest(
    cfg: MessRayConfig, storage: Storage, n_tracks: int = 3, seconds: float = 5.0, files: int = 2
) -> pa.Table:
    """Segment rows of a few synthetic tracks, cut with cfg.audio's window and hop, as ingest would."""
    rate = cfg.audio.sample_rate
    window, hop = int(cfg.audio.window_s * rate), int(cfg.audio.hop_s * rate)
    rows = {f.name: [] for f in SEGMENT_SCHEMA}
    for t in range(n_tracks):
        audio = tone_track(seconds, rate, 220.0 * (t + 1), seed=t)
        track = f"track{t}"
        for start in range(0, len(audio) - window + 1, hop):
            rows["segment_id"].append(segment_id(track, start))
            rows["track_id"].append(track)
            rows["piece_id"].append(f"piece{t}")
            rows["style"].append("romantic" if t % 2 else "baroque_crisp")
            rows["start_s"].append(start / rate)
            rows["end_s"].append((start + window) / rate)
            rows["start_sample"].append(start)
            rows["num_samples"].append(window)
            rows["sample_rate"].append(rate)
            rows["source_uri"].append(f"/nonexistent/{track}.wav")
            rows["metadata_json"].append("{}")
            rows["audio"].append(encode_audio(audio[start : start + window]))
    table = pa.table(rows, schema=SEGMENT_SCHEMA)
    version = new_version()
    step = -(-table.num_rows // files)
    for i in range(files):
        with storage.open(
            posixpath.join("ingest", version, "segments", f"part-{i}.parquet"), "wb"
        ) as f:
            pq.write_table(table.slice(i * step, step), f)
    storage.publish("ingest", version, {"counts": {"segments": table.num_rows}})
    return table


def publish_ingest(
    cfg: MessRayConfig, storage: Storage, tracks: list[int], seconds: float = 3.0
) -> pa.Table:
    """An ingest artifact holding the given synthetic tracks (ids are stable per track)."""
    rate = cfg.audio.sample_rate
    window, hop = int(cfg.audio.window_s * rate), int(cfg.audio.hop_s * rate)
    rows = {f.name: [] for f in SEGMENT_SCHEMA}
    for t in tracks:
        audio = tone_track(seconds, rate, 220.0 * (t + 1), seed=t)
        track = f"track{t}"
        for start in range(0, len(audio) - window + 1, hop):
            values = {
                "segment_id": segment_id(track, start),
                "track_id": track,
                "piece_id": f"piece{t}",
                "style": "romantic",
                "start_s": start / rate,
                "end_s": (start + window) / rate,
                "start_sample": start,
                "num_samples": window,
                "sample_rate": rate,
                "source_uri": f"/nonexistent/{track}.wav",
                "metadata_json": "{}",
                "audio": encode_audio(audio[start : start + window]),
            }
            for name, value in values.items():
                rows[name].append(value)
    table = pa.table(rows, schema=SEGMENT_SCHEMA)
    version = new_version()
    with storage.open(posixpath.join("ingest", version, "segments", "part-0.parquet"), "wb") as f:
        pq.write_table(table, f)
    storage.publish("ingest", version, {"counts": {"segments": table.num_rows}})
    return table


SR = 16000


STYLES = ("staccato", "legato", "noisy")


def clip(piece: int, style: str, index: int, seconds: float = 2.0) -> np.ndarray:
    """A style-shaped tone: pitch from the piece, envelope/texture from the style."""
    rng = np.random.default_rng(hash((piece, style, index)) % 2**32)
    t = np.arange(int(seconds * SR)) / SR
    tone = np.sin(2 * np.pi * (220 + 55 * piece) * t)
    if style == "staccato":
        tone *= np.sin(2 * np.pi * 4 * t) > 0.6
    elif style == "noisy":
        tone = 0.5 * tone + 0.5 * rng.standard_normal(len(t))
    return (0.3 * tone + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_tiny_ingest(
    storage: Storage, pieces: int = 4, per_style: int = 4, version: str = "ing1"
) -> str:
    """A segment table with SEGMENT_SCHEMA, one parquet file per piece, published as 'ingest'."""
    for piece in range(pieces):
        rows = []
        for style in STYLES:
            track = f"piece{piece}-{style}"
            for i in range(per_style):
                start = i * SR
                audio = clip(piece, style, i)
                rows.append(
                    {
                        "segment_id": segment_id(track, start),
                        "track_id": track,
                        "piece_id": f"piece{piece}",
                        "style": style,
                        "start_s": start / SR,
                        "end_s": start / SR + 2.0,
                        "start_sample": start,
                        "num_samples": len(audio),
                        "sample_rate": SR,
                        "source_uri": f"mem://{track}.wav",
                        "metadata_json": "{}",
                        "audio": encode_audio(audio),
                    }
                )
        with storage.open(f"ingest/{version}/segments/part-{piece:03d}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", version, {"counts": {"segments": pieces * len(STYLES) * per_style}})
    return version


TRACK_SECONDS = 6.0


def track_audio(t: int, rate: int) -> np.ndarray:
    """Distinct synthetic recordings: different pitch, pulse rate and brightness per track."""
    time = np.arange(int(TRACK_SECONDS * rate)) / rate
    pulse = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (1.5 + 1.5 * t) * time))
    tone = np.sin(2 * np.pi * 180 * (t + 1) * time) + 0.3 * (t % 2) * np.sin(
        2 * np.pi * 2000 * time
    )
    return (0.25 * pulse * tone).astype(np.float32)


COMPOSERS = ["J. S. Bach", "Frédéric Chopin", "Johann Sebastian Bach"]


def publish_audio_index(
    cfg: MessRayConfig,
    audio_dir: Path,
    n_tracks: int = 3,
    facet_layout: dict | None = None,
    spec: IndexSpec | None = None,
    track_ids: list[str] | None = None,
) -> dict:
    """WAV recordings on disk, their segments embedded with the real random Embedder, published as an index.

    With ``facet_layout`` the vectors are recomposed as a faceted embedding (each part of the
    random embedding re-normalised, as facet heads' outputs are) and the layout is published.
    """
    storage = Storage.from_config(cfg.storage)
    rate = cfg.audio.sample_rate
    window, hop = int(cfg.audio.window_s * rate), int(cfg.audio.hop_s * rate)
    embedder = Embedder.from_ref(cfg, storage, "random")
    rows = {c: [] for c in INDEX_METADATA_COLUMNS}
    frames = []
    audio_dir.mkdir(parents=True, exist_ok=True)
    for t in range(n_tracks):
        audio = track_audio(t, rate)
        track = track_ids[t] if track_ids else f"track{t}"
        path = audio_dir / f"{track}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, audio, rate)
        for start in range(0, len(audio) - window + 1, hop):
            rows["segment_id"].append(segment_id(track, start))
            rows["track_id"].append(track)
            rows["piece_id"].append(f"piece{t}")
            rows["style"].append(["romantic", "baroque_crisp", "soft_legato"][t % 3])
            rows["start_s"].append(start / rate)
            rows["end_s"].append((start + window) / rate)
            rows["sample_rate"].append(rate)
            rows["source_uri"].append(str(path))
            rows["metadata_json"].append(
                json.dumps(
                    {"title": track, "composer": COMPOSERS[t % 3], "catalog": f"Op. {t + 10}"}
                )
            )
            frames.append(audio[start : start + window])
    vectors = embedder.embed(np.stack(frames))
    info = dict(embedder.info)
    if facet_layout is not None:
        vectors = compose(
            {name: vectors[:, a:b] for name, (a, b) in facet_layout.items()}, facet_layout
        )
        info["facet_layout"] = {name: list(span) for name, span in facet_layout.items()}
    ids = np.array(rows["segment_id"], dtype=np.int64)
    spec = spec or IndexSpec(type="flat", dim=embedder.dim)
    # Two shards merged, as the index job does (an HNSW graph is built whole: no merge).
    parts = [(vectors[0::2], ids[0::2]), (vectors[1::2], ids[1::2])]
    if spec.type == "hnsw":
        parts = [(vectors, ids)]
    index = build_index(spec, parts, train_vectors=vectors)
    return write_index_artifact(
        cfg,
        storage,
        new_version(),
        index,
        spec,
        pa.table(rows),
        info,
        {"segments": len(ids), "vectors": len(ids)},
        {"ingest": "test"},
    )


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt)
    return out.getvalue()
