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
from mess_ray.facets import parse_weight_items  # noqa: E402
from mess_ray.models import shipped  # noqa: E402

REFERENCE_SEEDS = (0, 1, 2)
# The licence a training corpus puts on weights learned from it (recorded in the manifest).
TRAINING_DATA_LICENCES = {
    "music21": "the corpus bundled with music21 (distributed with music21 under BSD-3-Clause)",
    "asap": "ASAP / asap-dev performances: CC BY-NC-SA 4.0 (non-commercial, share alike)",
}


def recipe_description(cfg) -> str:
    """One line on what the shipped model is and what it heard, from its recipe."""
    r = cfg.render
    size = cfg.model.size
    head = (
        f"{size} HuBERT-style encoder (SSL-pretrained, then contrastively fine-tuned with facet "
        "heads) trained on "
    )
    if r.source == "asap":
        chains = [*r.chains, *r.train_piece_chains]
        return head + (
            f"the training pieces of {r.num_pieces} asap-dev pieces (human performances, first "
            f"{r.max_duration_s:g} s, performed MIDI rendered through the recording chains "
            f"{', '.join(chains)}; the held-out pieces and test-side pianists left out)"
        )
    if r.source == "music21":
        return head + (
            f"{r.num_pieces} music21 pieces x {len(r.styles)} synthetic expressive styles "
            "(FluidSynth)"
        )
    return head + f"a {r.source} corpus ({r.source_path})"


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


def heard_record(storage) -> dict | None:
    """The pianists the store's latest fine-tuning (its pretraining included) heard, from their
    manifests; None when a manifest does not record them."""
    from mess_ray.eval.protocol import heard_pianists

    heard, sources = heard_pianists(storage, ["finetune"], {})
    if heard is None or any("no pianists record" in v for v in sources.values()):
        return None
    return {"heard": sorted(heard), "from": sources}


def protocol_benchmark(table: dict, system: str, command: str) -> dict:
    """The shipped manifest's ``benchmark`` from a protocol table (``table.json``): the headline
    rows of every system on both splits, the shipped model among them as ``system``, with
    the split each row comes from (validation chose, test was reported once)."""
    from mess_ray.eval.protocol import figure_fields, headline_rows

    # Variants of a system (``+work-rel``, ``+rec-rel``) stay in the table; figures to 4 digits.
    rows = [r for r in headline_rows(table["rows"]) if "+" not in r["system"]]
    systems = {r["system"] for r in rows}
    if system not in systems:
        raise SystemExit(f"no system {system!r} in the table (systems: {sorted(systems)})")
    summary = table.get("summary") or {}
    return {
        "split": "validation and test pieces of the protocol split (each row says which); "
        "validation chose the default, test was computed once after that choice",
        "command": command,
        "shipped_as": system,
        "reference": summary.get("reference"),
        "held_out_pieces": summary.get("split"),
        "rows": [{k: _round(v) for k, v in figure_fields(r).items()} for r in rows],
    }


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def attach_protocol(out: Path, table_path: Path, system: str, command: str) -> None:
    manifest_path = out / shipped.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["benchmark"] = protocol_benchmark(json.loads(table_path.read_text()), system, command)
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def rows_benchmark(paths: list[Path], system: str, command: str) -> dict:
    """The shipped manifest's ``benchmark`` from protocol rows in JSON lines (every system's rows
    of both splits, paired against ``system``)."""
    from mess_ray.eval.protocol import figure_fields, headline_rows

    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                if row.get("task") and row.get("system"):
                    rows.append(row)
    rows = headline_rows(rows)
    mine = [r for r in rows if r["system"] == system]
    if {r["split"] for r in mine} != {"validation", "test"}:
        raise SystemExit(f"--attach-rows needs {system!r} on both splits")
    if {r.get("reference") for r in rows if r.get("reference")} != {system}:
        raise SystemExit(f"--attach-rows needs rows paired against {system!r}")
    return {
        "split": "validation and test pieces of the protocol split (each row says which); "
        "validation chose the default, test was computed once after that choice",
        "command": command,
        "shipped_as": system,
        "reference": system,
        "rows": [{k: _round(v) for k, v in figure_fields(r).items()} for r in rows],
    }


