"""Scaling study on paper: hours and cost to ingest, pretrain on, embed and index 10k/100k/1M hours.

Reads the MEASURED per-worker figures (JSON lines written by the benchmarks) and combines them
with ASSUMPTIONS that cannot be measured here (GPU peak FLOP/s, utilisation, instance prices),
which are all in :data:`ASSUMPTIONS` and printed with the result. Writes ``docs/scaling.md``'s
table (``--markdown``), a PNG plot and prints one JSON line per (cluster, corpus size, stage).

    python -m benchmarks.embed_throughput --out docs/scaling/embed_throughput.jsonl
    python -m benchmarks.ingest_throughput --repeats 3 --memory-minutes "" \\
        | grep '^{' > docs/scaling/ingest_throughput.jsonl
    python -m benchmarks.scaling_study --markdown docs/scaling/table.md --plot docs/scaling/scaling.png

Model of each stage (per hour of audio, segments of ``window_s`` every ``hop_s``):

- ingest: CPU seconds = audio seconds / (audio seconds decoded per CPU second, measured for
  the Ray ingest), spread over the CPU workers' vCPUs.
- pretrain: training FLOPs = train FLOPs per sample (measured with the flop counter for the
  ``base`` encoder) x samples (5 epochs over the segment table, capped at the MERT-sized
  budget below), on the GPUs at an assumed MFU.
- embed: forward FLOPs per segment (measured) x segments, on the GPUs at an assumed inference
  MFU; the CPU alternative uses the measured segments per CPU second of one worker thread.
- index: IVF build CPU seconds scaled from the measured 1e6-vector build (per vector cost
  grows with the number of lists, ~sqrt(N)); on the CPU workers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MEASURED = REPO / "docs" / "scaling"
CORPUS_HOURS = [10_000, 100_000, 1_000_000]
STAGES = ["ingest", "pretrain", "embed", "index"]

# Everything below is an assumption, not a measurement: change it and re-run.
ASSUMPTIONS = {
    "audio": {"window_s": 5.0, "hop_s": 2.5, "sample_rate": 24000, "note": "configs/cluster.yaml"},
    # Passes over the (capped) segment table: MERT-v1-95M-like budgets see each clip several times.
    "pretrain_epochs": 5.0,
    # SSL gains flatten beyond a MERT-sized corpus (MERT-v1 used ~160k hours); larger corpora
    # are pretrained on a sample of this size and only embedded in full.
    "pretrain_cap_hours": 160_000,
    "index_build": {
        "vectors": 1_000_000,
        "dim": 128,
        "build_s": 7.2,
        "cores": 2,
        "source": "benchmarks/index_search.py, IVF-Flat 1e6 x 128 on this 2-core machine "
        "(issue 7 note; not re-run here)",
    },
    "vcpu_per_core_equivalent": 1.0,  # a cloud vCPU counted as one of this machine's cores
    # Datasheet peaks. The MFU values apply only without gpu_throughput.jsonl: with it, every
    # GPU runs at the MFU measured on the H200 (same compute as an H100 SXM; 1.4x its memory
    # bandwidth, so memory-bound work runs somewhat slower on an H100), the L40S included,
    # which is an assumption (no L40S was measured).
    "gpus": {
        "H100-SXM": {"bf16_dense_tflops": 989.0, "train_mfu": 0.35, "infer_mfu": 0.25},
        "L40S": {"bf16_dense_tflops": 362.0, "train_mfu": 0.30, "infer_mfu": 0.25},
    },
    # USD per hour, us-east-1 Linux, as known to the author in 2025 (check current prices):
    # spot prices vary by zone and hour; the spot figure assumed is the on-demand x the ratio.
    "prices_date": "2025 list prices, to be re-checked on 2026-11-25",
    "instances": {
        "c7i.8xlarge": {"vcpus": 32, "gpus": 0, "on_demand": 1.428, "spot_ratio": 0.40},
        "g6e.12xlarge": {
            "vcpus": 48,
            "gpus": 4,
            "gpu": "L40S",
            "on_demand": 10.493,
            "spot_ratio": 0.45,
        },
        "p5.48xlarge": {
            "vcpus": 192,
            "gpus": 8,
            "gpu": "H100-SXM",
            "on_demand": 55.04,
            "spot_ratio": 0.50,
        },
    },
}

# Named clusters: (CPU workers, GPU workers). Training runs on on-demand GPUs; ingest, index and
# embedding tolerate preemption (they resume) and run on spot.
CLUSTERS = {
    "L40S cluster: 16 x c7i.8xlarge (spot) + 8 x g6e.12xlarge (32 L40S)": {
        "cpu": ("c7i.8xlarge", 16),
        "gpu": ("g6e.12xlarge", 8),
    },
    "H100 cluster: 16 x c7i.8xlarge (spot) + 4 x p5.48xlarge (32 H100)": {
        "cpu": ("c7i.8xlarge", 16),
        "gpu": ("p5.48xlarge", 4),
    },
}


@dataclass
class Measured:
    ingest_audio_s_per_cpu_s: float
    ingest_source: dict
    embed_cpu_segments_per_cpu_s: float
    forward_flops_per_segment: float
    train_flops_per_sample: float
    embed_source: dict
    # Measured on a GPU (gpu_throughput.jsonl, benchmarks/gpu_throughput.py), when present:
    # the rates of bf16 pretraining and of the Embedder's GPU default (TF32), with their MFU
    # for the record. None: the MFU assumptions apply.
    gpu: dict | None = None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run the benchmark named in {Path(__file__).name}'s docstring"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def load_gpu(folder: Path, size: str, audio: dict) -> dict | None:
    """The measured GPU figures for ``size`` at the study's audio settings, or None without
    ``gpu_throughput.jsonl``: the fastest bf16 pretraining step and the fastest ``Embedder.embed``
    in TF32 (the GPU default, host round trip included), with the datasheet peak the benchmark
    was given and the MFU against it."""
    path = folder / "gpu_throughput.jsonl"
    if not path.exists():
        return None
    lines = read_jsonl(path)
    rows = [
        r
        for r in lines
        if r.get("size") == size
        and r.get("sample_rate") == audio["sample_rate"]
        and r.get("window_s") == audio["window_s"]
        and "error" not in r
    ]
    train = [
        r
        for r in rows
        if r["figure"] == "gpu_pretrain_step" and r.get("precision") == "bf16-autocast"
    ]
    embed = [r for r in rows if r["figure"] == "gpu_embed" and r.get("precision") == "tf32"]
    ceiling = next((r for r in lines if r.get("figure") == "gpu_ceiling"), None)
    if not train or not embed or ceiling is None:
        raise ValueError(
            f"{path.name} has no bf16 gpu_pretrain_step, tf32 gpu_embed or gpu_ceiling lines "
            f"for size {size!r} at {audio['sample_rate']} Hz, {audio['window_s']} s windows"
        )
    t = max(train, key=lambda r: r["samples_per_s"])
    e = max(embed, key=lambda r: r["embed_segments_per_s"])
    peak = t["achieved_tflops"] / t["mfu_datasheet"]  # the peak the benchmark was given
    forward = e["forward_flops_per_segment"]
    return {
        "gpu": ceiling.get("gpu", "?"),
        "datasheet_tflops": round(peak, 1),
        "train_batch": t["batch"],
        "train_samples_per_s": t["samples_per_s"],
        "train_flops_per_sample": t["train_flops_per_sample"],
        "train_mfu": t["mfu_datasheet"],
        "embed_batch": e["batch"],
        "embed_segments_per_s": e["embed_segments_per_s"],
        "forward_flops_per_segment": forward,
        "infer_mfu": round(forward * e["embed_segments_per_s"] / (peak * 1e12), 4),
    }


def load_measured(folder: Path = MEASURED, size: str = "base") -> Measured:
    ingest = [
        r
        for r in read_jsonl(folder / "ingest_throughput.jsonl")
        if r.get("figure") == "throughput"
        and str(r.get("path", "")).startswith("ray_ingest")
        # the shipped settings only (``--variant`` lines measure alternatives side by side)
        and r.get("variant", "default") == "default"
    ]
    if not ingest:
        raise ValueError("ingest_throughput.jsonl has no ray_ingest throughput line")
    # Audio seconds per CPU second of the whole process tree: stays meaningful on a loaded machine.
    best_ingest = min(ingest, key=lambda r: r["x_realtime_per_cpu_s"])  # the conservative one
    embed = [r for r in read_jsonl(folder / "embed_throughput.jsonl") if r.get("size") == size]
    cpu = next((r for r in embed if r["figure"] == "embed_cpu"), None)
    flops = next((r for r in embed if r["figure"] == "flops"), None)
    if cpu is None or flops is None:
        raise ValueError(f"embed_throughput.jsonl has no embed_cpu/flops lines for size {size!r}")
    return Measured(
        ingest_audio_s_per_cpu_s=best_ingest["x_realtime_per_cpu_s"],
        ingest_source=best_ingest,
        # Per CPU second (process CPU time), as the ingest rate: on a dedicated vCPU that is the
        # wall rate, while this machine's wall rate depends on what else runs on its cores.
        embed_cpu_segments_per_cpu_s=cpu["segments_per_cpu_s"],
        forward_flops_per_segment=flops["forward_flops_per_segment"],
        train_flops_per_sample=flops["train_flops_per_sample"],
        embed_source={"cpu": cpu, "flops": flops},
        gpu=load_gpu(folder, size, ASSUMPTIONS["audio"]),
    )


def segments_for(hours: float, audio: dict) -> float:
    return hours * 3600.0 / audio["hop_s"]


def stage_hours(hours: float, m: Measured, cluster: dict, a: dict = ASSUMPTIONS) -> dict[str, dict]:
    """Wall hours and instance hours of each stage for ``hours`` of audio on ``cluster``."""
    cpu_type, cpu_nodes = cluster["cpu"]
    gpu_type, gpu_nodes = cluster["gpu"]
    cpu_inst, gpu_inst = a["instances"][cpu_type], a["instances"][gpu_type]
    gpu = a["gpus"][gpu_inst["gpu"]]
    vcpus = cpu_nodes * cpu_inst["vcpus"] * a["vcpu_per_core_equivalent"]
    n_gpus = gpu_nodes * gpu_inst["gpus"]
    segments = segments_for(hours, a["audio"])

    ingest_cpu_s = hours * 3600.0 / m.ingest_audio_s_per_cpu_s
    pretrain_segments = (
        segments_for(min(hours, a["pretrain_cap_hours"]), a["audio"]) * a["pretrain_epochs"]
    )
    if m.gpu is not None:
        # The measured GPU's rates, scaled by peak: the same MFU on this GPU.
        speed = gpu["bf16_dense_tflops"] / m.gpu["datasheet_tflops"]
        pretrain_gpu_s = pretrain_segments / (m.gpu["train_samples_per_s"] * speed)
        embed_gpu_s = segments / (m.gpu["embed_segments_per_s"] * speed)
    else:  # assumed MFU
        peak = gpu["bf16_dense_tflops"] * 1e12
        pretrain_gpu_s = m.train_flops_per_sample * pretrain_segments / (peak * gpu["train_mfu"])
        embed_gpu_s = m.forward_flops_per_segment * segments / (peak * gpu["infer_mfu"])
    build = a["index_build"]
    scale = segments / build["vectors"]
    index_cpu_s = build["build_s"] * build["cores"] * scale * math.sqrt(max(scale, 1.0))

    out = {
        "ingest": {
            "wall_h": ingest_cpu_s / vcpus / 3600,
            "nodes": cpu_nodes,
            "instance": cpu_type,
            "market": "spot",
        },
        "pretrain": {
            "wall_h": pretrain_gpu_s / n_gpus / 3600,
            "nodes": gpu_nodes,
            "instance": gpu_type,
            "market": "on_demand",
        },
        "embed": {
            "wall_h": embed_gpu_s / n_gpus / 3600,
            "nodes": gpu_nodes,
            "instance": gpu_type,
            "market": "spot",
        },
        "index": {
            "wall_h": index_cpu_s / vcpus / 3600,
            "nodes": cpu_nodes,
            "instance": cpu_type,
            "market": "spot",
        },
    }
    for stage in out.values():
        inst = a["instances"][stage["instance"]]
        price = inst["on_demand"] * (inst["spot_ratio"] if stage["market"] == "spot" else 1.0)
        stage["cost_usd"] = stage["wall_h"] * stage["nodes"] * price
        stage["cost_usd_all_on_demand"] = stage["wall_h"] * stage["nodes"] * inst["on_demand"]
    # Embedding on the CPU workers instead (measured per-worker rate), for comparison.
    out["embed_on_cpu_workers"] = {
        "wall_h": segments / m.embed_cpu_segments_per_cpu_s / vcpus / 3600,
        "nodes": cpu_nodes,
        "instance": cpu_type,
        "market": "spot",
    }
    inst = a["instances"][cpu_type]
    out["embed_on_cpu_workers"]["cost_usd"] = (
        out["embed_on_cpu_workers"]["wall_h"] * cpu_nodes * inst["on_demand"] * inst["spot_ratio"]
    )
    return out


def study(m: Measured) -> list[dict]:
    rows = []
    for name, cluster in CLUSTERS.items():
        for hours in CORPUS_HOURS:
            stages = stage_hours(hours, m, cluster)
            bottleneck = max(STAGES, key=lambda s: stages[s]["wall_h"])
            for stage, fig in stages.items():
                rows.append(
                    {
                        "cluster": name,
                        "corpus_hours": hours,
                        "stage": stage,
                        "wall_h": round(fig["wall_h"], 3),
                        "cost_usd": round(fig["cost_usd"], 0),
                        "instance": f"{fig['nodes']} x {fig['instance']} ({fig['market']})",
                        "bottleneck": stage == bottleneck,
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = []
    for name in CLUSTERS:
        lines += [
            f"**{name}**",
            "",
            "| corpus (hours of audio) | " + " | ".join(STAGES) + " | total | "
            "embed on the CPU workers instead |",
            "|---" * (len(STAGES) + 3) + "|",
        ]
        for hours in CORPUS_HOURS:
            cells = {
                r["stage"]: r for r in rows if r["cluster"] == name and r["corpus_hours"] == hours
            }
            total_h = sum(cells[s]["wall_h"] for s in STAGES)
            total_usd = sum(cells[s]["cost_usd"] for s in STAGES)

            def cell(r):
                text = f"{r['wall_h']:,.2f} h, ${r['cost_usd']:,.0f}"
                return f"**{text}**" if r["bottleneck"] else text

            cpu = cells["embed_on_cpu_workers"]
            lines.append(
                f"| {hours:,} | "
                + " | ".join(cell(cells[s]) for s in STAGES)
                + f" | {total_h:,.1f} h, ${total_usd:,.0f} | {cpu['wall_h']:,.1f} h, ${cpu['cost_usd']:,.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CLUSTERS), figsize=(6 * len(CLUSTERS), 4.5), sharey=True)
    colors = {"ingest": "#4c72b0", "pretrain": "#dd8452", "embed": "#55a868", "index": "#c44e52"}
    for ax, name in zip(axes, CLUSTERS):
        width = 0.2
        for i, stage in enumerate(STAGES):
            values = [
                next(
                    r["wall_h"]
                    for r in rows
                    if r["cluster"] == name and r["corpus_hours"] == h and r["stage"] == stage
                )
                for h in CORPUS_HOURS
            ]
            ax.bar(
                [x + (i - 1.5) * width for x in range(len(CORPUS_HOURS))],
                values,
                width,
                label=stage,
                color=colors[stage],
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(CORPUS_HOURS)), [f"{h:,} h" for h in CORPUS_HOURS])
        ax.set_xlabel("corpus (hours of audio)")
        ax.set_title(name.split(":")[0] + ":\n" + name.split(":", 1)[1].strip(), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("wall-clock hours per stage (log)")
    axes[0].legend()
    fig.suptitle(
        "mess-ray scaling on paper: measured CPU and H200 rates x datasheet peaks and prices",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--measured", default=str(MEASURED), help="folder with the benchmarks' JSON lines"
    )
    parser.add_argument("--size", default="base", help="encoder size whose FLOPs are used")
    parser.add_argument("--markdown", default=None, help="write the table here")
    parser.add_argument("--plot", default=None, help="write the PNG plot here")
    args = parser.parse_args(argv)
    m = load_measured(Path(args.measured), args.size)
    print(
        json.dumps(
            {
                "figure": "inputs_measured",
                "ingest_audio_s_per_cpu_s": m.ingest_audio_s_per_cpu_s,
                "embed_cpu_segments_per_cpu_s": m.embed_cpu_segments_per_cpu_s,
                "forward_flops_per_segment": m.forward_flops_per_segment,
                "train_flops_per_sample": m.train_flops_per_sample,
                "gpu": m.gpu,
            }
        )
    )
    print(json.dumps({"figure": "inputs_assumed", **ASSUMPTIONS}))
    rows = study(m)
    for row in rows:
        print(json.dumps({"figure": "stage", **row}))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
