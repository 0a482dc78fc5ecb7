"""The benchmark on held-out pieces (``run_evaluate``): task 1 here, tasks 2 and 3 in
:mod:`mess_ray.eval.tasks` over :mod:`mess_ray.performances`; the protocol table
(:mod:`mess_ray.eval.protocol`) is the yardstick.

Task 1, preset style retrieval, is a **renderer sanity check, not evidence**: its styles are the
renderer's own presets, shared by training and held-out pieces, and a preset's tempo, level and
instrument alone identify it. The non-circular style figure is the protocol's
``style_parameters`` task (held-out parameter values, one instrument, loudness-normalised,
Spearman with parameter distance). Protocol of the sanity check: every held-out segment with a known style and piece is a query; candidates are
held-out segments of *other tracks*; a candidate is relevant when it has the query's style
but comes from a different piece (so a system must match how music is played, not what is
played); hard negatives are the same piece played in another style. Each model ref, the
descriptor baseline and a random-init encoder embed the same segments; cosine similarity
ranks candidates; :mod:`mess_ray.eval.metrics` scores the rankings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mess_ray import style_grid
from mess_ray.config import MessRayConfig
from mess_ray.descriptors import descriptor_embeddings
from mess_ray.eval import metrics
from mess_ray.eval.tasks.performance import (
    AGREEMENT_TASK,
    PASSAGE_TASK,
    STYLE_TASK,
    PerformanceTasks,
    plan_performance_tasks,
    score_performance_tasks,
)
from mess_ray.segments import (
    METADATA_COLUMNS,
    decode_audio,
    encode_audio,
    fit_length,
    segments_dataset,
    split_pieces,
    window_samples,
)
from mess_ray.storage import Storage, new_version

log = logging.getLogger(__name__)

DESCRIPTORS = "descriptors"
RANDOM = "random"


@dataclass
class HeldOutSet:
    """Held-out segments in segment_id order: metadata arrays plus fixed-length audio."""

    segment_ids: np.ndarray  # int64 [N]
    track_ids: np.ndarray  # object [N]
    piece_ids: np.ndarray  # object [N]
    styles: np.ndarray  # object [N]
    audio: np.ndarray  # float32 [N, window_samples]
    holdout_pieces: list[str]
    train_pieces: list[str]
    excluded: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.segment_ids.size)


@dataclass
class Protocol:
    """The masks that define the benchmark over a held-out set ([N, N] booleans)."""

    candidates: np.ndarray  # other track
    relevant: np.ndarray  # candidate, same style, other piece
    hard_negatives: np.ndarray  # candidate, same piece, other style
    negatives: np.ndarray  # candidate, other style


# -- pure functions -----------------------------------------------------------------------------
def build_protocol(track_ids, piece_ids, styles) -> Protocol:
    """Candidate / relevance / negative masks from per-segment labels."""
    track_ids, piece_ids, styles = (
        np.asarray(x, dtype=object) for x in (track_ids, piece_ids, styles)
    )
    if not (track_ids.shape == piece_ids.shape == styles.shape) or track_ids.ndim != 1:
        raise ValueError("track_ids, piece_ids and styles must be 1-D and of equal length")
    same_track = track_ids[:, None] == track_ids[None, :]
    same_piece = piece_ids[:, None] == piece_ids[None, :]
    same_style = styles[:, None] == styles[None, :]
    candidates = ~same_track
    return Protocol(
        candidates=candidates,
        relevant=candidates & same_style & ~same_piece,
        hard_negatives=candidates & same_piece & ~same_style,
        negatives=candidates & ~same_style,
    )


def score_system(
    embeddings: np.ndarray,
    protocol: Protocol,
    recall_ks=(1, 10),
    ndcg_k: int = 10,
    margin: float = 0.2,
) -> tuple[dict[str, float], np.ndarray]:
    """Every metric of one system, and its cosine similarity matrix."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] != protocol.candidates.shape[0]:
        raise ValueError(
            f"embeddings shape {embeddings.shape} does not match "
            f"{protocol.candidates.shape[0]} segments"
        )
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms > 1e-12, norms, 1.0)
    similarity = unit @ unit.T
    summary = metrics.retrieval_summary(
        similarity, protocol.relevant, protocol.candidates, recall_ks=recall_ks, ndcg_k=ndcg_k
    )
    loss, accuracy, count = metrics.triplet_margin_loss(
        similarity, protocol.relevant, protocol.hard_negatives, margin=margin
    )
    summary.update(
        {
            "cos_positive": metrics.mean_pair_similarity(similarity, protocol.relevant),
            "cos_hard_negative": metrics.mean_pair_similarity(similarity, protocol.hard_negatives),
            "cos_negative": metrics.mean_pair_similarity(similarity, protocol.negatives),
            "triplet_loss": loss,
            "triplet_accuracy": accuracy,
            "triplets": count,
        }
    )
    return summary, similarity