def attach_rows(out: Path, paths: list[Path], system: str, command: str) -> None:
    manifest_path = out / shipped.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["benchmark"] = rows_benchmark(paths, system, command)
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shipped-tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default=shipped.DEFAULT_SHIPPED)
    parser.add_argument("--out", default=None, help="default: mess_ray/models/shipped/<name>")
    parser.add_argument("--skip-evaluate", action="store_true", help="quick reproducibility runs")
    parser.add_argument(
        "--attach-protocol",
        metavar="TABLE_JSON",
        default=None,
        help="train nothing: copy the headline rows of a protocol table (eval/<v>/protocol/"
        "table.json of the recipe's store, the shipped model evaluated there as --system) into "
        "the shipped folder's manifest as its benchmark",
    )
    parser.add_argument(
        "--system", default="finetune", help="the shipped model's name in that table"
    )
    parser.add_argument(
        "--derive",
        metavar="SHIPPED",
        default=None,
        help="train nothing: ship --name as SHIPPED's weights plus what --content-timeline adds "
        "(the manifest names SHIPPED as weights_of; attach its protocol rows afterwards)",
    )
    parser.add_argument(
        "--content-timeline",
        nargs=2,
        type=float,
        default=None,
        metavar=("CHROMA", "ONSET"),
        help="with --derive: append the chroma and onset timelines at these frame rates",
    )
    parser.add_argument(
        "--query-lags",
        nargs=2,
        type=float,
        default=None,
        metavar=("MAX_MS", "STEP_MS"),
        help="with --content-timeline: queries are also tried with the timeline moved up to "
        "+-MAX_MS every STEP_MS, each candidate scored at its best lag",
    )
    parser.add_argument(
        "--query-facet-weights",
        default=None,
        metavar="NAME=W,...",
        help="with --derive: the per-part weights its queries are searched with when a query "
        "names none (the service's facet weights; unnamed parts 0)",
    )
    parser.add_argument(
        "--attach-rows",
        nargs="+",
        default=None,
        metavar="JSONL",
        help="train nothing: the protocol rows of these JSON-lines files (benchmarks."
        "protocol_context on both splits, the shipped model as --system and paired reference) "
        "as the manifest's benchmark",
    )
    parser.add_argument(
        "--protocol-command", default="", help="the command that produced that table (recorded)"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="library and Ray logs on the terminal (default: <storage root>/logs, as the CLI)",
    )
    args = parser.parse_args(argv)
    if args.attach_protocol:
        out = Path(args.out) if args.out else shipped.SHIPPED_ROOT / args.name
        attach_protocol(out, Path(args.attach_protocol), args.system, args.protocol_command)
        print(f"{out / shipped.MANIFEST}: benchmark from {args.attach_protocol}")
        return 0

    if args.attach_rows:
        out = Path(args.out) if args.out else shipped.SHIPPED_ROOT / args.name
        attach_rows(out, [Path(p) for p in args.attach_rows], args.system, args.protocol_command)
        print(f"{out / shipped.MANIFEST}: benchmark from {' '.join(args.attach_rows)}")
        return 0
    if args.derive:
        return derive(args)

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


# What a derived model takes from its source's manifest unchanged (the same weights).
INHERITED = ("training_data_licence", "recipe", "weights_sha256", "pianists", "training")


def reference_record(cfg) -> dict:
    """The manifest's description of the reference clips' embeddings (what the auto-reference
    check recomputes at load)."""
    return {
        "file": shipped.REFERENCE,
        "clip": "mess_ray.models.shipped.reference_clip(seed, sample_rate, window_s)",
        "seeds": list(REFERENCE_SEEDS),
        "sample_rate": cfg.audio.sample_rate,
        "window_s": cfg.audio.window_s,
    }


