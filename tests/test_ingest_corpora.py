"""MAESTRO and ASAP catalogs: tiny generated layouts, metadata carried into the segment table."""

from __future__ import annotations

import json
from pathlib import Path

import mido
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from mess_ray.config import MessRayConfig
from mess_ray.ingest.catalog import build_catalog
from mess_ray.ingest.corpora import (
    catalog_from_asap,
    catalog_from_maestro,
    detect_corpus,
    maestro_piece_id,
    read_metadata_records,
    slug,
)
from mess_ray.ingest.job import run_ingest
from mess_ray.segments import read_segment_table
from mess_ray.storage import Storage

SR = 16000
CHOPIN = "Frédéric Chopin"
BALLADE = "Ballade No. 1 in G Minor, Op. 23"


def write_tone(path: Path, seconds: float, rate: int = 22050, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * rate)) / rate
    data = np.stack([0.2 * np.sin(2 * np.pi * 330 * (c + 1) * t) for c in range(channels)], axis=1)
    sf.write(str(path), data.astype(np.float32), rate)


def write_midi(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    track = mido.MidiTrack(
        [
            mido.Message("note_on", note=60, velocity=64, time=0),
            mido.Message("note_off", note=60, velocity=0, time=480),
        ]
    )
    mido.MidiFile(tracks=[track]).save(str(path))


MAESTRO_CSV = (
    "canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration\n"
    f'{CHOPIN},"{BALLADE}",train,2004,2004/perf_a.midi,2004/perf_a.wav,3.0\n'
    f'{CHOPIN},"{BALLADE}",test,2006,2006/perf_b.midi,2006/perf_b.flac,2.5\n'
    "Johann Sebastian Bach,Prelude and Fugue in C Major,validation,2008,2008/perf_c.midi,2008/perf_c.wav,2.0\n"
)


def make_maestro(root: Path, with_json: bool = False) -> dict[str, str | None]:
    """A tiny MAESTRO layout; returns expected reject reason per track id (None = segmented)."""
    write_tone(root / "2004" / "perf_a.wav", 3.0, rate=44100, channels=2)
    write_tone(root / "2006" / "perf_b.flac", 2.5)
    for name in ("2004/perf_a.midi", "2006/perf_b.midi", "2008/perf_c.midi"):
        write_midi(root / name)
    # 2008/perf_c.wav is listed in the metadata but missing: it must be rejected, not lost.
    (root / "maestro-v3.0.0.csv").write_text(MAESTRO_CSV)
    if with_json:  # MAESTRO v3's column-oriented JSON (pandas orient="columns")
        rows = read_metadata_records(_local_fs(), str(root / "maestro-v3.0.0.csv"))
        columns = {k: {str(i): r[k] for i, r in enumerate(rows)} for k in rows[0]}
        (root / "maestro-v3.0.0.json").write_text(json.dumps(columns))
    return {"2004/perf_a": None, "2006/perf_b": None, "2008/perf_c": "unreadable"}


ASAP_CSV = (
    "composer,title,folder,xml_score,midi_score,midi_performance,performance_annotations,"
    "midi_score_annotations,maestro_midi_performance,maestro_audio_performance,start,end,audio_performance\n"
    "Bach,Fugue_bwv_846,Bach/Fugue/bwv_846,Bach/Fugue/bwv_846/xml_score.musicxml,Bach/Fugue/bwv_846/midi_score.mid,"
    "Bach/Fugue/bwv_846/Shi05M.mid,Bach/Fugue/bwv_846/Shi05M_annotations.txt,"
    "Bach/Fugue/bwv_846/midi_score_annotations.txt,,,,,\n"
    "Chopin,Ballade_1,Chopin/Ballades/1,Chopin/Ballades/1/xml_score.musicxml,Chopin/Ballades/1/midi_score.mid,"
    "Chopin/Ballades/1/Perf1.mid,Chopin/Ballades/1/Perf1_annotations.txt,"
    "Chopin/Ballades/1/midi_score_annotations.txt,{maestro}/2004/x.midi,{maestro}/2004/x.wav,0.5,9.0,"
    "{maestro}/2004/x.wav\n"
    "Chopin,Ballade_1,Chopin/Ballades/1,Chopin/Ballades/1/xml_score.musicxml,Chopin/Ballades/1/midi_score.mid,"
    "Chopin/Ballades/1/Perf2.mid,Chopin/Ballades/1/Perf2_annotations.txt,"
    "Chopin/Ballades/1/midi_score_annotations.txt,,,,,\n"
)


def make_asap(root: Path) -> dict[str, str | None]:
    write_tone(root / "Bach" / "Fugue" / "bwv_846" / "Shi05M.wav", 2.2)
    write_tone(root / "Chopin" / "Ballades" / "1" / "Perf1.flac", 3.1, rate=48000, channels=2)
    for perf in ("Bach/Fugue/bwv_846/Shi05M", "Chopin/Ballades/1/Perf1", "Chopin/Ballades/1/Perf2"):
        write_midi(root / f"{perf}.mid")
        (root / f"{perf}_annotations.txt").write_text("0.50\t0.50\tdb\n1.00\t1.00\tb\n")
    (root / "metadata.csv").write_text(ASAP_CSV)
    # Perf2 has MIDI and annotations but no recording next to it: rejected as unreadable.
    return {
        "Bach/Fugue/bwv_846/Shi05M": None,
        "Chopin/Ballades/1/Perf1": None,
        "Chopin/Ballades/1/Perf2": "unreadable",
    }


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


def cfg_for(root: str, source: str, catalog: str = "auto") -> MessRayConfig:
    return MessRayConfig.model_validate(
        {
            "storage": {"root": root},
            "audio": {"sample_rate": SR, "window_s": 1.0, "hop_s": 0.5, "min_duration_s": 0.5},
            "ingest": {"source": source, "catalog": catalog, "read_block_s": 0.4},
        }
    )


# -- pure catalog functions -------------------------------------------------------------------
def test_slug_and_piece_id():
    assert slug(CHOPIN) == "frederic-chopin"
    assert maestro_piece_id(CHOPIN, BALLADE) == "frederic-chopin--ballade-no-1-in-g-minor-op-23"
    with pytest.raises(ValueError):
        maestro_piece_id("", "  ")


@pytest.mark.parametrize("use_json", [False, True])
def test_maestro_catalog(tmp_path, use_json):
    expected = make_maestro(tmp_path / "maestro", with_json=use_json)
    source = tmp_path / "maestro" / ("maestro-v3.0.0.json" if use_json else "")
    rows = {r["track_id"]: r for r in catalog_from_maestro(str(source))}
    assert set(rows) == set(expected)
    a = rows["2004/perf_a"]
    assert a["source_uri"] == str(tmp_path / "maestro" / "2004" / "perf_a.wav") and a["size"] > 0
    assert a["piece_id"] == rows["2006/perf_b"]["piece_id"] == maestro_piece_id(CHOPIN, BALLADE)
    meta = json.loads(a["metadata_json"])
    assert meta["composer"] == CHOPIN and meta["title"] == BALLADE and meta["split"] == "train"
    assert meta["year"] == 2004 and meta["duration"] == 3.0 and meta["corpus"] == "maestro"
    assert meta["midi_uri"] == str(tmp_path / "maestro" / "2004" / "perf_a.midi")
    assert rows["2008/perf_c"]["size"] == -1  # listed, but the recording is missing
    assert detect_corpus(str(tmp_path / "maestro")) == "maestro"
    assert detect_corpus(str(source)) == "maestro"


def test_maestro_metadata_errors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "maestro-v1.csv").write_text("canonical_composer,midi_filename\nX,a.midi\n")
    with pytest.raises(ValueError, match="audio_filename"):
        catalog_from_maestro(str(tmp_path / "m"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="layout"):
        catalog_from_maestro(str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="records"):
        catalog_from_maestro(str(tmp_path / "bad.json"))


def test_asap_catalog(tmp_path):
    expected = make_asap(tmp_path / "asap")
    rows = {r["track_id"]: r for r in catalog_from_asap(str(tmp_path / "asap"))}
    assert set(rows) == set(expected)
    bach = rows["Bach/Fugue/bwv_846/Shi05M"]
    assert bach["source_uri"].endswith("Bach/Fugue/bwv_846/Shi05M.wav") and bach["size"] > 0
    assert bach["piece_id"] == "Bach/Fugue/bwv_846"
    perf1 = rows["Chopin/Ballades/1/Perf1"]
    assert perf1["source_uri"].endswith("Perf1.flac")  # "{maestro}/..." audio paths are not local
    assert perf1["piece_id"] == rows["Chopin/Ballades/1/Perf2"]["piece_id"] == "Chopin/Ballades/1"
    meta = json.loads(bach["metadata_json"])
    assert meta["annotations_uri"] == str(
        tmp_path / "asap" / "Bach/Fugue/bwv_846/Shi05M_annotations.txt"
    )
    assert meta["score_annotations_uri"] == str(
        tmp_path / "asap" / "Bach/Fugue/bwv_846/midi_score_annotations.txt"
    )
    assert meta["midi_uri"] == str(tmp_path / "asap" / "Bach/Fugue/bwv_846/Shi05M.mid")
    assert meta["composer"] == "Bach" and meta["corpus"] == "asap"
    assert rows["Chopin/Ballades/1/Perf2"]["size"] == -1
    assert detect_corpus(str(tmp_path / "asap")) == "asap"
    assert detect_corpus(str(tmp_path / "asap" / "metadata.csv")) == "asap"


def test_auto_detection_in_build_catalog(tmp_path):
    make_maestro(tmp_path / "maestro")
    make_asap(tmp_path / "asap")
    write_tone(tmp_path / "plain" / "x.wav", 1.0)
    (tmp_path / "plain" / "metadata.csv").write_text(
        "path,who\nx.wav,me\n"
    )  # not ASAP: no midi_performance
    (tmp_path / "plain" / "list.csv").write_text("path,midi_performance\nx.wav,x.mid\n")
    assert (
        detect_corpus(str(tmp_path / "plain" / "list.csv")) is None
    )  # has 'path': a user manifest
    storage = Storage(str(tmp_path / "store"))
    for folder, kind in [
        ("maestro", "maestro"),
        ("asap", "asap"),
        ("plain", "folder"),
        ("plain/list.csv", "manifest"),
    ]:
        rows, source = build_catalog(cfg_for(storage.root, str(tmp_path / folder)), storage)
        assert source["kind"] == kind and rows
    # Explicit kinds override detection, and a layout mismatch is a clear error.
    with pytest.raises(ValueError, match="layout"):
        build_catalog(cfg_for(storage.root, str(tmp_path / "plain"), "maestro"), storage)
    with pytest.raises(ValueError, match="midi_performance"):
        build_catalog(
            cfg_for(storage.root, str(tmp_path / "plain" / "metadata.csv"), "asap"), storage
        )


# -- Ray runs ---------------------------------------------------------------------------------
def _check(manifest: dict, storage: Storage, expected: dict[str, str | None]) -> list[dict]:
    counts = manifest["counts"]
    assert (
        counts["files_in"] == len(expected) == counts["files_segmented"] + counts["files_rejected"]
    )
    rejects = pq.read_table(
        storage.open(f"ingest/{manifest['version']}/rejects.parquet")
    ).to_pylist()
    assert {r["track_id"]: r["reason"] for r in rejects} == {t: r for t, r in expected.items() if r}
    table = read_segment_table(
        storage, manifest["version"], columns=["track_id", "piece_id", "metadata_json", "end_s"]
    )
    assert table.num_rows == counts["segments"]
    rows = table.to_pylist()
    assert {r["track_id"] for r in rows} == {t for t, r in expected.items() if r is None}
    return rows


def test_ray_ingest_maestro_layout(ray_local, tmp_path):
    expected = make_maestro(tmp_path / "maestro")
    storage = Storage(str(tmp_path / "store"))
    manifest = run_ingest(cfg_for(storage.root, str(tmp_path / "maestro")), storage)
    assert manifest["inputs"]["catalog"] == "maestro"
    rows = _check(manifest, storage, expected)
    a = [r for r in rows if r["track_id"] == "2004/perf_a"]
    assert max(r["end_s"] for r in a) == pytest.approx(3.0)
    meta = json.loads(a[0]["metadata_json"])
    assert a[0]["piece_id"] == maestro_piece_id(CHOPIN, BALLADE)
    assert (meta["composer"], meta["split"], meta["year"]) == (CHOPIN, "train", 2004)
    assert meta["midi_uri"].endswith("2004/perf_a.midi")


def test_ray_ingest_asap_layout_from_s3(ray_local, s3_bucket, tmp_path):
    import fsspec

    expected = make_asap(tmp_path / "asap")
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    fs.put(str(tmp_path / "asap") + "/", f"{s3_bucket}/asap/", recursive=True)
    storage = Storage(f"{s3_bucket}/store")
    manifest = run_ingest(cfg_for(storage.root, f"{s3_bucket}/asap"), storage)
    assert manifest["inputs"]["catalog"] == "asap"
    rows = _check(manifest, storage, expected)
    perf1 = [r for r in rows if r["track_id"] == "Chopin/Ballades/1/Perf1"]
    assert perf1[0]["piece_id"] == "Chopin/Ballades/1"
    meta = json.loads(perf1[0]["metadata_json"])
    assert meta["annotations_uri"] == f"{s3_bucket}/asap/Chopin/Ballades/1/Perf1_annotations.txt"
    assert max(r["end_s"] for r in perf1) == pytest.approx(3.1)
