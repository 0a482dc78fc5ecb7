"""Test helpers shared across test files: the tiny config and tiny ingest / index builders.

Test files import these from here (``from helpers import ...``), never from each other.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import posixpath
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pretty_midi
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from mess_ray.config import MessRayConfig, load_config
from mess_ray.content import track_features
from mess_ray.facets import compose
from mess_ray.index.content_features import CONTENT_DIR, finish_content, segments_digest
from mess_ray.index.faiss_index import (
    IndexSpec,
    build_index,
)
from mess_ray.index.job import (
    INDEX_METADATA_COLUMNS,
    write_index_artifact,
)
from mess_ray.models import Embedder
from mess_ray.segments import SEGMENT_SCHEMA, encode_audio, segment_id, segments_dir
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


def clip_row(
    track: str, piece: int, style: str, start: int, audio: np.ndarray, meta: str = "{}"
) -> dict:
    """One ingest row of a 2 s clip of ``piece{piece}`` at ``start`` samples (SR)."""
    return {
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
        "metadata_json": meta,
        "audio": encode_audio(audio),
    }


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
                rows.append(clip_row(track, piece, style, start, audio))
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


# -- scores and ASAP-layout folders (render, eval) ----------------------------------------
def make_score(
    bars: int = 8, tempo: float = 120.0, program: int = 0, seed: int = 0
) -> pretty_midi.PrettyMIDI:
    """A 4/4 two-voice score: quarter-note melody over a half-note bass, ``bars`` bars."""
    midi = pretty_midi.PrettyMIDI(initial_tempo=tempo)
    midi.time_signature_changes.append(pretty_midi.TimeSignature(4, 4, 0.0))
    beat = 60.0 / tempo
    rng = np.random.default_rng(seed)
    melody = pretty_midi.Instrument(program=program, name="melody")
    bass = pretty_midi.Instrument(program=program, name="bass")
    for i in range(bars * 4):
        pitch = 60 + int(rng.integers(0, 12))
        melody.notes.append(pretty_midi.Note(80, pitch, i * beat, (i + 1) * beat))
    for i in range(bars * 2):
        bass.notes.append(pretty_midi.Note(70, 36 + (i * 5) % 12, i * 2 * beat, (i + 1) * 2 * beat))
    midi.instruments += [melody, bass]
    return midi


def write_midi(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_score(**kwargs).write(str(path))
    return path


def make_asap_folder(root: Path) -> Path:
    """A tiny ASAP-layout folder: two performances of one piece, one of another."""
    rows = []
    for composer, work, performer, seed in [
        ("Bach", "Prelude/bwv_846", "Shi05M", 0),
        ("Bach", "Prelude/bwv_846", "Lee01", 1),
        ("Chopin", "Etude/op_10/3", "Kim07", 2),
    ]:
        folder = f"{composer}/{work}"
        write_midi(root / folder / f"{performer}.mid", bars=2, seed=seed)
        (root / folder / f"{performer}_annotations.txt").write_text("0.0\t0.0\tdb,4/4,0\n")
        rows.append(
            {
                "composer": composer,
                "title": work.replace("/", "_"),
                "folder": folder,
                "midi_score": f"{folder}/midi_score.mid",
                "midi_performance": f"{folder}/{performer}.mid",
                "performance_annotations": f"{folder}/{performer}_annotations.txt",
                "midi_score_annotations": f"{folder}/midi_score_annotations.txt",
            }
        )
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


ASAP_PIECES = ["bach-a", "bach-b", "chopin-c", "chopin-d"]
ASAP_SECONDS = 8.0


def asap_piece(index: int) -> str:
    """The name of the ``index``-th piece of the ASAP-layout fixtures (beyond the named four:
    ``extra-<index>``)."""
    return ASAP_PIECES[index] if index < len(ASAP_PIECES) else f"extra-{index}"


def write_performance(root, piece_index: int, perf_index: int):
    """A performance MIDI + its beats + the score's beats; the piece sets pitches, the performer
    tempo, loudness and articulation. Returns (midi, midi path, annotation paths)."""
    beat = 0.5 if perf_index == 0 else 0.4
    velocity = 50 if perf_index == 0 else 100
    hold = 0.3 if perf_index == 0 else 1.0
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    n_beats = (
        int(ASAP_SECONDS / 0.4) + 2
    )  # the same beats for every performance: annotated one to one
    for i in range(n_beats):
        pitch = 55 + (i * (piece_index + 2)) % 12 + 2 * piece_index
        piano.notes.append(pretty_midi.Note(velocity, pitch, i * beat, i * beat + hold * beat))
    midi.instruments.append(piano)
    folder = root / asap_piece(piece_index)
    folder.mkdir(parents=True, exist_ok=True)
    midi_path = folder / f"perf{perf_index}.mid"
    midi.write(str(midi_path))
    (folder / f"perf{perf_index}_annotations.txt").write_text(
        "".join(f"{i * beat:.6f}\t{i * beat:.6f}\tb\n" for i in range(n_beats))
    )
    (folder / "midi_score_annotations.txt").write_text(
        "".join(f"{i * 0.5:.6f}\t{i * 0.5:.6f}\tb\n" for i in range(n_beats))
    )
    return midi, midi_path, folder


def synth_sine_notes(midi: pretty_midi.PrettyMIDI) -> np.ndarray:
    out = np.zeros(int((midi.get_end_time() + 1) * SR))
    for note in midi.instruments[0].notes:
        i, n = int(note.start * SR), int((note.end - note.start) * SR)
        t = np.arange(n) / SR
        f0 = pretty_midi.note_number_to_hz(note.pitch)
        env = np.minimum(t / 0.005, 1) * np.minimum((t[-1] - t) / 0.02 if n else t, 1)
        out[i : i + n] += note.velocity / 127 * 0.3 * env * np.sin(2 * np.pi * f0 * t)
    return out[: int(ASAP_SECONDS * SR)].astype(np.float32)


def write_asap_ingest(
    storage: Storage,
    root,
    window_s: float,
    hop_s: float,
    styled: bool = False,
    pianists: bool = False,
    pieces: int = len(ASAP_PIECES),
) -> str:
    """Performances with MIDI and beats; ``styled``: renderings instead, with a style per
    performer and MIDI but no beat annotations; ``pianists``: each performer's catalog tag
    (``Slow01`` plays every piece slow and soft, ``Fast02`` fast and loud); ``pieces``: how many
    pieces (:func:`asap_piece`)."""
    rows = []
    for p in range(pieces):
        piece = asap_piece(p)
        for k in range(2):
            midi, midi_path, folder = write_performance(root, p, k)
            audio = synth_sine_notes(midi)
            track = f"{piece}/perf{k}"
            meta = {
                "corpus": "asap",
                "midi_uri": str(midi_path),
                "annotations_uri": str(folder / f"perf{k}_annotations.txt"),
                "score_annotations_uri": str(folder / "midi_score_annotations.txt"),
            }
            if styled:
                # As the render stage writes it: the performed MIDI beside the audio in the render
                # artifact (so under s3:// when the storage root is there), found via midi_path.
                rel = f"audio/{piece}__perf{k}.mid"
                storage.put_file(midi_path, f"render/vtest/{rel}")
                meta = {
                    "midi_path": rel,
                    "render_version": "vtest",
                    "style_params_json": json.dumps(
                        {"style": f"style{k}", "leading_silence_s": 0.0}
                    ),
                }
            if pianists:
                meta["performer"] = ("Slow01", "Fast02")[k]
            win, hop = int(window_s * SR), int(hop_s * SR)
            for start in range(0, len(audio) - win + 1, hop):
                rows.append(
                    {
                        "segment_id": segment_id(track, start),
                        "track_id": track,
                        "piece_id": piece,
                        "style": f"style{k}" if styled else "",
                        "start_s": start / SR,
                        "end_s": (start + win) / SR,
                        "start_sample": start,
                        "num_samples": win,
                        "sample_rate": SR,
                        "source_uri": f"{folder}/perf{k}.wav",
                        "metadata_json": json.dumps(meta),
                        "audio": encode_audio(audio[start : start + win]),
                    }
                )
    version = new_version()
    with storage.open(posixpath.join(segments_dir(version), "part-00000.parquet"), "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", version, {"counts": {"segments": len(rows)}})
    return version


# -- melodies and the passages index (content view) --------------------------------------
def melody(seed: int = 0, notes: int = 48) -> list[tuple[int, float, float]]:
    """(midi pitch, duration in beats, velocity 0..1) of a random but fixed tune with chords."""
    rng = np.random.default_rng(seed)
    pitches = rng.integers(55, 80, size=notes)
    durations = rng.choice([0.5, 1.0, 1.0, 1.5], size=notes)
    velocity = 0.4 + 0.5 * rng.random(notes)
    return list(zip(pitches.tolist(), durations.tolist(), velocity.tolist()))


def render_melody(
    tune, seconds_per_beat: float, lead_s: float = 0.0, loud=None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Harmonic tones (pitch + a third below) played at the given tempo; also the note onsets."""
    total = lead_s + sum(d for _, d, _ in tune) * seconds_per_beat + 1.0
    y = np.zeros(int(total * SR), dtype=np.float64)
    t0 = lead_s
    onsets = []
    for i, (pitch, dur, vel) in enumerate(tune):
        length = dur * seconds_per_beat
        n = int(length * SR)
        t = np.arange(n) / SR
        env = np.exp(-3.0 * t) * np.minimum(1.0, t / 0.01)
        tone = np.zeros(n)
        for p in (pitch, pitch - 4):
            f = 440.0 * 2 ** ((p - 69) / 12)
            for h in range(1, 5):
                tone += np.sin(2 * np.pi * f * h * t) / h
        gain = vel * (loud[i] if loud is not None else 1.0)
        s = int(t0 * SR)
        y[s : s + n] += 0.1 * gain * env * tone
        onsets.append(t0)
        t0 += length
    y += 1e-4 * np.random.default_rng(seed).standard_normal(len(y))
    return y.astype(np.float32), np.asarray(onsets)


