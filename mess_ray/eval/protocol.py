"""The yardstick: tasks x systems x recording chains on the validation and test pieces, every
figure with a 95 % interval from a bootstrap over pieces, every system paired against the first
model ref for a wins / ties / losses verdict.

Data: the held-out segments that have beat annotations or performed MIDI
(:func:`mess_ray.performances.load_performance_set`), each with its recording chain, its
performance (the track without the chain) and its pianist (ASAP performer tag) from the catalog
metadata. Pieces are split by :func:`mess_ray.splits.split_by_piece`: train pieces are what the
models and the learned descriptor head train on; validation is where settings are chosen; test
is reported once per model.

Tasks, each *within* a chain (queries and corpus in chain A) and *across* chains (queries in A,
corpus in B != A):

* ``performer_identity``: relevant = the query's pianist in *another piece*; candidates are other
  pieces only (mAP, R@1). Also on the queries whose pianist plays no training piece
  (``performer_identity_unseen``).
* ``chain_invariance`` (across chains only): the same passage of the same performance through
  chain B must come first among every segment of the query's piece in chain B (R@1, mAP).
* ``passage_retrieval``: the same beats of the same piece played by another performance (mAP),
  plus the top hit's time error in seconds where the top hit is the right piece.
* ``expressive_agreement``: graded relevance from performed-MIDI descriptors over other pieces
  (nDCG@k).
* ``style_parameters`` (on its own evaluated set, the evaluation side of the style grid; chain
  ``dry-lufs``): Spearman between cosine similarity and minus the style-parameter distance over
  the same passage's other renderings (:mod:`mess_ray.eval.tasks.style`); chance 0.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from mess_ray import style_grid
from mess_ray.eval import metrics
from mess_ray.eval.bootstrap import cluster_bootstrap, paired_difference, verdict
from mess_ray.eval.tasks import agreement
from mess_ray.eval.tasks import style as style_task
from mess_ray.midi_descriptors import beat_time, expressive_matrix
from mess_ray.splits import TEST, TRAIN, VALIDATION, pianist_of, split_by_piece

log = logging.getLogger(__name__)

PERFORMER = "performer_identity"
PERFORMER_UNSEEN = "performer_identity_unseen"
CHAIN_INVARIANCE = "chain_invariance"
PASSAGE = "passage_retrieval"
AGREEMENT = "expressive_agreement"
STYLE = style_task.STYLE_PARAMETERS
TASKS = (PERFORMER, PERFORMER_UNSEEN, CHAIN_INVARIANCE, PASSAGE, AGREEMENT, STYLE)
HEADLINE = {
    STYLE: "spearman",
    PERFORMER: "map",
    PERFORMER_UNSEEN: "map",
    CHAIN_INVARIANCE: "recall@1",
    PASSAGE: "map",
    AGREEMENT: "ndcg@10",
}


@dataclass
class SegmentLabels:
    """Per held-out segment: which chain recorded it, which performance and pianist it is."""

    chain: np.ndarray  # object [N]
    performance: np.ndarray  # object [N]
    pianist: np.ndarray  # object [N], "" unknown
    side: np.ndarray  # object [N]: validation / test


def labels_from_metadata(
    metadata: list[dict[str, Any]], track_ids, split_of: dict[str, str], piece_ids
):
    """:class:`SegmentLabels` from each segment's catalog metadata (render or ASAP catalogs)."""
    chains, perfs, pianists, sides = [], [], [], []
    for meta, tid, piece in zip(metadata, track_ids, piece_ids):
        chain = "dry"
        raw = meta.get("chain_json")
        if isinstance(raw, str) and raw:
            chain = json.loads(raw).get("name") or "dry"
        perfs.append(meta.get("performance_id") or tid)
        params: dict[str, Any] = {}
        raw_params = meta.get("style_params_json")
        if isinstance(raw_params, str) and raw_params:
            try:
                params = json.loads(raw_params)
            except json.JSONDecodeError:
                params = {}
        performer = params.get("performer") or meta.get("performer") or ""
        pianists.append(pianist_of(performer) if performer else "")
        chains.append(chain)
        sides.append(split_of.get(piece, ""))
    return SegmentLabels(*(np.asarray(x, dtype=object) for x in (chains, perfs, pianists, sides)))


