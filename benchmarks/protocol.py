"""The yardstick end to end (issue 15): render -> ingest -> pretrain -> finetune -> evaluate on
``configs/protocol.yaml``, then one JSON line per figure of the protocol table (headline metric
of every task x split x chain condition x system, with its 95 % CI over pieces and the paired
verdict of the first model against it; ``style_parameters`` on the held-out pieces' style-grid
renderings, ``render.style_grid``).

    python -m benchmarks.protocol                      # everything: about an hour of stages on 2
                                                       # shared cores (many-chain recipe, style grid
                                                       # off: render 571 s for 655 tracks, ingest
                                                       # 45, pretrain 285, finetune 566, evaluate
                                                       # 1,059 for three models; load 2-12; the
                                                       # style grid adds ~350 s render, ~800 s rows)
    python -m benchmarks.protocol --reuse render       # keep a published render
    python -m benchmarks.protocol --skip render ingest # reuse the corpus, retrain and evaluate
    python -m benchmarks.protocol --skip render ingest pretrain finetune   # evaluate only

Each stage runs in this process with its own embedded Ray, which is shut down after the stage;
with ``--lock PATH`` (none by default) the Ray stages hold an exclusive flock on
PATH, once for all of them (several users of one machine take turns). Evaluate embeds on the
driver when ``eval.ray_data_min_segments`` exceeds 100000 (configs/protocol.yaml) and then
starts no Ray and takes no lock. A stage line gives its seconds and the 1-minute load
average. Every setting is chosen on the validation pieces; the test rows are the report.
Library and Ray logs go to ``<storage root>/logs`` as with the CLI (``--verbose``: terminal).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager

from mess_ray import console
from mess_ray.config import load_config

STAGES = ("render", "ingest", "pretrain", "finetune", "evaluate")


@contextmanager
def exclusive(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


DRIVER_ONLY = 100_000  # eval.ray_data_min_segments above this: evaluate never starts Ray


def stage_record(stage: str, t0: float, waited: float, manifest: dict) -> dict:
    return {
        "figure": "stage_seconds",
        "stage": stage,
        "seconds": round(time.time() - t0, 1),
        "waited_for_lock_s": round(waited, 1),
        "load1": round(os.getloadavg()[0], 2),
        "version": manifest.get("version"),
        "counts": manifest.get("counts"),
    }


def emit(record: dict) -> None:
    console.say(json.dumps(record, default=float))


def figure_lines(manifest: dict) -> list[dict]:
    """The headline rows of the protocol table as JSON-line records."""
    from mess_ray.eval.protocol import figure_fields, headline_rows

    protocol = manifest.get("protocol") or {}
    if "rows" not in protocol:
        raise RuntimeError(f"the evaluation wrote no protocol table: {protocol.get('skipped')}")
    return [{"figure": "protocol", **figure_fields(r)} for r in headline_rows(protocol["rows"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--models", nargs="+", default=["finetune", "pretrain"])
    parser.add_argument("--skip", nargs="*", default=[], choices=STAGES)
    parser.add_argument(
        "--lock",
        default="",
        help="a lock file to hold while the Ray stages run (several users sharing one machine); none by default",
    )
    parser.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        choices=STAGES[:-1],
        help="stages not rerun when their artifact is already published (checked under the lock)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="library and Ray logs on the terminal (default: <storage root>/logs, as the CLI)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = load_config(args.config, args.set)
    with console.quiet_console(cfg.storage.root, verbose=args.verbose):
        return run(args, cfg)


def run(args: argparse.Namespace, cfg) -> int:
    """The stages and the figure lines (JSON lines and progress bars on the terminal)."""
    import ray

    from mess_ray.pipeline import run_stage
    from mess_ray.storage import Storage

    started = time.time()
    manifest: dict = {}
    ray_stages = [s for s in STAGES[:-1] if s not in args.skip]
    # The Ray stages run back to back under one hold of the lock (no queueing between them);
    # evaluate embeds on the driver (eval.ray_data_min_segments above the corpus) and needs none.
    if ray_stages:
        t0 = time.time()
        with exclusive(args.lock):
            waited = time.time() - t0
            for stage in ray_stages:
                t1 = time.time()
                if stage in args.reuse and Storage.from_config(cfg.storage).latest(stage):
                    emit({"figure": "stage_reused", "stage": stage})
                    continue
                manifest = run_stage(stage, cfg)
                ray.shutdown()
                emit(stage_record(stage, t1, waited, manifest))
                waited = 0.0
    if "evaluate" in args.skip:
        return 0
    t1 = time.time()
    if cfg.eval.ray_data_min_segments <= DRIVER_ONLY:
        with exclusive(args.lock):
            manifest = run_stage("evaluate", cfg, model_refs=args.models)
            ray.shutdown()
    else:
        from mess_ray.eval import run_evaluate
        from mess_ray.pipeline import with_storage_resolved

        cfg = with_storage_resolved(cfg)
        manifest = run_evaluate(cfg, Storage.from_config(cfg.storage), args.models)
    emit(stage_record("evaluate", t1, 0.0, manifest))
    for record in figure_lines(manifest):
        emit(record)
    summary = manifest["protocol"]["summary"]
    emit(
        {
            "figure": "protocol_summary",
            "split": summary["split"],
            "chains": summary["chains"],
            "segments": summary["segments"],
            "pianists": summary["pianists"],
            "style_parameters": summary.get("style_parameters"),
            "skipped": summary["skipped"],
            "unseen_pianists": summary.get("unseen_pianists"),
            "cens_dtw": summary.get("cens_dtw"),
            "eval_version": manifest.get("version"),
            "total_seconds": round(time.time() - started, 1),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