def derive(args: argparse.Namespace) -> int:
    """Write ``--name`` as ``--derive``'s weights with the content timeline appended: a manifest
    naming the source (``weights_of``), the declaration, and reference vectors of its own. No
    figures yet: ``--attach-protocol`` adds them (the shipped-model tests require them)."""
    import tempfile

    source = shipped.shipped_manifest(args.derive)
    if source.get("weights_of"):
        raise SystemExit(f"--derive {args.derive}: it is itself derived; derive from its source")
    if not args.content_timeline or min(args.content_timeline) <= 0:
        raise SystemExit("--derive needs --content-timeline CHROMA ONSET (positive frame rates)")
    out = Path(args.out) if args.out else shipped.SHIPPED_ROOT / args.name
    if out.resolve() == shipped.shipped_dir(args.derive).resolve():
        raise SystemExit("--derive writes a new folder: give another --name or --out")
    chroma, onset = args.content_timeline
    declared = {"chroma_rate": chroma, "onset_rate": onset}
    what_lags = ""
    if args.query_lags:
        lag, step = args.query_lags
        if lag <= 0 or step <= 0:
            raise SystemExit("--query-lags takes positive MAX_MS and STEP_MS")
        declared.update(query_shift_ms=lag, query_step_ms=step)
        what_lags = (
            f"; each query also tried with its timeline moved up to +-{lag:g} ms every "
            f"{step:g} ms, a candidate scored at its best lag"
        )
    config_file = ROOT / source["recipe"]["config_file"]
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(
            str(config_file),
            [
                f"storage.root={scratch}",
                "model.content_timeline=true",
                f"model.content_timeline_rates=[{chroma}, {onset}]",
            ],
        )
        seeds, vectors = reference_vectors(cfg, shipped.model_dir(args.derive))
    weights, what_weights = None, ""
    if args.query_facet_weights:
        weights = parse_weight_items(args.query_facet_weights.split(","), "--query-facet-weights")
        what_weights = (
            "; queries searched with the parts weighted "
            + ", ".join(f"{k} {v:g}" for k, v in weights.items())
            + " (the indexed vectors unchanged)"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    np.savez(out / shipped.REFERENCE, seeds=seeds, vectors=vectors)
    manifest = {
        "name": args.name,
        "what": f"{args.derive}'s weights (its manifest: {source['what']}), with the "
        f"passage's chroma and onset timelines (mess_ray.content.timelines at {chroma:g} and "
        f"{onset:g} frames per second, no learning) appended as a last 'timeline' part"
        + what_lags
        + what_weights,
        "weights_of": args.derive,
        "content_timeline": declared,
        **({"query_facet_weights": weights} if weights else {}),
        **{key: source[key] for key in INHERITED if key in source},
        "benchmark": {
            "split": "none yet: attach the protocol table (--attach-protocol)",
            "command": "",
        },
        "reference": reference_record(cfg),
    }
    (out / shipped.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    print(f"{out}: {args.derive}'s weights + content timeline ({chroma:g}, {onset:g} fps)")
    return 0


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
    pianists = heard_record(storage)
    manifest = {
        "name": args.name,
        "what": recipe_description(cfg),
        "training_data_licence": TRAINING_DATA_LICENCES.get(cfg.render.source),
        "recipe": {
            "command": " ".join(
                ["nice -n 10 .venv/bin/python scripts/ship_model.py", *sys.argv[1:]]
            ),
            "config_file": str(Path(args.config).resolve().relative_to(ROOT))
            if Path(args.config).resolve().is_relative_to(ROOT)
            else args.config,
            "overrides": args.overrides,
            "config": cfg.model_dump(mode="json", exclude={"storage"}),
            "config_digest": cfg.digest(),
            "wall_s": train_s,
        },
        "weights_sha256": weights_digest(out / shipped.MODEL_DIR),
        # Who the training stages heard (the protocol's unseen-pianist rows read it).
        **({"pianists": pianists} if pianists is not None else {}),
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
            "command": f"mess-ray evaluate --config {args.config} --models pretrain finetune",
            "headline": evaluate.get("headline"),
            "held_out_pieces": evaluate.get("held_out_pieces"),
            "train_pieces": evaluate.get("train_pieces"),
            "counts": evaluate.get("counts"),
            "tasks": evaluate.get("tasks"),
        },
        "reference": reference_record(cfg),
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