@dataclass
class View:
    """One (task, split, chain condition): query rows, [Q, N] candidate and relevance masks over
    the split's rows, per-query extra data."""

    task: str
    split: str
    condition: str  # "A" (within chain A) or "A->B"
    rows: np.ndarray  # indices (into the evaluated set) of the split's segments
    queries: np.ndarray  # indices into rows
    candidates: np.ndarray  # [Q, len(rows)] bool
    relevance: np.ndarray  # [Q, len(rows)] float
    clusters: np.ndarray  # piece of each query
    pianists: np.ndarray  # pianist of each query


@dataclass
class EvalData:
    perf: Any  # PerformanceSet (held-out segments)
    labels: SegmentLabels
    split: dict[str, list[str]]
    train_pianists: set[str] = field(default_factory=set)


def _add_view(views, split, cond, rows, q_all, piece, pianist, task, qmask, cand, rel) -> None:
    """Append the view of the queries in ``qmask`` that have something relevant."""
    keep = qmask & (rel > 0).any(axis=1)
    if keep.any():
        views.append(
            View(
                task,
                split,
                cond,
                rows,
                q_all[keep],
                cand[keep],
                rel[keep].astype(np.float64),
                piece[q_all[keep]],
                pianist[q_all[keep]],
            )
        )


def build_views(
    data: EvalData,
    splits=(VALIDATION, TEST),
    hop_s: float = 2.0,
    max_queries: int | None = None,
    seed: int = 0,
) -> list[View]:
    """Every (task, split, chain condition) the data supports."""
    perf, lab = data.perf, data.labels
    views: list[View] = []
    rng = np.random.default_rng(seed)
    for split in splits:
        rows = np.flatnonzero(lab.side == split)
        if rows.size == 0:
            continue
        piece = perf.piece_ids[rows]
        chain = lab.chain[rows]
        performance = lab.performance[rows]
        pianist = lab.pianist[rows]
        start = perf.start_s[rows]
        spans = perf.beat_spans[rows]
        has_beats = ~np.isnan(spans[:, 0])
        has_midi = perf.has_midi[rows]
        features = None
        if has_midi.sum() >= 2:
            try:
                features, _ = expressive_matrix(perf.midi_descriptors[rows])
            except ValueError:
                features = None
        chains = sorted(set(chain))
        for a in chains:
            q_all = np.flatnonzero(chain == a)
            if max_queries and q_all.size > max_queries:
                q_all = np.sort(rng.choice(q_all, max_queries, replace=False))
            for b in chains:
                cond = a if a == b else f"{a}->{b}"
                in_b = chain == b
                other_piece = piece[q_all, None] != piece[None, :]
                same_piece = ~other_piece
                other_perf = performance[q_all, None] != performance[None, :]

                add = partial(_add_view, views, split, cond, rows, q_all, piece, pianist)

                known = pianist[q_all] != ""
                cand = in_b[None, :] & other_piece
                rel = cand & (pianist[None, :] == pianist[q_all, None]) & known[:, None]
                add(PERFORMER, known, cand, rel)
                unseen = known & np.array([p not in data.train_pianists for p in pianist[q_all]])
                add(PERFORMER_UNSEEN, unseen, cand, rel)
                if a != b:
                    cand = in_b[None, :] & same_piece
                    rel = (
                        cand
                        & ~other_perf
                        & (np.abs(start[q_all, None] - start[None, :]) < hop_s / 2)
                    )
                    add(CHAIN_INVARIANCE, np.ones(q_all.size, bool), cand, rel)
                cand = in_b[None, :] & other_perf & has_beats[None, :]
                qb = has_beats[q_all]
                s = np.where(np.isnan(spans), 0.0, spans)
                overlap = (s[q_all, None, 0] < s[None, :, 1]) & (s[None, :, 0] < s[q_all, None, 1])
                rel = cand & same_piece & overlap & qb[:, None]
                add(PASSAGE, qb, cand, rel)
                if features is not None:
                    qm = has_midi[q_all]
                    cand = in_b[None, :] & other_piece & has_midi[None, :] & qm[:, None]
                    full_cand = np.zeros((rows.size, rows.size), bool)
                    full_cand[q_all] = cand
                    relevance = agreement.graded_relevance(features, full_cand)[q_all]
                    add(AGREEMENT, qm, cand, relevance)
    return views


