"""GPU throughput and model FLOPs utilisation (MFU) of pretraining and embedding, by size.

One process, no Ray (a lent GPU machine has PyTorch and transformers but not Ray): the same
model, codebook shape, batch and optimiser as the pretraining loop (``train.common``: AdamW,
gradient clipping, bf16 autocast on GPU) through ``benchmarks.train_throughput.baseline``, and
the index actors' ``Embedder.embed``. Prints JSON lines (one per figure):

- ``gpu_ceiling``: the device's own ceilings, measured first: a bf16 8192^3 matrix product on
  random data (median of CUDA-event-timed products after warm-up) and a device-to-device copy
  (bytes read + written). MFU is given against both the datasheet's dense bf16 rate
  (``--peak-tflops``, 989 for an H100/H200 SXM) and this measured product.
- ``gpu_pretrain_step``: per size and batch, the median step (batch to device, forward,
  backward, clip, AdamW; synchronised) in bf16 autocast, with samples and audio seconds per
  second, achieved TFLOP/s (model FLOPs per sample counted with ``torch.utils.flop_counter`` on
  the device), MFU and peak memory. The baseline, same run: the same step in float32 (TF32 off).
- ``gpu_embed``: per size and batch, ``Embedder.embed`` (to device, forward, back to host) and
  the model's forward alone on device-resident batches, in float32 (TF32 off), TF32 (the GPU
  default, ``inference_precision: auto``) and bf16 autocast; recall@10 of each one's cosine neighbours against float32's and the
  smallest cosine, over the same piano-like segments.
- ``gpu_embed_compiled`` (``--compile``): ``torch.compile`` of the bf16 forward, with its
  compile time, against the eager forward at the same batch.

Audio settings come from ``--config`` (default: the cluster config, 24 kHz, 5 s windows, as in
docs/scaling.md); ``--set`` overrides. Input is synthetic (piano-like clips), so the data path
(Ray Data reads, chain augmentation) is outside these figures.

On the GPU machine (wheels for the packages it lacks carried in ``.whl``)::

    python -m benchmarks.gpu_throughput --sizes tiny small base --compile --out gpu.jsonl
    python -m benchmarks.gpu_throughput --config configs/shipped-asap.yaml --sizes tiny small base

Here (CPU, a smoke run of the same code): ``--device cpu --sizes tiny --train-batches 2
--embed-batches 4 --segments 8 --steps 2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit_with_load as emit
from benchmarks.embed_throughput import forward_flops, piano_like_segments, recall_at_k, window
from benchmarks.train_throughput import (
    baseline,
    flops_per_sample,
    make_model,
    plain_step,
    random_codebook,
)
from mess_ray.config import load_config
from mess_ray.models import Embedder, MeanPooledEncoder
from mess_ray.models.encoder import build_encoder, float32_positional_conv


def mfu(flops: float, per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over a peak in TFLOP/s (0 without one)."""
    return round(flops * per_s / (peak_tflops * 1e12), 4) if peak_tflops > 0 else 0.0


def utilisation(flops: float, per_s: float, peaks: dict[str, float]) -> dict:
    """Achieved TFLOP/s and MFU against each named peak (``mfu_<name>``)."""
    out = {"achieved_tflops": round(flops * per_s / 1e12, 3)}
    out.update({f"mfu_{name}": mfu(flops, per_s, peak) for name, peak in peaks.items() if peak})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def tf32(enabled: bool, cudnn_benchmark: bool = False):
    """Allow (or forbid) TF32 matrix products and convolutions inside the block, and cuDNN's
    algorithm search (``cudnn.benchmark``), restoring both settings after."""
    backends = torch.backends
    before = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = enabled
    backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark = (
            before
        )


