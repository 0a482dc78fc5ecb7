"""Regenerate the shipped default model from its recipe (configs/shipped-tiny.yaml).

    nice -n 10 .venv/bin/python scripts/ship_model.py

Renders the demo corpus, ingests it, pretrains and fine-tunes the tiny encoder on one
deterministic worker, evaluates it on the held-out pieces (the *test* split of the evaluate
stage: pieces no training stage saw), then copies the fine-tuned model folder into
``mess_ray/models/shipped/<name>/`` with its manifest (recipe, seeds, losses, figures) and the
reference vectors of a generated clip. Fixed seeds + ``deterministic: true`` + one worker +
Ray Data's ``preserve_order``: a rerun gives the same weights (``--check DIR`` compares the new
weights with a shipped folder bit for bit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mess_ray.config import load_config  # noqa: E402
from mess_ray.models import shipped  # noqa: E402

REFERENCE_SEEDS = (0, 1, 2)


def weights_digest(model_dir: Path) -> str:
    """SHA-256 over every weight file of a model folder (names and bytes, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.suffix in (".pt", ".safetensors", ".bin"):
            import torch

            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            digest.update(str(path.relative_to(model_dir)).encode())
            for key in sorted(state):
                digest.update(key.encode())
                digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def reference_vectors(cfg, model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from mess_ray.models import Embedder
    from mess_ray.storage import Storage

    embedder = Embedder.from_ref(cfg, Storage.from_config(cfg.storage), str(model_dir))
    clips = np.stack(
        [
            shipped.reference_clip(seed, cfg.audio.sample_rate, cfg.audio.window_s)
            for seed in REFERENCE_SEEDS
        ]
    )
    return np.asarray(REFERENCE_SEEDS), embedder.embed(clips)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shipped-tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default=shipped.DEFAULT_SHIPPED)
    parser.add_argument("--out", default=None, help="default: mess_ray/models/shipped/<name>")
    parser.add_argument("--skip-evaluate", action="store_true", help="quick reproducibility runs")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="library and Ray logs on the terminal (default: <storage root>/logs, as the CLI)",
    )
    args = parser.parse_args(argv)

    from mess_ray import console, pipeline
    from mess_ray.storage import Storage

    cfg = pipeline.with_storage_resolved(load_config(args.config, args.overrides))
    storage = Storage.from_config(cfg.storage)
    root = Path(storage.url())
    if (
        storage.protocol == "file" and root.exists()
    ):  # a fresh store: no earlier artifact may leak into the recipe
        shutil.rmtree(root)
    with console.quiet_console(cfg.storage.root, verbose=args.verbose):
        return ship(args, cfg, storage)


def ship(args: argparse.Namespace, cfg, storage) -> int:
    """Train the recipe in ``storage`` and write the shipped folder (console: summary lines)."""
    from ray.data import DataContext

    from mess_ray import console, pipeline

    out = Path(args.out) if args.out else shipped.SHIPPED_ROOT / args.name
    pipeline.ensure_ray(cfg.ray)
    DataContext.get_current().execution_options.preserve_order = True
    started, manifests = time.monotonic(), {}
    stages = ["render", "ingest", "pretrain", "finetune"]
    for stage in stages:
        manifests[stage] = pipeline.run_stage(stage, cfg, storage)
    if not args.skip_evaluate:
        manifests["evaluate"] = pipeline.run_stage(
            "evaluate", cfg, storage, model_refs=["pretrain", "finetune"]
        )
    train_s = round(time.monotonic() - started, 1)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rel = f"finetune/{manifests['finetune']['version']}/model"
    with storage.local_dir(rel) as local:
        shutil.copytree(local, out / shipped.MODEL_DIR)
    seeds, vectors = reference_vectors(cfg, out / shipped.MODEL_DIR)
    np.savez(out / shipped.REFERENCE, seeds=seeds, vectors=vectors)
    evaluate = manifests.get("evaluate", {})
    manifest = {
        "name": args.name,
        "what": "tiny HuBERT-style encoder (SSL-pretrained, then contrastively fine-tuned with "
        "facet heads) trained on 8 music21 pieces x 4 synthetic expressive styles (FluidSynth)",
        "recipe": {
            "command": "nice -n 10 .venv/bin/python scripts/ship_model.py",
            "config_file": str(Path(args.config).resolve().relative_to(ROOT))
            if Path(args.config).resolve().is_relative_to(ROOT)
            else args.config,
            "overrides": args.overrides,
            "config": cfg.model_dump(mode="json", exclude={"storage"}),
            "config_digest": cfg.digest(),
            "wall_s": train_s,
        },
        "weights_sha256": weights_digest(out / shipped.MODEL_DIR),
        "training": {
            stage: {
                "version": manifests[stage].get("version"),
                "counts": manifests[stage].get("counts"),
                "loss_first": manifests[stage].get("losses", {}).get("first"),
                "loss_last": manifests[stage].get("losses", {}).get("last"),
            }
            for stage in ("pretrain", "finetune")
        },
        "benchmark": {
            "split": "test: the evaluate stage's held-out pieces (eval.holdout_fraction, "
            "eval.seed), never seen by pretraining (exclude_eval_holdout) nor fine-tuning",
            "command": "mess-ray evaluate --config configs/shipped-tiny.yaml --models pretrain finetune",
            "headline": evaluate.get("headline"),
            "held_out_pieces": evaluate.get("held_out_pieces"),
            "train_pieces": evaluate.get("train_pieces"),
            "counts": evaluate.get("counts"),
            "tasks": evaluate.get("tasks"),
        },
        "reference": {
            "file": shipped.REFERENCE,
            "clip": "mess_ray.models.shipped.reference_clip(seed, sample_rate, window_s)",
            "seeds": list(REFERENCE_SEEDS),
            "sample_rate": cfg.audio.sample_rate,
            "window_s": cfg.audio.window_s,
        },
    }
    (out / shipped.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    console.say(f"shipped model {args.name} -> {out} ({size / 1e6:.2f} MB, {train_s} s)")
    console.say(f"weights sha256 {manifest['weights_sha256']}")
    if evaluate:
        console.say(f"benchmark (test split): {evaluate.get('headline')}")
    pipeline.shutdown_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())
