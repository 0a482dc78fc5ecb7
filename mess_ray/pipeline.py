"""Stage dispatch and the end-to-end demo, shared by the CLI and jobs/*.py.

Each stage's own package holds its logic; this module only connects Ray, storage and the
config to it, so that `mess-ray <verb>`, `python jobs/<verb>.py` and `ray job submit -- python
jobs/<verb>.py` all run the same code.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from typing import Any

import numpy as np

from mess_ray import console
from mess_ray.config import MessRayConfig
from mess_ray.raylocal import ensure_ray, shutdown_ray
from mess_ray.stages import get_stage
from mess_ray.storage import Storage, resolve_endpoint

log = logging.getLogger(__name__)


def run_stage(name: str, cfg: MessRayConfig, storage: Storage | None = None, **kwargs: Any) -> dict:
    """Run one batch stage (:data:`mess_ray.stages.BATCH_STAGES`) on the configured Ray cluster;
    returns its published manifest."""
    runner = get_stage(name, batch=True).load_runner()
    cfg = with_storage_resolved(cfg)
    ensure_ray(cfg.ray)
    started = time.monotonic()
    with console.stage(name, unit=console.STAGE_UNITS.get(name, "it")) as shown:
        manifest = runner(cfg, storage or Storage.from_config(cfg.storage), **kwargs)
        shown.summary = console.summary_line(name, manifest, time.monotonic() - started)
    return manifest


def with_storage_resolved(cfg: MessRayConfig) -> MessRayConfig:
    """A copy of ``cfg`` whose storage section names its S3 endpoint explicitly (for workers)."""
    return cfg.model_copy(update={"storage": resolve_endpoint(cfg.storage)})


def service_url(cfg: MessRayConfig) -> str:
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def serve_forever(cfg: MessRayConfig) -> None:
    from mess_ray.serve import run_service

    ensure_ray(cfg.ray)
    console.say(f"search service and web page on {service_url(cfg)}/ (Ctrl-C stops it)")
    run_service(with_storage_resolved(cfg), blocking=True)


def serve_verb(cfg: MessRayConfig, args: argparse.Namespace) -> None:
    serve_forever(cfg)


def demo_verb(cfg: MessRayConfig, args: argparse.Namespace) -> dict:
    return run_demo(cfg)


def search_options(args: argparse.Namespace) -> dict:
    """The search verb's options as the API's query parameters (``--facet tempo=2`` -> ``w_tempo=2``)."""
    options: dict = {
        "exclude_track": args.exclude_track,
        "min_gap_s": args.min_gap_s,
        "mmr_lambda": args.mmr,
    }
    from mess_ray.facets import parse_weight_items

    for name, weight in parse_weight_items(args.facet, "--facet").items():
        options[f"w_{name}"] = weight
    if args.filter:
        if any("=" not in item for item in args.filter):
            raise ValueError(f"--filter values must look like field=value, got {args.filter}")
        options["filter"] = list(args.filter)
    return {key: value for key, value in options.items() if value is not None}


def search_cli(cfg: MessRayConfig, args: argparse.Namespace) -> dict:
    import json

    from mess_ray.serve import client

    url = args.url or service_url(cfg)
    options = search_options(args)
    if args.file:
        result = client.search_file(url, args.file, k=args.k, **options)
    else:
        result = client.search_by_track(url, args.track, args.start, args.end, k=args.k, **options)
    print(json.dumps(result, indent=2) if args.json else client.format_hits(result))
    return result


def passages_cli(cfg: MessRayConfig, args: argparse.Namespace) -> dict:
    """`mess-ray passages`: GET /passages (--track --start --end) or POST /passages (--file)."""
    import json

    from mess_ray.serve import client

    url = args.url or service_url(cfg)
    if args.file:
        result = client.passages_file(url, args.file)
    else:
        if args.start is None or args.end is None:
            raise SystemExit("mess-ray passages: --track needs --start and --end (seconds)")
        result = client.passages_by_track(url, args.track, args.start, args.end)
    print(json.dumps(result, indent=2) if args.json else client.format_passages(result))
    return result


def _wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def pick_demo_query(storage: Storage, cfg: MessRayConfig) -> dict:
    """A held-out segment (a piece the models never trained on) to query the service with."""
    from mess_ray.segments import decode_audio, read_segment_table, split_pieces

    table = read_segment_table(
        storage,
        columns=["segment_id", "track_id", "piece_id", "style", "start_s", "end_s", "audio"],
    ).to_pylist()
    _, holdout = split_pieces(
        [r["piece_id"] for r in table], cfg.eval.holdout_fraction, cfg.eval.seed
    )
    candidates = [r for r in table if r["piece_id"] in set(holdout)] or table
    # A segment from the middle of a track: the opening is often a quiet attack.
    query = candidates[len(candidates) // 2]
    query["audio"] = decode_audio(query["audio"])
    return query


def run_demo(cfg: MessRayConfig, shutdown: bool = True) -> dict:
    """Every stage on the embedded default, a real HTTP query, an mAP figure, clean shutdown.

    ``shutdown=False`` leaves Ray and the service running (tests share one Ray session).
    """
    from mess_ray.serve import client, run_service

    started = time.monotonic()
    timings: dict[str, float] = {}
    cfg = with_storage_resolved(cfg)
    ensure_ray(cfg.ray)
    storage = Storage.from_config(cfg.storage)
    console.say(f"mess-ray demo: storage root {storage.url()}")
    manifests: dict[str, dict] = {}
    try:
        for stage, kwargs in (
            ("render", {}),
            ("ingest", {}),
            ("pretrain", {}),
            ("finetune", {}),
            ("index", {"model_ref": "finetune"}),
        ):
            t0 = time.monotonic()
            manifests[stage] = run_stage(stage, cfg, storage, **kwargs)
            timings[stage] = round(time.monotonic() - t0, 1)  # run_stage printed its summary

        t0 = time.monotonic()
        url = service_url(cfg)
        with console.stage("serve", unit="s"):  # a live bar while Serve starts
            run_service(cfg, blocking=False)
            client.wait_ready(url, timeout_s=120)
        query = pick_demo_query(storage, cfg)
        wav = _wav_bytes(query["audio"], cfg.audio.sample_rate)
        result = client.search_file(url, wav, k=5, filename="query.wav")
        timings["serve+query"] = round(time.monotonic() - t0, 1)
        console.say(
            f"\nHTTP query: {query['track_id']} {query['start_s']:.2f}-{query['end_s']:.2f} s "
            f"(style {query['style']!r}, piece {query['piece_id']!r}) -> POST {url}/search"
        )
        console.say(client.format_hits(result))
        # The same clip with its own recording excluded: passages of other recordings played alike.
        elsewhere = client.search_file(
            url, wav, k=5, filename="query.wav", exclude_track=query["track_id"]
        )
        console.say(f"\nSame query, other recordings only (exclude_track={query['track_id']}):")
        console.say(client.format_hits(elsewhere))

        t0 = time.monotonic()
        manifests["evaluate"] = run_stage(
            "evaluate", cfg, storage, model_refs=["pretrain", "finetune"]
        )
        timings["evaluate"] = round(time.monotonic() - t0, 1)

        console.say(f"report: {storage.url('eval', manifests['evaluate']['version'], 'report.md')}")
    finally:
        if shutdown:
            shutdown_ray(stop_serve=True)
    total = round(time.monotonic() - started, 1)
    console.say(f"\ndemo finished in {total} s; stage timings {timings}")
    return {
        "manifests": manifests,
        "timings": timings,
        "total_s": total,
        "query": query,
        "query_result": result,
        "query_result_elsewhere": elsewhere,
        "service_url": url,
    }