def on_off(choice: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def pos_convs(choice: str) -> list[bool]:
    """``--pos-conv``: whether the positional conv runs in float32 (True) or under autocast."""
    return {"autocast": [False], "float32": [True], "both": [False, True]}[choice]


def pos_conv_name(float32: bool) -> str:
    return "float32" if float32 else "autocast"


KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "sm90")),
    ("normalisation", ("norm",)),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
)


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind from its name (first match in ``KERNEL_KINDS``, else elementwise)."""
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "elementwise/other"


def profile_shares(fn, device: torch.device, steps: int = 3) -> dict:
    """Shares of device time by kernel kind over ``steps`` calls of ``fn`` (after one warm-up),
    and the five costliest kernels, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    if device.type == "cuda":  # kernels only: an op's device time is its kernels' again
        cuda = torch.autograd.DeviceType.CUDA
        events = [
            (e.key, float(e.self_device_time_total))
            for e in prof.key_averages()
            if e.device_type == cuda
        ]
    else:
        events = [(e.key, float(e.self_cpu_time_total)) for e in prof.key_averages()]
    events = [(k, t) for k, t in events if t > 0]
    total = sum(t for _, t in events) or 1.0
    kinds: dict[str, float] = {}
    for key, t in events:
        kinds[kernel_kind(key)] = kinds.get(kernel_kind(key), 0.0) + t / total
    top = sorted(events, key=lambda kt: -kt[1])[:5]
    return {
        "device_ms_per_call": round(total / 1e3 / steps, 3),
        "shares": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [[k[:80], round(t / total, 3)] for k, t in top],
    }


