"""Ingest throughput (seconds of audio per second per core) and peak memory vs file length.

Prints one JSON line per figure:

- ``throughput``: the real Ray ingest (:func:`mess_ray.ingest.run_ingest`) over a generated
  corpus, from a local folder and from a moto S3 server on 127.0.0.1 (source and storage root
  both on S3), against naive baselines measured in the same run: ``librosa.load`` of whole
  files (local, and after fetching each whole object from S3) and the streaming decoder in a
  single process without Ray. Throughput per core = audio seconds / wall seconds / cores used
  (the Ray runs use every core of the machine; the single-process ones one core). Each line
  also gives the CPU seconds consumed and audio seconds per CPU second, which stay meaningful
  when other work loads the machine (``load_avg_1m``): for the Ray runs that is every process
  of the embedded Ray session (driver, GCS, raylet and the raylet's workers, which are not the
  driver's descendants), before/after snapshots per pid (:func:`consumed_cpu`). Ray's start-up and a
  first small ingest (one worker per concurrent task) are timed apart, as fixed costs.
- ``peak_memory``: peak RSS and tracemalloc peak of ingesting one file in a fresh process, for
  each file length (default 5 and 60 minutes of 44.1 kHz stereo), streaming vs whole-file.

Default run: a 24-minute mixed corpus (WAV/FLAC, 22.05-48 kHz, mono/stereo) plus the 5- and
60-minute files, about 2-3 minutes on 2 cores. ``--big`` ingests 40 x 10 minutes instead.

- ``ratio_to_single_process_decoder``: each Ray run's audio seconds per CPU second and per
  core of wall time over the single-process decoder's, measured just before it in the same
  round (``--repeats`` rounds); ``ray_ingest_fixed_cost``: a warm one-file run, by phase. The
  same single process also writing the Parquet shards (``..._write_single_process_local``)
  tells the writing's share of the gap from Ray's.
- ``--variant 'ingest.cpus_per_task=1 ...'`` (repeatable): several ingest settings measured
  side by side, every round, against that round's decoder. Each Ray figure splits its CPU
  seconds by process role (``cpu_s_by_role``: driver, worker, gcs, raylet, agent, and
  s3_server: moto runs in its own process, and the S3 figures also give the rate without
  the S3 service's CPU, ``x_realtime_per_cpu_s_without_s3_server``).

    python -m benchmarks.ingest_throughput [--files 8 --minutes 3] [--big] [--memory-minutes 5,60]
        [--repeats 3] [--variant default --variant 'ingest.cpus_per_task=0.5']
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before ray is imported: loopback only; dummy credentials for the local moto endpoint.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


from benchmarks.common import emit, free_port
from mess_ray.config import MessRayConfig, apply_overrides
from mess_ray.ingest.job import ShardWriter, ingest_file, shard_name
from mess_ray.ingest.memory import measure_peak_memory, write_long_wav
from mess_ray.storage import Storage

# (extension, sample rate, channels) cycled over the corpus files.
FORMATS = [(".wav", 44100, 2), (".flac", 48000, 2), (".wav", 22050, 1), (".flac", 44100, 1)]
SAMPLE_RATE = 16000


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_corpus(folder: Path, files: int, minutes: float) -> float:
    """Generated recordings in mixed formats; returns their total duration in seconds."""
    import soundfile as sf

    total = 0.0
    for i in range(files):
        ext, rate, channels = FORMATS[i % len(FORMATS)]
        wav = write_long_wav(
            folder / f"piece_{i:03d}.wav", minutes * 60, rate=rate, channels=channels, seed=i
        )
        if ext != ".wav":  # re-encode block by block, keeping memory small
            with (
                sf.SoundFile(str(wav)) as src,
                sf.SoundFile(
                    str(wav.with_suffix(ext)), "w", rate, channels, format=ext[1:].upper()
                ) as dst,
            ):
                for block in src.blocks(blocksize=rate * 10, dtype="float32"):
                    dst.write(block)
            wav.unlink()
        total += minutes * 60
    return total


def config(
    root: str, source: str, read_block_s: float, overrides: list[str] | None = None
) -> MessRayConfig:
    """The benchmark's ingest config; ``overrides`` (``section.key=value``, as ``--set``) last."""
    tree = {
        "storage": {"root": root},
        "audio": {
            "sample_rate": SAMPLE_RATE,
            "window_s": 4.0,
            "hop_s": 2.0,
            "min_duration_s": 1.0,
        },
        "ingest": {"source": source, "read_block_s": read_block_s, "incremental": False},
    }
    return MessRayConfig.model_validate(apply_overrides(tree, overrides or []))


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``--variant`` text -> (name, overrides): space-separated ``section.key=value`` items,
    e.g. ``"ingest.cpus_per_task=1 ingest.read_block_s=60"``; ``default`` (or empty) is the
    configuration as shipped. Bad items fail here, before any corpus is generated."""
    items = [item for item in text.split() if item and item != "default"]
    config("/tmp/unused", "/tmp/unused", 30.0, items)  # validate early
    return (" ".join(items) or "default"), items


def cpu_by_pid(roots: list[int], roles: dict[int, str] | None = None) -> dict[int, float]:
    """CPU seconds (user + system, plus reaped children's) of each process in the trees rooted
    at ``roots``, by pid. ``roles``, when given, receives each pid's :func:`process_role`."""
    import psutil

    out: dict[int, float] = {}
    for root in roots:
        try:
            top = psutil.Process(root)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
                if roles is not None and proc.pid not in roles:
                    roles[proc.pid] = process_role(proc)
            except psutil.Error:  # a process that exited meanwhile
                continue
            out[proc.pid] = t.user + t.system + t.children_user + t.children_system
    return out


def process_role(proc) -> str:
    """What a process of the Ray session is: driver (this process and its own children),
    worker (Ray worker processes, the ones running the ingest tasks), gcs, raylet, or agent
    (dashboard/runtime-env agents, log monitor, Ray Data's stats and autoscaling actors)."""
    if proc.pid == os.getpid():
        return "driver"
    name, cmdline = proc.name(), " ".join(proc.cmdline())
    if name.startswith(("ray::_", "ray::Dashboard")):  # Ray Data's and the dashboard's actors
        return "agent"
    if "default_worker.py" in cmdline or name.startswith("ray::"):
        return "worker"
    if "gcs_server" in name or "gcs_server" in cmdline:
        return "gcs"
    if name == "raylet" or cmdline.split(" ")[0].endswith("/raylet"):
        return "raylet"
    return "agent"


def cpu_by_role(
    before: dict[int, float], after: dict[int, float], roles: dict[int, str]
) -> dict[str, float]:
    """:func:`consumed_cpu` split by :func:`process_role` (CPU seconds, 3 decimals)."""
    out: dict[str, float] = {}
    for pid, cpu in after.items():
        role = roles.get(pid, "agent")
        out[role] = out.get(role, 0.0) + cpu - before.get(pid, 0.0)
    return {role: round(cpu, 3) for role, cpu in sorted(out.items())}


def consumed_cpu(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_by_pid` snapshots: each process's growth, a
    process born in between counted whole. (A process gone by ``after`` counts through its
    parent's reaped-children times when that parent is in the tree, else it is missed: Ray's
    workers live for the whole session.)"""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def ray_roots() -> list[int]:
    """This process plus every process the embedded Ray session started (GCS, raylet: the
    raylet's children are the Ray workers, which are NOT descendants of the driver)."""
    roots = [os.getpid()]
    try:
        import ray

        if ray.is_initialized():
            node = ray._private.worker._global_node
            for infos in node.all_processes.values():
                roots += [info.process.pid for info in infos if info.process is not None]
    except (ImportError, AttributeError):
        pass
    return sorted(set(roots))


_ROLES: dict[int, str] = {}  # pid -> process_role, filled by every snapshot
LAST_CPU_BY_ROLE: dict[str, float] = {}  # the latest timed() call's CPU split by role


def cpu_snapshot() -> dict[int, float]:
    return cpu_by_pid(ray_roots(), _ROLES)


def throughput(
    path: str, seconds: float, wall: float, used_cores: int, cpu: float, **extra
) -> dict:
    """Wall-based per-core throughput, plus audio seconds per CPU second actually consumed (the
    latter is robust to other load on the machine, reported as load_avg_1m)."""
    server_cpu = LAST_CPU_BY_ROLE.get("s3_server", 0.0)
    if server_cpu > 0 and cpu > server_cpu:
        # The S3 service's own CPU (moto here; a managed store's is not the ingest's to pay).
        extra["x_realtime_per_cpu_s_without_s3_server"] = round(seconds / (cpu - server_cpu), 1)
    return emit(
        figure="throughput",
        path=path,
        seconds_audio=round(seconds, 1),
        wall_s=round(wall, 2),
        cores=used_cores,
        x_realtime_per_core=round(seconds / wall / used_cores, 1),
        cpu_s=round(cpu, 2),
        x_realtime_per_cpu_s=round(seconds / cpu, 1) if cpu > 0 else None,
        load_avg_1m=round(os.getloadavg()[0], 2),
        **extra,
    )


def ratio(figure: dict, reference: dict, key: str) -> float | None:
    """``figure[key] / reference[key]`` (3 decimals); None when either is missing or zero."""
    a, b = figure.get(key), reference.get(key)
    return round(a / b, 3) if a and b else None


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process, its descendants and every process of
    the embedded Ray session, Ray workers included)."""
    before, began = cpu_snapshot(), time.perf_counter()
    result = fn(*args, **kwargs)
    wall = time.perf_counter() - began
    after = cpu_snapshot()
    LAST_CPU_BY_ROLE.clear()
    LAST_CPU_BY_ROLE.update(cpu_by_role(before, after, _ROLES))
    return result, wall, consumed_cpu(before, after)


def ray_ingest(
    root: str, source: str, read_block_s: float, overrides: list[str] | None = None
) -> dict:
    from mess_ray.ingest import run_ingest

    return run_ingest(config(root, source, read_block_s, overrides), Storage(root))


def _tiny_wav() -> bytes:
    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((44100, 2), np.float32), 44100, format="WAV")
    return buffer.getvalue()


_WARMUP_WAV = _tiny_wav()


def naive_librosa(paths: list[str], fetch=None) -> tuple[float, float]:
    """librosa.load of each whole file (optionally fetched whole from S3 first): (audio s, wall s)."""
    import librosa

    librosa.load(io.BytesIO(_WARMUP_WAV), sr=SAMPLE_RATE, mono=True)  # imports and JIT, not timed
    began, seconds = time.perf_counter(), 0.0
    for path in paths:
        source = io.BytesIO(fetch(path)) if fetch else path
        audio, _ = librosa.load(source, sr=SAMPLE_RATE, mono=True)
        seconds += len(audio) / SAMPLE_RATE
    return seconds, time.perf_counter() - began


def single_process_stream(
    paths: list[str], read_block_s: float, write_to: str | None = None
) -> tuple[float, float]:
    """The worker code path (decode, resample, segment, Arrow row groups) in this process,
    without Ray and without writing: the decoder's pace, the reference of the Ray ingest.
    ``write_to``: a storage root the shards are also written under (as the Ray tasks do), to
    tell the Parquet writing's share of the gap from Ray's."""
    settings = {"sample_rate": SAMPLE_RATE, "window_s": 4.0, "hop_s": 2.0, "min_duration_s": 1.0}
    storage = Storage(write_to) if write_to else None
    began, seconds = time.perf_counter(), 0.0
    for i, path in enumerate(paths):
        row = {
            "source_uri": path,
            "track_id": str(i),
            "piece_id": "",
            "style": "",
            "metadata_json": "{}",
            "size": -1,
            "fingerprint": f"bench{i}",
        }
        writer = ShardWriter(storage, f"segments/{shard_name(row)}" if storage else None)
        status = ingest_file(row, settings, read_block_s, None, writer)
        seconds += status["duration_s"] if status["status"] == "segmented" else 0.0
    return seconds, time.perf_counter() - began


def profile(paths: list[str], read_block_s: float, write_to: str, top: int) -> None:
    """One ``figure=profile`` line per function among the ``top`` by own time (cProfile, which
    measures wall time: run it on an idle machine) of a decode + segment + write pass."""
    import cProfile
    import pstats

    single_process_stream(paths[:1], read_block_s)  # imports, not profiled
    profiler = cProfile.Profile()
    began = time.process_time()
    profiler.enable()
    seconds, _ = single_process_stream(paths, read_block_s, write_to)
    profiler.disable()
    cpu = time.process_time() - began
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (file, line, name), (_, calls, own, cumulative, _) in rows:
        emit(
            figure="profile",
            function=f"{os.path.basename(file)}:{line}({name})",
            calls=calls,
            own_s=round(own, 3),
            cumulative_s=round(cumulative, 3),
            pass_cpu_s=round(cpu, 2),
            seconds_audio=round(seconds, 1),
            load_avg_1m=round(os.getloadavg()[0], 2),
        )


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on 127.0.0.1 in its own process, so its CPU (an S3 service's, not the
    ingest's) is counted apart (role ``s3_server``) from the driver's."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    _ROLES[server.pid] = "s3_server"
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # before Ray starts, so workers inherit it
    return server, endpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=3.0, help="Length of each corpus file.")
    parser.add_argument(
        "--big", action="store_true", help="40 files x 10 minutes (overrides --files/--minutes)."
    )
    parser.add_argument(
        "--memory-minutes", default="5,60", help="File lengths of the peak-memory figures."
    )
    parser.add_argument("--read-block-s", type=float, default=30.0)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument(
        "--skip-naive", action="store_true", help="Leave out the librosa.load baselines."
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="Only profile (cProfile, no Ray) one decode + segment + write pass of the corpus "
        "in this process, the code a Ray task runs, and print its N most costly functions.",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Rounds of decoder baseline + Ray ingest (local, S3), side by side.",
    )
    parser.add_argument(
        "--warmup-files", type=int, default=8, help="Untimed first ingest (worker start-up)."
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="'KEY=VALUE ...'",
        help="An ingest setting to measure side by side (repeatable): space-separated config "
        "overrides, e.g. 'ingest.cpus_per_task=1'; 'default' is the shipped configuration. Each "
        "round runs every variant (local, then S3) against that round's single-process decoder, "
        "in a rotating order. Default: the shipped configuration only.",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="Scratch folder (default: a temporary one, removed); a corpus already generated "
        "there with the same --files (same --minutes assumed) is reused.",
    )
    args = parser.parse_args(argv)
    variants = [parse_variant(text) for text in (args.variant or ["default"])]
    if args.big:
        args.files, args.minutes = 40, 10.0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ingest_bench_"))
    n_cores = cores()
    server = None
    try:
        corpus = workdir / "corpus"
        if corpus.is_dir() and len(list(corpus.iterdir())) == args.files:
            corpus_seconds = args.files * args.minutes * 60  # generated by an earlier run
        else:
            corpus_seconds = make_corpus(corpus, args.files, args.minutes)
        paths = sorted(str(p) for p in corpus.iterdir())
        emit(
            figure="corpus",
            files=len(paths),
            seconds_audio=corpus_seconds,
            bytes=sum(os.path.getsize(p) for p in paths),
            cores=n_cores,
        )
        if args.profile:
            profile(paths, args.read_block_s, str(workdir / "profile_store"), args.profile)
            return

        # -- peak memory vs file length (fresh process per file) ------------------------------
        for minutes in [float(m) for m in args.memory_minutes.split(",") if m]:
            path = write_long_wav(workdir / f"long_{minutes:g}min.wav", minutes * 60)
            for mode in ("stream", "whole_file"):
                stats = measure_peak_memory(
                    str(path), mode=mode, sample_rate=SAMPLE_RATE, read_block_s=args.read_block_s
                )
                emit(
                    figure="peak_memory",
                    file_minutes=minutes,
                    format="wav 44.1 kHz stereo pcm16",
                    file_mib=round(path.stat().st_size / 2**20, 1),
                    **stats,
                )
            path.unlink()

        # -- baselines in this process (one core), once -------------------------------------
        if not args.skip_naive:
            (seconds, _), wall, cpu = timed(naive_librosa, paths)
            throughput("naive_librosa_load_local", seconds, wall, 1, cpu)

        bucket = "ingest-bench"
        if not args.skip_s3:
            import boto3
            import fsspec

            server, endpoint = start_moto()
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            fs = fsspec.filesystem(
                "s3", use_listings_cache=False, client_kwargs={"endpoint_url": endpoint}
            )
            fs.put(str(corpus) + "/", f"{bucket}/corpus/", recursive=True)
            s3_paths = sorted(f"s3://{p}" for p in fs.ls(f"{bucket}/corpus"))
        if not args.skip_s3 and not args.skip_naive:
            (seconds, _), wall, cpu = timed(naive_librosa, s3_paths, fetch=fs.cat_file)
            throughput(
                "naive_librosa_load_s3",
                seconds,
                wall,
                1,
                cpu,
                note="whole object fetched, then loaded; cpu_s includes the moto server process",
            )

        # -- the real Ray ingest -------------------------------------------------------------
        from mess_ray.raylocal import ensure_ray

        _, wall, cpu = timed(ensure_ray)
        emit(figure="ray_start", wall_s=round(wall, 2))
        # Start-up of Ray Data and of one worker per concurrent task: a fixed cost, reported
        # apart from the throughput (it is amortised over a real corpus).
        warm = workdir / "warm"
        for i in range(args.warmup_files):
            write_long_wav(warm / f"w{i}.wav", 5.0, rate=44100, seed=100 + i)
        for name, overrides in variants:
            _, wall, cpu = timed(
                ray_ingest, str(workdir / "warm_store"), str(warm), args.read_block_s, overrides
            )
            emit(
                figure="ray_ingest_warmup",
                variant=name,
                files=args.warmup_files,
                wall_s=round(wall, 2),
                cpu_s=round(cpu, 2),
                cpu_s_by_role=dict(LAST_CPU_BY_ROLE),
            )
        # The fixed cost of one more run once warm: a single 5 s file (catalog, Ray Data's
        # planning and task launch, the manifest and tables), by phase (the manifest's timings).
        one = workdir / "one"
        write_long_wav(one / "w.wav", 5.0, rate=44100, seed=99)
        manifest, wall, cpu = timed(
            ray_ingest, str(workdir / "one_store"), str(one), args.read_block_s, variants[0][1]
        )
        emit(
            figure="ray_ingest_fixed_cost",
            variant=variants[0][0],
            cpu_s_by_role=dict(LAST_CPU_BY_ROLE),
            files=1,
            seconds_audio=5.0,
            wall_s=round(wall, 2),
            cpu_s=round(cpu, 2),
            timings_s=manifest.get("timings_s"),
            load_avg_1m=round(os.getloadavg()[0], 2),
        )

        # -- side by side, ``--repeats`` rounds: the single-process decoder, then the Ray
        # ingest (local, S3); each round's ratios are against that round's decoder figure.
        for repeat in range(args.repeats):
            (seconds, _), wall, cpu = timed(single_process_stream, paths, args.read_block_s)
            stream = throughput(
                "stream_decode_segment_single_process_local",
                seconds,
                wall,
                1,
                cpu,
                repeat=repeat,
            )
            (seconds, _), wall, cpu = timed(
                single_process_stream, paths, args.read_block_s, str(workdir / f"plain{repeat}")
            )
            written = throughput(
                "stream_decode_segment_write_single_process_local",
                seconds,
                wall,
                1,
                cpu,
                repeat=repeat,
                note="the same, also writing the Parquet shards (no Ray)",
            )
            emit(
                figure="ratio_to_single_process_decoder",
                path=written["path"],
                repeat=repeat,
                per_cpu_s=ratio(written, stream, "x_realtime_per_cpu_s"),
                per_core_wall=ratio(written, stream, "x_realtime_per_core"),
                load_avg_1m=written["load_avg_1m"],
            )
            # Variants in a rotating order, so none always runs first (or right after the
            # decoder) in every round.
            shift = repeat % len(variants)
            for v, (variant, overrides) in enumerate(variants[shift:] + variants[:shift]):
                runs = [
                    ("ray_ingest_local", str(workdir / f"store{repeat}_{v}"), str(corpus), None)
                ]
                if not args.skip_s3:
                    runs.append(
                        (
                            "ray_ingest_s3",
                            f"s3://{bucket}/store{repeat}_{v}",
                            f"s3://{bucket}/corpus",
                            "source and storage root on moto S3; cpu_s includes the moto server "
                            "process (s3_server in cpu_s_by_role)",
                        )
                    )
                for name, root, source, note in runs:
                    manifest, wall, cpu = timed(
                        ray_ingest, root, source, args.read_block_s, overrides
                    )
                    counts = manifest["counts"]
                    extra = {"note": note} if note else {}
                    figure = throughput(
                        name,
                        counts["seconds_audio"],
                        wall,
                        n_cores,
                        cpu,
                        variant=variant,
                        files=counts["files_segmented"],
                        segments=counts["segments"],
                        repeat=repeat,
                        timings_s=manifest.get("timings_s"),
                        cpu_s_by_role=dict(LAST_CPU_BY_ROLE),
                        **extra,
                    )
                    emit(
                        figure="ratio_to_single_process_decoder",
                        path=name,
                        variant=variant,
                        repeat=repeat,
                        per_cpu_s=ratio(figure, stream, "x_realtime_per_cpu_s"),
                        per_core_wall=ratio(figure, stream, "x_realtime_per_core"),
                        load_avg_1m=figure["load_avg_1m"],
                        **(
                            {
                                "per_cpu_s_without_s3_server": round(
                                    figure["x_realtime_per_cpu_s_without_s3_server"]
                                    / stream["x_realtime_per_cpu_s"],
                                    3,
                                )
                            }
                            if "x_realtime_per_cpu_s_without_s3_server" in figure
                            else {}
                        ),
                    )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