PASSAGE_TUNE = melody(seed=11, notes=40)
PASSAGE_SWELL = np.linspace(0.3, 1.0, len(PASSAGE_TUNE))
# (track, piece, seconds per beat, loudness shape): four performances of one work, one of
# another work with a single performance, one unlabelled performance of the first work.
PASSAGE_PERFORMANCES = [
    ("anna", "tune", 0.50, PASSAGE_SWELL, PASSAGE_TUNE),
    ("ben", "tune", 0.42, PASSAGE_SWELL * 0.8, PASSAGE_TUNE),
    ("cleo", "tune", 0.58, PASSAGE_SWELL[::-1], PASSAGE_TUNE),
    ("dan", "tune", 0.46, np.ones(len(PASSAGE_TUNE)), PASSAGE_TUNE),
    ("solo", "other", 0.5, None, melody(seed=23, notes=30)),
    ("nolabel", "", 0.48, PASSAGE_SWELL, PASSAGE_TUNE),
]


def publish_passages_index(cfg, root) -> tuple[dict, dict]:
    storage = Storage.from_config(cfg.storage)
    rate = cfg.audio.sample_rate
    window, hop = int(cfg.audio.window_s * rate), int(cfg.audio.hop_s * rate)
    embedder = Embedder.from_ref(cfg, storage, "random")
    rows = {c: [] for c in INDEX_METADATA_COLUMNS}
    frames, content, onsets = (
        [],
        {c: [] for c in ("track_id", "segments_digest", "rate", "frames", "features")},
        {},
    )
    version = new_version()
    for i, (track, piece, spb, loud, tune) in enumerate(PASSAGE_PERFORMANCES):
        audio, on = render_melody(tune, spb, lead_s=0.3 * i, loud=loud, seed=i)
        audio = audio[: int(rate * (len(audio) // rate))]
        onsets[track] = on
        path = root / f"{track}.wav"
        sf.write(path, audio, rate)
        ids = []
        for start in range(0, len(audio) - window + 1, hop):
            ids.append(segment_id(track, start))
            rows["segment_id"].append(ids[-1])
            rows["track_id"].append(track)
            rows["piece_id"].append(piece)
            rows["style"].append("romantic")
            rows["start_s"].append(start / rate)
            rows["end_s"].append((start + window) / rate)
            rows["sample_rate"].append(rate)
            rows["source_uri"].append(str(path))
            rows["metadata_json"].append(json.dumps({"performer": track}))
            frames.append(audio[start : start + window])
        feats = track_features(audio, rate, cfg.content.feature_rate)
        for name, value in (
            ("track_id", track),
            ("segments_digest", segments_digest(ids)),
            ("rate", feats.rate),
            ("frames", feats.frames),
            ("features", feats.to_bytes()),
        ):
            content[name].append(value)
    buffer = io.BytesIO()
    pq.write_table(pa.table(content), buffer)
    base = posixpath.join("index", version)
    storage.write_bytes(posixpath.join(base, CONTENT_DIR, "part-0.parquet"), buffer.getvalue())
    digests = {t: d for t, d in zip(content["track_id"], content["segments_digest"])}
    vectors = embedder.embed(np.stack(frames))
    ids = np.array(rows["segment_id"], dtype=np.int64)
    spec = IndexSpec(type="flat", dim=embedder.dim)
    manifest = write_index_artifact(
        cfg,
        storage,
        version,
        build_index(spec, [(vectors, ids)]),
        spec,
        pa.table(rows),
        embedder.info,
        {"segments": len(ids), "vectors": len(ids)},
        {"ingest": "test"},
        {"content": finish_content(storage, base, digests, cfg.content.feature_rate)},
    )
    return manifest, onsets


# -- loopback servers and the browser (web page tests) -----------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


@contextlib.contextmanager
def serve_app_in_thread(cfg: MessRayConfig):
    """The search app of ``cfg`` served by uvicorn in a thread on a free loopback port (no Ray);
    yields its base URL."""
    import uvicorn

    from mess_ray.serve import SearchService, create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(SearchService.from_config(cfg)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- a catalog whose performances carry pianists (the unseen-pianist holdout) ----------------
PIANIST_TAGS = ("Alpha01", "Bravo02", "Charlie03", "Delta04", "Echo05", "Foxtrot06")


def publish_pianist_ingest(
    cfg: MessRayConfig, storage: Storage, pieces: int = 4, seconds: float = 3.0
) -> pa.Table:
    """Every pianist of :data:`PIANIST_TAGS` plays every piece (an ASAP-rendering-like catalog:
    the performer tag in ``style_params_json``); two styles, and the third and fifth pianists
    unlabelled (fine-tuning mines labels for them)."""
    rate = cfg.audio.sample_rate
    window, hop = int(cfg.audio.window_s * rate), int(cfg.audio.hop_s * rate)
    rows = {f.name: [] for f in SEGMENT_SCHEMA}
    for p in range(pieces):
        for k, tag in enumerate(PIANIST_TAGS):
            audio = tone_track(seconds, rate, 110.0 * (p + 2) + 7 * k, seed=10 * p + k)
            track = f"piece{p}__{tag.lower()}"
            meta = json.dumps({"style_params_json": json.dumps({"performer": tag})})
            for start in range(0, len(audio) - window + 1, hop):
                values = {
                    "segment_id": segment_id(track, start),
                    "track_id": track,
                    "piece_id": f"piece{p}",
                    "style": "" if k in (2, 4) else ("legato" if k % 2 else "staccato"),
                    "start_s": start / rate,
                    "end_s": (start + window) / rate,
                    "start_sample": start,
                    "num_samples": window,
                    "sample_rate": rate,
                    "source_uri": f"/nonexistent/{track}.wav",
                    "metadata_json": meta,
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


class EagerDataset:
    """Stands in for a Ray Data dataset in driver tests: map_batches runs at once on the table."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def map_batches(self, fn, fn_kwargs=None, **_):
        return EagerDataset(fn(self.table, **(fn_kwargs or {})))

    def randomize_block_order(self, seed=None):
        return self


def make_asap_folder_with_scores(root: Path, pieces: int = 3) -> Path:
    """An ASAP-layout folder whose pieces have a ``midi_score.mid`` (the style grid's input):
    two performances of each of ``pieces`` pieces."""
    rows = []
    for p in range(pieces):
        folder = f"Composer{p}/Work{p}"
        write_midi(root / folder / "midi_score.mid", bars=4, seed=10 + p)
        for k, performer in enumerate(("Shi05M", "Lee01")):
            write_midi(root / folder / f"{performer}.mid", bars=2, seed=p * 2 + k)
            rows.append(
                {
                    "composer": f"Composer{p}",
                    "title": f"Work{p}",
                    "folder": folder,
                    "midi_score": f"{folder}/midi_score.mid",
                    "midi_performance": f"{folder}/{performer}.mid",
                }
            )
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def render_and_ingest_without_ray(cfg: MessRayConfig, storage: Storage, plan) -> list[dict]:
    """Render ``plan`` ((ref, style, track id, chain) tuples) with the render task function
    itself and publish render + ingest artifacts cut with cfg.audio's window and hop, as the
    stages would (no Ray). Returns the render catalog rows."""
    from mess_ray.ingest.catalog import catalog_from_render
    from mess_ray.render.job import render_track, write_catalog
    from mess_ray.render.sources import load_score

    sr = cfg.render.sample_rate
    if sr != cfg.audio.sample_rate:
        raise ValueError("render at the ingest rate (no resampling here)")
    version = new_version()
    rows = [
        render_track(load_score(ref), ref, style, tid, cfg.render, storage, version, chain)
        for ref, style, tid, chain in plan
    ]
    write_catalog(storage, version, rows)
    storage.publish("render", version, {"counts": {"tracks": len(rows)}})
    win, hop = round(cfg.audio.window_s * sr), round(cfg.audio.hop_s * sr)
    segments = []
    for row in catalog_from_render(storage)[0]:
        with storage.open(row["source_uri"].replace(storage.root.rstrip("/") + "/", ""), "rb") as f:
            audio, _ = sf.read(f, dtype="float32")
        for start in range(0, len(audio) - win + 1, hop):
            segments.append(
                {
                    "segment_id": segment_id(row["track_id"], start),
                    "track_id": row["track_id"],
                    "piece_id": row["piece_id"],
                    "style": row["style"],
                    "start_s": start / sr,
                    "end_s": (start + win) / sr,
                    "start_sample": start,
                    "num_samples": win,
                    "sample_rate": sr,
                    "source_uri": row["source_uri"],
                    "metadata_json": row["metadata_json"],
                    "audio": encode_audio(audio[start : start + win]),
                }
            )
    ingest = new_version()
    with storage.open(posixpath.join(segments_dir(ingest), "part-00000.parquet"), "wb") as f:
        pq.write_table(pa.Table.from_pylist(segments, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", ingest, {"counts": {"segments": len(segments)}})
    return rows


def write_chained_ingest(
    storage: Storage,
    pieces: int = 4,
    per_track: int = 3,
    chains: tuple[str, ...] = ("dry", "train-1"),
    version: str = "ing-chains",
) -> str:
    """Styled performances, each rendered through several recording chains (track
    ``<performance>__<chain>``, catalog metadata with ``performance_id`` and ``chain_json`` as the
    renderer writes them); chain k is the same notes at another level with added noise. One
    parquet file per piece."""
    total = 0
    for piece in range(pieces):
        rows = []
        for style in STYLES[:2]:
            performance = f"piece{piece}__{style}"
            for k, chain in enumerate(chains):
                track = f"{performance}__{chain}"
                meta = json.dumps(
                    {
                        "performance_id": performance,
                        "chain_json": json.dumps({"name": chain}),
                        "chain_id": f"{chain}-000000",
                    }
                )
                for i in range(per_track):
                    start = i * SR
                    audio = clip(piece, style, i)
                    if k:
                        noise = np.random.default_rng([piece, k, i]).standard_normal(len(audio))
                        audio = (audio * (0.5 + 0.3 * k) + 0.01 * noise).astype(np.float32)
                    rows.append(clip_row(track, piece, style, start, audio, meta))
        total += len(rows)
        with storage.open(f"ingest/{version}/segments/part-{piece:03d}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", version, {"counts": {"segments": total}})
    return version