def headline(system_metrics: dict[str, dict[str, float]], num_pieces: int) -> str:
    """One line: mAP of every system side by side, with the chance level."""
    parts = [f"{name} {m['map']:.2f}" for name, m in system_metrics.items()]
    chance = next(iter(system_metrics.values()))["chance"] if system_metrics else float("nan")
    return (
        f"style retrieval mAP (preset sanity check) on {num_pieces} held-out pieces: "
        + " vs ".join(parts)
        + f" (chance {chance:.2f})"
    )


def system_order(model_refs: list[str]) -> list[str]:
    """Model refs as given (deduplicated), then the descriptor baseline, then random."""
    ordered: list[str] = []
    for ref in [*model_refs, DESCRIPTORS, RANDOM]:
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"model refs must be non-empty strings, got {ref!r}")
        if ref not in ordered:
            ordered.append(ref)
    return ordered


# -- data ---------------------------------------------------------------------------------------
def load_held_out(cfg: MessRayConfig, storage: Storage, version: str) -> HeldOutSet:
    """Held-out segments with a style and a piece, audio cropped/padded to the model window."""
    dataset = segments_dataset(storage, version)
    meta = dataset.to_table(columns=["piece_id", "style"])
    if meta.num_rows == 0:
        raise ValueError(f"ingest artifact {version} has no segments")
    all_pieces = [p for p in pc.unique(meta["piece_id"]).to_pylist() if p]
    if len(all_pieces) < 2:
        raise ValueError(
            f"ingest artifact {version} has {len(all_pieces)} known piece(s); "
            "style retrieval across pieces needs at least 2"
        )
    train_pieces, holdout_pieces = split_pieces(
        all_pieces, cfg.eval.holdout_fraction, cfg.eval.seed
    )
    is_holdout = pc.is_in(meta["piece_id"], value_set=pa.array(holdout_pieces, pa.string()))
    excluded = {
        "train_piece_segments": int(
            pc.sum(pc.and_(pc.invert(is_holdout), pc.not_equal(meta["piece_id"], ""))).as_py() or 0
        ),
        "unknown_piece_segments": int(pc.sum(pc.equal(meta["piece_id"], "")).as_py() or 0),
        "unknown_style_segments": int(
            pc.sum(pc.and_(is_holdout, pc.equal(meta["style"], ""))).as_py() or 0
        ),
    }
    # Read audio only for the rows that are evaluated (the filter is pushed into the scan).
    # Style-grid renderings are the protocol's style_parameters set, not preset styles.
    row_filter = (
        pc.field("piece_id").isin(holdout_pieces)
        & (pc.field("style") != "")
        & ~pc.starts_with(pc.field("style"), pattern=style_grid.PREFIX)
    )
    table = dataset.to_table(columns=[*METADATA_COLUMNS, "audio"], filter=row_filter).sort_by(
        "segment_id"
    )
    if table.num_rows == 0:
        raise ValueError(
            f"no held-out segment with a style label in ingest {version} "
            f"(held-out pieces: {holdout_pieces})"
        )
    rates = set(pc.unique(table["sample_rate"]).to_pylist())
    if rates != {cfg.audio.sample_rate}:
        raise ValueError(
            f"segments are at {sorted(rates)} Hz but audio.sample_rate is {cfg.audio.sample_rate}"
        )
    window = window_samples(cfg.audio.window_s, cfg.audio.sample_rate)
    audio = np.stack(
        [fit_length(decode_audio(blob), window) for blob in table["audio"].to_pylist()]
    )
    return HeldOutSet(
        segment_ids=np.asarray(table["segment_id"].to_numpy(), dtype=np.int64),
        track_ids=np.asarray(table["track_id"].to_pylist(), dtype=object),
        piece_ids=np.asarray(table["piece_id"].to_pylist(), dtype=object),
        styles=np.asarray(table["style"].to_pylist(), dtype=object),
        audio=audio.astype(np.float32, copy=False),
        holdout_pieces=holdout_pieces,
        train_pieces=train_pieces,
        excluded=excluded,
    )