def top_hit_time_errors(view: View, similarity: np.ndarray, data: EvalData) -> np.ndarray:
    """Per query: |top hit's start - where the query's first beat falls in the hit's performance|
    (s), when the top hit is the query's piece; NaN otherwise."""
    perf = data.perf
    out = np.full(view.queries.size, np.nan)
    rows = view.rows
    for i, q in enumerate(view.queries):
        idx = np.flatnonzero(view.candidates[i])
        top = idx[np.lexsort((idx, -similarity[i, idx]))[0]]
        gq, gt = rows[q], rows[top]
        if perf.piece_ids[gt] != perf.piece_ids[gq]:
            continue
        beats = perf.beats.get(perf.track_ids[gt])
        if beats is None:
            continue
        expected = float(beat_time(np.array([perf.beat_spans[gq, 0]]), beats)[0])
        out[i] = abs(float(perf.start_s[gt]) - expected)
    return out


def score_view(
    view: View, unit: np.ndarray, data: EvalData, ndcg_k: int = 10
) -> dict[str, np.ndarray]:
    """Per-query values of every metric of the view's task for one system's unit vectors."""
    sub = unit[view.rows]
    sim = sub[view.queries] @ sub.T
    if view.task == AGREEMENT:
        return {f"ndcg@{ndcg_k}": metrics.ndcg_at_k(sim, view.relevance, view.candidates, k=ndcg_k)}
    if view.task == STYLE:
        return {"spearman": style_task.spearman_per_query(sim, view.relevance, view.candidates)}
    out = {
        "map": metrics.average_precision(sim, view.relevance, view.candidates),
        "recall@1": metrics.recall_at_k(sim, view.relevance, view.candidates, k=1),
    }
    if view.task == PASSAGE:
        out["top_hit_error_s"] = top_hit_time_errors(view, sim, data)
    return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    if not np.all(np.isfinite(vectors)):
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 1e-12, norms, 1.0)


def score_table(
    views: list[View],
    systems: dict[str, np.ndarray],
    data: EvalData,
    reference: str | None,
    ndcg_k: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    min_pieces: int = 5,
) -> list[dict[str, Any]]:
    """One row per (task, split, condition, system, metric): value, 95 % CI over pieces, the
    paired difference to ``reference`` with its CI and verdict; performer tasks also carry the
    CI over pianists."""
    units = {name: _unit(v) for name, v in systems.items()}
    rows: list[dict[str, Any]] = []
    for view in views:
        per_system = {name: score_view(view, u, data, ndcg_k) for name, u in units.items()}
        chance = metrics.chance_level(view.relevance > 0, view.candidates)
        for name, values in per_system.items():
            for metric, per_query in values.items():
                ci = cluster_bootstrap(per_query, view.clusters, n_boot=n_boot, seed=seed)
                row = {
                    "task": view.task,
                    "split": view.split,
                    "chains": view.condition,
                    "system": name,
                    "metric": metric,
                    "value": ci.value,
                    "ci_low": ci.low,
                    "ci_high": ci.high,
                    "pieces": ci.clusters,
                    "queries": ci.queries,
                }
                if metric == "map":
                    row["chance"] = (
                        float(np.nanmean(chance)) if np.isfinite(chance).any() else math.nan
                    )
                elif metric == "spearman":
                    row["chance"] = 0.0  # a random ranking's expected rank correlation
                if view.task in (PERFORMER, PERFORMER_UNSEEN):
                    by_pianist = cluster_bootstrap(
                        per_query, view.pianists, n_boot=n_boot, seed=seed
                    )
                    row.update(
                        ci_low_pianists=by_pianist.low,
                        ci_high_pianists=by_pianist.high,
                        pianists=by_pianist.clusters,
                    )
                if reference and name != reference and reference in per_system:
                    diff = paired_difference(
                        per_system[reference][metric],
                        per_query,
                        view.clusters,
                        n_boot=n_boot,
                        seed=seed,
                    )
                    # the reference's verdict against this system: lower is better for errors
                    v = verdict(diff)
                    if diff.clusters < min_pieces:
                        v = "too few pieces"  # a bootstrap over 1-4 pieces decides nothing
                    elif metric == "top_hit_error_s" and v in ("wins", "loses"):
                        v = "wins" if v == "loses" else "loses"
                    row.update(
                        reference=reference,
                        diff=diff.value,
                        diff_low=diff.low,
                        diff_high=diff.high,
                        reference_verdict=v,
                    )
                rows.append(row)
    return rows


