"""The render job: every (piece, style) pair becomes a WAV in a versioned artifact.

Layout written under the storage root::

    render/<version>/audio/<track_id>.wav
    render/<version>/audio/<track_id>.mid  the expressive MIDI that was synthesised
    render/<version>/catalog.parquet      one row per track (CATALOG_SCHEMA)
    render/<version>/manifest.json        inputs, counts, seconds of audio
    render/LATEST

Each piece is parsed once by a Ray task; its styles are rendered by one task each, which
synthesizes to a local temp file and uploads it through :class:`Storage` (so an s3:// root
works the same as a folder). Failures are per track: a piece that cannot be parsed or
rendered is logged, counted and listed in the manifest, and the other tracks still publish.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import traceback
import zlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from mess_ray import style_grid
from mess_ray.config import MessRayConfig, RenderConfig, StorageConfig, StyleSpec
from mess_ray.render.chains import DRY, ChainSpec, render_with_chain, resolve_chain
from mess_ray.render.expressive import apply_style, as_played
from mess_ray.render.sources import Score, ScoreRef, list_score_refs, load_score
from mess_ray.render.synth import check_soundfont, fluidsynth_binary, render_to_wav
from mess_ray.splits import split_by_piece
from mess_ray.storage import Storage, new_version

log = logging.getLogger(__name__)

STAGE = "render"
TASK_CPUS = 0.5
CATALOG_FILE = "catalog.parquet"
CATALOG_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("path", pa.string()),  # relative to render/<version>/
        ("midi_path", pa.string()),  # the performed MIDI, relative to render/<version>/
        ("piece_id", pa.string()),
        ("composer", pa.string()),
        ("title", pa.string()),
        ("style", pa.string()),  # "" for performances rendered as played
        ("style_params_json", pa.string()),
        ("seed", pa.int64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("source", pa.string()),
        ("performance_id", pa.string()),  # the track id without the chain: one per performance
        ("chain_id", pa.string()),  # chain name + parameter digest (mess_ray.render.chains)
        ("chain_json", pa.string()),  # every parameter of the recording chain
    ]
)
MAX_LISTED_FAILURES = 50


def track_id(piece_id: str, label: str) -> str:
    """``<piece_id>__<style>`` (for ASAP performances the label is the performer tag)."""
    if not piece_id or not label:
        raise ValueError("track ids need a piece id and a style/variant label")
    return f"{piece_id}__{label}"


def track_seed(base_seed: int, tid: str) -> int:
    """Per-track seed that depends only on the track id: adding pieces changes no other track."""
    return (base_seed * 1_000_003 + zlib.crc32(tid.encode())) % (2**31)


def plan_tracks(
    refs: list[ScoreRef], styles: list[StyleSpec]
) -> list[tuple[ScoreRef, StyleSpec | None, str]]:
    """All (piece, style, track id) triples; performances (a ``variant``) play unstyled."""
    names = [s.name for s in styles]
    if len(set(names)) != len(names):
        raise ValueError(f"render.styles has duplicate names: {names}")
    plan: list[tuple[ScoreRef, StyleSpec | None, str]] = []
    for ref in refs:
        if ref.variant:
            plan.append((ref, None, track_id(ref.piece_id, ref.variant)))
        else:
            if not styles:
                raise ValueError("render.styles is empty: nothing to render scores with")
            plan.extend((ref, style, track_id(ref.piece_id, style.name)) for style in styles)
    return plan


def chain_plan(
    plan: list[tuple[ScoreRef, StyleSpec | None, str]],
    chains: list[str],
    eval_chains: list[str],
    held_out_pieces: set[str],
    train_piece_chains: list[str] | tuple[str, ...] = (),
) -> list[tuple[ScoreRef, StyleSpec | None, str, str]]:
    """Every planned track through every chain: (ref, style, track id, chain name). Only
    ``chains == ['dry']`` keeps the bare track ids; otherwise ``<track id>__<chain>``.
    Evaluation-only chains render held-out pieces only; ``train_piece_chains`` the other
    (training) pieces only."""
    bare = list(chains) == [DRY] and not eval_chains and not train_piece_chains
    out = []
    for ref, style, tid in plan:
        held = ref.piece_id in held_out_pieces
        names = list(chains) + list(eval_chains if held else train_piece_chains)
        for name in names:
            out.append((ref, style, tid if bare else f"{tid}__{name}", name))
    return out


def grid_score_ref(ref: ScoreRef) -> ScoreRef | None:
    """Where a piece's score is, for the style grid: a score ref itself, an ASAP performance's
    ``midi_score``; None for performances without one."""
    if not ref.variant:
        return ref
    uri = ref.extra.get("midi_score_uri")
    if not uri:
        return None
    return ScoreRef(
        ref.piece_id,
        ref.composer,
        ref.title,
        ref.source,
        uri,
        extra={"midi_score": ref.extra.get("midi_score", "")},
    )


def grid_plan(
    refs: list[ScoreRef], cfg: RenderConfig, held_out_pieces: set[str]
) -> list[tuple[ScoreRef, StyleSpec, str, str]]:
    """Style-grid renderings (:mod:`mess_ray.style_grid`): for each piece with a score,
    ``style_grid.eval_renders`` evaluation combinations if it is held out, else
    ``style_grid.train_renders`` training combinations (the same ones for every training piece);
    (score ref, style, track id, chain)."""
    grid = cfg.style_grid
    if not (grid.eval_renders or grid.train_renders):
        return []
    hits = style_grid.preset_collisions(cfg.styles)
    if hits:
        raise ValueError(
            "render.styles use values of the held-out style grid (a model trained on them would "
            f"have heard an evaluation value): {hits}"
        )
    out, seen = [], set()
    for ref in refs:
        score = None if ref.piece_id in seen else grid_score_ref(ref)
        if score is None:
            continue
        seen.add(ref.piece_id)
        side = style_grid.EVAL if ref.piece_id in held_out_pieces else style_grid.TRAIN
        count = grid.eval_renders if side == style_grid.EVAL else grid.train_renders
        # Training combinations are shared by every training piece: their style labels are
        # fine-tuning classes, whose positives are other pieces. Evaluation ones vary by piece.
        key = ref.piece_id if side == style_grid.EVAL else "train-pieces"
        for combo in style_grid.sample_combinations(side, count, cfg.seed, key):
            style = style_grid.style_spec(combo, side)
            out.append((score, style, track_id(ref.piece_id, style.name), style_grid.CHAIN))
    return out


def grid_chain(cfg: RenderConfig) -> ChainSpec:
    """The grid renderings' chain: render.soundfont, loudness-normalised, nothing else."""
    return ChainSpec(name=style_grid.CHAIN, soundfont=cfg.soundfont, lufs=cfg.style_grid.lufs)


