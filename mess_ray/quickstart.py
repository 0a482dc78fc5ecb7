"""`mess-ray quickstart --audio DIR`: your own recordings, searchable in one command.

Ingests a folder (local or ``s3://``) of WAV/FLAC/MP3/... files, indexes it with the model
shipped inside the package (:mod:`mess_ray.models.shipped`, no training), starts the search
service and prints the URL of its web page. A manifest (``--manifest FILE``, or a
``manifest.csv``/``manifest.parquet`` at the top of the folder) with a ``path`` column and
metadata columns such as ``composer``, ``title``, ``performer`` lights up the page's filters.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

from mess_ray import console
from mess_ray.config import MessRayConfig
from mess_ray.storage import make_filesystem

MANIFEST_NAMES = ("manifest.csv", "manifest.parquet")


def find_manifest(audio: str, s3_endpoint_url: str | None = None) -> str | None:
    """``audio``'s own manifest file (manifest.csv/.parquet at its top level), if it has one."""
    fs, base = make_filesystem(audio, s3_endpoint_url)
    if not fs.isdir(base):
        raise ValueError(f"--audio {audio!r} is not a folder")
    for name in MANIFEST_NAMES:
        if fs.exists(posixpath.join(base, name)):
            return f"{audio.rstrip('/')}/{name}"
    return None


def quickstart_config(
    cfg: MessRayConfig, audio: str, manifest: str | None = None
) -> tuple[MessRayConfig, str]:
    """``cfg`` with ingest reading ``audio`` (or its manifest); returns it and the source used."""
    fs, base = make_filesystem(audio, cfg.storage.s3_endpoint_url)
    if not fs.exists(base):
        raise FileNotFoundError(f"--audio {audio!r} does not exist")
    source = manifest or find_manifest(audio, cfg.storage.s3_endpoint_url) or audio
    ingest = cfg.ingest.model_copy(update={"source": source, "catalog": "auto"})
    ingest = type(cfg.ingest).model_validate(ingest.model_dump())  # pins a relative path
    return cfg.model_copy(update={"ingest": ingest}), ingest.source


def run_quickstart(
    cfg: MessRayConfig,
    audio: str,
    *,
    manifest: str | None = None,
    model_ref: str = "shipped",
    serve: bool = True,
    block: bool = True,
    say=None,
) -> dict[str, Any]:
    """Ingest ``audio``, index it with ``model_ref``, start the service and print its URL.

    ``serve=False`` stops after indexing; ``block=False`` returns once the service is ready
    (tests, ``--exit-after-ready``) and leaves it running in this Ray session.
    """
    from mess_ray import pipeline
    from mess_ray.serve import client

    say = say or console.say
    started = time.monotonic()
    cfg, source = quickstart_config(cfg, audio, manifest)
    timings: dict[str, float] = {}
    manifests: dict[str, dict] = {}
    say(f"mess-ray quickstart: {source} -> {cfg.storage.root}")
    t0 = time.monotonic()
    manifests["ingest"] = pipeline.run_stage("ingest", cfg)
    timings["ingest"] = round(time.monotonic() - t0, 1)
    counts = manifests["ingest"].get("counts", {})
    rejects = counts.get("rejects_by_reason") or {}
    if rejects:
        say(
            f"skipped files (by reason): {rejects}; details in the ingest artifact's rejects.parquet"
        )
    if not counts.get("segments"):
        raise ValueError(
            f"nothing to search: no file under {source} could be decoded as audio "
            f"(skipped: {rejects or 'no files'})"
        )
    t0 = time.monotonic()
    manifests["index"] = pipeline.run_stage("index", cfg, model_ref=model_ref)
    timings["index"] = round(time.monotonic() - t0, 1)
    url = pipeline.service_url(cfg)
    result = {"manifests": manifests, "timings": timings, "service_url": url, "source": source}
    if not serve:
        result["total_s"] = round(time.monotonic() - started, 1)
        return result
    from mess_ray.serve import run_service

    t0 = time.monotonic()
    with console.stage("serve", unit="s"):  # a live bar while Serve starts
        run_service(pipeline.with_storage_resolved(cfg), blocking=False)
        client.wait_ready(url, timeout_s=180)
    timings["serve"] = round(time.monotonic() - t0, 1)
    result["total_s"] = round(time.monotonic() - started, 1)
    say(f"ready in {result['total_s']} s. Open {url}/ in a browser (Ctrl-C stops the service).")
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            say("stopping")
    return result


def quickstart_verb(cfg: MessRayConfig, args) -> dict[str, Any]:
    """`mess-ray quickstart` (registered in :mod:`mess_ray.stages`)."""
    return run_quickstart(
        cfg,
        args.audio,
        manifest=args.manifest,
        model_ref=args.model,
        serve=not args.no_serve,
        block=not args.exit_after_ready,
    )