def load_eval_data(cfg, storage, version: str, validation_share: float = 0.5):
    """Held-out segments with their labels, and the training pieces' segments (for the
    descriptor head): (EvalData, PerformanceSet of training pieces or None)."""
    import pyarrow.compute as pc

    from mess_ray.performances import load_performance_set
    from mess_ray.segments import segments_dataset

    ecfg = cfg.eval
    dataset = segments_dataset(storage, version)
    meta = dataset.to_table(columns=["segment_id", "track_id", "piece_id", "metadata_json"])
    pieces = [p for p in pc.unique(meta["piece_id"]).to_pylist() if p]
    split = split_by_piece(pieces, ecfg.holdout_fraction, ecfg.seed, validation_share)
    split_of = {p: s for s in (TRAIN, VALIDATION, TEST) for p in getattr(split, s)}
    perf = load_performance_set(
        storage,
        version,
        ecfg.holdout_fraction,
        ecfg.seed,
        cfg.audio.sample_rate,
        cfg.audio.window_s,
    )
    if perf is None:
        raise ValueError(
            f"ingest {version}: no held-out recording has beat annotations or performed MIDI"
        )
    meta_of = dict(zip(meta["segment_id"].to_pylist(), meta["metadata_json"].to_pylist()))
    metadata = [json.loads(meta_of[int(s)] or "{}") for s in perf.segment_ids]
    labels = labels_from_metadata(metadata, perf.track_ids, split_of, perf.piece_ids)
    train_pianists = set()
    for blob, piece in zip(meta["metadata_json"].to_pylist(), meta["piece_id"].to_pylist()):
        if split_of.get(piece) == TRAIN:
            tag = json.loads(json.loads(blob or "{}").get("style_params_json") or "{}").get(
                "performer"
            )
            if tag:
                train_pianists.add(pianist_of(tag))
    train = load_performance_set(
        storage,
        version,
        ecfg.holdout_fraction,
        ecfg.seed,
        cfg.audio.sample_rate,
        cfg.audio.window_s,
        pieces="train",
        with_audio=False,  # the descriptor head reads the audio of its sample only
    )
    data = EvalData(perf, labels, split.as_dict(), train_pianists)
    return data, train


# -- the run -----------------------------------------------------------------------------------
def _read_audio(
    storage, version: str, segment_ids, sample_rate: int, window_s: float
) -> np.ndarray:
    import pyarrow.compute as pc

    from mess_ray.segments import decode_audio, fit_length, segments_dataset

    table = (
        segments_dataset(storage, version)
        .to_table(
            columns=["segment_id", "audio"], filter=pc.field("segment_id").isin(list(segment_ids))
        )
        .sort_by("segment_id")
    )
    window = round(window_s * sample_rate)
    by_id = {
        int(s): fit_length(decode_audio(a), window)
        for s, a in zip(table["segment_id"].to_pylist(), table["audio"].to_pylist())
    }
    return np.stack([by_id[int(s)] for s in segment_ids]).astype(np.float32)