def render_track(
    score: Score,
    ref: ScoreRef,
    style: StyleSpec | None,
    tid: str,
    cfg: RenderConfig,
    storage: Storage,
    version: str,
    chain_name: str = DRY,
) -> dict[str, Any]:
    """Perform, synthesize, record through the chain and upload one track; returns its catalog
    row. The performance (expressive MIDI) depends on the performance id only, so every chain
    of one performance plays the same notes."""
    performance_id = tid[: -len(f"__{chain_name}")] if tid.endswith(f"__{chain_name}") else tid
    seed = track_seed(cfg.seed, performance_id)
    if style is None:
        midi, params = as_played(score.midi, cfg.max_duration_s)
        params.update(ref.extra)
    else:
        midi, params = apply_style(score.midi, style, seed, cfg.max_duration_s)
        if style_grid.is_grid_style(style.name):
            values = {n: getattr(style, n) for n in style_grid.PARAMETERS}
            params[style_grid.PARAMETER_KEY] = {
                "side": style_grid.combination_side(values),
                "values": values,
                **ref.extra,
            }
    rel = posixpath.join("audio", f"{tid}.wav")
    midi_rel = posixpath.join("audio", f"{tid}.mid")
    with tempfile.TemporaryDirectory(prefix="mess-ray-render-") as tmp:
        local = os.path.join(tmp, f"{tid}.wav")
        chain = (
            grid_chain(cfg)
            if chain_name == style_grid.CHAIN
            else resolve_chain(chain_name, cfg.soundfont)
        )
        if chain_name == DRY:
            duration = render_to_wav(midi, cfg, local)
            chain_params = chain.model_dump(mode="json")
        else:
            duration, chain_params = render_with_chain(midi, cfg, chain, local)
        # Kept beside the audio: MIDI descriptors of a segment come from exactly what was played.
        local_midi = os.path.join(tmp, f"{tid}.mid")
        midi.write(local_midi)
        storage.put_file(local_midi, posixpath.join(STAGE, version, midi_rel))
        storage.put_file(local, posixpath.join(STAGE, version, rel))
    return {
        "track_id": tid,
        "path": rel,
        "midi_path": midi_rel,
        "piece_id": score.piece_id,
        "composer": score.composer,
        "title": score.title,
        "style": style.name if style else "",
        "style_params_json": json.dumps(params, sort_keys=True),
        "seed": seed,
        "duration_s": round(duration, 4),
        "sample_rate": cfg.sample_rate,
        "source": ref.source,
        "performance_id": performance_id,
        "chain_id": chain.chain_id,
        "chain_json": json.dumps(chain_params, sort_keys=True),
    }


@ray.remote(num_cpus=TASK_CPUS)
def _load_task(ref: ScoreRef) -> Score | str:
    """The parsed score, or the error text (so dependent tasks can report, not crash)."""
    try:
        return load_score(ref)
    except Exception as exc:  # any parse failure skips the piece
        return f"{type(exc).__name__}: {exc}"


