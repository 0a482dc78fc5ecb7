"""`mess-ray quickstart --audio DIR`: a folder of the user's recordings, searchable on the page."""

from __future__ import annotations

import csv
import socket
import sys
from pathlib import Path

import httpx
import pytest
from helpers import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quickstart_time import write_folder  # noqa: E402

from mess_ray.models import shipped  # noqa: E402
from mess_ray.quickstart import find_manifest, quickstart_config, run_quickstart  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_manifest_in_the_folder_is_found_and_a_flag_wins(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    cfg = tiny_config(str(tmp_path / "store"))
    assert find_manifest(str(tmp_path)) is None
    assert quickstart_config(cfg, str(tmp_path))[1] == str(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,composer\na.wav,Bach\n")
    assert find_manifest(str(tmp_path)) == f"{tmp_path}/manifest.csv"
    other = tmp_path / "other.parquet"
    assert quickstart_config(cfg, str(tmp_path), str(other))[1] == str(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quickstart_config(cfg, str(tmp_path / "missing"))


def test_quickstart_indexes_a_folder_with_the_shipped_model_and_serves_it(ray_local, tmp_path):
    from ray import serve

    folder = tmp_path / "my recordings"
    # 6 files of 12 s: WAV, FLAC and MP3 (ffmpeg), 44.1 kHz stereo, with a manifest.
    assert write_folder(folder, minutes=1.2, file_s=12.0) == 6
    (folder / "notes.txt").write_text("not audio")  # not in the manifest: not ingested
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.audio.window_s, cfg.audio.hop_s = 4.0, 2.0  # the shipped model's framing
    cfg.serve.port = _free_port()
    said: list[str] = []
    try:
        result = run_quickstart(cfg, str(folder), block=False, say=said.append)
        url = result["service_url"]
        index = result["manifests"]["index"]
        assert index["model"]["shipped"] == shipped.DEFAULT_SHIPPED
        ingest = result["manifests"]["ingest"]["counts"]
        assert ingest["files_in"] == ingest["files_segmented"] == 6
        assert said[-1].startswith("ready in ") and f"{url}/" in said[-1]

        # The page and the API answer; the manifest's columns are searchable metadata.
        assert "mess-ray" in httpx.get(f"{url}/", timeout=30).text
        tracks = httpx.get(f"{url}/tracks", timeout=30).json()
        assert {t["track_id"] for t in tracks} == {f"take_{i:03d}" for i in range(6)}
        assert {"composer", "title", "performer"} <= set(tracks[0]["metadata"])
        with open(folder / "take_001.flac", "rb") as f:
            resp = httpx.post(
                f"{url}/search",
                params={"k": 3, "filter": "performer=Ann"},
                files={"file": ("q.flac", f.read())},
                timeout=120,
            )
        assert resp.status_code == 200, resp.text
        hits = resp.json()["hits"]
        assert hits and all(h["metadata"]["performer"] == "Ann" for h in hits)
        assert all(h["percentile"] is not None and h["closest_facet"] for h in hits)
    finally:
        serve.shutdown()


def test_quickstart_on_a_folder_without_audio_says_so(ray_local, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing to hear")
    with open(folder / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "composer"], ["readme.txt", "Nobody"]])
    cfg = tiny_config(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="nothing to search"):
        run_quickstart(cfg, str(folder), serve=False, say=lambda *_: None)


def test_an_s3_prefix_and_its_manifest_are_found(s3_bucket, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.pipe(f"{s3_bucket}/music/a.wav", b"RIFF")
    cfg = tiny_config(str(tmp_path / "store"))
    assert quickstart_config(cfg, f"{s3_bucket}/music")[1] == f"{s3_bucket}/music"
    fs.pipe(f"{s3_bucket}/music/manifest.parquet", b"PAR1")
    assert find_manifest(f"{s3_bucket}/music/") == f"{s3_bucket}/music/manifest.parquet"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quickstart_config(cfg, f"{s3_bucket}/nothing-here")
