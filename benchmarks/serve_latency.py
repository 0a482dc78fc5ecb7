"""Search service benchmark: latency and throughput over HTTP vs calling FAISS / the Embedder directly.

Builds a synthetic corpus (tone recordings embedded by the random-init encoder into a flat
FAISS index), deploys the real Ray Serve application on 127.0.0.1 and prints one JSON line per
figure, each compared with its in-process baseline measured in the same run:

- ``direct``: ``SearchIndex.search`` (FAISS + hit assembly) for a stored vector, and the
  Embedder on a 5 s clip (window cutting + model call), p50/p99 in this process;
- ``latency``: sequential requests, p50/p99, for query by id (``GET /search/by-track``) and by
  a 5 s WAV upload (``POST /search``), each without and with per-facet explanations, paired
  with the direct call (by id: ``SearchIndex.search``; upload: Embedder + search) alternately
  so both see the same load; ``overhead_p50_ms`` is the service's p50 minus the direct p50
  (HTTP, Serve proxy and routing, JSON, decoding, explanations);
- ``throughput``: a SECOND PROCESS (this script with ``--load``) keeps ``--concurrency``
  requests in flight on loopback for ``--duration`` seconds; requests/s, p50/p99 and the error
  count (must be 0).

- ``upload_inference`` (``--only upload-inference``): the upload p50/p99 with the service
  deployed with the embedding's fast CPU path off (``model.fast_inference=false``,
  ``model.inference_precision=float32``: the path before the CPU embedding work), then with
  today's defaults, each paired with the direct Embedder + search call in the same mode.

- ``query_lags`` (``--only query-lags``): upload and track + time p50/p99 with the content
  timeline searched at one lag, then at the shipped model's 15 (``tiny-asap-v3``: +-140 ms every
  20 ms), each paired with the same search called in this process.

- ``adversarial``: the same by-id load (second process) for ``--duration`` seconds twice:
  alone, then while ``--hostile`` threads of this process send hostile requests (a WAV
  declaring 1 Hz, an 8-channel 96 kHz 240 s FLAC of silence, a 64 MiB chunked body without
  Content-Length, 1 KiB ranges of /audio, waveforms at random resolutions); p50/p99 of the
  normal queries, the replica's peak resident memory in each phase (VmHWM, reset between
  phases) and the hostile requests' statuses.

Run: ``python -m benchmarks.serve_latency [--tracks 40] [--track-s 30] [--requests 60]
[--duration 20] [--concurrency 8] [--only adversarial|upload-inference|query-lags]
[--hostile 3] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks.common import emit, free_port, percentiles

CLIP_S = 5.0


def load_command(spec: str, args: argparse.Namespace) -> list[str]:
    """The load generator: this module in a second process (``--load SPEC``)."""
    return [
        sys.executable,
        "-m",
        "benchmarks.serve_latency",
        "--load",
        spec,
        "--duration",
        str(args.duration),
        "--concurrency",
        str(args.concurrency),
    ]


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV")
    return out.getvalue()


def recording(t: int, seconds: float, rate: int) -> np.ndarray:
    """A distinct synthetic performance per track: pitch, pulse rate, brightness and a crescendo."""
    time_s = np.arange(int(seconds * rate)) / rate
    pulse = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (1.0 + 0.37 * t) * time_s))
    tone = np.sin(2 * np.pi * 110 * (1 + t % 7) * time_s) + 0.3 * (t % 3) * np.sin(
        2 * np.pi * 1900 * time_s
    )
    swell = 0.4 + 0.6 * time_s / seconds if t % 2 else 1.0 - 0.6 * time_s / seconds
    return (0.2 * pulse * tone * swell).astype(np.float32)


# -- the load client (second process) -----------------------------------------------------
def run_load(args: argparse.Namespace) -> None:
    import httpx

    spec = json.loads(args.load)
    url, kind, params = spec["url"], spec["kind"], spec["params"]
    body = open(spec["clip"], "rb").read() if kind == "upload" else None
    deadline = time.monotonic() + args.duration
    latencies: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    if kind == "upload":
                        r = client.post(
                            f"{url}/search", params=params, files={"file": ("q.wav", body)}
                        )
                    else:
                        r = client.get(f"{url}/search/by-track", params=params)
                    ok = r.status_code == 200
                    if not ok:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as err:
                    ok = False
                    errors.append(repr(err))
                if ok:
                    latencies.append(1000 * (time.perf_counter() - started))

    started = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for _ in range(args.concurrency):
            pool.submit(worker)
    elapsed = time.monotonic() - started
    print(
        json.dumps(
            {
                "requests": len(latencies),
                "errors": len(errors),
                "first_errors": errors[:3],
                "elapsed_s": round(elapsed, 2),
                "rps": round(len(latencies) / elapsed, 2),
                **(percentiles(latencies) if latencies else {}),
            }
        )
    )


# -- hostile requests (issue 18) ---------------------------------------------------------
BOUNDARY = "benchboundary"


def hostile_requests(work: str, rate: int) -> dict[str, Any]:
    """What an attacker sends: small files that declare huge audio, and a body with no end."""
    import soundfile as sf

    one_hz = io.BytesIO()
    sf.write(one_hz, np.zeros(10_000, np.float32), 1, format="WAV")  # 20 KB, 10 000 s at 1 Hz
    flac = io.BytesIO()
    with sf.SoundFile(flac, "w", 96000, 8, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((96000 * 10, 8), np.float32)
        for _ in range(24):
            f.write(block)
    return {"wav_1hz": one_hz.getvalue(), "flac_8ch_96k_240s": flac.getvalue()}


def hostile_client(url: str, track: str, files: dict[str, bytes], deadline: float, seed: int):
    """Send hostile requests round-robin until ``deadline``; a Counter of kind -> status."""
    from collections import Counter

    import httpx

    rng = np.random.default_rng(seed)
    statuses: Counter = Counter()

    def chunked_body():
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="q.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        mib = b"\0" * 2**20
        for _ in range(64):
            yield mib

    kinds = ["wav_1hz", "flac_8ch_96k_240s", "chunked_64mib", "range_1kib", "waveform"]
    with httpx.Client(timeout=120) as client:
        i = seed
        while time.monotonic() < deadline:
            kind = kinds[i % len(kinds)]
            i += 1
            try:
                if kind in files:
                    r = client.post(
                        f"{url}/search",
                        params={"explain": False},
                        files={"file": ("q.bin", files[kind])},
                    )
                elif kind == "chunked_64mib":
                    r = client.post(
                        f"{url}/search",
                        content=chunked_body(),
                        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
                    )
                elif kind == "range_1kib":
                    first = int(rng.integers(44, 400_000))
                    r = client.get(
                        f"{url}/audio/{track}", headers={"Range": f"bytes={first}-{first + 1023}"}
                    )
                else:
                    r = client.get(
                        f"{url}/tracks/{track}/waveform",
                        params={"points": int(rng.integers(16, 4000))},
                    )
                statuses[f"{kind} {r.status_code}"] += 1
            except httpx.HTTPError as err:  # e.g. the server closing a cut chunked body
                statuses[f"{kind} {type(err).__name__}"] += 1
    return statuses


def replica_pids() -> list[int]:
    """PIDs of the Serve replicas, from the GCS actor table (the embedded Ray has no dashboard,
    so no state API)."""
    from ray._private.state import actors

    return [
        int(a["Pid"])
        for a in actors().values()
        if a["State"] == "ALIVE" and "SearchDeployment" in a["ActorClassName"] and a["Pid"]
    ]


def reset_peak_rss(pids: list[int]) -> None:
    for pid in pids:  # "5" resets VmHWM (the peak resident set) to the current RSS
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")


def peak_rss_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return round(total, 1)


def run_adversarial(args, url: str, by_id: dict, track: str, work: str, rate: int, out) -> None:
    """Normal by-id load alone, then with hostile requests alongside (same duration)."""
    files = hostile_requests(work, rate)
    pids = replica_pids()
    for phase in ("normal", "normal+hostile"):
        reset_peak_rss(pids)
        spec = json.dumps(
            {"url": url, "kind": "by-track", "params": {**by_id, "explain": False}, "clip": ""}
        )
        load = subprocess.Popen(
            load_command(spec, args),
            stdout=subprocess.PIPE,
            text=True,
        )
        statuses: dict[str, int] = {}
        if phase == "normal+hostile":
            deadline = time.monotonic() + args.duration
            with ThreadPoolExecutor(args.hostile) as pool:
                futures = [
                    pool.submit(hostile_client, url, track, files, deadline, seed)
                    for seed in range(args.hostile)
                ]
                for future in futures:
                    for key, value in future.result().items():
                        statuses[key] = statuses.get(key, 0) + value
        stdout, _ = load.communicate()
        result = json.loads(stdout.strip().splitlines()[-1])
        emit(
            {
                "figure": "adversarial",
                "phase": phase,
                "query": "by_id",
                "concurrency": args.concurrency,
                **result,
                "replica_peak_rss_mb": peak_rss_mb(pids),
                "replicas": len(pids),
                "hostile_threads": args.hostile if phase != "normal" else 0,
                "hostile_statuses": dict(sorted(statuses.items())),
                "load_avg_1m": round(os.getloadavg()[0], 1),
            },
            out,
        )


# -- the benchmark ------------------------------------------------------------------------
def build_corpus(cfg: Any, root: str, tracks: int, track_s: float) -> dict[str, Any]:
    import pyarrow as pa
    import soundfile as sf

    from mess_ray.index.faiss_index import IndexSpec, build_index
    from mess_ray.index.job import INDEX_METADATA_COLUMNS, write_index_artifact
    from mess_ray.models import Embedder
    from mess_ray.segments import segment_id
    from mess_ray.storage import Storage, new_version

    storage = Storage.from_config(cfg.storage)
    rate = cfg.audio.sample_rate
    window, hop = int(cfg.audio.window_s * rate), int(cfg.audio.hop_s * rate)
    embedder = Embedder.from_ref(cfg, storage, "random")
    rows: dict[str, list] = {c: [] for c in INDEX_METADATA_COLUMNS}
    vectors = []
    for t in range(tracks):
        audio = recording(t, track_s, rate)
        path = os.path.join(root, f"track{t:03d}.wav")
        sf.write(path, audio, rate)
        starts = list(range(0, len(audio) - window + 1, hop))
        for start in starts:
            rows["segment_id"].append(segment_id(f"track{t:03d}", start))
            rows["track_id"].append(f"track{t:03d}")
            rows["piece_id"].append(f"piece{t % 10}")
            rows["style"].append(["romantic", "baroque_crisp", "soft_legato", "jazz_swing"][t % 4])
            rows["start_s"].append(start / rate)
            rows["end_s"].append((start + window) / rate)
            rows["sample_rate"].append(rate)
            rows["source_uri"].append(path)
            rows["metadata_json"].append(
                json.dumps({"title": f"Piece {t % 10}", "composer": f"Composer {t % 5}"})
            )
        vectors.append(embedder.embed(np.stack([audio[s : s + window] for s in starts])))
    matrix = np.concatenate(vectors)
    ids = np.array(rows["segment_id"], dtype=np.int64)
    spec = IndexSpec(type="flat", dim=embedder.dim)
    index = build_index(spec, [(matrix, ids)])
    return write_index_artifact(
        cfg,
        storage,
        new_version(),
        index,
        spec,
        pa.table(rows),
        embedder.info,
        {"segments": len(ids), "vectors": len(ids)},
        {"ingest": "benchmark"},
    )


def timed(fn, n: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - started))
    return percentiles(samples)


def paired(served, direct, n: int, warmup: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """Alternate a served and a direct call ``n`` times; percentiles of each."""
    for _ in range(warmup):
        served()
        direct()
    a, b = [], []
    for _ in range(n):
        started = time.perf_counter()
        served()
        a.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        direct()
        b.append(1000 * (time.perf_counter() - started))
    return percentiles(a), percentiles(b)


INFERENCE_MODES = {
    # The inference path before the CPU embedding work: the plain float32 module forward.
    "baseline": {"fast_inference": False, "inference_precision": "float32"},
    # Today's defaults (model.fast_inference=true, model.inference_precision=auto).
    "fast": {},
}


def run_upload_inference(
    args: argparse.Namespace, cfg: Any, clip: np.ndarray, clip_path: str, out
) -> None:
    """``upload_inference`` figures: the service deployed with each of :data:`INFERENCE_MODES`
    in turn (same corpus, same run), sequential 5 s WAV uploads (``POST /search``, no
    explanations) paired with the direct call (Embedder + search) in the same mode."""
    import httpx
    import torch
    from ray import serve

    from mess_ray.serve import SearchService, run_service
    from mess_ray.serve.client import wait_ready

    torch.set_num_threads(1)  # as in a Serve replica
    url = f"http://127.0.0.1:{cfg.serve.port}"
    upload_body = open(clip_path, "rb").read()
    for mode, overrides in INFERENCE_MODES.items():
        mode_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=overrides)})
        service = SearchService.from_config(mode_cfg)

        def direct(service=service) -> None:
            service.index.search(service.embed_clip(clip), k=10)

        run_service(mode_cfg, blocking=False)
        try:
            wait_ready(url, timeout_s=300)
            with httpx.Client(timeout=120) as client:

                def upload() -> None:
                    r = client.post(
                        f"{url}/search",
                        params={"k": 10, "explain": False},
                        files={"file": ("q.wav", upload_body)},
                    )
                    assert r.status_code == 200, r.text

                served, baseline = paired(upload, direct, args.requests)
        finally:
            serve.shutdown()
        # CPU time of the direct call (this process, one thread): robust to the machine's load.
        cpu_began = time.process_time()
        for _ in range(20):
            direct()
        direct_cpu_ms = 1000 * (time.process_time() - cpu_began) / 20
        emit(
            {
                "figure": "upload_inference",
                "mode": mode,
                "model_size": mode_cfg.model.size,
                "fast_inference": service.embedder.fast,
                "front_end_dtype": str(service.embedder.front_end_dtype),
                **served,
                "direct_p50_ms": baseline["p50_ms"],
                "direct_p99_ms": baseline["p99_ms"],
                "direct_cpu_ms_per_call": round(direct_cpu_ms, 3),
                "load_avg_1m": round(os.getloadavg()[0], 1),
            },
            out,
        )


# The shipped model's lags (tiny-asap-v3: +-140 ms every 20 ms, 15 lags) against one lag, on
# the same content timeline (20 and 50 frames per second) and the same vectors.
LAG_MODES = {
    "one_lag": {"content_timeline": True, "content_timeline_query_shift_ms": 0.0},
    "lags": {
        "content_timeline": True,
        "content_timeline_query_shift_ms": 140.0,
        "content_timeline_query_step_ms": 20.0,
    },
}


def run_query_lags(args: argparse.Namespace, cfg: Any, clip_path: str, work: str, out) -> None:
    """``query_lags`` figures: the corpus indexed with the content timeline and searched at one
    lag, then at the shipped model's 15 (same vectors: lags change only the query), each
    deployed in turn; sequential 5 s WAV uploads and track + time queries (4 s windows, so a
    3-segment span), no explanations, each paired with the same call in this process
    (``search_upload`` / ``search_by_track``: decoding, embedding, lags and search, no HTTP)."""
    import torch

    torch.set_num_threads(1)  # as in a Serve replica
    for mode, overrides in LAG_MODES.items():
        mode_cfg = cfg.model_copy(
            update={
                "model": cfg.model.model_copy(update=overrides),
                "storage": cfg.storage.model_copy(update={"root": f"{work}/store-{mode}"}),
            }
        )
        build_corpus(mode_cfg, work, args.tracks, args.track_s)
        emit(
            {"figure": "query_lags", "mode": mode, **lag_mode_latency(args, mode_cfg, clip_path)},
            out,
        )


def lag_mode_latency(args: argparse.Namespace, cfg: Any, clip_path: str) -> dict[str, Any]:
    """One ``query_lags`` line: the service deployed on ``cfg``'s index, HTTP paired with
    in-process calls."""
    import httpx
    from ray import serve

    from mess_ray.serve import SearchService, run_service
    from mess_ray.serve.client import wait_ready
    from mess_ray.serve.service import SearchOptions

    url = f"http://127.0.0.1:{cfg.serve.port}"
    upload_body = open(clip_path, "rb").read()
    options = SearchOptions(k=10, explain=False)
    service = SearchService.from_config(cfg)
    lags = len(service.embedder.query_shifts_ms)
    track = service.index.tracks()[min(7, args.tracks - 1)]["track_id"]
    by_id = {"track_id": track, "start_s": 4.0, "end_s": 12.0, "k": 10, "explain": False}
    run_service(cfg, blocking=False)
    try:
        wait_ready(url, timeout_s=300)
        with httpx.Client(timeout=120) as client:

            def upload() -> None:
                r = client.post(
                    f"{url}/search",
                    params={"k": 10, "explain": False},
                    files={"file": ("q.wav", upload_body)},
                )
                assert r.status_code == 200, r.text

            def by_track() -> None:
                r = client.get(f"{url}/search/by-track", params=by_id)
                assert r.status_code == 200, r.text
                assert r.json()["query"].get("query_lags", 1) == lags, r.json()["query"]

            served_upload, direct_upload = paired(
                upload, lambda: service.search_upload(upload_body, options), args.requests
            )
            served_track, direct_track = paired(
                by_track,
                lambda: service.search_by_track(track, 4.0, 12.0, options),
                args.requests,
            )
    finally:
        serve.shutdown()
    return {
        "query_lags": lags,
        "model_size": cfg.model.size,
        "window_s": cfg.audio.window_s,
        "upload_p50_ms": served_upload["p50_ms"],
        "upload_p99_ms": served_upload["p99_ms"],
        "upload_direct_p50_ms": direct_upload["p50_ms"],
        "by_track_p50_ms": served_track["p50_ms"],
        "by_track_p99_ms": served_track["p99_ms"],
        "by_track_direct_p50_ms": direct_track["p50_ms"],
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=40)
    parser.add_argument("--track-s", type=float, default=30.0)
    parser.add_argument(
        "--requests", type=int, default=60, help="sequential requests per latency figure"
    )
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of each throughput run"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--only",
        choices=["all", "adversarial", "upload-inference", "query-lags"],
        default="all",
        help="adversarial: only the corpus and the adversarial-mix figures; upload-inference: "
        "only the corpus and POST /search p50 with the fast CPU embedding path off, then on; "
        "query-lags: uploads and track + time queries at one lag, then at the shipped 15 "
        "(4 s windows, a corpus per mode)",
    )
    parser.add_argument("--hostile", type=int, default=3, help="threads sending hostile requests")
    parser.add_argument(
        "--load", default=None, help=argparse.SUPPRESS
    )  # internal: be the load client
    args = parser.parse_args()
    if args.load:
        run_load(args)
        return

    import httpx

    from mess_ray.config import load_config
    from mess_ray.serve import SearchService, run_service
    from mess_ray.serve.client import wait_ready
    from mess_ray.serve.service import clip_windows

    out = open(args.out, "a") if args.out else None
    work = tempfile.mkdtemp(prefix="serve-bench-")
    cfg = load_config(
        None,
        [
            f"storage.root={work}/store",
            "audio.window_s=2.0",
            "audio.hop_s=1.0",
            f"serve.port={free_port()}",
            "serve.reload_interval_s=0",
            f"serve.source_prefixes=[{work}]",  # the recordings lie beside the store
        ],
    )
    if args.only == "query-lags":
        # The shipped model's windows; each mode indexes its own corpus.
        cfg = cfg.model_copy(
            update={"audio": cfg.audio.model_copy(update={"window_s": 4.0, "hop_s": 2.0})}
        )
        rate = cfg.audio.sample_rate
        clip = recording(3, CLIP_S + 2, rate)[rate : rate + int(CLIP_S * rate)]
        clip_path = os.path.join(work, "clip.wav")
        with open(clip_path, "wb") as f:
            f.write(wav_bytes(clip, rate))
        run_query_lags(args, cfg, clip_path, work, out)
        return
    started = time.perf_counter()
    manifest = build_corpus(cfg, work, args.tracks, args.track_s)
    emit(
        {
            "figure": "corpus",
            "tracks": args.tracks,
            "track_s": args.track_s,
            "segments": manifest["count"],
            "dim": manifest["dim"],
            "build_s": round(time.perf_counter() - started, 1),
        },
        out,
    )

    rate = cfg.audio.sample_rate
    clip = recording(3, CLIP_S + 2, rate)[rate : rate + int(CLIP_S * rate)]
    clip_path = os.path.join(work, "clip.wav")
    with open(clip_path, "wb") as f:
        f.write(wav_bytes(clip, rate))

    if args.only == "upload-inference":
        run_upload_inference(args, cfg, clip, clip_path, out)
        return

    if args.only == "adversarial":
        from ray import serve

        url = f"http://127.0.0.1:{cfg.serve.port}"
        run_service(cfg, blocking=False)
        try:
            wait_ready(url, timeout_s=300)
            index = SearchService.from_config(cfg).index
            tracks = index.tracks()
            track = tracks[min(7, len(tracks) - 1)]["track_id"]
            by_id = {"track_id": track, "start_s": 4.0, "k": 10}
            run_adversarial(args, url, by_id, track, work, rate, out)
        finally:
            serve.shutdown()
        return

    # -- direct, in process --------------------------------------------------------------
    import torch

    torch.set_num_threads(
        1
    )  # as in a Serve replica: Ray sets OMP_NUM_THREADS to its CPU count, at least 1
    service = SearchService.from_config(cfg)
    index = service.index
    sample_ids = [
        int(s["segment_id"])
        for t in index.tracks()[:5]
        for s in index.track(t["track_id"])["segments"][:4]
    ]
    vectors = [index.vector(s) for s in sample_ids]
    it = iter(range(10**9))
    direct_search = timed(
        lambda: index.search(vectors[next(it) % len(vectors)], k=10), args.requests
    )
    raw = np.stack(vectors)
    direct_faiss = timed(
        lambda: index.index.search(raw[next(it) % len(raw)][None, :], 10), args.requests
    )
    frames = clip_windows(clip, service.window, service.hop)
    direct_embed = timed(lambda: service.embedder.embed(frames), max(10, args.requests // 3))
    emit({"figure": "direct", "what": "faiss index.search k=10", **direct_faiss}, out)
    emit(
        {"figure": "direct", "what": "SearchIndex.search k=10 (faiss + hits)", **direct_search}, out
    )
    emit(
        {
            "figure": "direct",
            "what": f"Embedder on a {CLIP_S:.0f} s clip ({len(frames)} windows)",
            **direct_embed,
        },
        out,
    )

    # -- over HTTP, Ray Serve ------------------------------------------------------------
    from ray import serve

    url = f"http://127.0.0.1:{cfg.serve.port}"
    run_service(cfg, blocking=False)
    try:
        wait_ready(url, timeout_s=300)
        tracks = index.tracks()
        track = tracks[min(7, len(tracks) - 1)]["track_id"]
        by_id = {"track_id": track, "start_s": 4.0, "k": 10}
        with httpx.Client(timeout=120) as client:

            def by_track(params: dict) -> None:
                r = client.get(f"{url}/search/by-track", params=params)
                assert r.status_code == 200, r.text

            def upload(params: dict) -> None:
                r = client.post(
                    f"{url}/search",
                    params=params,
                    files={"file": ("q.wav", open(clip_path, "rb").read())},
                )
                assert r.status_code == 200, r.text

            # Paired: each sample times one direct call and then one request, so both see the
            # same machine load (the figures are comparable even on a busy 2-core box).
            direct_one = lambda: index.search(vectors[next(it) % len(vectors)], k=10)  # noqa: E731

            def direct_upload() -> None:
                vector = service.embed_clip(clip)
                index.search(vector, k=10)

            for name, fn, params, direct in (
                ("by_id", by_track, {**by_id, "explain": False}, direct_one),
                ("by_id+explain", by_track, by_id, direct_one),
                ("upload_5s", upload, {"k": 10, "explain": False}, direct_upload),
                ("upload_5s+explain", upload, {"k": 10}, direct_upload),
            ):
                served, baseline = paired(
                    lambda fn=fn, params=params: fn(params), direct, args.requests
                )
                emit(
                    {
                        "figure": "latency",
                        "query": name,
                        **served,
                        "direct_p50_ms": baseline["p50_ms"],
                        "direct_p99_ms": baseline["p99_ms"],
                        "overhead_p50_ms": round(served["p50_ms"] - baseline["p50_ms"], 3),
                        "load_avg_1m": round(os.getloadavg()[0], 1),
                    },
                    out,
                )

        def direct_rps(fn, seconds: float = 3.0) -> float:
            count, deadline = 0, time.monotonic() + seconds
            while time.monotonic() < deadline:
                fn()
                count += 1
            return round(count / seconds, 2)

        for kind, params in (
            ("by_id", {**by_id, "explain": False}),
            ("upload", {"k": 10, "explain": False}),
        ):
            # One thread in this process, no HTTP: what the same queries cost without the service.
            baseline_rps = direct_rps(direct_one if kind == "by_id" else direct_upload)
            spec = json.dumps(
                {
                    "url": url,
                    "kind": "upload" if kind == "upload" else "by-track",
                    "params": params,
                    "clip": clip_path,
                }
            )
            proc = subprocess.run(
                load_command(spec, args),
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            stats = httpx.get(f"{url}/readyz", timeout=30).json()["stats"]
            emit(
                {
                    "figure": "throughput",
                    "query": kind,
                    "concurrency": args.concurrency,
                    **result,
                    "direct_single_thread_rps": baseline_rps,
                    "max_embed_batch": stats["max_embed_batch"],
                    "load_avg_1m": round(os.getloadavg()[0], 1),
                },
                out,
            )
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
