"""The stage registry: one table of every `mess-ray` verb.

Each :class:`Stage` names its runner, its help text, its extra CLI options and, for batch
stages, the cluster it needs as a KubeRay RayJob. ``mess_ray.cli`` builds its parser from the
table, ``mess_ray.pipeline.run_stage`` dispatches through it, ``jobs/<name>.py`` runs the verb of
its own name, and ``deploy/kuberay/render.py`` renders one RayJob per batch stage. Adding a
stage is one entry here (plus its ``jobs/<name>.py`` launcher and a re-run of the renderer).

Runners are ``"module:function"`` strings, imported only when the stage runs, so reading the
table imports nothing heavy. A batch runner is called as ``runner(cfg, storage, **kwargs)`` and
returns its published manifest; a verb runner (``batch=False``) as ``runner(cfg, args)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """One argparse argument: ``parser.add_argument(*flags, **kwargs)``. Options sharing an
    ``exclusive`` group name are mutually exclusive, and one of them is required."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    exclusive: str | None = None


@dataclass(frozen=True)
class Resources:
    """What a batch stage asks the cluster for as a KubeRay RayJob."""

    cpu_max: int  # CPU worker pods at most (autoscaled from 0)
    gpu_max: int  # GPU worker pods at most (0: no GPU group)
    deadline_s: int  # activeDeadlineSeconds of the RayJob


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    runner: str  # "module:function"
    batch: bool = True  # publishes a versioned artifact; runs through pipeline.run_stage
    options: tuple[Option, ...] = ()
    # runner keyword -> attribute of the parsed CLI arguments (batch stages)
    kwargs_from_args: dict[str, str] = field(default_factory=dict)
    resources: Resources | None = None  # batch stages: their RayJob's cluster

    def load_runner(self) -> Callable[..., Any]:
        module, _, name = self.runner.partition(":")
        return getattr(importlib.import_module(module), name)


_SEARCH_OPTIONS = (
    Option(("--url",), {"default": None, "help": "service URL (default: from serve.host/port)"}),
    Option(("--file",), {"help": "audio file to search with"}, exclusive="query"),
    Option(
        ("--track",),
        {"help": "indexed track id to search with (see --start/--end)"},
        exclusive="query",
    ),
    Option(
        ("--start",),
        {"type": float, "default": 0.0, "help": "start time in seconds (with --track)"},
    ),
    Option(
        ("--end",), {"type": float, "default": None, "help": "end time in seconds (with --track)"}
    ),
    Option(("-k",), {"type": int, "default": 10, "help": "number of hits"}),
    Option(
        ("--exclude-track",),
        {"default": None, "help": "drop hits from this track (e.g. the query's own)"},
    ),
    Option(
        ("--min-gap-s",),
        {"type": float, "default": None, "help": "min distance between hits of one track"},
    ),
    Option(
        ("--facet",),
        {
            "action": "append",
            "default": [],
            "metavar": "FACET=WEIGHT",
            "help": "facet weight, repeatable: overall, tempo, dynamics, articulation, timbre",
        },
    ),
    Option(
        ("--mmr",),
        {
            "type": float,
            "default": None,
            "metavar": "LAMBDA",
            "help": "diversity: 1 = pure similarity, lower = more varied hits",
        },
    ),
    Option(
        ("--filter",),
        {
            "action": "append",
            "default": [],
            "metavar": "FIELD=VALUE",
            "help": "metadata filter, repeatable (composer=Bach, style=romantic, ...)",
        },
    ),
    Option(("--json",), {"action": "store_true", "help": "print the raw JSON response"}),
)

