"""Shared Ray Train machinery for pretraining and fine-tuning: one training loop style.

A stage supplies a :class:`TrainTask` (how to build the model, turn a Ray Data batch into
tensors, compute the loss, and save the final model). :func:`fit` builds the
``TorchTrainer`` (scaling, storage, checkpoints, failures), :func:`train_loop` is the
per-worker loop (AdamW, warmup + cosine, gradient accumulation, bf16 autocast on GPU, DDP,
metrics every ``report_every`` steps, checkpoints every N steps, resume, per-phase step
timings), and :func:`finish` writes the final model to ``<stage>/<run_name>/model/`` and
publishes the artifact.

Resume: Ray Train V2 keeps a checkpoint-manager snapshot in ``<storage_path>/<run_name>/``;
re-running with the same ``run_name`` restores it, so ``ray.train.get_checkpoint()`` returns
the latest checkpoint and the step counter continues (tests/test_train_ray.py checks this).

Checkpoints: every ``checkpoint_every`` steps; Ray keeps the best ``keep_checkpoints`` by
``CHECKPOINT_SCORE`` (mean loss since the previous checkpoint, mode "min") and always the
latest too, which is what a restarted worker group or a re-run resumes from.

Fault tolerance: ``FailureConfig(max_failures)`` restarts the whole worker group when a worker
dies; the new group resumes from the latest checkpoint. ``test_fail_at_step`` injects such a
death once (tests only, see :func:`maybe_inject_test_failure`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mess_ray.config import MessRayConfig, TrainConfig
from mess_ray.segments import decode_audio, fit_length
from mess_ray.storage import Storage

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HISTORY_FILE = "train_state.json"
MODEL_SUBDIR = "model"
# Metric that ranks checkpoints for "keep the best K": the mean training loss over the steps
# since the previous checkpoint (one step's loss is too noisy to rank by). Every report that
# carries a checkpoint carries it.
CHECKPOINT_SCORE = "checkpoint_loss"
TEST_FAILURE_MARKER = "TEST_FAILURE_INJECTED"
# Columns of a run's per-step timing rows (rank 0; ``step_timings`` in the manifest), seconds:
# step (data + forward + backward + optimizer + losses), data wait (Ray Data iterator +
# collation + host-to-device), the step's end as a Unix time, forward, backward (DDP's gradient
# all-reduce included), optimizer (clip + step + zero_grad), losses (the cross-worker loss
# all-reduce, only on steps that report) and, after the step, the Ray Train report and the
# checkpoint save (zero on steps without them). On GPU the phases are host times (kernels run
# asynchronously); the step total is synchronised by the loss at reporting steps only.
TIMING_COLUMNS = (
    "step_s",
    "data_s",
    "end_unix",
    "forward_s",
    "backward_s",
    "optimizer_s",
    "losses_s",
    "report_s",
    "checkpoint_s",
)


# -- pure helpers --------------------------------------------------------------------------
def lr_at(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> float:
    """Linear warmup to ``base_lr`` then cosine decay to ``min_ratio * base_lr`` (step is 0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def decode_audio_column(blobs, window_samples: int) -> torch.Tensor:
    """The ``audio`` bytes column -> float32 [B, window_samples] (cropped or zero-padded)."""
    rows = [fit_length(decode_audio(bytes(b)), window_samples) for b in blobs]
    if not rows:
        return torch.zeros((0, window_samples), dtype=torch.float32)
    return torch.from_numpy(np.stack(rows).astype(np.float32, copy=False))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (state dicts are saved without the prefix)."""
    return model.module if hasattr(model, "module") else model


def ddp_kwargs(model: nn.Module) -> dict[str, Any]:
    """DistributedDataParallel settings for ``model``: buffers are broadcast from rank 0 before
    every forward only when some module keeps running statistics (batch norm); the models here
    hold constant buffers (mel filterbanks, codebooks, descriptor statistics), so the extra
    collective per step, which also makes each worker wait for the slowest, is skipped."""
    running = any(
        isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        for m in model.modules()
    )
    return {"forward_sync_buffers": running}


def check_resume_inputs(saved: dict | None, current: dict, run_name: str) -> None:
    """Resuming is only valid on the same data and starting weights as the checkpoint."""
    if saved is not None and saved != current:
        raise ValueError(
            f"run_name {run_name!r} has checkpoints trained on {saved}, but this run's inputs are "
            f"{current}: choose a new run_name (or delete the old run folder) to train afresh"
        )


def maybe_inject_test_failure(
    tcfg: dict, storage_cfg: dict | None, stage: str, step: int, rank: int, world_size: int
) -> None:
    """TEST ONLY: kill this worker process after step ``tcfg["test_fail_at_step"]``, once per run.

    Simulates a node loss for the fault-tolerance test: the last-rank worker ``os._exit``s (no
    cleanup, no exception, like a killed process) so Ray Train restarts the worker group from the
    latest checkpoint. A marker file in the run folder records that the failure happened, so the
    restarted group, which passes the same step again, does not fail a second time.
    """
    fail_at = tcfg.get("test_fail_at_step")
    if fail_at is None or step != fail_at or rank != world_size - 1 or storage_cfg is None:
        return
    from mess_ray.config import StorageConfig

    storage = Storage.from_config(StorageConfig(**storage_cfg))
    marker = posixpath.join(stage, "runs", tcfg["run_name"], TEST_FAILURE_MARKER)
    if storage.exists(marker):
        return
    storage.write_json(marker, {"step": step, "rank": rank, "pid": os.getpid()})
    # The controller collects reports when it polls the workers (every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); a worker that dies before that poll
    # loses its last report, and with it the checkpoint. Recovery would still be correct (from
    # the previous checkpoint), but the test expects the checkpoint just made, so wait two polls.
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 0.5)
    os._exit(1)


# -- task interface ------------------------------------------------------------------------
@dataclass
class TrainTask:
    """What differs between pretraining and fine-tuning; everything here must pickle."""

    stage: str
    build_model: Callable[[dict], nn.Module]  # loop config -> fresh model
    collate: Callable[[dict, Any], dict[str, torch.Tensor]]  # (numpy batch, settings) -> tensors
    loss: Callable[[nn.Module, dict, Any], tuple[torch.Tensor, dict[str, float]]]
    save_model: Callable[[nn.Module, Path, Any], None]  # (unwrapped model, folder, settings)


def _endless_batches(
    shard, batch_size: int, shuffle_buffer: int, collate, settings: Any, seed: int
) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) forever; each epoch re-iterates the shard through a local shuffle buffer."""
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=max(shuffle_buffer, batch_size),
            local_shuffle_seed=seed + epoch,
        ):
            count += 1
            yield epoch, collate(batch, settings)
        if count == 0:
            raise ValueError(
                f"training shard has fewer than batch_size={batch_size} rows: "
                "lower batch_size/num_workers or ingest more audio"
            )
        epoch += 1


