"""The search service on real Ray Serve over HTTP (127.0.0.1, a free port)."""

from __future__ import annotations

import socket

import httpx
import numpy as np

from mess_ray.serve import run_service
from mess_ray.serve.app import APP_NAME
from mess_ray.serve.client import (ServiceError, format_hits, list_tracks, search_by_track, search_file,
                                   wait_ready)

from conftest import tiny_config
from test_serve import publish_audio_index, track_audio, wav_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_run_over_http(ray_local, tmp_path):
    from ray import serve

    cfg = tiny_config(str(tmp_path / "store"))
    cfg.serve.port = free_port()
    assert cfg.serve.host == "127.0.0.1"
    manifest = publish_audio_index(cfg, tmp_path / "audio")
    base_url = f"http://127.0.0.1:{cfg.serve.port}"
    run_service(cfg, blocking=False)
    try:
        ready = wait_ready(base_url)
        assert ready["index_version"] == manifest["version"]
        assert [t["track_id"] for t in list_tracks(base_url)] == ["track0", "track1", "track2"]

        result = search_file(base_url, wav_bytes(track_audio(1, 16000)[8000:40000], 16000), k=3)
        assert result["hits"][0]["track_id"] == "track1" and len(result["hits"]) == 3
        table = format_hits(result)
        assert table.splitlines()[0].split()[:2] == ["rank", "track"] and len(table.splitlines()) == 5

        by_track = search_by_track(base_url, "track0", 2.0, k=2, exclude_track="track0")
        assert len(by_track["hits"]) == 2 and all(h["track_id"] != "track0" for h in by_track["hits"])

        audio = httpx.get(f"{base_url}/audio/track0", params={"start_s": 0, "end_s": 1}, timeout=30)
        assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
        try:
            search_file(base_url, b"not audio at all" * 10)
            raise AssertionError("expected a 415")
        except ServiceError as err:
            assert err.status == 415
        try:
            search_by_track(base_url, "ghost", 0.0)
            raise AssertionError("expected a 404")
        except ServiceError as err:
            assert err.status == 404
        assert np.isfinite(result["took_ms"])
    finally:
        # Shut Serve down (not only the app) so later tests can start a proxy on their own port.
        serve.shutdown()
