"""The yardstick end to end (issue 15): render -> ingest -> pretrain -> finetune -> evaluate on
``configs/protocol.yaml``, then one JSON line per figure of the protocol table (headline metric
of every task x split x chain condition x system, with its 95 % CI over pieces and the paired
verdict of the first model against it).

    python -m benchmarks.protocol                      # everything, ~40-70 min on 2 cores
    python -m benchmarks.protocol --skip render ingest # reuse the corpus, retrain and evaluate
    python -m benchmarks.protocol --skip render ingest pretrain finetune   # evaluate only

Each stage runs in this process with its own embedded Ray, which is shut down after the stage;
with ``--lock PATH`` (default /tmp/mess-ray-ray.lock) the stage holds an exclusive flock on PATH
(several users of one machine take turns). A stage line gives its seconds and the 1-minute load
average. Every setting is chosen on the validation pieces; the test rows are the report.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager

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


def emit(record: dict) -> None:
    print(json.dumps(record, default=float), flush=True)


def figure_lines(manifest: dict) -> list[dict]:
    """The headline rows of the protocol table as JSON-line records."""
    from mess_ray.eval.protocol import headline_rows

    protocol = manifest.get("protocol") or {}
    if "rows" not in protocol:
        raise RuntimeError(f"the evaluation wrote no protocol table: {protocol.get('skipped')}")
    keys = (
        "split",
        "task",
        "chains",
        "metric",
        "system",
        "value",
        "ci_low",
        "ci_high",
        "pieces",
        "queries",
        "chance",
        "ci_low_pianists",
        "ci_high_pianists",
        "pianists",
        "reference",
        "diff",
        "diff_low",
        "diff_high",
        "reference_verdict",
    )
    return [
        {"figure": "protocol", **{k: r[k] for k in keys if k in r}}
        for r in headline_rows(protocol["rows"])
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--models", nargs="+", default=["finetune", "pretrain"])
    parser.add_argument("--skip", nargs="*", default=[], choices=STAGES)
    parser.add_argument("--lock", default="/tmp/mess-ray-ray.lock", help="'' for none")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from mess_ray.pipeline import run_stage

    cfg = load_config(args.config, args.set)
    started = time.time()
    manifest: dict = {}
    for stage in STAGES:
        if stage in args.skip:
            continue
        t0 = time.time()
        with exclusive(args.lock):
            t_locked = time.time()
            kwargs = {"model_refs": args.models} if stage == "evaluate" else {}
            manifest = run_stage(stage, cfg, **kwargs)
            ray.shutdown()
        emit(
            {
                "figure": "stage_seconds",
                "stage": stage,
                "seconds": round(time.time() - t_locked, 1),
                "waited_for_lock_s": round(t_locked - t0, 1),
                "load1": round(os.getloadavg()[0], 2),
                "version": manifest.get("version"),
                "counts": manifest.get("counts"),
            }
        )
    if "evaluate" in args.skip:
        return 0
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
            "skipped": summary["skipped"],
            "eval_version": manifest.get("version"),
            "total_seconds": round(time.time() - started, 1),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