@ray.remote(num_cpus=TASK_CPUS)
def _render_task(
    score: Score | str,
    ref: ScoreRef,
    style: StyleSpec | None,
    tid: str,
    cfg: RenderConfig,
    storage_cfg: StorageConfig,
    version: str,
    chain_name: str = DRY,
) -> dict[str, Any]:
    if isinstance(score, str):
        return {"error": score, "track_id": tid, "piece_id": ref.piece_id}
    try:
        return render_track(
            score, ref, style, tid, cfg, Storage.from_config(storage_cfg), version, chain_name
        )
    except Exception as exc:
        log.debug("render of %s failed:\n%s", tid, traceback.format_exc())
        return {"error": f"{type(exc).__name__}: {exc}", "track_id": tid, "piece_id": ref.piece_id}


def _worker_storage_config(storage: Storage) -> StorageConfig:
    """Storage settings for workers: pin the S3 endpoint the driver uses right now."""
    endpoint = storage.s3_endpoint_url
    if endpoint is None and storage.protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return StorageConfig(root=storage.root, s3_endpoint_url=endpoint)


def write_catalog(storage: Storage, version: str, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["track_id"]), schema=CATALOG_SCHEMA)
    with storage.open(posixpath.join(STAGE, version, CATALOG_FILE), "wb") as f:
        pq.write_table(table, f)


def read_catalog(storage: Storage, version: str | None = None) -> pa.Table:
    """The catalog of a render version (default: the latest published one)."""
    version = version or storage.require_latest(STAGE)
    with storage.open(posixpath.join(STAGE, version, CATALOG_FILE), "rb") as f:
        return pq.read_table(f)


def run_render(cfg: MessRayConfig, storage: Storage) -> dict:
    """Render every (piece, style) pair of ``cfg.render`` and publish the "render" artifact."""
    from mess_ray.raylocal import ensure_ray

    rcfg = cfg.render
    check_soundfont(rcfg.soundfont)  # fail before starting any task
    fluidsynth_binary()
    refs = list_score_refs(rcfg)
    held_out = set(
        split_by_piece(
            [r.piece_id for r in refs], cfg.eval.holdout_fraction, cfg.eval.seed
        ).held_out
    )
    for name in [*rcfg.chains, *rcfg.eval_chains, *rcfg.train_piece_chains]:
        chain = resolve_chain(name, rcfg.soundfont)  # fail before starting any task
        check_soundfont(chain.soundfont or rcfg.soundfont)
    grid = grid_plan(refs, rcfg, held_out)  # checks the presets before any task starts
    plan = chain_plan(
        plan_tracks(refs, rcfg.styles),
        rcfg.chains,
        rcfg.eval_chains,
        held_out,
        rcfg.train_piece_chains,
    )
    plan += grid
    version = new_version()
    log.info("render %s: %d pieces, %d tracks", version, len({r.piece_id for r in refs}), len(plan))

    ensure_ray(cfg.ray)
    storage_cfg = _worker_storage_config(storage)
    # One parse per source file, shared by all of its style tasks through the object store.
    loaded = {(ref.piece_id, ref.variant): _load_task.remote(ref) for ref in refs}
    for ref, _, _, _ in grid:
        if (ref.piece_id, ref.variant) not in loaded:  # an ASAP piece's score
            loaded[(ref.piece_id, ref.variant)] = _load_task.remote(ref)
    pending = [
        _render_task.remote(
            loaded[(ref.piece_id, ref.variant)], ref, style, tid, rcfg, storage_cfg, version, chain
        )
        for ref, style, tid, chain in plan
    ]
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    with tqdm(total=len(pending), desc="render", unit="track") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])
            if "error" in result:
                log.warning("skipping track %s: %s", result["track_id"], result["error"])
                failures.append(result)
            else:
                rows.append(result)
            bar.update(1)
    if not rows:
        raise RuntimeError(
            f"render produced no tracks ({len(failures)} failed); first error: "
            f"{failures[0]['error'] if failures else 'nothing planned'}"
        )

    write_catalog(storage, version, rows)
    rendered_pieces = {r["piece_id"] for r in rows}
    failed_pieces = sorted({f["piece_id"] for f in failures})
    manifest = {
        "inputs": {
            "source": rcfg.source,
            "source_path": rcfg.source_path,
            "pieces": sorted({r.piece_id for r in refs}),
            "styles": [s.name for s in rcfg.styles],
            "soundfont": rcfg.soundfont,
            "chains": list(rcfg.chains),
            "eval_chains": list(rcfg.eval_chains),
            "style_grid": rcfg.style_grid.model_dump(mode="json"),
            "train_piece_chains": list(rcfg.train_piece_chains),
            "config_digest": cfg.digest(),
        },
        "counts": {
            "pieces": len(rendered_pieces),
            "styles": len({r["style"] for r in rows}),
            "tracks": len(rows),
            "failed": len(failures),
            "failed_pieces": len(failed_pieces),
            "style_grid_tracks": sum(style_grid.is_grid_style(r["style"]) for r in rows),
        },
        "seconds_of_audio": round(sum(r["duration_s"] for r in rows), 3),
        "sample_rate": rcfg.sample_rate,
        "catalog": CATALOG_FILE,
        "failures": [
            {k: f[k] for k in ("track_id", "error")} for f in failures[:MAX_LISTED_FAILURES]
        ],
    }
    return storage.publish(STAGE, version, manifest)