_STAGES = (
    Stage(
        "render",
        "Render MIDI scores with expressive transforms to audio (FluidSynth, Ray tasks).",
        "mess_ray.render:run_render",
        resources=Resources(cpu_max=16, gpu_max=0, deadline_s=6 * 3600),
    ),
    Stage(
        "ingest",
        "Decode, resample and cut recordings into timestamped segments (Ray Data).",
        "mess_ray.ingest:run_ingest",
        resources=Resources(cpu_max=16, gpu_max=0, deadline_s=12 * 3600),
    ),
    Stage(
        "pretrain",
        "Self-supervised pretraining of the audio encoder (Ray Train).",
        "mess_ray.train:run_pretrain",
        resources=Resources(cpu_max=4, gpu_max=8, deadline_s=7 * 24 * 3600),
    ),
    Stage(
        "finetune",
        "Contrastive fine-tuning for expressive similarity (Ray Train).",
        "mess_ray.train:run_finetune",
        resources=Resources(cpu_max=4, gpu_max=4, deadline_s=2 * 24 * 3600),
    ),
    Stage(
        "index",
        "Embed every segment on an actor pool and publish a versioned FAISS index.",
        "mess_ray.index:run_index",
        options=(
            Option(
                ("--model",),
                {
                    "default": "auto",
                    "help": "model to embed with: auto (finetune if trained here, else the shipped "
                    "model) | finetune | pretrain | shipped[:NAME] | random | a model folder",
                },
            ),
        ),
        kwargs_from_args={"model_ref": "model"},
        resources=Resources(cpu_max=8, gpu_max=8, deadline_s=24 * 3600),
    ),
    Stage(
        "reindex",
        "Update the latest index: embed only new segments, drop removed ones, publish a new version.",
        "mess_ray.index:run_reindex",
        options=(
            Option(
                ("--model",),
                {
                    "default": None,
                    "help": "optional check that the index was built with this model (default: its own)",
                },
            ),
        ),
        kwargs_from_args={"model_ref": "model"},
        # Under the schedule's period (deploy/kuberay), so two scheduled runs never overlap.
        resources=Resources(cpu_max=16, gpu_max=4, deadline_s=50 * 60),
    ),
    Stage(
        "serve",
        "Run the search service and web page (Ray Serve + FastAPI).",
        "mess_ray.pipeline:serve_verb",
        batch=False,
    ),
    Stage(
        "search",
        "Query a running search service by audio file or by track and time.",
        "mess_ray.pipeline:search_cli",
        batch=False,
        options=_SEARCH_OPTIONS,
    ),
    Stage(
        "passages",
        "Find a passage in every other performance of its work (aligned, with expression curves).",
        "mess_ray.pipeline:passages_cli",
        batch=False,
        options=(
            Option(
                ("--url",), {"default": None, "help": "service URL (default: from serve.host/port)"}
            ),
            Option(("--file",), {"help": "audio clip of the passage"}, exclusive="query"),
            Option(
                ("--track",),
                {"help": "indexed track id (with --start and --end)"},
                exclusive="query",
            ),
            Option(("--start",), {"type": float, "default": None, "help": "passage start (s)"}),
            Option(("--end",), {"type": float, "default": None, "help": "passage end (s)"}),
            Option(("--json",), {"action": "store_true", "help": "print the raw JSON response"}),
        ),
    ),
    Stage(
        "evaluate",
        "Score retrieval on held-out pieces against baselines; write a report.",
        "mess_ray.eval:run_evaluate",
        options=(
            Option(
                ("--models",),
                {
                    "nargs": "*",
                    "default": None,
                    "help": "model refs to compare (baselines 'descriptors' and 'random' always "
                    "run; default: pretrain and finetune where trained here, else the shipped model)",
                },
            ),
        ),
        kwargs_from_args={"model_refs": "models"},
        resources=Resources(cpu_max=4, gpu_max=1, deadline_s=6 * 3600),
    ),
    Stage(
        "quickstart",
        "Search your own recordings: ingest a folder (or s3:// prefix), index it with the shipped "
        "model, serve the web page.",
        "mess_ray.quickstart:quickstart_verb",
        batch=False,
        options=(
            Option(
                ("--audio",),
                {"required": True, "help": "folder (or s3:// prefix) of WAV/FLAC/MP3/... files"},
            ),
            Option(
                ("--manifest",),
                {
                    "default": None,
                    "help": "CSV/Parquet with a 'path' column and composer/title/performer/... "
                    "columns (default: manifest.csv or manifest.parquet in the folder, if any)",
                },
            ),
            Option(
                ("--model",),
                {"default": "shipped", "help": "model ref (default: the shipped model)"},
            ),
            Option(
                ("--no-serve",),
                {"action": "store_true", "help": "stop after indexing (no service)"},
            ),
            Option(
                ("--exit-after-ready",),
                {
                    "action": "store_true",
                    "help": "exit once the page is ready instead of serving until Ctrl-C",
                },
            ),
        ),
    ),
    Stage(
        "demo",
        "Run the whole pipeline on a small generated corpus, query it, evaluate it.",
        "mess_ray.pipeline:demo_verb",
        batch=False,
    ),
)

STAGES: dict[str, Stage] = {stage.name: stage for stage in _STAGES}
BATCH_STAGES: tuple[str, ...] = tuple(s.name for s in _STAGES if s.batch)


def get_stage(name: str, batch: bool | None = None) -> Stage:
    """The registered stage ``name`` (``batch=True``: only batch stages); a clear error otherwise."""
    names = BATCH_STAGES if batch else tuple(STAGES)
    if name not in names:
        kind = "batch stage" if batch else "stage"
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(names)}")
    return STAGES[name]
