"""`mess-ray`: one verb per pipeline stage, plus `demo` that runs them all.

Every verb takes the same ``--config`` (YAML, one schema for all jobs) and any number of
``--set section.key=value`` overrides, and reads/writes artifacts under ``storage.root``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from mess_ray.config import MessRayConfig, load_config

STAGE_HELP = {
    "render": "Render MIDI scores with expressive transforms to audio (FluidSynth, Ray tasks).",
    "ingest": "Decode, resample and cut recordings into timestamped segments (Ray Data).",
    "pretrain": "Self-supervised pretraining of the audio encoder (Ray Train).",
    "finetune": "Contrastive fine-tuning for expressive similarity (Ray Train).",
    "index": "Embed every segment on an actor pool and publish a versioned FAISS index.",
    "reindex": "Update the latest index: embed only new segments, drop removed ones, publish a new version.",
    "serve": "Run the search service and web page (Ray Serve + FastAPI).",
    "search": "Query a running search service by audio file or by track and time.",
    "evaluate": "Score retrieval on held-out pieces against baselines; write a report.",
    "demo": "Run the whole pipeline on a small generated corpus, query it, evaluate it.",
    "quickstart": "Search your own recordings: ingest a folder (or s3:// prefix), index it with "
    "the shipped model, serve the web page.",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config (default: built-in demo settings)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set pretrain.steps=50 (repeatable)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mess-ray", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in STAGE_HELP.items():
        sub = verbs.add_parser(verb, help=text, description=text)
        _add_common(sub)
        if verb == "index":
            sub.add_argument(
                "--model",
                default="auto",
                help="model to embed with: auto (finetune if trained here, else the shipped "
                "model) | finetune | pretrain | shipped[:NAME] | random | a model folder",
            )
        if verb == "reindex":
            sub.add_argument(
                "--model",
                default=None,
                help="optional check that the index was built with this model (default: its own)",
            )
        if verb == "evaluate":
            sub.add_argument(
                "--models",
                nargs="*",
                default=None,
                help="model refs to compare (baselines 'descriptors' and 'random' always run; "
                "default: pretrain and finetune where trained here, else the shipped model)",
            )
        if verb == "quickstart":
            sub.add_argument(
                "--audio", required=True, help="folder (or s3:// prefix) of WAV/FLAC/MP3/... files"
            )
            sub.add_argument(
                "--manifest",
                default=None,
                help="CSV/Parquet with a 'path' column and composer/title/performer/... columns "
                "(default: manifest.csv or manifest.parquet in the folder, if any)",
            )
            sub.add_argument(
                "--model", default="shipped", help="model ref (default: the shipped model)"
            )
            sub.add_argument(
                "--no-serve", action="store_true", help="stop after indexing (no service)"
            )
            sub.add_argument(
                "--exit-after-ready",
                action="store_true",
                help="exit once the page is ready instead of serving until Ctrl-C",
            )
        if verb == "search":
            sub.add_argument(
                "--url", default=None, help="service URL (default: from serve.host/port)"
            )
            group = sub.add_mutually_exclusive_group(required=True)
            group.add_argument("--file", help="audio file to search with")
            group.add_argument(
                "--track", help="indexed track id to search with (see --start/--end)"
            )
            sub.add_argument(
                "--start", type=float, default=0.0, help="start time in seconds (with --track)"
            )
            sub.add_argument(
                "--end", type=float, default=None, help="end time in seconds (with --track)"
            )
            sub.add_argument("-k", type=int, default=10, help="number of hits")
            sub.add_argument(
                "--exclude-track",
                default=None,
                help="drop hits from this track (e.g. the query's own)",
            )
            sub.add_argument(
                "--min-gap-s",
                type=float,
                default=None,
                help="min distance between hits of one track",
            )
            sub.add_argument(
                "--facet",
                action="append",
                default=[],
                metavar="FACET=WEIGHT",
                help="facet weight, repeatable: overall, tempo, dynamics, articulation, timbre",
            )
            sub.add_argument(
                "--mmr",
                type=float,
                default=None,
                metavar="LAMBDA",
                help="diversity: 1 = pure similarity, lower = more varied hits",
            )
            sub.add_argument(
                "--filter",
                action="append",
                default=[],
                metavar="FIELD=VALUE",
                help="metadata filter, repeatable (composer=Bach, style=romantic, ...)",
            )
            sub.add_argument("--json", action="store_true", help="print the raw JSON response")
    return parser


def _stage_runner(verb: str) -> Callable[[MessRayConfig, argparse.Namespace], object]:
    from mess_ray import pipeline

    return {
        "render": lambda cfg, a: pipeline.run_stage("render", cfg),
        "ingest": lambda cfg, a: pipeline.run_stage("ingest", cfg),
        "pretrain": lambda cfg, a: pipeline.run_stage("pretrain", cfg),
        "finetune": lambda cfg, a: pipeline.run_stage("finetune", cfg),
        "index": lambda cfg, a: pipeline.run_stage("index", cfg, model_ref=a.model),
        "reindex": lambda cfg, a: pipeline.run_stage("reindex", cfg, model_ref=a.model),
        "evaluate": lambda cfg, a: pipeline.run_stage(
            "evaluate", cfg, model_refs=a.models or pipeline.default_eval_models(cfg)
        ),
        "serve": lambda cfg, a: pipeline.serve_forever(cfg),
        "search": lambda cfg, a: pipeline.search_cli(cfg, a),
        "demo": lambda cfg, a: pipeline.run_demo(cfg),
        "quickstart": _quickstart,
    }[verb]


def _quickstart(cfg: MessRayConfig, args: argparse.Namespace) -> dict:
    from mess_ray.quickstart import run_quickstart

    return run_quickstart(
        cfg,
        args.audio,
        manifest=args.manifest,
        model_ref=args.model,
        serve=not args.no_serve,
        block=not args.exit_after_ready,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        print(f"mess-ray: bad config: {err}", file=sys.stderr)
        return 2
    if args.verb == "search":  # no Ray: plain logging, its table on stdout
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
        _stage_runner(args.verb)(cfg, args)
        return 0
    from mess_ray import console

    # Default: one bar and one line per stage, Ray's and the libraries' output to a log file.
    with console.quiet_console(cfg.storage.root, verbose=args.verbose):
        try:
            result = _stage_runner(args.verb)(cfg, args)
        except KeyboardInterrupt:  # Ctrl-C is how `serve` and `quickstart` are meant to stop
            console.say("stopped (Ctrl-C)")
            return 130
        except Exception as err:
            logging.getLogger("mess_ray").exception("%s failed", args.verb)
            if args.verbose:
                raise
            console.error(f"{args.verb} failed: {type(err).__name__}: {err}")
            return 1
        finally:
            # Inside the quiet console: Ray's and Serve's shutdown chatter goes to the log too.
            _shutdown_ray(cfg)
        if isinstance(result, dict) and args.verb not in ("search", "demo", "quickstart"):
            if console.is_quiet():
                console.say(f"manifest: {_manifest_location(cfg, args.verb, result)}")
            else:
                print(json.dumps(result, indent=2, default=str))
    return 0


def _shutdown_ray(cfg: MessRayConfig) -> None:
    """Stop what this process started: the embedded Ray (and its Serve); on a cluster, only
    disconnect (Serve there may be serving others)."""
    import os

    import ray

    if not ray.is_initialized():
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.shutdown()
        return
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve never started or is already gone
        pass
    ray.shutdown()


def _manifest_location(cfg: MessRayConfig, verb: str, manifest: dict) -> str:
    from mess_ray.storage import Storage

    stage = manifest.get("stage") or verb
    return Storage.from_config(cfg.storage).url(
        stage, str(manifest.get("version")), "manifest.json"
    )


if __name__ == "__main__":
    sys.exit(main())
