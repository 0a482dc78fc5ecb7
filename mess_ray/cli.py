"""`mess-ray`: one verb per pipeline stage, plus `demo` that runs them all.

The verbs, their help and their options come from the stage registry (:mod:`mess_ray.stages`).

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
from mess_ray.stages import STAGES, get_stage


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
    for stage in STAGES.values():
        sub = verbs.add_parser(stage.name, help=stage.help, description=stage.help)
        _add_common(sub)
        groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
        for option in stage.options:
            target = sub
            if option.exclusive:
                target = groups.get(option.exclusive) or groups.setdefault(
                    option.exclusive, sub.add_mutually_exclusive_group(required=True)
                )
            target.add_argument(*option.flags, **option.kwargs)
    return parser


def _stage_runner(verb: str) -> Callable[[MessRayConfig, argparse.Namespace], object]:
    stage = get_stage(verb)
    if not stage.batch:
        return stage.load_runner()

    def run(cfg: MessRayConfig, args: argparse.Namespace) -> object:
        from mess_ray import pipeline

        kwargs = {key: getattr(args, attr) for key, attr in stage.kwargs_from_args.items()}
        return pipeline.run_stage(verb, cfg, **kwargs)

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        print(f"mess-ray: bad config: {err}", file=sys.stderr)
        return 2
    if args.verb in ("search", "passages"):  # no Ray: plain logging, the table on stdout
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
        if isinstance(result, dict) and args.verb not in (
            "search",
            "passages",
            "demo",
            "quickstart",
        ):
            if console.is_quiet():
                console.say(f"manifest: {_manifest_location(cfg, args.verb, result)}")
            else:
                print(json.dumps(result, indent=2, default=str))
    return 0


def _shutdown_ray(cfg: MessRayConfig) -> None:
    """Stop what this process started: the embedded Ray (and its Serve); on a cluster, only
    disconnect (Serve there may be serving others)."""
    import os

    from mess_ray.raylocal import shutdown_ray

    shutdown_ray(stop_serve=not (cfg.ray.address or os.environ.get("RAY_ADDRESS")))


def _manifest_location(cfg: MessRayConfig, verb: str, manifest: dict) -> str:
    from mess_ray.storage import Storage

    stage = manifest.get("stage") or verb
    return Storage.from_config(cfg.storage).url(
        stage, str(manifest.get("version")), "manifest.json"
    )


if __name__ == "__main__":
    sys.exit(main())