# -- embedding ----------------------------------------------------------------------------------
def embed_on_pool(cfg: MessRayConfig, info: dict, held_out: HeldOutSet) -> np.ndarray:
    """Embed on the index stage's Ray Data actor pool (:func:`mess_ray.index.job.embedding_pool`:
    ``index.min_actors``..``index.max_actors`` actors, ``index.cpus_per_actor`` /
    ``index.gpus_per_actor`` each, ``index.batch_size`` rows a batch, the same fault tolerance);
    rows come back in ``held_out.segment_ids`` order."""
    import ray

    from mess_ray.index.embed import table_to_vectors
    from mess_ray.index.job import embedding_pool
    from mess_ray.raylocal import ensure_ray

    ensure_ray(cfg.ray)
    n = len(held_out)
    source = ray.data.from_arrow(
        pa.table(
            {
                "segment_id": pa.array(held_out.segment_ids, pa.int64()),
                "sample_rate": pa.array([cfg.audio.sample_rate] * n, pa.int32()),
                "audio": pa.array([encode_audio(a) for a in held_out.audio], pa.binary()),
            }
        )
    )
    tables = ray.get(embedding_pool(source, cfg, info).to_arrow_refs())
    vectors, ids = table_to_vectors(pa.concat_tables(tables))
    by_id = dict(zip(ids.tolist(), vectors))
    if len(by_id) != n or len(ids) != n:
        raise RuntimeError(f"the embedding pool returned {len(ids)} embeddings for {n} segments")
    return np.stack([by_id[int(s)] for s in held_out.segment_ids])