def timed_median(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()`` (synchronised each time) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ceilings(device: torch.device, size: int) -> dict:
    """bf16 matmul TFLOP/s on random data and device-copy GB/s (read + write), measured."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    mm_s = timed_median(lambda: a @ b, device, repeats=10, warmup=3)
    src = torch.randn(1 << 28 if device.type == "cuda" else 1 << 22, device=device)
    dst = torch.empty_like(src)
    copy_s = timed_median(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    return {
        "matmul_n": size,
        "matmul_bf16_tflops": round(2 * size**3 / mm_s / 1e12, 1),
        "copy_gb_s": round(2 * src.numel() * src.element_size() / copy_s / 1e9, 1),
    }


def device_info(device: torch.device) -> dict:
    info = {"device": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count)
        try:
            info["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def bench_pretrain(size, cfg, audio, device, args, peaks, out) -> None:
    """``gpu_pretrain_step`` lines for one size: bf16 at each batch, float32 at the first."""
    codebook = random_codebook(cfg)
    model = make_model(size, codebook, cfg)
    common = {
        "size": size,
        "sample_rate": cfg.audio.sample_rate,
        "window_s": cfg.audio.window_s,
        "parameters": sum(p.numel() for p in model.encoder.parameters()),
    }
    flops = flops_per_sample(model.to(device).train(), audio[:2].to(device))
    runs = [
        (batch, True, allow, bench, f32pos)
        for batch in args.train_batches
        for allow in on_off(args.train_tf32)
        for bench in on_off(args.cudnn_benchmark)
        for f32pos in pos_convs(args.pos_conv)
    ]
    baseline_batch = args.train_batches[min(1, len(args.train_batches) - 1)]
    runs.append((baseline_batch, False, False, False, pos_convs(args.pos_conv)[-1]))
    for batch, bf16, allow_tf32, cudnn_benchmark, f32pos in runs:
        model = make_model(size, codebook, cfg)  # fresh weights and optimiser state per run
        float32_positional_conv(model, enabled=f32pos)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with tf32(allow_tf32, cudnn_benchmark):
                rows = baseline(model, audio, batch, args.steps, args.warmup, device, bf16)
        except torch.OutOfMemoryError:
            emit({"figure": "gpu_pretrain_step", **common, "batch": batch, "error": "OOM"}, out)
            torch.cuda.empty_cache()
            continue
        step_s = statistics.median(r["step_s"] for r in rows)
        per_s = batch / step_s
        record = {
            "figure": "gpu_pretrain_step",
            **common,
            "precision": "bf16-autocast" if bf16 else "float32",
            "tf32": allow_tf32,
            "cudnn_benchmark": cudnn_benchmark,
            "pos_conv": pos_conv_name(f32pos),
            "batch": batch,
            "steps": len(rows),
            "step_s_median": round(step_s, 5),
            "data_s_median": round(statistics.median(r["data_s"] for r in rows), 5),
            "samples_per_s": round(per_s, 2),
            "audio_s_per_s": round(per_s * cfg.audio.window_s, 1),
            "train_flops_per_sample": flops,
            **utilisation(flops, per_s, peaks),
        }
        if device.type == "cuda":
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        emit(record, out)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.profile:
        batch = max(args.train_batches)
        for allow_tf32 in on_off(args.train_tf32):
            model = make_model(size, codebook, cfg)
            float32_positional_conv(model, enabled=pos_convs(args.pos_conv)[-1])
            with tf32(allow_tf32, args.cudnn_benchmark == "on"):
                step = training_step(model, audio, batch, device)
                emit(
                    {
                        "figure": "gpu_profile",
                        **common,
                        "what": "pretrain_step",
                        "pos_conv": pos_conv_name(pos_convs(args.pos_conv)[-1]),
                        "precision": "bf16-autocast",
                        "tf32": allow_tf32,
                        "batch": batch,
                        **profile_shares(step, device),
                    },
                    out,
                )
            del model


def training_step(model, audio: torch.Tensor, batch: int, device: torch.device):
    """One bf16 pretraining step on a fixed random batch, as a closure (``plain_step``)."""
    step = plain_step(model, device, bf16=True)
    x = audio[torch.randint(0, len(audio), (batch,))].to(device)
    return lambda: step(x)


def inference(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """``model(x)`` without gradients, under autocast to ``dtype`` unless float32, as a closure."""

    def forward():
        with (
            torch.inference_mode(),
            torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32),
        ):
            return model(x)

    return forward


def bench_embed(size, cfg, segments, device, args, peaks, out) -> None:
    """``gpu_embed`` (and ``gpu_embed_compiled``) lines for one size."""
    encoder = MeanPooledEncoder(
        build_encoder(size, seed=0), cfg.model.ssl_layer, cfg.audio.sample_rate
    ).eval()  # as embedded: in eval mode the encoder stops at its embedding layer
    count = len(segments)
    flops = forward_flops(encoder.to(device), torch.from_numpy(segments[:1]).to(device))
    common = {
        "size": size,
        "sample_rate": cfg.audio.sample_rate,
        "window_s": cfg.audio.window_s,
        "segments": count,
        "forward_flops_per_segment": flops,
    }
    # (name, Embedder precision, TF32 for the model-alone timing): 'auto' is TF32 on CUDA
    variants = [("float32", "float32", False), ("tf32", "auto", True)]
    variants.append(("bf16-autocast", "bfloat16", False))
    reference = None
    # float32 first, always: the reference the others' recall is measured against.
    variants = [v for v in variants if v[0] == "float32" or v[0] in args.embed_precisions]
    for batch in args.embed_batches:
        for (name, precision, allow_tf32), bench, f32pos in (
            (v, b, g)
            for v in variants
            for b in on_off(args.cudnn_benchmark)
            for g in pos_convs(args.pos_conv)
        ):
            embedder = Embedder(
                encoder, encoder.embedding_dim, {}, window(cfg), batch, precision, fast=False
            )
            float32_positional_conv(embedder.model, enabled=f32pos)  # the Embedder's on CUDA
            with tf32(allow_tf32, bench):
                embedder.embed(segments[:batch])  # kernels, allocator: untimed
                sync(device)
                started = time.perf_counter()
                vectors = np.concatenate(
                    [embedder.embed(segments[i : i + batch]) for i in range(0, count, batch)]
                )
                wall = time.perf_counter() - started
                x = torch.from_numpy(segments[:batch]).to(device)
                forward = inference(embedder.model, x, embedder.dtype)
                model_s = timed_median(forward, device, args.repeats, warmup=2)
            if reference is None:
                reference = vectors
            cosine = np.sum(reference * vectors, axis=1) / (
                np.linalg.norm(reference, axis=1) * np.linalg.norm(vectors, axis=1)
            )
            emit(
                {
                    "figure": "gpu_embed",
                    **common,
                    "precision": name,
                    "cudnn_benchmark": bench,
                    "pos_conv": pos_conv_name(f32pos),
                    "batch": batch,
                    "embed_segments_per_s": round(count / wall, 1),
                    "model_segments_per_s": round(batch / model_s, 1),
                    "model_audio_s_per_s": round(batch * cfg.audio.window_s / model_s, 1),
                    **utilisation(flops, batch / model_s, peaks),
                    "recall_at_10_vs_float32": round(recall_at_k(reference, vectors, 10), 4),
                    "min_cosine_vs_float32": round(float(cosine.min()), 6),
                },
                out,
            )
    if args.profile:
        batch = max(args.embed_batches)
        x = torch.from_numpy(segments[:batch]).to(device)
        float32_positional_conv(encoder, enabled=pos_convs(args.pos_conv)[-1])
        for name, precision, allow_tf32 in variants:
            dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
            forward = inference(encoder, x, dtype)
            with tf32(allow_tf32, args.cudnn_benchmark == "on"):
                emit(
                    {
                        "figure": "gpu_profile",
                        **common,
                        "what": "embed_forward",
                        "pos_conv": pos_conv_name(pos_convs(args.pos_conv)[-1]),
                        "precision": name,
                        "batch": batch,
                        **profile_shares(forward, device),
                    },
                    out,
                )
    if args.compile:
        bench_compiled(encoder, common, segments, device, args, peaks, out)


def bench_compiled(encoder, common, segments, device, args, peaks, out) -> None:
    """``torch.compile`` of the bf16 forward at the largest embedding batch vs eager."""
    batch = max(args.embed_batches)
    x = torch.from_numpy(segments[:batch]).to(device)
    eager = inference(encoder, x, torch.bfloat16)
    compiled = inference(torch.compile(encoder), x, torch.bfloat16)
    started = time.perf_counter()
    reference, first = eager(), compiled()
    sync(device)
    compile_s = time.perf_counter() - started
    eager_s = timed_median(eager, device, args.repeats, warmup=2)
    compiled_s = timed_median(compiled, device, args.repeats, warmup=2)
    cosine = torch.nn.functional.cosine_similarity(reference.float(), first.float(), dim=1)
    emit(
        {
            "figure": "gpu_embed_compiled",
            **common,
            "precision": "bf16-autocast",
            "batch": batch,
            "compile_s": round(compile_s, 1),
            "eager_segments_per_s": round(batch / eager_s, 1),
            "compiled_segments_per_s": round(batch / compiled_s, 1),
            "speedup": round(eager_s / compiled_s, 3),
            **utilisation(common["forward_flops_per_segment"], batch / compiled_s, peaks),
            "min_cosine_vs_eager": round(float(cosine.min()), 6),
        },
        out,
    )


def plot(records: list[dict], path: str | Path, size: str = "base") -> None:
    """Two panels for ``size``: pretraining samples/s (and MFU) against batch, and embedding
    segments/s per precision against batch (the model alone, solid; ``Embedder.embed``, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, seen = [], set()
    for r in records:  # the first line per figure, precision and batch (later runs repeat some)
        key = (r.get("figure"), r.get("precision"), r.get("batch"))
        if r.get("size") == size and "error" not in r and key not in seen:
            seen.add(key)
            rows.append(r)

    def points(figure: str, precision: str, *keys: str) -> list[tuple]:
        """(batch, *keys) of one figure and precision, in batch order."""
        return sorted(
            (r["batch"], *(r[k] for k in keys))
            for r in rows
            if r["figure"] == figure and r["precision"] == precision
        )

    fig, (train_ax, embed_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"float32": "#4c72b0", "tf32": "#55a868", "bf16-autocast": "#dd8452"}
    for precision in ("bf16-autocast", "float32"):
        color = colors[precision]
        steps = points("gpu_pretrain_step", precision, "samples_per_s", "mfu_datasheet")
        if steps:
            batches, rates, mfus = zip(*steps)
            train_ax.plot(batches, rates, "o-", color=color, label=precision)
            for b, rate, m in steps:
                train_ax.annotate(
                    f"MFU {m:.3f}", (b, rate), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    train_ax.set(
        xscale="log",
        xlabel="batch",
        ylabel="samples / s",
        title=f"{size}: pretraining step (one GPU)",
    )
    for precision, color in colors.items():
        embeds = points("gpu_embed", precision, "model_segments_per_s", "embed_segments_per_s")
        if embeds:
            batches, model_rates, embed_rates = zip(*embeds)
            embed_ax.plot(batches, model_rates, "o-", color=color, label=f"{precision}, model")
            embed_ax.plot(
                batches,
                embed_rates,
                "o--",
                color=color,
                alpha=0.6,
                label=f"{precision}, Embedder.embed",
            )
    embed_ax.set(
        xscale="log", xlabel="batch", ylabel="segments / s", title=f"{size}: embedding (one GPU)"
    )
    for ax in (train_ax, embed_ax):
        batches = sorted({r["batch"] for r in rows if "batch" in r})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    sample = next((r for r in rows if "sample_rate" in r), {})
    fig.suptitle(
        f"{records[0].get('gpu', '')} {sample.get('sample_rate', '?')} Hz, "
        f"{sample.get('window_s', '?')} s segments (benchmarks/gpu_throughput.py)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cluster.yaml")
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    parser.add_argument("--sizes", nargs="+", default=["base"])
    parser.add_argument("--train-batches", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--embed-batches", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--segments", type=int, default=256, help="segments to embed per size")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per variant")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet bf16 dense")
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the forward")
    parser.add_argument(
        "--embed-precisions",
        nargs="+",
        default=["float32", "tf32", "bf16-autocast"],
        choices=["float32", "tf32", "bf16-autocast"],
        help="float32 always runs (the reference of the others' recall)",
    )
    parser.add_argument(
        "--cudnn-benchmark", choices=["off", "on", "both"], default="off", help="cuDNN autotuning"
    )
    parser.add_argument(
        "--train-tf32", choices=["off", "on", "both"], default="off", help="TF32 in bf16 steps"
    )
    parser.add_argument(
        "--profile", action="store_true", help="device time by kernel kind (torch.profiler)"
    )
    parser.add_argument(
        "--pos-conv",
        choices=["autocast", "float32", "both"],
        default="float32",
        help="the positional conv under bf16 autocast, or in float32 (mess-ray on CUDA)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["pretrain", "embed"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    parser.add_argument(
        "--plot", default="", help="write a PNG of the lines (with --plot-from: those, no run)"
    )
    parser.add_argument("--plot-from", nargs="*", default=[], help="JSON-lines files to plot")
    args = parser.parse_args(argv)
    if args.plot_from:
        lines = [ln for f in args.plot_from for ln in Path(f).read_text().splitlines()]
        records = [json.loads(ln) for ln in lines if ln.startswith("{")]
        plot(records, args.plot or "gpu_throughput.png", args.sizes[0])
        return records
    device = torch.device(args.device)
    cfg = load_config(args.config if args.config else None, args.set)
    records: list[dict] = []
    sink = open(args.out, "a") if args.out else None  # noqa: SIM115 - kept open for all lines
    try:
        info = device_info(device)
        ceiling = ceilings(device, args.matmul_n if device.type == "cuda" else 256)
        emit({"figure": "gpu_ceiling", **info, **ceiling}, sink)
        peaks = {"datasheet": args.peak_tflops, "measured_matmul": ceiling["matmul_bf16_tflops"]}
        segments = piano_like_segments(args.segments, window(cfg), cfg.audio.sample_rate, seed=0)
        audio = torch.from_numpy(segments[: max(64, max(args.train_batches))])
        for size in args.sizes:
            for stage, bench, data in (
                ("pretrain", bench_pretrain, audio),
                ("embed", bench_embed, segments),
            ):
                if stage in args.skip:
                    continue
                try:
                    bench(size, cfg, data, device, args, peaks, sink)
                except Exception as exc:  # one lease, one run: keep the other figures
                    traceback.print_exc()
                    emit({"figure": f"gpu_{stage}", "size": size, "error": repr(exc)}, sink)
    finally:
        if sink is not None:
            sink.close()
    if args.out:
        records = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    if args.plot and records:
        plot(records, args.plot, args.sizes[0])
    return records


if __name__ == "__main__":
    main()
