"""The index job's content-feature pass: one task per track's shard against the former shuffle.

Prints one JSON line per figure:

- ``content_pass``: :func:`mess_ray.index.content_features.compute_content` (one Ray Data task
  per track's segment files, nothing shuffled) and, in the same round, the baseline it
  replaced: ``groupby("track_id").map_groups`` over the segment rows (every segment's audio
  through a Ray Data shuffle). Wall seconds, CPU seconds of every process of the embedded Ray
  session (:func:`benchmarks.ingest_throughput.timed`, also split by process role), audio seconds per wall and per CPU
  second, and the load average beside them.
- ``content_pass_ratio``: per round, the baseline's wall and CPU seconds over the new pass's.
- ``content_pass_equal``: whether both passes stored byte-identical feature rows.

The corpus is generated (mixed WAV/FLAC, as ``benchmarks.ingest_throughput``) and ingested by
the real Ray ingest job first (not timed). Rounds alternate the order of the two passes.

    python -m benchmarks.content_pass [--files 12 --minutes 2] [--repeats 2] [--workdir DIR]
        [--set content.cpus_per_task=1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import emit  # noqa: E402
from benchmarks.ingest_throughput import LAST_CPU_BY_ROLE, config, make_corpus, timed  # noqa: E402
from mess_ray.index.content_features import compute_content, features_of_group  # noqa: E402
from mess_ray.segments import read_segments_ray  # noqa: E402
from mess_ray.storage import Storage  # noqa: E402


def groupby_baseline(cfg, storage: Storage, ingest_version: str, out_rel: str) -> None:
    """The content pass as it was before: a Ray Data shuffle of the segment rows by track."""
    dataset = read_segments_ray(
        storage,
        ingest_version,
        columns=["segment_id", "track_id", "start_sample", "sample_rate", "audio"],
    )
    rows = dataset.groupby("track_id").map_groups(
        features_of_group,
        fn_kwargs={
            "sample_rate": cfg.audio.sample_rate,
            "feature_rate": cfg.content.feature_rate,
        },
        batch_format="numpy",
        num_cpus=cfg.content.cpus_per_task,
    )
    rows.write_parquet(storage.path(out_rel), filesystem=storage.pyarrow_fs())


def stored_rows(storage: Storage, rel: str) -> list[tuple]:
    import pyarrow.parquet as pq

    table = pq.read_table(storage.path(rel), filesystem=storage.pyarrow_fs())
    return sorted(
        zip(
            table.column("track_id").to_pylist(),
            table.column("segments_digest").to_pylist(),
            table.column("features").to_pylist(),
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep the corpus and store here")
    parser.add_argument(
        "--set", action="append", default=[], help="config override, e.g. content.cpus_per_task=1"
    )
    args = parser.parse_args(argv)

    from mess_ray.ingest import run_ingest
    from mess_ray.raylocal import ensure_ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="content-pass-"))
    corpus, root = work / "corpus", str(work / "store")
    corpus.mkdir(parents=True, exist_ok=True)
    seconds = make_corpus(corpus, args.files, args.minutes)
    cfg = config(root, str(corpus), 30.0, args.set)
    storage = Storage(root)
    ensure_ray(cfg.ray)
    version = run_ingest(cfg, storage)["version"]
    # A warm-up of each pass: Ray's worker processes start once, not inside a timed run.
    compute_content(cfg, storage, version, "bench/warm-new")
    groupby_baseline(cfg, storage, version, "bench/warm-old")
    passes = {"one_task_per_track": compute_content, "groupby_shuffle": groupby_baseline}
    for round_ in range(args.repeats):
        order = list(passes) if round_ % 2 == 0 else list(reversed(passes))
        figures, outputs = {}, {}
        for name in order:
            rel = f"bench/{name}-{round_}-{time.time_ns()}"
            _, wall, cpu = timed(passes[name], cfg, storage, version, rel)
            outputs[name] = stored_rows(storage, rel)
            figures[name] = emit(
                figure="content_pass",
                method=name,
                round=round_,
                tracks=args.files,
                seconds_audio=round(seconds, 1),
                wall_s=round(wall, 2),
                cpu_s=round(cpu, 2),
                cpu_s_by_role={k: round(v, 2) for k, v in LAST_CPU_BY_ROLE.items()},
                x_realtime_per_wall_s=round(seconds / wall, 1),
                x_realtime_per_cpu_s=round(seconds / cpu, 1) if cpu > 0 else None,
                load_avg_1m=round(os.getloadavg()[0], 2),
            )
        new, old = figures["one_task_per_track"], figures["groupby_shuffle"]
        emit(
            figure="content_pass_ratio",
            round=round_,
            baseline_over_new_wall=round(old["wall_s"] / new["wall_s"], 2),
            baseline_over_new_cpu=round(old["cpu_s"] / new["cpu_s"], 2) if new["cpu_s"] else None,
        )
        emit(
            figure="content_pass_equal",
            round=round_,
            identical=outputs["one_task_per_track"] == outputs["groupby_shuffle"],
            rows=len(outputs["one_task_per_track"]),
        )


if __name__ == "__main__":
    main()