def train_head(cfg, storage, version: str, train, seed: int = 0):
    """The learned descriptor head trained on the training pieces: a function from raw
    descriptor matrices to vectors (None when there are fewer than two training pieces)."""
    from mess_ray.descriptors import descriptor_matrix, zscore
    from mess_ray.eval import baselines as bl

    ecfg = cfg.eval
    sr = cfg.audio.sample_rate
    if train is None or len(set(train.piece_ids)) < 2:
        log.warning("no training pieces with segments: the learned descriptor head is left out")
        return None
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(len(train), min(len(train), ecfg.head_max_segments), replace=False))
    train_audio = _read_audio(storage, version, train.segment_ids[take], sr, cfg.audio.window_s)
    train_desc = descriptor_matrix(list(train_audio), sr)
    train_z, mean, std = zscore(train_desc)
    head = bl.train_descriptor_head(
        train_z,
        train.piece_ids[take],
        np.where(train.has_midi[take, None], train.midi_descriptors[take], np.nan),
        steps=ecfg.head_steps,
        mine_clusters=cfg.finetune.mine_clusters,
        midi_weight=max(cfg.finetune.midi_weight, 0.0),
        temperature=cfg.finetune.temperature,
        facet_temperature=cfg.finetune.facet_temperature,
        midi_target_temperature=cfg.finetune.midi_target_temperature,
        seed=seed,
    )
    return lambda desc: head((desc - mean) / np.where(std > 1e-12, std, 1.0))


def feature_baselines(audio: np.ndarray, sample_rate: int, head, seed: int = 0):
    """Every baseline's vectors for one evaluated set of segments (feature baselines z-scored
    over that set; ``head`` from :func:`train_head` or None)."""
    from mess_ray.descriptors import descriptor_matrix, zscore
    from mess_ray.eval import baselines as bl

    out: dict[str, np.ndarray] = {}
    log.info("protocol baselines on %d segments", len(audio))
    desc = descriptor_matrix(list(audio), sample_rate)
    z, _, _ = zscore(desc)
    out[bl.DESCRIPTORS] = z.astype(np.float32)
    out[bl.CHROMA] = bl.feature_embeddings(bl.CHROMA, audio, sample_rate)
    out[bl.MFCC] = bl.feature_embeddings(bl.MFCC, audio, sample_rate)
    if head is not None:
        out[bl.DESCRIPTOR_HEAD] = head(desc)
    out[bl.CHANCE] = bl.chance_embeddings(len(audio), seed)
    return out


def baseline_vectors(
    cfg, storage, version: str, data: EvalData, train, seed: int = 0, head=None
) -> dict[str, np.ndarray]:
    """Every baseline's vectors for the held-out segments (chroma, mfcc, descriptors, the learned
    descriptor head trained on the training pieces, chance); ``head``: one already trained."""
    if head is None:
        head = train_head(cfg, storage, version, train, seed)
    return feature_baselines(data.perf.audio, cfg.audio.sample_rate, head, seed)


def build_style_views(style_set, hop_s: float = 2.0, splits=(VALIDATION, TEST)) -> list[View]:
    """The style_parameters views (one per split) over a :class:`StyleGridSet`: queries with at
    least ``MIN_CANDIDATES`` same-passage renderings; relevance = minus the parameter distance."""
    views = []
    for split in splits:
        rows = np.flatnonzero(style_set.side == split)
        if rows.size == 0:
            continue
        piece = style_set.piece_ids[rows]
        cand = style_task.same_passage_candidates(
            piece, style_set.track_ids[rows], style_set.start_s[rows], hop_s
        )
        target = style_task.negative_parameter_distance(
            style_set.params[rows], style_set.params[rows]
        )
        q = np.flatnonzero(cand.sum(axis=1) >= style_task.MIN_CANDIDATES)
        if q.size:
            views.append(
                View(
                    STYLE,
                    split,
                    style_grid.CHAIN,
                    rows,
                    q,
                    cand[q],
                    target[q],
                    piece[q],
                    np.full(q.size, "", dtype=object),
                )
            )
    return views