def _all_reduce_mean(values: list[float]) -> list[float]:
    """Each value's mean over the workers (one collective for the whole list)."""
    import torch.distributed as dist

    if values and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return [float(v) / dist.get_world_size() for v in t.tolist()]
    return list(values)


def seed_numpy(seed: int, rank: int, step: int) -> None:
    """Seed NumPy's global generator for worker ``rank`` at ``step`` (one stream per each)."""
    np.random.seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def train_loop(loop_config: dict) -> None:
    """The per-worker training loop (runs under Ray Train on every worker).

    ``loop_config`` is Ray Train's plumbing, built by :func:`fit`: ``task`` (TrainTask),
    ``train`` (:func:`train_settings`), ``storage`` and ``settings``, the task's own frozen
    settings object (with ``inputs``), handed to the task's callbacks."""
    import ray.train
    import ray.train.torch

    task: TrainTask = loop_config["task"]
    tcfg: dict = loop_config["train"]
    settings = loop_config["settings"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(tcfg["seed"] + rank)
    # Libraries that draw from NumPy's global generator (HuBERT's span masking) are seeded too,
    # so a run is a function of its seed; re-seeded below with the step a resume starts from.
    seed_numpy(tcfg["seed"], rank, 0)
    use_gpu = bool(tcfg["use_gpu"])
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if not use_gpu:
        # Fractional CPUs per worker: one intra-op thread each keeps workers from thrashing.
        torch.set_num_threads(max(1, int(tcfg["cpus_per_worker"])))
    if tcfg["deterministic"]:
        # Reproducible weights (the shipped model's recipe): deterministic kernels, one thread
        # (float sums in a fixed order).
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)

    model = task.build_model(settings)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    # history: every step's mean loss and its step number; resumes: the step each restored
    # attempt continued from (a worker-group restart or a re-run with the same run name).
    # timings: per step, the TIMING_COLUMNS (throughput benchmarks).
    start_step, history, history_steps, resumes, timings = 0, [], [], [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
            saved = json.loads((Path(folder) / HISTORY_FILE).read_text())
        check_resume_inputs(state.get("inputs"), settings.inputs, tcfg["run_name"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        seed_numpy(tcfg["seed"], rank, start_step)
        history = saved["losses"]
        history_steps = saved.get("steps", list(range(1, len(history) + 1)))
        resumes = saved.get("resumes", []) + ([start_step] if start_step < tcfg["steps"] else [])
        timings = saved.get("timings", [])
    model = ray.train.torch.prepare_model(
        model,
        move_to_device=device if use_gpu else True,
        parallel_strategy_kwargs=ddp_kwargs(model),
    )

    shard = ray.train.get_dataset_shard("train")
    batches = _endless_batches(
        shard,
        tcfg["batch_size"],
        tcfg["shuffle_buffer"],
        task.collate,
        settings,
        tcfg["seed"] + rank,
    )
    total_steps, accum = tcfg["steps"], tcfg["grad_accum"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_gpu else contextlib.nullcontext()

    world_size = context.get_world_size()
    # This rank's step losses (micro-batch loss tensors) not yet averaged across workers: they
    # are converted and all-reduced in one go when metrics are reported or a checkpoint is
    # made, not every step (a per-step collective and host sync cost more than the tensor).
    pending: list[list[torch.Tensor]] = []

    def flush_losses() -> None:
        """Append the pending steps' worker-mean losses to ``history`` (all ranks together)."""
        local = [sum(float(loss) / accum for loss in micro) for micro in pending]
        history.extend(_all_reduce_mean(local))
        pending.clear()

    progress_at = 0.0
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        lr = lr_at(step, tcfg["lr"], tcfg["warmup_steps"], total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        micro_losses, extra, epoch = [], {}, 0
        data_s = forward_s = backward_s = 0.0
        for micro in range(accum):
            waited = time.perf_counter()
            epoch, batch = next(batches)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            forward_at = time.perf_counter()
            data_s += forward_at - waited
            # Gradients are all-reduced once per step, on the last micro-batch only.
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync(), autocast:
                loss, extra = task.loss(model, batch, settings)
                backward_at = time.perf_counter()
                (loss / accum).backward()
            backward_s += time.perf_counter() - backward_at
            forward_s += backward_at - forward_at
            micro_losses.append(loss.detach())
        optimizer_at = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(micro_losses)

        done = step + 1
        checkpoint_due = done % tcfg["checkpoint_every"] == 0 or done == total_steps
        report_due = checkpoint_due or done % tcfg["report_every"] == 0
        metrics_at = time.perf_counter()
        if report_due or world_size == 1:
            flush_losses()
        history_steps.append(done)
        ended = time.perf_counter()
        # One row per step, columns TIMING_COLUMNS; report_s and checkpoint_s are filled in
        # after the report below (a checkpoint's own row is saved before they are known).
        timing = [
            round(ended - started, 5),
            round(data_s, 5),
            round(time.time(), 4),
            round(forward_s, 5),
            round(backward_s, 5),
            round(metrics_at - optimizer_at, 5),
            round(ended - metrics_at, 5),
            0.0,
            0.0,
        ]
        timings.append(timing)
        if report_due:
            metrics = {
                "step": done,
                "loss": history[-1],
                "lr": lr,
                "epoch": epoch,
                "grad_norm": float(grad_norm),
                "step_time_s": ended - started,
                "data_wait_s": data_s,
                **extra,
            }
        if checkpoint_due:
            checkpoint_at = time.perf_counter()
            previous_checkpoint = (done - 1) // tcfg["checkpoint_every"] * tcfg["checkpoint_every"]
            since_last = history[previous_checkpoint - done :]
            with tempfile.TemporaryDirectory() as folder:
                ckpt = None
                if rank == 0:
                    torch.save(
                        {
                            "model": unwrap(model).state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "step": done,
                            "inputs": settings.inputs,
                        },
                        Path(folder) / STATE_FILE,
                    )
                    (Path(folder) / HISTORY_FILE).write_text(
                        json.dumps(
                            {
                                "step": done,
                                "losses": history,
                                "steps": history_steps,
                                "resumes": resumes,
                                "timings": timings,
                                "inputs": settings.inputs,
                            }
                        )
                    )
                    ckpt = ray.train.Checkpoint.from_directory(folder)
                report_at = time.perf_counter()
                ray.train.report(
                    {**metrics, CHECKPOINT_SCORE: sum(since_last) / len(since_last)},
                    checkpoint=ckpt,
                    checkpoint_dir_name=f"checkpoint_{done:07d}",
                )
            timing[7] = round(time.perf_counter() - report_at, 5)
            timing[8] = round(report_at - checkpoint_at, 5)
        elif report_due:
            # Every step's loss is kept in `history` (checkpoint and manifest); a Ray Train
            # report is a synchronous round trip through the controller (about 1 s on 2 cores
            # here), so it happens every `report_every` steps, with the window's mean loss.
            report_at = time.perf_counter()
            window = history[-tcfg["report_every"] :]
            ray.train.report({**metrics, "loss_window_mean": sum(window) / len(window)})
            timing[7] = round(time.perf_counter() - report_at, 5)
        progress = loop_config.get("progress")
        if rank == 0 and progress is not None and (ended - progress_at >= 0.5 or report_due):
            # The driver's console bar (mess_ray.console): fire and forget, at most twice a
            # second (the driver redraws it at its own pace). Its loss is rank 0's own (the
            # worker mean is only known at reports).
            progress_at = ended
            progress.update.remote(
                n=done, total=total_steps, loss=sum(float(x) for x in micro_losses) / accum
            )
        maybe_inject_test_failure(tcfg, loop_config["storage"], task.stage, done, rank, world_size)


# -- driver side ---------------------------------------------------------------------------
def with_run_name(
    cfg: MessRayConfig, stage: str, tcfg: TrainConfig, inputs: dict[str, Any]
) -> TrainConfig:
    """``tcfg`` with its run name resolved: the configured one, or one derived from the inputs.

    A derived name hashes the inputs (ingest version, starting weights) and every setting that
    shapes the model, so re-submitting the same job resumes its run, while new data or new
    settings train a new run instead of clashing with an old one.
    """
    if tcfg.run_name:
        return tcfg
    key = {
        "inputs": inputs,
        "train": {
            k: v
            for k, v in train_settings(tcfg).items()
            # Settings that do not shape the model leave the name (and resuming) alone.
            if k not in _NOT_SHAPING
        },
        "model": cfg.model.model_dump(mode="json"),
        "audio": cfg.audio.model_dump(mode="json"),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return tcfg.model_copy(update={"run_name": f"{stage}-{digest}"})


def train_settings(tcfg: TrainConfig) -> dict[str, Any]:
    return tcfg.model_dump(mode="json")


# Settings that do not change what a run trains (its name, fault injection, data caching).
_NOT_SHAPING = ("run_name", "test_fail_at_step", "materialize_below_mb")


def finished_run(
    cfg: MessRayConfig, storage: Storage, stage: str, tcfg: TrainConfig, inputs: dict[str, Any]
) -> dict[str, Any] | None:
    """The run ``tcfg.run_name`` published again, when it already trained to ``tcfg.steps`` on
    the same inputs and settings: re-submitting a finished job then answers at once, instead of
    starting a Ray Train worker group only to find nothing left to do (tens of seconds on a
    small machine). None otherwise: a new, unfinished or changed run goes through :func:`fit`,
    which resumes it or refuses a change of inputs."""
    try:
        manifest = storage.manifest(stage, tcfg.run_name)
    except (FileNotFoundError, KeyError, ValueError):
        return None

    def shaping(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k not in _NOT_SHAPING}

    config = manifest.get("config", {})
    same = (
        manifest.get("counts", {}).get("steps") == tcfg.steps
        and manifest.get("inputs") == json.loads(json.dumps(inputs, default=str))
        and shaping(config.get(stage) or {}) == shaping(train_settings(tcfg))
        and config.get("model") == cfg.model.model_dump(mode="json")
        and config.get("audio") == cfg.audio.model_dump(mode="json")
        and storage.exists(stage, tcfg.run_name, MODEL_SUBDIR)
    )
    if not same:
        return None
    log.info(
        "%s run %s already trained %d steps: published again", stage, tcfg.run_name, tcfg.steps
    )
    kept = {
        k: v for k, v in manifest.items() if k not in ("stage", "version", "created_at", "host")
    }
    return storage.publish(stage, tcfg.run_name, kept)


def fit(
    cfg: MessRayConfig,
    storage: Storage,
    task: TrainTask,
    tcfg: TrainConfig,
    dataset,
    settings: Any,
):
    """Run ``train_loop`` on ``tcfg.num_workers`` Ray Train workers; returns the Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mess_ray.raylocal import ensure_ray

    # Fail fast (before Ray retries a worker error max_failures times) on an invalid resume.
    check_resume_inputs(
        previous_run_inputs(storage, task.stage, tcfg.run_name),
        settings.inputs,
        tcfg.run_name,
    )
    ensure_ray(cfg.ray)
    from mess_ray import console

    if tcfg.deterministic:
        # Reproducible weights need the rows in the same order every run: Ray Data otherwise
        # hands out blocks as its parallel tasks finish (set here, on the driver that builds
        # the dataset, so every entry point gets it, not only scripts/ship_model.py).
        from ray.data import DataContext

        DataContext.get_current().execution_options.preserve_order = True
    ingest = settings.inputs.get("ingest")
    if ingest is not None and 0 < ingest_size_mb(storage, ingest) <= tcfg.materialize_below_mb:
        # A small corpus is read once: each epoch then replays the object store's blocks (same
        # blocks, same order) instead of restarting the read, which stalls every worker.
        dataset = dataset.materialize()

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "progress": console.progress_handle(),
            "task": task,
            "train": train_settings(tcfg),
            "storage": storage.config().model_dump(),
            "settings": settings,
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=tcfg.run_name,
            # With an explicit filesystem, Ray wants the path inside it (no "s3://" prefix).
            storage_path=storage.path(task.stage, "runs"),
            storage_filesystem=storage.pyarrow_fs(),
            # Best K by CHECKPOINT_SCORE; Ray never deletes the latest one, so resume still
            # continues from the newest step.
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.keep_checkpoints,
                checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{task.stage} training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{task.stage} training reported no checkpoint")
    return result


def ingest_size_mb(storage: Storage, version: str) -> float:
    """Total size of an ingest artifact's segment files on storage, in MB."""
    from mess_ray.segments import segments_dataset

    files = segments_dataset(storage, version).files
    return sum(info.size or 0 for info in storage.pyarrow_fs().get_file_info(files)) / 1e6


def previous_run_inputs(storage: Storage, stage: str, run_name: str) -> dict | None:
    """Inputs recorded in the newest checkpoint of an earlier run with this name, if any."""
    run = posixpath.join(stage, "runs", run_name)
    checkpoints = [name for name in storage.listdir(run) if name.startswith("checkpoint_")]
    for name in sorted(checkpoints, reverse=True):
        rel = posixpath.join(run, name, HISTORY_FILE)
        if storage.exists(rel):
            return storage.read_json(rel).get("inputs")
    return None


def finish(
    cfg: MessRayConfig,
    storage: Storage,
    task: TrainTask,
    tcfg: TrainConfig,
    result,
    settings: Any,
    counts: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rebuild the model from the final checkpoint, save it under the artifact, publish.

    The published model is the *last* checkpoint (``result.checkpoint``, step == ``steps``), not
    the best-scored one: the score is a training loss on masked targets (SSL) or on in-batch
    pairs (fine-tuning), noisy and not a validation metric, and the end of the cosine schedule
    is the intended model; the kept best-K are listed in the manifest for rollback/inspection.
    """
    model = task.build_model(settings)
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        saved = json.loads((Path(folder) / HISTORY_FILE).read_text())
    history = saved["losses"]
    best = [
        {
            "checkpoint": storage.url(posixpath.relpath(ckpt.path, storage.path())),
            "step": metrics.get("step"),
            CHECKPOINT_SCORE: metrics.get(CHECKPOINT_SCORE),
        }
        for ckpt, metrics in (result.best_checkpoints or [])
    ]
    model.load_state_dict(state["model"])
    version = tcfg.run_name
    rel = posixpath.join(task.stage, version, MODEL_SUBDIR)
    with tempfile.TemporaryDirectory(prefix="mess-ray-model-") as tmp:
        task.save_model(model.eval(), Path(tmp), settings)
        storage.put_dir(tmp, rel)
    manifest = {
        "inputs": settings.inputs,
        "counts": {
            **counts,
            "steps": int(state["step"]),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "losses": {
            "first": history[0] if history else None,
            "last": history[-1] if history else None,
            "history": history,
            "steps": saved.get("steps", list(range(1, len(history) + 1))),
        },
        "resumed_from_steps": saved.get("resumes", []),
        # Rank 0's [step_time_s, data_wait_s, unix end time] per step (benchmarks/train_throughput.py).
        "step_timings": saved.get("timings", []),
        "kept_checkpoints": sorted(
            best, key=lambda c: (c[CHECKPOINT_SCORE] is None, c[CHECKPOINT_SCORE])
        ),
        "model_path": storage.url(rel),
        "run_path": storage.url(task.stage, "runs", tcfg.run_name),
        "checkpoint": storage.url(posixpath.relpath(result.checkpoint.path, storage.path())),
        "sample_rate": cfg.audio.sample_rate,
        "window_s": cfg.audio.window_s,
        "config": {
            "model": cfg.model.model_dump(mode="json"),
            task.stage: train_settings(tcfg),
            "audio": cfg.audio.model_dump(mode="json"),
        },
        "config_digest": cfg.digest(),
        **(extra or {}),
    }
    return storage.publish(task.stage, version, manifest)


def resolve_init(cfg: MessRayConfig, storage: Storage, init_from: str = "auto") -> dict[str, Any]:
    """Where the encoder weights come from (a picklable description, loaded on each worker).

    ``auto``: ``model.pretrained`` when set (a user who names published weights means them,
    not whatever pretrain artifact the store holds), unless the latest pretrain artifact was
    itself pretrained from those same weights (then it is their continuation, and wins); else
    the latest pretrain artifact, else a seeded random init. ``pretrain``, ``pretrained`` and
    ``random`` force one source.
    """
    if init_from not in ("auto", "pretrain", "pretrained", "random"):
        raise ValueError(f"unknown init_from {init_from!r}")
    if init_from == "auto" and cfg.model.pretrained:
        latest = storage.latest("pretrain")
        continued = latest is not None and _pretrained_from(storage, latest) == str(
            cfg.model.pretrained
        )
        init_from = "pretrain" if continued else "pretrained"
    version = storage.latest("pretrain") if init_from in ("auto", "pretrain") else None
    if init_from == "pretrain" and version is None:
        storage.require_latest("pretrain")  # raises a clear FileNotFoundError
    if version is not None:
        return {
            "kind": "artifact",
            "stage": "pretrain",
            "version": version,
            "storage": storage.config().model_dump(),
            "rel": posixpath.join("pretrain", version, MODEL_SUBDIR),
            # An artifact pretrained from a remote-code checkpoint keeps its custom code.
            "trust_remote_code": cfg.model.trust_remote_code,
        }
    if init_from == "pretrained" and not cfg.model.pretrained:
        raise ValueError("init_from='pretrained' needs model.pretrained (a folder or hub name)")
    if init_from in ("auto", "pretrained") and cfg.model.pretrained:
        return {
            "kind": "pretrained",
            "name": cfg.model.pretrained,
            "trust_remote_code": cfg.model.trust_remote_code,
        }
    return {"kind": "random", "size": cfg.model.size, "seed": cfg.model.seed}


def _pretrained_from(storage: Storage, version: str) -> str | None:
    """The published checkpoint a pretrain artifact started from (None: random or unknown)."""
    try:
        init = storage.manifest("pretrain", version).get("inputs", {}).get("init", {})
    except FileNotFoundError:
        return None
    return str(init["name"]) if init.get("kind") == "pretrained" and init.get("name") else None


def load_init_encoder(init: dict[str, Any]):
    """The encoder described by :func:`resolve_init` (runs on workers and on the driver)."""
    from mess_ray.config import StorageConfig
    from mess_ray.models.encoder import build_encoder, load_encoder

    if init["kind"] == "random":
        return build_encoder(init["size"], seed=init["seed"])
    if init["kind"] == "pretrained":
        return load_encoder(init["name"], trust_remote_code=init["trust_remote_code"])
    if init["kind"] == "artifact":
        storage = Storage.from_config(StorageConfig(**init["storage"]))
        with storage.local_dir(init["rel"]) as local:
            return load_encoder(local, trust_remote_code=init.get("trust_remote_code", False))
    raise ValueError(f"unknown encoder init {init}")
