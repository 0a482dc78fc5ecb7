"""Hostile input costs the service bounded memory and time, and leaks nothing (issue 18).

Each test names the attack it defends against. Everything runs in-process (FastAPI
TestClient or the raw ASGI app) on a tiny index, well under 1 GiB; only the credentials
test starts Ray (under the session's ``ray_local``).
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from fastapi.testclient import TestClient
from helpers import publish_audio_index, tiny_config, track_audio, wav_bytes

from mess_ray.config import load_config, load_yaml
from mess_ray.index.searcher import SearchIndex
from mess_ray.serve import SearchService, create_app
from mess_ray.serve import service as service_module
from mess_ray.serve.service import DecodeLimits, UnsupportedMedia, decode_upload, read_passage
from mess_ray.storage import Storage

REPO = Path(__file__).resolve().parents[1]
# Real catalog layouts: ASAP ids are composer/work/.../performer, MAESTRO ids year/file.
SLASH_IDS = [
    "Chopin/Ballades/1/Perf1",
    "Bach/Fugue/bwv_846/Shi05M",
    "2018/MIDI-Unprocessed_Chamber3_MID--AUDIO_10_R3_2018_wav--1",
]


def peak_bytes(fn, *args, **kwargs):
    """(result or raised exception, peak bytes traced by tracemalloc while ``fn`` ran)."""
    tracemalloc.start()
    try:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (returned to the test)
            result = err
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cfg = tiny_config(str(root / "store"))
    cfg.serve.reload_interval_s = 0
    cfg.serve.max_upload_mb = 1.0
    manifest = publish_audio_index(cfg, root / "audio", track_ids=SLASH_IDS)
    return cfg, manifest, root


@pytest.fixture(scope="module")
def service(published):
    return SearchService.from_config(published[0])


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def silent_flac_8ch() -> bytes:
    """The probe's 234 KB FLAC: 8 channels of silence at 96 kHz, 240 s (184 M samples)."""
    out = io.BytesIO()
    with sf.SoundFile(out, "w", 96000, 8, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((96000 * 10, 8), np.float32)
        for _ in range(24):
            f.write(block)
    return out.getvalue()


# -- 1. what an upload declares does not set its cost ---------------------------------
def test_absurd_sample_rate_is_refused_before_decoding():
    one_hz = wav_bytes(np.zeros(2000, np.float32), 1)  # 4 KB declaring 2000 s at 1 Hz
    err, peak = peak_bytes(decode_upload, one_hz, 16000, max_seconds=30)
    assert isinstance(err, UnsupportedMedia) and "1 Hz" in str(err)
    assert peak < 4 * 2**20  # resampled whole it was 32 M samples (128 MiB)
    too_fast = wav_bytes(np.zeros(100, np.float32), 768000)
    with pytest.raises(UnsupportedMedia, match="768000 Hz"):
        decode_upload(too_fast, 16000)


def test_channel_count_above_the_limit_is_refused():
    nine = wav_bytes(np.zeros((100, 9), np.float32), 16000)
    with pytest.raises(UnsupportedMedia, match="9 channels"):
        decode_upload(nine, 16000)
    with pytest.raises(UnsupportedMedia, match="3 channels"):
        decode_upload(
            wav_bytes(np.zeros((100, 3), np.float32), 16000),
            16000,
            limits=DecodeLimits(max_channels=2),
        )


def test_long_multichannel_upload_decodes_only_the_budget(silent_flac_8ch):
    assert len(silent_flac_8ch) < 300_000
    limits = DecodeLimits()  # 8 M source samples: 1 M frames of 8 channels
    (mono, info), peak = peak_bytes(
        decode_upload, silent_flac_8ch, 16000, max_seconds=30, limits=limits
    )
    frames = limits.max_decode_samples // 8
    assert info["truncated"] and info["channels"] == 8 and info["source_sample_rate"] == 96000
    assert abs(len(mono) - frames * 16000 / 96000) <= 2
    # Whole, this upload was 184 M float32 samples (0.7 GiB) before being cut to 30 s.
    assert peak < 24 * 2**20, f"decoding peaked at {peak / 2**20:.0f} MiB"


def test_upload_stops_at_max_query_s(service):
    long = wav_bytes(np.zeros(16000 * 120, np.float32), 16000)  # 120 s, 3.7 MiB
    (mono, info), peak = peak_bytes(decode_upload, long, 16000, max_seconds=5)
    assert len(mono) == 5 * 16000 and info["truncated"]
    assert peak < 2 * 2**20  # 5 s of float32 is 320 KB; the whole file would be 7.7 MB


def test_hostile_uploads_answer_415(client):
    for data in (
        wav_bytes(np.zeros(2000, np.float32), 1),
        wav_bytes(np.zeros((100, 9), np.float32), 16000),
    ):
        response = client.post("/search", files={"file": ("q.wav", data)})
        assert response.status_code == 415, response.text


# -- 2. a chunked body is counted as it arrives ---------------------------------------
BOUNDARY = "hostileboundary"


def run_asgi_post(app, chunks, total_chunks: int, path: str = "/search"):
    """POST a chunked body (no Content-Length) straight to the ASGI app; (status, body, chunks read)."""
    state = {"read": 0, "status": None, "body": b""}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"explain=false",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 5555),
        "server": ("testserver", 80),
    }
    iterator = iter(chunks)

    async def receive():
        chunk = next(iterator, None)
        if chunk is None:
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}
        state["read"] += 1
        return {"type": "http.request", "body": chunk, "more_body": state["read"] < total_chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            state["status"] = message["status"]
        elif message["type"] == "http.response.body":
            state["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return state["status"], state["body"], state["read"]


def multipart_chunks(payload_chunks):
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="q.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    yield from payload_chunks
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_chunked_upload_is_cut_at_the_limit(service):
    app = create_app(service)  # serve.max_upload_mb = 1
    mib = b"\0" * 2**20
    total = 64  # a 64 MiB body with no Content-Length
    status, body, read = run_asgi_post(app, multipart_chunks(mib for _ in range(total)), total + 2)
    assert status == 413 and "limit" in json.loads(body)["detail"]
    assert read <= 3, f"read {read} MiB of a body above the 1 MiB limit"


def test_chunked_upload_under_the_limit_still_works(service):
    app = create_app(service)
    data = wav_bytes(track_audio(0, 16000)[:32000], 16000)
    pieces = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    status, body, _ = run_asgi_post(app, multipart_chunks(pieces), len(pieces) + 2)
    assert status == 200, body
    assert json.loads(body)["hits"][0]["track_id"] == SLASH_IDS[0]


# -- 3. track ids with "/" ------------------------------------------------------------
@pytest.mark.parametrize("track_id", SLASH_IDS)
def test_track_ids_with_slashes_are_reachable(client, track_id):
    for path in (track_id, track_id.replace("/", "%2F")):  # raw and encoded slashes
        detail = client.get(f"/tracks/{path}")
        assert detail.status_code == 200 and detail.json()["track_id"] == track_id
        wave = client.get(f"/tracks/{path}/waveform", params={"points": 50})
        assert wave.status_code == 200 and wave.json()["track_id"] == track_id
        audio = client.get(f"/audio/{path}", params={"start_s": 1, "end_s": 2})
        assert audio.status_code == 200 and len(sf.read(io.BytesIO(audio.content))[0]) == 16000
    hits = client.get(
        "/search/by-track", params={"track_id": track_id, "start_s": 0, "explain": False}
    )
    assert hits.status_code == 200
    assert client.get(f"/tracks/{track_id}/nope").status_code == 404


def test_page_encodes_each_part_of_an_id():
    page = (REPO / "mess_ray" / "serve" / "static" / "index.html").read_text()
    assert 'split("/").map(encodeURIComponent).join("/")' in page
    assert "encodeURIComponent(hit.track_id)" not in page


# -- 4. credentials never reach Ray's logs ---------------------------------------------
def test_secrets_stay_out_of_ray_runtime_env_and_logs(ray_local):
    import os

    import ray

    from mess_ray import raylocal

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 8, "conftest sets a distinctive canary"

    @ray.remote(num_cpus=0.1)
    def worker_secret() -> str | None:
        return os.environ.get("AWS_SECRET_ACCESS_KEY")

    # Local workers still have the credentials: they inherit the raylet's environment.
    assert ray.get(worker_secret.remote()) == secret
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaks = []
    for path in session.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 * 2**20:
            try:
                if secret.encode() in path.read_bytes():
                    leaks.append(str(path.relative_to(session)))
            except OSError:
                continue
    assert not leaks, f"the AWS secret is written into {leaks}"
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"} & set(
        raylocal.FORWARDED_ENV
    )


# -- 5. ranges seek, waveforms are cached, decodes are bounded -------------------------
@pytest.fixture(scope="module")
def long_track(tmp_path_factory):
    """A 10-minute recording in its own index (where a range request used to decode 900 s)."""
    root = tmp_path_factory.mktemp("long")
    cfg = tiny_config(str(root / "store"))
    cfg.serve.reload_interval_s = 0
    manifest = publish_audio_index(cfg, root / "audio", n_tracks=1, track_ids=["Long/Perf1"])
    path = Path(
        SearchIndex.load(Storage.from_config(cfg.storage)).track("Long/Perf1")["source_uri"]
    )
    with sf.SoundFile(path, "w", 16000, 1, subtype="PCM_16") as f:
        tone = 0.3 * np.sin(np.arange(16000 * 60) / 16000 * 2 * np.pi * 220).astype(np.float32)
        for _ in range(10):
            f.write(tone)
    service = SearchService.from_config(cfg)
    return service, TestClient(create_app(service)), manifest


def test_range_request_decodes_only_its_bytes(long_track):
    service, client, _ = long_track
    size = int(client.head("/audio/Long/Perf1").headers["content-length"])
    assert size == 44 + 2 * 16000 * 600
    response, peak = peak_bytes(
        client.get, "/audio/Long/Perf1", headers={"Range": "bytes=5000000-5001023"}
    )
    assert response.status_code == 206 and len(response.content) == 1024
    assert response.headers["content-range"] == f"bytes 5000000-5001023/{size}"
    assert peak < 4 * 2**20, f"a 1 KiB range peaked at {peak / 2**20:.1f} MiB"
    # The bytes are those of the whole passage.
    uri = service.index.track("Long/Perf1")["source_uri"]
    whole, total = read_passage(uri, 290.0, 320.0)
    part, _ = read_passage(uri, 290.0, 320.0, byte_span=(10, 5009))
    assert part == whole[10:5010] and total == len(whole)
    head, _ = read_passage(uri, 0.0, None, byte_span=(0, 99))
    reference = io.BytesIO()
    pcm, rate = sf.read(uri, frames=16000 * 600, dtype="float32", always_2d=True)
    sf.write(reference, pcm, rate, format="WAV", subtype="PCM_16")
    assert head == reference.getvalue()[:100]


def test_whole_passage_is_streamed_in_blocks(long_track):
    service, client, _ = long_track

    def drain() -> tuple[int, bytes]:
        total, first = 0, b""
        for chunk in service.audio_stream("Long/Perf1"):
            first = first or chunk
            total += len(chunk)
        return total, first

    (total, header), peak = peak_bytes(drain)
    assert total == 44 + 2 * 16000 * 600 and header[:4] == b"RIFF"
    assert peak < 4 * 2**20, f"streaming 10 minutes peaked at {peak / 2**20:.1f} MiB"
    uri = service.index.track("Long/Perf1")["source_uri"]
    for span in (None, (0, 43), (40, 70_000), (100_001, 300_000)):
        streamed = b"".join(
            service_module.passage_chunks(uri, 290.0, 320.0, byte_span=span, block_frames=1000)
        )
        assert streamed == read_passage(uri, 290.0, 320.0, byte_span=span)[0], span


def test_waveform_is_decoded_once_per_track(long_track):
    service, client, _ = long_track
    before = service.waveform_cache.info()["misses"]
    shapes = [
        client.get("/tracks/Long/Perf1/waveform", params={"points": p})
        for p in (100, 333, 800, 4000)
    ]
    assert [r.json()["points"] for r in shapes] == [100, 333, 800, 4000]
    assert all(r.json()["duration_s"] == 600.0 for r in shapes)
    assert service.waveform_cache.info()["misses"] == before + 1
    peaks = shapes[0].json()
    assert min(peaks["min"]) < -0.29 and max(peaks["max"]) > 0.29


def test_concurrent_decodes_are_bounded(published, monkeypatch):
    cfg = published[0].model_copy(deep=True)
    cfg.serve.max_concurrent_decodes = 2
    service = SearchService.from_config(cfg)
    running, most = [0], [0]
    lock = threading.Lock()
    original = service_module.read_passage

    def slow_read(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(service_module, "read_passage", slow_read)
    threads = [
        threading.Thread(target=service.audio, args=(SLASH_IDS[i % 3], 0.0, 1.0)) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 2


# -- 6. exposure ------------------------------------------------------------------------
def test_what_the_project_binds_is_loopback_by_default():
    assert load_config(None).serve.host == "127.0.0.1"
    serve_cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert serve_cfg["http_options"]["host"] == "127.0.0.1"


def test_api_key_guards_every_endpoint_but_liveness(published, monkeypatch):
    cfg = published[0].model_copy(deep=True)
    cfg.serve.api_key = "correct horse battery staple"
    client = TestClient(create_app(SearchService.from_config(cfg)))
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200  # the page; its API calls need the key
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        response = client.get("/tracks", headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["detail"]
    assert client.get("/tracks", headers={"X-API-Key": cfg.serve.api_key}).status_code == 200
    bearer = {"Authorization": f"Bearer {cfg.serve.api_key}"}
    assert client.get("/info", headers=bearer).status_code == 200
    assert client.post("/search", files={"file": ("q.wav", b"x")}).status_code == 401
    # The same from the environment, without a config key.
    monkeypatch.setenv("MESS_RAY_API_KEY", "from-env")
    env_client = TestClient(create_app(SearchService.from_config(published[0])))
    assert env_client.get("/tracks").status_code == 401
    assert env_client.get("/tracks", headers={"X-API-Key": "from-env"}).status_code == 200
    from mess_ray.serve.client import _headers

    assert _headers() == {"X-API-Key": "from-env"}


# -- 7. small leaks and contract gaps ----------------------------------------------------
def test_errors_show_no_object_reprs(client):
    response = client.post("/search", files={"file": ("notes.txt", b"not audio at all" * 64)})
    assert response.status_code == 415
    assert " at 0x" not in response.text and "BytesIO" not in response.text


def test_responses_show_no_server_paths(client, published):
    _, _, root = published
    clip = wav_bytes(track_audio(0, 16000)[:32000], 16000)
    bodies = [
        client.get("/tracks").text,
        client.get(f"/tracks/{SLASH_IDS[0]}").text,
        client.get("/info").text,
        client.get("/readyz").text,
        client.post("/search", params={"explain": False}, files={"file": ("q.wav", clip)}).text,
    ]
    for body in bodies:
        assert str(root) not in body and str(Path(root).parent) not in body, body[:300]
    tracks = client.get("/tracks").json()
    assert tracks[0]["source_uri"] == f"audio/{tracks[0]['track_id']}.wav"


def test_sources_outside_the_allowed_roots_are_never_read(tmp_path, monkeypatch):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.serve.reload_interval_s = 0
    cfg.serve.source_prefixes = [str(tmp_path / "allowed")]
    publish_audio_index(cfg, tmp_path / "outside", n_tracks=2)
    opened = []
    real = service_module.make_filesystem
    monkeypatch.setattr(
        service_module, "make_filesystem", lambda uri, *a: opened.append(uri) or real(uri, *a)
    )
    service = SearchService.from_config(cfg)
    client = TestClient(create_app(service))
    response = client.get("/audio/track0")
    assert response.status_code == 404 and "outside" in response.json()["detail"]
    assert client.get("/tracks/track0/waveform").status_code == 404
    # A tampered index pointing at a URL, or escaping the root with "..".
    for uri in (
        "http://127.0.0.1:9/steal.wav",
        str(tmp_path / "allowed" / ".." / "outside" / "track1.wav"),
    ):
        service.index._cols["source_uri"] = [uri] * len(service.index._cols["source_uri"])
        service.waveform_cache = service_module.LRUCache(4)
        assert client.get("/audio/track1").status_code == 404
        assert client.get("/tracks/track1/waveform").status_code == 404
    assert opened == []
    hits = client.post(
        "/search", files={"file": ("q.wav", wav_bytes(track_audio(1, 16000)[:32000], 16000))}
    )
    assert hits.status_code == 200 and all(h["explanation"] is None for h in hits.json()["hits"])
    assert opened == []


def test_manifest_without_checksums_is_refused(tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.serve.reload_interval_s = 0
    publish_audio_index(cfg, tmp_path / "audio", n_tracks=1)
    service = SearchService.from_config(cfg)
    storage = Storage.from_config(cfg.storage)
    tampered = publish_audio_index(cfg, tmp_path / "audio2", n_tracks=2)
    manifest_path = Path(storage.path("index", tampered["version"], "manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    del manifest["checksums"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lacks checksums"):
        SearchIndex.load(storage, tampered["version"])
    assert not service.reload_if_changed()
    assert service.stats.reload_errors == 1 and len(service.index.tracks()) == 1


def test_unusable_ranges_are_ignored_and_head_works(client):
    path = f"/audio/{SLASH_IDS[1]}"
    whole = client.get(path)
    for header in ("bytes=0-1,5-9", "items=0-10", "bytes=-", "bytes=abc"):
        response = client.get(path, headers={"Range": header})
        assert response.status_code == 200 and response.content == whole.content, header
    head = client.head(path)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(whole.content)
    assert head.headers["content-type"] == "audio/wav"
    ranged = client.head(path, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.headers["content-length"] == "10"
    assert client.head("/audio/ghost").status_code == 404


def test_yaml_config_rejects_duplicates_booleans_and_aliases(tmp_path):
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("serve:\n  port: 8000\n  port: 9000\n")
    with pytest.raises(ValueError, match="duplicate key"):
        load_config(duplicate)
    boolean = tmp_path / "bool.yaml"
    boolean.write_text("serve:\n  port: true\n")
    with pytest.raises(ValueError, match="expected a number"):
        load_config(boolean)
    with pytest.raises(ValueError, match="expected a number"):
        load_config(None, ["serve.max_upload_mb=yes"])
    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        laughs.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(laughs) + "\n")
    started = time.perf_counter()
    with pytest.raises(ValueError, match="aliases"):
        load_config(bomb)
    assert time.perf_counter() - started < 1.0
    assert load_yaml("serve:\n  port: 8001\n") == {"serve": {"port": 8001}}
    assert load_config(None, ["serve.port=8001"]).serve.port == 8001


def test_repository_configs_still_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