def style_parameter_rows(
    cfg, storage, version, split: dict, model_refs, embed_system, head, reference, skipped
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The style_parameters rows on the evaluation grid's segments (none when the ingest has no
    evaluation-grid renderings) and a summary of what was scored."""
    ecfg = cfg.eval
    split_of = {p: s for s, pieces in split.items() for p in pieces}
    style_set = style_task.load_style_grid_set(
        storage, version, split_of, cfg.audio.sample_rate, cfg.audio.window_s
    )
    if style_set is None:
        return [], {"skipped": "no evaluation-grid renderings (render.style_grid.eval_renders)"}
    systems: dict[str, np.ndarray] = {}
    for ref in model_refs:
        if ref in skipped or ref in systems:
            continue
        systems[ref], _ = embed_system(cfg, storage, ref, style_set)
    systems.update(feature_baselines(style_set.audio, cfg.audio.sample_rate, head, ecfg.seed))
    views = build_style_views(style_set, hop_s=cfg.audio.hop_s)
    rows = score_table(
        views, systems, None, reference, n_boot=ecfg.bootstrap_samples, seed=ecfg.seed
    )
    summary = {
        "segments": {s: int((style_set.side == s).sum()) for s in (VALIDATION, TEST)},
        "renderings": {
            s: int(len(set(style_set.track_ids[style_set.side == s]))) for s in (VALIDATION, TEST)
        },
        "queries": {v.split: int(v.queries.size) for v in views},
        "parameters": list(style_grid.PARAMETERS),
        "eval_values": {
            n: list(style_grid.side_values(n, style_grid.EVAL)) for n in style_grid.LEVELS
        },
        "train_values": {
            n: list(style_grid.side_values(n, style_grid.TRAIN)) for n in style_grid.LEVELS
        },
    }
    return rows, summary


def run_protocol(
    cfg,
    storage,
    version: str,
    model_refs: list[str],
    embed_system,
    precomputed: dict[str, np.ndarray] | None = None,
    random_ref: str = "random",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The full table for ``model_refs`` (plus the random-init encoder ``random_ref``) and every
    baseline. ``embed_system(cfg, storage, ref, held_out) -> (vectors, info)`` embeds one model
    (the evaluate stage passes its own, so this module does not import it back).
    Returns (rows, summary: split, counts, skipped systems)."""
    ecfg = cfg.eval
    data, train = load_eval_data(cfg, storage, version, ecfg.validation_share)
    systems: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    precomputed = precomputed or {}
    for ref in [*model_refs, random_ref]:
        if ref in systems:
            continue
        if ref in precomputed and len(precomputed[ref]) == len(data.perf):
            systems[ref] = precomputed[ref]
            continue
        try:
            systems[ref], _ = embed_system(cfg, storage, ref, data.perf)
        except FileNotFoundError as err:
            skipped[ref] = str(err)
    head = train_head(cfg, storage, version, train, ecfg.seed)
    systems.update(feature_baselines(data.perf.audio, cfg.audio.sample_rate, head, ecfg.seed))
    views = build_views(
        data, hop_s=cfg.audio.hop_s, max_queries=ecfg.max_queries_per_chain, seed=ecfg.seed
    )
    reference = next((r for r in model_refs if r in systems), None)
    rows = score_table(
        views,
        systems,
        data,
        reference,
        ndcg_k=ecfg.ndcg_k,
        n_boot=ecfg.bootstrap_samples,
        seed=ecfg.seed,
    )
    style_rows, style_summary = style_parameter_rows(
        cfg,
        storage,
        version,
        data.split,
        [r for r in [*model_refs, random_ref] if r in systems],
        embed_system,
        head,
        reference,
        skipped,
    )
    rows += style_rows
    summary = {
        "split": data.split,
        "reference": reference,
        "systems": list(systems),
        "skipped": skipped,
        "chains": sorted(set(data.labels.chain)),
        "segments": {s: int((data.labels.side == s).sum()) for s in (VALIDATION, TEST)},
        "train_segments_for_head": int(min(len(train), ecfg.head_max_segments)) if train else 0,
        "pianists": {
            s: int(
                len(set(data.labels.pianist[(data.labels.side == s) & (data.labels.pianist != "")]))
            )
            for s in (VALIDATION, TEST)
        },
        "views": len(views),
        STYLE: style_summary,
        "bootstrap": {"samples": ecfg.bootstrap_samples, "over": "pieces", "level": 0.95},
    }
    return rows, summary