def embed_on_driver(embedder, held_out: HeldOutSet, batch_size: int) -> np.ndarray:
    from tqdm.auto import tqdm

    chunks = [
        embedder.embed(held_out.audio[i : i + batch_size])
        for i in tqdm(range(0, len(held_out), batch_size), desc=f"embed {embedder.info.get('ref')}")
    ]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def embed_system(
    cfg: MessRayConfig, storage: Storage, ref: str, held_out: HeldOutSet
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings [N, D] of one system and what produced them (raises FileNotFoundError when a
    model artifact does not exist)."""
    if ref == DESCRIPTORS:
        return (
            descriptor_embeddings(list(held_out.audio), cfg.audio.sample_rate, progress=True),
            {"ref": DESCRIPTORS, "kind": "descriptors"},
        )
    from mess_ray.models import Embedder

    embedder = Embedder.from_ref(cfg, storage, ref)
    if len(held_out) >= cfg.eval.ray_data_min_segments:
        vectors = embed_on_pool(cfg, embedder.info, held_out)
    else:
        vectors = embed_on_driver(embedder, held_out, cfg.eval.batch_size)
    return vectors, dict(embedder.info)


# -- tasks 2 and 3 (mess_ray.eval.tasks.performance) ----------------------------------------------
def full_headline(
    task_metrics: dict[str, dict[str, dict[str, float]]], style_line: str | None, ndcg_k: int
) -> str:
    """Task 1's line (the demo's figure) then the passage mAP and agreement nDCG of every system."""
    parts = [style_line] if style_line else []
    if PASSAGE_TASK in task_metrics:
        m = task_metrics[PASSAGE_TASK]
        chance = next(iter(m.values()))["chance"]
        parts.append(
            "passage retrieval mAP: "
            + " vs ".join(f"{k} {v['map']:.2f}" for k, v in m.items())
            + f" (chance {chance:.2f})"
        )
    if AGREEMENT_TASK in task_metrics:
        m = task_metrics[AGREEMENT_TASK]
        chance = next(iter(m.values()))["chance"]
        parts.append(
            f"expressive agreement nDCG@{ndcg_k}: "
            + " vs ".join(f"{k} {v[f'ndcg@{ndcg_k}']:.2f}" for k, v in m.items())
            + f" (chance {chance:.2f})"
        )
    return "; ".join(parts)


def reuse_or_embed(
    cfg: MessRayConfig,
    storage: Storage,
    ref: str,
    perf,
    held_out: HeldOutSet,
    held_out_vectors: np.ndarray,
    info: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    """A model's vectors for the performance set, taken from its task-1 vectors where the
    segments are the same (renderings with MIDI are in both sets), embedding only the rest.
    (Not for the descriptor baseline: its z-scoring depends on the set it is fitted on.)"""
    row_of = {int(s): i for i, s in enumerate(held_out.segment_ids)}
    missing = np.array([int(s) not in row_of for s in perf.segment_ids], dtype=bool)
    out = np.zeros((len(perf), held_out_vectors.shape[1]), dtype=held_out_vectors.dtype)
    if missing.any():
        out[missing], _ = embed_system(cfg, storage, ref, perf.subset(missing))
    out[~missing] = held_out_vectors[[row_of[int(s)] for s in perf.segment_ids[~missing]]]
    return out, info


# -- entry point --------------------------------------------------------------------------------
def run_evaluate(cfg: MessRayConfig, storage: Storage, model_refs: list[str] | None = None) -> dict:
    """Benchmark ``model_refs`` plus the descriptor and random baselines on every task whose data
    the latest ingest holds; publish "eval". ``model_refs=None``: the models trained under this
    storage root (pretrain, finetune), else the model shipped in the package.

    Task 1 (style retrieval) needs style labels; tasks 2 (passage retrieval) and 3 (expressive
    agreement) need performances with beat annotations / performed MIDI. The report says which
    tasks ran and why the others did not.
    """
    from mess_ray.eval.report import SystemResult, write_report
    from mess_ray.performances import load_performance_set, performance_table_summary

    if isinstance(model_refs, str):
        raise ValueError("model_refs must be a list of refs, e.g. ['finetune', 'pretrain']")
    if model_refs is None:
        model_refs = [ref for ref in ("pretrain", "finetune") if storage.latest(ref)] or ["shipped"]
    systems = system_order(list(model_refs))
    ingest_version = storage.require_latest("ingest")
    ecfg = cfg.eval
    tasks_skipped: dict[str, str] = {}

    held_out: HeldOutSet | None = None
    protocol: Protocol | None = None
    try:
        held_out = load_held_out(cfg, storage, ingest_version)
        protocol = build_protocol(held_out.track_ids, held_out.piece_ids, held_out.styles)
        if not protocol.relevant.any():
            raise ValueError(
                f"no held-out query has a relevant candidate (same style, other piece): held-out pieces "
                f"{held_out.holdout_pieces} with styles {sorted(set(held_out.styles))}; raise "
                "eval.holdout_fraction or render more pieces per style"
            )
    except ValueError as err:
        tasks_skipped[STYLE_TASK] = str(err)
        held_out, protocol = None, None

    perf = load_performance_set(
        storage,
        ingest_version,
        ecfg.holdout_fraction,
        ecfg.seed,
        cfg.audio.sample_rate,
        cfg.audio.window_s,
    )
    plan: PerformanceTasks | None = None
    if perf is None:
        reason = "no held-out recording has beat annotations or performed MIDI"
        tasks_skipped[PASSAGE_TASK] = tasks_skipped[AGREEMENT_TASK] = reason
    else:
        plan = plan_performance_tasks(perf, ecfg.ndcg_k, ecfg.seed)
        tasks_skipped.update(plan.skipped)
        if plan.passage_rows is None and plan.agreement_rows is None:
            plan = None
    if held_out is None and plan is None and not ecfg.protocol:
        raise ValueError(
            "no benchmark task can run on ingest "
            + ingest_version
            + ": "
            + "; ".join(f"{k}: {v}" for k, v in tasks_skipped.items())
        )
    log.info("evaluating %s; tasks skipped: %s", systems, tasks_skipped or "none")

    results: list[SystemResult] = []
    task_metrics: dict[str, dict[str, dict[str, float]]] = {}
    task_similarities: dict[str, dict[str, np.ndarray]] = {}
    perf_vectors: dict[str, np.ndarray] = {}  # reused by the protocol table (same segments)
    perf_infos: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for ref in systems:
        try:
            if held_out is not None:
                vectors, info = embed_system(cfg, storage, ref, held_out)
                summary, similarity = score_system(
                    vectors,
                    protocol,
                    recall_ks=tuple(ecfg.recall_ks),
                    ndcg_k=ecfg.ndcg_k,
                    margin=ecfg.triplet_margin,
                )
                results.append(
                    SystemResult(
                        name=ref,
                        info=info,
                        metrics=summary,
                        embeddings=vectors,
                        similarity=similarity,
                    )
                )
                task_metrics.setdefault(STYLE_TASK, {})[ref] = summary
            if plan is not None:
                if held_out is not None and ref != DESCRIPTORS:
                    vectors, info = reuse_or_embed(
                        cfg, storage, ref, plan.perf, held_out, vectors, info
                    )
                else:
                    vectors, info = embed_system(cfg, storage, ref, plan.perf)
                if ref != DESCRIPTORS:
                    perf_vectors[ref], perf_infos[ref] = vectors, info
                if held_out is None:
                    results.append(
                        SystemResult(
                            name=ref,
                            info=info,
                            metrics={},
                            embeddings=vectors,
                            similarity=np.zeros((0, 0)),
                        )
                    )
                scores, sims = score_performance_tasks(
                    vectors, plan, tuple(ecfg.recall_ks), ecfg.ndcg_k
                )
                for task, values in scores.items():
                    task_metrics.setdefault(task, {})[ref] = values
                    task_similarities.setdefault(task, {})[ref] = sims[task]
        except FileNotFoundError as err:
            log.warning("skipping %s: %s", ref, err)
            skipped[ref] = str(err)
            continue

    version = new_version()
    counts: dict[str, Any] = {}
    if held_out is not None:
        counts.update(
            {
                "segments": len(held_out),
                "tracks": int(len(set(held_out.track_ids))),
                "held_out_pieces": len(held_out.holdout_pieces),
                "train_pieces": len(held_out.train_pieces),
                "styles": int(len(set(held_out.styles))),
                "queries": len(held_out),
                "queries_with_relevant": int(protocol.relevant.any(axis=1).sum()),
                "relevant_pairs": int(protocol.relevant.sum()),
                "hard_negative_pairs": int(protocol.hard_negatives.sum()),
                **{f"excluded_{k}": v for k, v in held_out.excluded.items()},
            }
        )
    task_counts: dict[str, dict[str, Any]] = {}
    if plan is not None:
        summary_counts = performance_table_summary(plan.perf)
        if plan.passage_rows is not None:
            task_counts[PASSAGE_TASK] = {
                **{k: summary_counts[k] for k in ("tracks", "pieces")},
                "queries": int(plan.passage_rows.size),
                "queries_with_relevant": int(plan.passage_relevant.any(axis=1).sum()),
                "relevant_pairs": int(plan.passage_relevant.sum()),
            }
        if plan.agreement_rows is not None:
            task_counts[AGREEMENT_TASK] = {
                "queries": int(plan.agreement_rows.size),
                "pieces": int(len(set(plan.perf.piece_ids[plan.agreement_rows]))),
                "descriptors": plan.agreement_features,
            }
        counts["performance_segments"] = summary_counts["segments"]
    style_line = (
        headline(task_metrics[STYLE_TASK], len(held_out.holdout_pieces))
        if STYLE_TASK in task_metrics
        else None
    )
    line = full_headline(task_metrics, style_line, ecfg.ndcg_k) or "no system could be evaluated"
    holdout_pieces, train_pieces = [], []
    if held_out is not None:
        holdout_pieces, train_pieces = held_out.holdout_pieces, held_out.train_pieces
    elif plan is not None:
        holdout_pieces, train_pieces = plan.perf.holdout_pieces, plan.perf.train_pieces
    manifest = {
        "inputs": {
            "ingest": ingest_version,
            "models": {r.name: r.info.get("version") for r in results},
        },
        "counts": counts,
        "headline": line,
        "systems": [r.name for r in results],
        "skipped": skipped,
        "tasks": {
            task: {"metrics": task_metrics.get(task, {}), "counts": task_counts.get(task, counts)}
            for task in (STYLE_TASK, PASSAGE_TASK, AGREEMENT_TASK)
            if task in task_metrics
        },
        "tasks_skipped": tasks_skipped,
        "metrics": task_metrics.get(STYLE_TASK, {}),
        "settings": {
            "config_digest": cfg.digest(),
            **ecfg.model_dump(mode="json"),
            "window_s": cfg.audio.window_s,
            "sample_rate": cfg.audio.sample_rate,
        },
        "held_out_pieces": holdout_pieces,
        "train_pieces": train_pieces,
    }
    protocol_files: dict[str, str] = {}
    if ecfg.protocol:
        from mess_ray.eval.protocol import run_protocol, write_protocol_report

        try:
            rows, protocol_summary = run_protocol(
                cfg,
                storage,
                ingest_version,
                [r for r in systems if r not in (DESCRIPTORS, RANDOM)],
                embed_system,
                precomputed=perf_vectors,
                precomputed_infos=perf_infos,
                random_ref=RANDOM,
            )
        except ValueError as err:
            if held_out is None and plan is None:
                raise ValueError(
                    f"no benchmark task can run on ingest {ingest_version}: protocol: {err}; "
                    + "; ".join(f"{k}: {v}" for k, v in tasks_skipped.items())
                ) from err
            manifest["protocol"] = {"skipped": str(err)}
            log.warning("protocol table skipped: %s", err)
        else:
            manifest["protocol"] = {"summary": protocol_summary, "rows": rows}
            protocol_files = write_protocol_report(storage, version, rows, protocol_summary)
    if plan is not None and plan.perf.problems:
        manifest["performance_problems"] = {t: p for t, p in list(plan.perf.problems.items())[:50]}
    manifest["files"] = write_report(
        storage,
        version,
        manifest,
        results,
        held_out,
        protocol,
        max_plot_points=ecfg.max_plot_points,
        seed=ecfg.seed,
        task_similarities=task_similarities,
        plan=plan,
    )
    manifest["files"] = [*manifest["files"], *protocol_files.values()]
    log.info(line)
    return storage.publish("eval", version, manifest)
