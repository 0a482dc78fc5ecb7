"""Pretraining throughput on Ray Train vs a plain PyTorch loop, plus model FLOPs per sample.

For each encoder size, prints JSON lines (one per figure), baseline and Ray figures from the
same run, each with ``os.getloadavg()`` (other jobs on the same cores skew CPU figures):

- ``ray_train_step``: ``run_pretrain`` on a synthetic segment table (331 segments like the demo
  corpus) with ``num_workers`` workers at the demo's cadence (batch 8 per worker, a report every
  10 steps, a checkpoint at step 20 of 40). Rank 0's per-step phase timings
  (``train.common.TIMING_COLUMNS``): medians of the step (data + forward + backward + optimizer
  + loss bookkeeping) and of each phase over the steps after warm-up.
- ``ray_train_wall``: the wall time between step ends over the same steps, so epoch boundaries
  (``data_s_max``), metric reports and checkpoints count too (``report_s_per_step``,
  ``checkpoint_s_per_step``; ``step_s_mean`` is the in-step part).
- ``baseline_plain_torch``: the same model (encoder + k-means head), codebook, audio, batch and
  optimiser in one process, no Ray, no DDP, with the Ray worker's intra-op thread count (one
  here: ``cpus_per_worker`` 0.5 gives ``max(1, int(0.5))``; the line prints ``threads``), so the
  comparison is like for like. ``ray_step_overhead_ratio`` = Ray step median / this one.
- ``baseline_plain_ddp`` (2+ CPU workers): the same loop in ``num_workers`` plain processes
  under torch DDP (gloo, same DDP settings as ``train.common.ddp_kwargs``): what data
  parallelism itself costs on these cores, without Ray.
- ``flops``: model FLOPs for one forward+backward per sample (``torch.utils.flop_counter``), so
  MFU = flops_per_sample * samples_per_s / peak FLOP/s; printed for the measured figures when
  ``--peak-tflops`` is given (e.g. 989 for an H100 SXM bf16 dense).

Where the time goes (tiny, CPU, 2 cores shared with other jobs, load average 9.5-11.6; see the
README's benchmark list for the figures and the spread over 3 runs): with one worker the Ray
step equals the plain loop's (0.98x, wall 1.07x); with the demo's two workers each step is
forward + backward at the speed two processes get from two busy cores (the plain DDP loop is no
faster), reports and checkpoints cost about 1 ms per step, and before ``materialize_below_mb``
each epoch boundary restarted the Ray Data read and stalled every worker 4.7-7.2 s; with it
(load 2.2-2.9) the longest data wait is 0.14-0.22 s and the 2-worker Ray step is 1.09-1.18x
the single plain process (wall 1.10-1.21x) and 1.01-1.09x the plain DDP loop.

CPU here (default, about 4 min): ``python -m benchmarks.train_throughput --sizes tiny``.
GPU machine: ``python -m benchmarks.train_throughput --gpu --sizes base --peak-tflops 989``
(bf16 autocast, one worker per visible GPU, NCCL; the baseline runs on the same GPU in bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import emit_with_load, free_port
from mess_ray.config import load_config
from mess_ray.models.encoder import build_encoder
from mess_ray.segments import SEGMENT_SCHEMA, encode_audio, segment_id, window_samples
from mess_ray.storage import Storage
from mess_ray.train.common import TIMING_COLUMNS, decode_audio_column
from mess_ray.train.pretrain import HubertPretrainModel, masked_prediction_loss


def write_synthetic_ingest(storage: Storage, segments: int, window_s: float, sr: int) -> str:
    """Random harmonic tones with noise, published as an 'ingest' artifact (SEGMENT_SCHEMA)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(window_s * sr)) / sr
    rows = []
    for i in range(segments):
        f0 = rng.uniform(110, 880)
        audio = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 4)) * np.exp(
            -t * rng.uniform(0.2, 3)
        )
        audio = (0.2 * audio + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
        track = f"track{i % 8}"
        rows.append(
            {
                "segment_id": segment_id(track, i * len(t)),
                "track_id": track,
                "piece_id": f"piece{i % 4}",
                "style": "synthetic",
                "start_s": float(i * window_s),
                "end_s": float((i + 1) * window_s),
                "start_sample": i * len(t),
                "num_samples": len(t),
                "sample_rate": sr,
                "source_uri": f"mem://{track}.wav",
                "metadata_json": "{}",
                "audio": encode_audio(audio),
            }
        )
    with storage.open("ingest/bench/segments/part-000.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", "bench", {"counts": {"segments": segments}})
    return "bench"


def random_codebook(cfg) -> dict[str, np.ndarray]:
    """A k-means codebook of the configured shape with random centroids: model FLOPs and step
    times depend on its shape, not its values."""
    n_mels, k = cfg.pretrain.n_mels, cfg.pretrain.num_clusters
    return {
        "centroids": np.random.default_rng(0).standard_normal((k, n_mels)).astype(np.float32),
        "mean": np.zeros(n_mels, np.float32),
        "std": np.ones(n_mels, np.float32),
    }


def make_model(size: str, codebook: dict, cfg) -> HubertPretrainModel:
    return HubertPretrainModel(
        build_encoder(size, seed=0),
        codebook,
        cfg.audio.sample_rate,
        cfg.pretrain.n_mels,
        cfg.pretrain.mask_prob,
        cfg.pretrain.mask_length,
    )


def flops_per_sample(model: torch.nn.Module, batch: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        logits, targets, mask = model(batch)
        masked_prediction_loss(logits, targets, mask)[0].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.shape[0]


def plain_step(model: torch.nn.Module, device: torch.device, bf16: bool):
    """One plain training step of the pretraining model as a closure over its own AdamW state
    (the Ray loop's optimiser and clipping; bf16 autocast when ``bf16``): ``step(batch)`` returns
    the ``perf_counter`` marks after the forward (with the loss) and after the backward."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(batch: torch.Tensor) -> tuple[float, float]:
        with autocast:
            logits, targets, mask = model(batch)
            loss, _ = masked_prediction_loss(logits, targets, mask)
        backward_at = time.perf_counter()
        loss.backward()
        optimizer_at = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return backward_at, optimizer_at

    return step


def baseline(
    model: torch.nn.Module,
    audio: torch.Tensor,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    bf16: bool,
) -> list[float]:
    """Step times of a plain single-process loop over the same model and batch size."""
    step_fn = plain_step(model, device, bf16)
    rows_out = []
    for step in range(warmup + steps):
        rows = torch.randint(0, len(audio), (batch_size,))
        started = time.perf_counter()
        batch = audio[rows].to(device)
        forward_at = time.perf_counter()
        backward_at, optimizer_at = step_fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ended = time.perf_counter()
        if step >= warmup:
            rows_out.append(
                {
                    "step_s": ended - started,
                    "data_s": forward_at - started,
                    "forward_s": backward_at - forward_at,
                    "backward_s": optimizer_at - backward_at,
                    "optimizer_s": ended - optimizer_at,
                }
            )
    return rows_out


def _ddp_worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """One process of the plain DDP baseline (gloo, no Ray); rank 0 writes its step rows."""
    import torch.distributed as dist

    from mess_ray.train.common import ddp_kwargs

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(rank)
    torch.set_num_threads(spec["threads"])
    model = make_model(spec["size"], spec["codebook"], spec["cfg"])
    model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs(model))
    rows = baseline(
        model,
        spec["audio"],
        spec["batch_size"],
        spec["steps"],
        spec["warmup"],
        torch.device("cpu"),
        False,
    )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def ddp_baseline(workers: int, spec: dict) -> list[dict]:
    """Step rows (rank 0) of the same loop in ``workers`` plain processes under torch DDP."""

    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mess-ray-ddp-") as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(_ddp_worker, args=(workers, port, spec, out), nprocs=workers, join=True)
        return json.loads(Path(out).read_text())


def phase_medians(rows: list[dict]) -> dict:
    return {
        f"{k}_median": round(statistics.median(r[k] for r in rows), 4)
        for k in ("data_s", "forward_s", "backward_s", "optimizer_s")
    }


class fixed_cost_clock:
    """Times, on the driver, when ``run_pretrain`` enters Ray Train's ``fit`` and how long the
    small-corpus read into the object store takes (``Dataset.materialize``; ``fit`` does it
    when the ingest is under ``train.materialize_below_mb``), and when ``fit`` returns."""

    def __enter__(self):
        import ray.data

        import mess_ray.train.pretrain as pretrain_mod

        self.marks: dict[str, float] = {}
        self._restore = [
            (pretrain_mod, "fit", pretrain_mod.fit),
            (ray.data.Dataset, "materialize", ray.data.Dataset.materialize),
        ]
        fit, materialize, marks = pretrain_mod.fit, ray.data.Dataset.materialize, self.marks

        def timed_fit(*a, **k):
            marks["fit_in"] = time.perf_counter()
            try:
                return fit(*a, **k)
            finally:
                marks["fit_out"] = time.perf_counter()

        def timed_materialize(dataset, *a, **k):
            t = time.perf_counter()
            out = materialize(dataset, *a, **k)
            marks["materialize_s"] = marks.get("materialize_s", 0.0) + time.perf_counter() - t
            return out

        pretrain_mod.fit = timed_fit
        ray.data.Dataset.materialize = timed_materialize
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._restore:
            setattr(owner, name, value)
        return False


def fixed_costs(clock: fixed_cost_clock, rows: list[dict], started: float, ended: float) -> dict:
    """Where a short run's wall time goes outside its steps (seconds, on the driver's clock;
    the steps' Unix end times are mapped onto it): before ``fit`` (codebooks, run name), the
    read into the object store, from there to the first step's start (Ray Train's controller
    and worker group: processes, imports, process group, model, data iterator), the steps,
    from the last step to ``fit`` returning (reports, shutdown), then publishing."""
    marks = clock.marks
    offset = time.time() - time.perf_counter()  # Unix = perf_counter + offset (same host)
    first_start = rows[0]["end_unix"] - rows[0]["step_s"] - offset
    last_end = rows[-1]["end_unix"] - offset
    read = marks.get("materialize_s", 0.0)
    return {
        "before_fit_s": round(marks["fit_in"] - started, 2),
        "driver_read_s": round(read, 2),
        "to_first_step_s": round(first_start - marks["fit_in"] - read, 2),
        "first_batch_wait_s": round(rows[0]["data_s"], 2),
        "steps_s": round(last_end - first_start, 2),
        "after_last_step_s": round(marks["fit_out"] - last_end, 2),
        "publish_s": round(ended - marks["fit_out"], 2),
    }


def throughput(
    step_s: float, batch_size: int, workers: int, window_s: float, stat: str = "step_s_median"
) -> dict:
    return {
        "samples_per_s": round(workers * batch_size / step_s, 3),
        "audio_s_per_s_per_worker": round(batch_size * window_s / step_s, 3),
        stat: round(step_s, 4),
    }


def bench_size(size: str, args, root: str) -> None:
    from mess_ray.train import run_pretrain

    workers = args.workers or (max(1, torch.cuda.device_count()) if args.gpu else 2)
    cfg = load_config(
        None,
        [
            f"storage.root={root}/{size}",
            f"audio.window_s={args.window_s}",
            f"pretrain.steps={args.steps}",
            f"pretrain.batch_size={args.batch_size}",
            f"pretrain.num_workers={workers}",
            f"pretrain.use_gpu={args.gpu}",
            f"pretrain.checkpoint_every={args.checkpoint_every or args.steps}",
            f"pretrain.report_every={args.report_every}",
            f"pretrain.warmup_steps={args.warmup}",
            "pretrain.kmeans_sample_frames=2000",
            f"pretrain.run_name=bench-{size}",
            f"model.size={size}",
        ],
    )
    storage = Storage(cfg.storage.root)
    write_synthetic_ingest(storage, args.segments, cfg.audio.window_s, cfg.audio.sample_rate)
    common = {
        "size": size,
        "batch_size_per_worker": args.batch_size,
        "window_s": cfg.audio.window_s,
        "device": "cuda-bf16" if args.gpu else "cpu",
    }

    started = time.perf_counter()
    with fixed_cost_clock() as clock:
        manifest = run_pretrain(cfg, storage)
    total_wall = time.perf_counter() - started
    rows = [dict(zip(TIMING_COLUMNS, t, strict=True)) for t in manifest["step_timings"]]
    if args.dump_timings:
        Path(args.dump_timings).write_text(json.dumps(rows, indent=1))
    timings = rows[args.warmup :]
    if len(timings) < 2:
        raise ValueError(f"--steps must exceed --warmup + 1 (got {args.steps}, {args.warmup})")
    step_s = statistics.median(t["step_s"] for t in timings)
    wall_step_s = (timings[-1]["end_unix"] - timings[0]["end_unix"]) / (len(timings) - 1)
    # Reports and checkpoints between the first and the last measured step end (per step).
    between = timings[:-1]
    after_step = {
        f"{k}_per_step": round(sum(t[k] for t in between) / len(between), 4)
        for k in ("report_s", "checkpoint_s")
    }
    # The wall step = mean step (its data wait included: an epoch boundary restarts the Ray
    # Data stream) + reports + checkpoints + the rest (unaccounted: Ray's own threads).
    after_step["step_s_mean"] = round(statistics.mean(t["step_s"] for t in timings[1:]), 4)
    after_step["data_s_max"] = round(max(t["data_s"] for t in timings[1:]), 4)
    params = manifest["counts"]["parameters"]
    ray_step = throughput(step_s, args.batch_size, workers, cfg.audio.window_s)
    emit_with_load(
        {
            "figure": "ray_train_step",
            **common,
            "workers": workers,
            **ray_step,
            **phase_medians(timings),
            "losses_s_median": round(statistics.median(t["losses_s"] for t in timings), 4),
            "steps_measured": len(timings),
            "parameters": params,
        }
    )
    emit_with_load(
        {
            "figure": "ray_train_wall",
            **common,
            "workers": workers,
            **throughput(
                wall_step_s, args.batch_size, workers, cfg.audio.window_s, stat="step_s_mean_wall"
            ),
            "report_every": args.report_every,
            **after_step,
            "run_total_wall_s": round(total_wall, 1),
        }
    )

    fixed = fixed_costs(clock, rows, started, started + total_wall)

    # Baseline: same architecture, codebook and batch, no Ray; one thread like one Ray worker here.
    with storage.open(f"pretrain/bench-{size}/model/kmeans_codebook.npz") as f:
        codebook = dict(np.load(f))
    device = torch.device("cuda" if args.gpu else "cpu")
    if not args.gpu:
        torch.set_num_threads(max(1, int(cfg.pretrain.cpus_per_worker)))
    # The same audio the Ray run trained on (its first 64 segments), decoded up front.
    with storage.open("ingest/bench/segments/part-000.parquet") as f:
        blobs = pq.read_table(f, columns=["audio"]).column("audio").to_pylist()[:64]
    audio = decode_audio_column(blobs, window_samples(cfg.audio.window_s, cfg.audio.sample_rate))
    model = make_model(size, codebook, cfg)
    flops = flops_per_sample(model, audio[:2])
    base_rows = baseline(
        model, audio, args.batch_size, args.baseline_steps, args.warmup, device, args.gpu
    )
    base = throughput(
        statistics.median(r["step_s"] for r in base_rows), args.batch_size, 1, cfg.audio.window_s
    )
    emit_with_load(
        {
            "figure": "baseline_plain_torch",
            **common,
            "workers": 1,
            "threads": torch.get_num_threads(),
            **base,
            **phase_medians(base_rows),
            "ray_step_overhead_ratio": round(step_s / base["step_s_median"], 3),
            "ray_wall_overhead_ratio": round(wall_step_s / base["step_s_median"], 3),
        }
    )
    plain_run_s = args.steps * base["step_s_median"]
    emit_with_load(
        {
            "figure": "ray_train_fixed",
            **common,
            "workers": workers,
            "steps": args.steps,
            **fixed,
            "plain_loop_s_same_steps": round(plain_run_s, 2),
            "run_over_plain_loop": round(total_wall / plain_run_s, 2),
        }
    )
    if workers > 1 and not args.gpu:
        # The same loop in `workers` plain processes under torch DDP (gloo, same threads, same
        # DDP settings as the Ray loop): what data parallelism itself costs on these cores,
        # so Ray's own share is the gap between this and the Ray step.
        ddp_rows = ddp_baseline(
            workers,
            {
                "threads": torch.get_num_threads(),
                "size": size,
                "codebook": codebook,
                "cfg": cfg,
                "audio": audio,
                "batch_size": args.batch_size,
                "steps": args.baseline_steps,
                "warmup": args.warmup,
            },
        )
        ddp = throughput(
            statistics.median(r["step_s"] for r in ddp_rows),
            args.batch_size,
            workers,
            cfg.audio.window_s,
        )
        emit_with_load(
            {
                "figure": "baseline_plain_ddp",
                **common,
                "workers": workers,
                "threads": torch.get_num_threads(),
                **ddp,
                **phase_medians(ddp_rows),
                "ray_step_overhead_ratio": round(step_s / ddp["step_s_median"], 3),
                "ray_wall_overhead_ratio": round(wall_step_s / ddp["step_s_median"], 3),
            }
        )
    record = {
        "figure": "flops",
        **common,
        "train_flops_per_sample": flops,
        "gflops_per_audio_s": round(flops / cfg.audio.window_s / 1e9, 3),
        "parameters": params,
    }
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
        record["mfu_ray_step"] = round(flops * ray_step["samples_per_s"] / workers / peak, 5)
        record["mfu_baseline"] = round(flops * base["samples_per_s"] / peak, 5)
    else:
        record["achieved_tflops_per_worker"] = round(
            flops * ray_step["samples_per_s"] / workers / 1e12, 5
        )
    emit_with_load(record)


def parquet_listing(root: str, args) -> None:
    """``parquet_listing``: what reading the benchmark's corpus into the object store costs
    (``read_segments_ray(...).materialize()``, as ``fit`` does for a small corpus) with Ray
    Data's default pool of 32 footer-reading actors and with the pool ``read_segments_ray``
    sizes to the files (``segments.footer_readers``), alternating, after one read that warms
    the workers up. Both read the same blocks in the same order (compared here)."""
    import os

    from mess_ray.segments import FOOTER_ACTORS_ENV, footer_readers, read_segments_ray

    storage = Storage(f"{root}/listing")
    version = write_synthetic_ingest(storage, args.segments, args.window_s, 16000)

    def read(actors: int | None) -> tuple[float, list]:
        if actors is not None:
            os.environ[FOOTER_ACTORS_ENV] = str(actors)
        try:
            t = time.perf_counter()
            dataset = read_segments_ray(storage, version, columns=["audio"]).materialize()
            elapsed = time.perf_counter() - t
        finally:
            os.environ.pop(FOOTER_ACTORS_ENV, None)
        # Each block's rows and a checksum of its audio, in the order the dataset yields them.
        return elapsed, [
            (len(b["audio"]), zlib.crc32(b"".join(b["audio"])))
            for b in dataset.iter_batches(batch_size=None, batch_format="numpy")
        ]

    read(None)
    default, sized, blocks = [], [], set()
    for _ in range(args.listing_repeats):
        for actors, times in ((32, default), (None, sized)):
            elapsed, shape = read(actors)
            times.append(elapsed)
            blocks.add(tuple(shape))
    emit_with_load(
        {
            "figure": "parquet_listing",
            "segments": args.segments,
            "files": 1,
            "repeats": args.listing_repeats,
            "baseline_ray_default_actors": 32,
            "baseline_s_median": round(statistics.median(default), 2),
            "sized_actors": footer_readers(1),
            "sized_s_median": round(statistics.median(sized), 2),
            "baseline_over_sized": round(statistics.median(default) / statistics.median(sized), 2),
            "same_blocks": len(blocks) == 1,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument(
        "--gpu", action="store_true", help="bf16 on GPU (one worker per GPU); use --sizes base"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="0: 2 on CPU, one per GPU with --gpu"
    )
    # Defaults: the demo's pretraining (batch 8 per worker, 2 workers, a report every 10 steps,
    # about 330 segments, so an epoch every ~20 steps), shortened to 40 steps with a checkpoint
    # at 20 so reports, a checkpoint and an epoch boundary fall inside the measured steps.
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    parser.add_argument("--baseline-steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker (the demo's)")
    parser.add_argument("--window-s", type=float, default=4.0)
    parser.add_argument("--segments", type=int, default=331, help="the demo corpus has 331")
    parser.add_argument("--dump-timings", default="", help="write the Ray run's step rows here")
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=20, help="0: only at the last step")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 bf16: 989)"
    )
    parser.add_argument(
        "--listing-repeats",
        type=int,
        default=3,
        help="reads of the corpus per footer-pool size for parquet_listing (0: skip)",
    )
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")
    from mess_ray.raylocal import ensure_ray

    ensure_ray(load_config(None, []).ray)
    with tempfile.TemporaryDirectory(prefix="mess-ray-train-bench-") as root:
        if args.listing_repeats:
            parquet_listing(root, args)
        for size in args.sizes:
            bench_size(size, args, root)


if __name__ == "__main__":
    main()