# -- the report --------------------------------------------------------------------------------
def headline_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if r["metric"] == HEADLINE.get(r["task"]) or r["metric"] == "top_hit_error_s"
    ]


def markdown_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    ref = summary.get("reference")
    lines = [
        "# Protocol table",
        "",
        f"Split (by piece): {json.dumps(summary['split'])}",
        f"Chains: {summary['chains']}; reference model for verdicts: {ref}; 95 % CIs from a "
        f"{summary['bootstrap']['samples']}-draw bootstrap over pieces (performer tasks also over pianists).",
        *_style_note(summary),
        "",
        "| split | task | chains | metric | system | value | 95 % CI | pieces | queries | chance | "
        f"{ref} - system (CI) | {ref} verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        headline_rows(rows), key=lambda r: (r["split"], r["task"], r["chains"], r["metric"])
    ):
        diff = (
            f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]" if "diff" in r else ""
        )
        chance = (
            f"{r['chance']:.3f}"
            if isinstance(r.get("chance"), float) and math.isfinite(r["chance"])
            else ""
        )
        lines.append(
            f"| {r['split']} | {r['task']} | {r['chains']} | {r['metric']} | {r['system']} | "
            f"{r['value']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['pieces']} | {r['queries']} | "
            f"{chance} | {diff} | {r.get('reference_verdict', '')} |"
        )
    return "\n".join(lines) + "\n"


def _style_note(summary: dict[str, Any]) -> list[str]:
    info = summary.get(STYLE) or {}
    if "eval_values" not in info:
        return []
    return [
        f"{STYLE} (chain {style_grid.CHAIN}: one piano, loudness-normalised): Spearman between "
        "cosine similarity and minus the standardised style-parameter distance over the same "
        "passage's other renderings (same piece, same start), chance 0. Evaluation values "
        f"{json.dumps(info['eval_values'])}, never rendered for training (training values "
        f"{json.dumps(info['train_values'])}); pedal on/off on both sides. Renderings "
        f"{json.dumps(info['renderings'])}, queries {json.dumps(info['queries'])}."
    ]


def plot_table(rows: list[dict[str, Any]], path: str) -> None:
    """One panel per (split, task): headline metric per system and chain condition, with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = [r for r in rows if r["metric"] == HEADLINE.get(r["task"])]
    panels = sorted({(r["split"], r["task"]) for r in head})
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels)), squeeze=False)
    for ax, (split, task) in zip(axes[:, 0], panels):
        sub = [r for r in head if r["split"] == split and r["task"] == task]
        systems = list(dict.fromkeys(r["system"] for r in sub))
        conds = sorted({r["chains"] for r in sub})
        width = 0.8 / max(len(conds), 1)
        for j, cond in enumerate(conds):
            vals = {r["system"]: r for r in sub if r["chains"] == cond}
            xs = [i + j * width for i, s in enumerate(systems) if s in vals]
            ys = [vals[s]["value"] for s in systems if s in vals]
            lo = [vals[s]["value"] - vals[s]["ci_low"] for s in systems if s in vals]
            hi = [vals[s]["ci_high"] - vals[s]["value"] for s in systems if s in vals]
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=cond)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(systems))], systems, fontsize=7)
        ax.set_title(f"{task} ({split}): {HEADLINE[task]}", fontsize=9)
        ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_protocol_report(storage, version: str, rows, summary) -> dict[str, str]:
    """table.json, table.md and table.png under eval/<version>/protocol/."""
    import os
    import posixpath
    import tempfile

    files = {}
    base = posixpath.join("eval", version, "protocol")
    with storage.open(posixpath.join(base, "table.json"), "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1, default=float)
    files["protocol_table_json"] = posixpath.join("protocol", "table.json")
    with storage.open(posixpath.join(base, "table.md"), "w") as f:
        f.write(markdown_table(rows, summary))
    files["protocol_table_md"] = posixpath.join("protocol", "table.md")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "table.png")
        plot_table(rows, local)
        if os.path.exists(local):
            storage.put_file(local, posixpath.join(base, "table.png"))
            files["protocol_plot"] = posixpath.join("protocol", "table.png")
    return files
