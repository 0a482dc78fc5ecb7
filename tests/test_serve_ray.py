"""The search service on real Ray Serve over HTTP (127.0.0.1, a free port): endpoints, uploads
batched across concurrent requests, hot index updates under load, Prometheus metrics through Ray."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from helpers import publish_audio_index, tiny_config, track_audio, wav_bytes

from mess_ray.serve import run_service
from mess_ray.serve.client import (
    ServiceError,
    format_hits,
    list_tracks,
    search_by_track,
    search_file,
    wait_ready,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_run_over_http(ray_local, tmp_path):
    from ray import serve

    cfg = tiny_config(str(tmp_path / "store"))
    cfg.serve.port = free_port()
    cfg.serve.reload_interval_s = 0.5
    cfg.serve.batch_wait_s = (
        0.25  # long enough that concurrent uploads on 2 busy cores meet in a batch
    )
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
        assert (
            table.splitlines()[0].split()[:2] == ["rank", "track"]
            # header, rule, three hits, the footnote on percentile and closest facet
            and len(table.splitlines()) == 6
            and "percentile" in table.splitlines()[-1]
        )

        by_track = search_by_track(base_url, "track0", 2.0, k=2, exclude_track="track0")
        assert len(by_track["hits"]) == 2 and all(
            h["track_id"] != "track0" for h in by_track["hits"]
        )
        chopin = search_by_track(base_url, "track0", 2.0, k=3, composer="chopin", mmr_lambda=0.5)
        assert {h["track_id"] for h in chopin["hits"]} == {"track1"} and chopin["hits"][0][
            "explanation"
        ]

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

        # Concurrent uploads are embedded together (@serve.batch), decoding each on its own.
        clips = [wav_bytes(track_audio(t % 3, 16000)[:32000], 16000) for t in range(8)]
        before = httpx.get(f"{base_url}/readyz", timeout=30).json()["stats"]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda c: search_file(base_url, c, k=1), clips))
        assert [a["hits"][0]["track_id"] for a in answers] == [f"track{t % 3}" for t in range(8)]
        stats = httpx.get(f"{base_url}/readyz", timeout=30).json()["stats"]
        assert stats["max_embed_batch"] > 1, stats
        embedded = lambda st: sum(int(size) * n for size, n in st["embed_batch_sizes"].items())  # noqa: E731
        assert embedded(stats) - embedded(before) == 8

        # Hot index update: publish a new version while a client loops; no request fails.
        errors, versions, stop = [], [], threading.Event()

        def loop() -> None:
            while not stop.is_set():
                r = httpx.get(
                    f"{base_url}/search/by-track",
                    timeout=30,
                    params={"track_id": "track1", "start_s": 1.0, "k": 2, "explain": False},
                )
                errors.append(r.text) if r.status_code != 200 else versions.append(
                    r.json()["index_version"]
                )

        worker = threading.Thread(target=loop)
        worker.start()
        try:
            new = publish_audio_index(cfg, tmp_path / "audio2", n_tracks=4)
            deadline = time.monotonic() + 60
            while (not versions or versions[-1] != new["version"]) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop.set()
            worker.join()
        assert not errors and versions[0] == manifest["version"] and versions[-1] == new["version"]
        assert set(versions[versions.index(new["version"]) :]) == {new["version"]}
        assert len(list_tracks(base_url)) == 4

        # Prometheus through Ray: the replica's counters reach the node's metrics endpoint.
        metrics_url = f"http://127.0.0.1:{ray_local._private.worker.global_worker.node.metrics_export_port}/metrics"
        deadline, text = time.monotonic() + 60, ""
        while "ray_mess_ray_requests" not in text and time.monotonic() < deadline:
            time.sleep(2)
            text = httpx.get(metrics_url, timeout=10).text
        assert "ray_mess_ray_requests" in text and "ray_mess_ray_latency_ms_bucket" in text
        assert (
            "ray_serve_num_http_requests" in text or "ray_serve_deployment_request_counter" in text
        )
    finally:
        # Shut Serve down (not only the app) so later tests can start a proxy on their own port.
        serve.shutdown()
