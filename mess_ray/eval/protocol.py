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
  pieces only (mAP, R@1). Also on the queries whose pianist no training stage of any evaluated
  system heard (``performer_identity_unseen``): who was heard is read from the training
  manifests' ``pianists`` blocks (:func:`heard_pianists`), and ``eval.test_pianist_fraction``
  leaves the test-side pianists out of training so that these rows have queries. And with the
  candidates from other *works* only (``performer_identity_other_work``,
  :func:`mess_ray.splits.work_of`): not the other half of the same prelude and fugue nor another
  movement of the same sonata, whose key and material give the pianist away in ASAP, where one
  pianist often plays both.
* ``chain_invariance`` (across chains only): the same passage of the same performance through
  chain B must come first among every segment of the query's piece in chain B (R@1, mAP).
* ``passage_retrieval``: the same beats of the same piece played by another performance (mAP),
  plus the top hit's time error in seconds where the top hit is the right piece.
* ``expressive_agreement``: graded relevance from performed-MIDI descriptors over other pieces
  (nDCG@k).
* ``performer_identity_excerpt``: performer identity with each whole excerpt (a performance in
  one chain) pooled into one vector (the mean of its segments' unit vectors).

Besides the models and baselines, the table holds the audio expression features
(``audio-expression``, :func:`mess_ray.descriptors.expression_features`), the performed-MIDI
reference (``midi-reference``: the MIDI descriptors of the same segments, z-scored), their
chain-normalised variants (``+rec-rel``: level columns relative to the recording's median) and
the work-relative variants (``+work-rel``, :mod:`mess_ray.work_relative`) of the reference model,
the descriptors, the descriptor head, the audio expression features and the MIDI reference.
* ``style_parameters`` (on its own evaluated set, the evaluation side of the style grid; chain
  ``dry-lufs``): Spearman between cosine similarity and minus the style-parameter distance over
  the same passage's other renderings (:mod:`mess_ray.eval.tasks.style`); chance 0.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from mess_ray import style_grid
from mess_ray.eval import metrics
from mess_ray.eval.bootstrap import cluster_bootstrap, paired_difference, verdict
from mess_ray.eval.tasks import agreement
from mess_ray.eval.tasks import style as style_task
from mess_ray.midi_descriptors import beat_time, expressive_matrix
from mess_ray.splits import (
    TEST,
    TRAIN,
    VALIDATION,
    pianist_from_metadata,
    pianist_holdout,
    read_track_pianists,
    split_by_piece,
    track_pianists,
    work_of,
)

log = logging.getLogger(__name__)

PERFORMER = "performer_identity"
PERFORMER_UNSEEN = "performer_identity_unseen"
PERFORMER_WORK = "performer_identity_other_work"
CHAIN_INVARIANCE = "chain_invariance"
PASSAGE = "passage_retrieval"
AGREEMENT = "expressive_agreement"
PERFORMER_EXCERPT = "performer_identity_excerpt"
STYLE = style_task.STYLE_PARAMETERS
TASKS = (
    PERFORMER,
    PERFORMER_UNSEEN,
    PERFORMER_WORK,
    CHAIN_INVARIANCE,
    PASSAGE,
    AGREEMENT,
    PERFORMER_EXCERPT,
    STYLE,
)
HEADLINE = {
    STYLE: "spearman",
    PERFORMER: "map",
    PERFORMER_EXCERPT: "map",
    PERFORMER_UNSEEN: "map",
    PERFORMER_WORK: "map",
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
        pianists.append(pianist_from_metadata(meta))
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
    # Pianists some training stage of an evaluated system heard (read from the training manifests,
    # :func:`heard_pianists`); None: unknown, and the unseen-pianist rows are left out.
    heard_pianists: set[str] | None = None


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
        work = np.array([work_of(str(p)) for p in piece], dtype=object)
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
                other_work = work[q_all, None] != work[None, :]
                cand_work = in_b[None, :] & other_work
                add(PERFORMER_WORK, known, cand_work, rel & other_work)
                if data.heard_pianists is not None:
                    heard = data.heard_pianists
                    unseen = known & np.array([p not in heard for p in pianist[q_all]], dtype=bool)
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


def excerpt_groups(data: EvalData) -> tuple[np.ndarray, np.ndarray]:
    """Per row, its excerpt (one performance through one chain): (group index [N], the first
    row of each group [E])."""
    keys = [f"{p}\x00{c}" for p, c in zip(data.labels.performance, data.labels.chain)]
    _, first, groups = np.unique(
        np.asarray(keys, dtype=object), return_index=True, return_inverse=True
    )
    return groups.astype(np.int64), first.astype(np.int64)


def pool_excerpts(vectors: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """[E, D] mean of each excerpt's unit vectors."""
    unit = _unit(vectors)
    out = np.zeros((count, unit.shape[1]))
    np.add.at(out, groups, unit)
    return out / np.maximum(np.bincount(groups, minlength=count), 1)[:, None]


def excerpt_views(data: EvalData, first: np.ndarray, splits=(VALIDATION, TEST)) -> list[View]:
    """Performer identity between whole excerpts: relevant = the same pianist in another piece
    (candidates: other pieces in chain B), within and across chains; rows index excerpts."""
    lab = data.labels
    piece = data.perf.piece_ids[first]
    chain, pianist, side = lab.chain[first], lab.pianist[first], lab.side[first]
    views: list[View] = []
    for split in splits:
        rows = np.flatnonzero(side == split)
        if rows.size == 0:
            continue
        p, c, who = piece[rows], chain[rows], pianist[rows]
        for a in sorted(set(c)):
            q_all = np.flatnonzero(c == a)
            for b in sorted(set(c)):
                cand = (c[None, :] == b) & (p[q_all, None] != p[None, :])
                known = who[q_all] != ""
                rel = cand & (who[None, :] == who[q_all, None]) & known[:, None]
                cond = a if a == b else f"{a}->{b}"
                _add_view(
                    views, split, cond, rows, q_all, p, who, PERFORMER_EXCERPT, known, cand, rel
                )
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


@dataclass
class QueryVariants:
    """A model that searches with each query at several lags of its content timeline
    (``Embedder.query_variants``): ``vectors`` [N, D] as indexed, ``queries`` [K, N, D] (the
    first = ``vectors``; rows that are never queries may stay unshifted). A candidate's
    similarity is its best over the K, as :meth:`SearchIndex.search` scores it. Excerpt pooling
    and work-relative variants use ``vectors``."""

    vectors: np.ndarray
    queries: np.ndarray


def plain_vectors(system):
    """A system's indexed vectors (:class:`QueryVariants` -> its ``vectors``)."""
    return system.vectors if isinstance(system, QueryVariants) else system


def with_query_variants(
    systems: dict[str, Any], infos: dict[str, dict], data: EvalData, views, sample_rate: int
) -> None:
    """Replace every model whose embedder tries its queries at several lags, or weighs its
    query's parts (``query_facet_weights``), by its :class:`QueryVariants` (shifted timelines
    computed for the rows some view queries; every variant weighted as the index weighs it)."""
    from mess_ray.facets import parse_layout, weighted_query
    from mess_ray.models.embedder import query_variants_from_info

    asked = np.unique(np.concatenate([v.rows[v.queries] for v in views] or [np.zeros(0, int)]))
    for name, info in infos.items():
        vectors = systems.get(name)
        if vectors is None or isinstance(vectors, (ContentScorer, QueryVariants)):
            continue
        part = query_variants_from_info(info, vectors[asked], data.perf.audio[asked], sample_rate)
        weights = info.get("query_facet_weights")
        if part is None and not weights:
            continue
        k = 1 if part is None else len(part)
        queries = np.repeat(np.asarray(vectors, dtype=np.float32)[None], k, 0)
        if part is not None:
            queries[:, asked] = part
        if weights:
            queries = weighted_query(queries, parse_layout(info["facet_layout"]), weights)
        systems[name] = QueryVariants(np.asarray(vectors), queries)


class ContentScorer:
    """A system without vectors that scores the views of some tasks itself (``scorer.scores(
    queries, rows, candidates) -> (similarity [Q, len(rows)], scored queries)``): n/a elsewhere."""

    def __init__(self, scorer, tasks: tuple[str, ...], why: str) -> None:
        self.scorer, self.tasks, self.why = scorer, tasks, why
        self.seconds = 0.0
        self.unscored = 0


def _subview(view: View, keep: np.ndarray) -> View:
    return View(
        view.task,
        view.split,
        view.condition,
        view.rows,
        view.queries[keep],
        view.candidates[keep],
        view.relevance[keep],
        view.clusters[keep],
        view.pianists[keep],
    )


def score_view(
    view: View, unit: np.ndarray, data: EvalData, ndcg_k: int = 10
) -> dict[str, np.ndarray]:
    """Per-query values of every metric of the view's task for one system's unit vectors."""
    if isinstance(unit, QueryVariants):
        sub = unit.vectors[view.rows]
        asked = view.rows[view.queries]
        sim = np.max([q[asked] @ sub.T for q in unit.queries], axis=0)
        return score_similarity(view, sim, data, ndcg_k)
    sub = unit[view.rows]
    return score_similarity(view, sub[view.queries] @ sub.T, data, ndcg_k)


def score_content(
    view: View, system: ContentScorer, data: EvalData, ndcg_k: int = 10
) -> dict[str, np.ndarray] | None:
    """Per-query metric values of a :class:`ContentScorer` (NaN for queries it left unscored);
    None where its task is not one it can do."""
    import time

    if view.task not in system.tasks:
        return None
    t0 = time.perf_counter()
    sim, scored = system.scorer.scores(view.rows[view.queries], view.rows, view.candidates)
    system.seconds += time.perf_counter() - t0
    system.unscored += int((~scored).sum())
    part = score_similarity(_subview(view, scored), sim[scored], data, ndcg_k)
    out = {}
    for metric, values in part.items():
        full = np.full(view.queries.size, np.nan)
        full[scored] = values
        out[metric] = full
    return out


def score_similarity(
    view: View, sim: np.ndarray, data: EvalData, ndcg_k: int = 10
) -> dict[str, np.ndarray]:
    """Per-query values of every metric of the view's task for similarities [Q, len(rows)]."""
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

    def unit(v):
        if isinstance(v, ContentScorer):
            return v
        if isinstance(v, QueryVariants):
            return QueryVariants(_unit(v.vectors), np.stack([_unit(q) for q in v.queries]))
        return _unit(v)

    units = {name: unit(v) for name, v in systems.items()}
    rows: list[dict[str, Any]] = []
    for view in views:
        per_system = {}
        for name, u in units.items():
            if not isinstance(u, ContentScorer):
                per_system[name] = score_view(view, u, data, ndcg_k)
                continue
            values = score_content(view, u, data, ndcg_k)
            if values is None:  # a content baseline on a task it cannot do: n/a, never 0
                rows.append(
                    {
                        "task": view.task,
                        "split": view.split,
                        "chains": view.condition,
                        "system": name,
                        "metric": HEADLINE[view.task],
                        "value": None,
                        "ci_low": None,
                        "ci_high": None,
                        "pieces": int(len(set(view.clusters))),
                        "queries": int(view.queries.size),
                        "reference_verdict": "n/a",
                        "n/a": u.why,
                    }
                )
            else:
                per_system[name] = values
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
                if view.task in (PERFORMER, PERFORMER_UNSEEN, PERFORMER_WORK):
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


def heard_pianists(
    storage, refs, tracks: dict[str, tuple[str, str]]
) -> tuple[set[str] | None, dict[str, str]]:
    """The pianists that some training stage behind the model ``refs`` heard, read from the
    training manifests (a fine-tuned model's pretraining included, through its ``inputs.init``):
    their ``pianists.heard`` list, or for a manifest written before that record existed, the
    pianists of the pieces it recorded training on (``train_pieces``; pretraining: every piece
    but ``inputs.excluded_pieces``), ``tracks`` being ``{track: (piece, pianist)}`` of the
    evaluated ingest. Returns (heard, where each part came from); heard is None when a ref is no
    training artifact of this store (a folder, a shipped model whose manifest has no
    ``pianists.heard``): who it heard is unknown."""
    from mess_ray.models import shipped

    heard: set[str] = set()
    sources: dict[str, str] = {}
    todo: list[tuple[str, str]] = []
    for ref in refs:
        if shipped.is_shipped_ref(ref):
            block = shipped.shipped_manifest(shipped.shipped_name(ref)).get("pianists")
            if isinstance(block, dict) and "heard" in block:
                heard.update(block["heard"])
                sources[ref] = f"shipped manifest: {len(block['heard'])} pianists heard"
                continue
        if ref not in ("pretrain", "finetune"):
            sources[ref] = (
                "not a training artifact of this store: the pianists it heard are unknown"
            )
            return None, sources
        version = storage.latest(ref)
        if version is not None:
            todo.append((ref, version))
    while todo:
        stage, version = todo.pop()
        key = f"{stage}/{version}"
        if key in sources:
            continue
        manifest = storage.manifest(stage, version)
        block = manifest.get("pianists")
        if isinstance(block, dict) and "heard" in block:
            heard.update(block["heard"])
            sources[key] = f"manifest: {len(block['heard'])} pianists heard"
        else:
            if stage == "finetune":
                pieces = set(manifest.get("train_pieces") or ())
            else:
                left = set((manifest.get("inputs") or {}).get("excluded_pieces") or ())
                pieces = {piece for piece, _ in tracks.values()} - left
            found = {p for tid, (piece, p) in tracks.items() if p and piece in pieces}
            heard.update(found)
            sources[key] = f"manifest's pieces (no pianists record): {len(found)} pianists heard"
        init = (manifest.get("inputs") or {}).get("init") or {}
        if init.get("kind") == "artifact" and init.get("stage") and init.get("version"):
            todo.append((init["stage"], init["version"]))
    return heard, sources


def head_training_set(cfg, storage, version: str, tracks: dict[str, tuple[str, str]]):
    """The training pieces' segments for the learned descriptor head (no audio: it reads the
    audio of its sample only), the test-side pianists' tracks left out as training leaves them
    out; None when nothing is left. ``tracks``: :func:`mess_ray.splits.track_pianists`."""
    from mess_ray.performances import load_performance_set

    ecfg = cfg.eval
    train = load_performance_set(
        storage,
        version,
        ecfg.holdout_fraction,
        ecfg.seed,
        cfg.audio.sample_rate,
        cfg.audio.window_s,
        pieces="train",
        with_audio=False,
    )
    holdout = pianist_holdout(tracks, ecfg.test_pianist_fraction, ecfg.seed)
    if train is not None and holdout.tracks:
        kept = ~np.isin(train.track_ids, list(holdout.tracks))
        train = train.subset(kept) if kept.any() else None
    return train


def load_eval_data(cfg, storage, version: str, validation_share: float = 0.5):
    """Held-out segments with their labels, the training pieces' segments (for the descriptor
    head; the test-side pianists' tracks left out as training leaves them out) and every track's
    piece and pianist: (EvalData, PerformanceSet of training pieces or None, tracks). The
    EvalData's heard pianists are left for :func:`run_protocol` to fill from the manifests."""
    import pyarrow.compute as pc

    from mess_ray.performances import load_performance_set
    from mess_ray.segments import segments_dataset

    ecfg = cfg.eval
    dataset = segments_dataset(storage, version)
    meta = dataset.to_table(columns=["segment_id", "track_id", "piece_id", "metadata_json"])
    tracks = track_pianists(meta)
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
    train = head_training_set(cfg, storage, version, tracks)
    data = EvalData(perf, labels, split.as_dict(), None)
    return data, train, tracks


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


def train_head(cfg, storage, version: str, train, seed: int = 0, audio_transform=None):
    """The learned descriptor head trained on the training pieces: a function from raw
    descriptor matrices to vectors (None when there are fewer than two training pieces).
    ``audio_transform(audio [N, T], track_ids [N]) -> audio``: what the training segments go
    through before their descriptors (the same as the evaluated segments went through)."""
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
    if audio_transform is not None:
        train_audio = audio_transform(train_audio, train.track_ids[take])
    train_desc = descriptor_matrix(list(train_audio), sr)
    train_z, mean, std = zscore(train_desc)
    performers = None
    if cfg.finetune.performer_weight > 0:
        # The same performer term as fine-tuning (its own batches of pianists in two pieces).
        tracks = read_track_pianists(storage, version)
        performers = np.array(
            [tracks.get(t, ("", ""))[1] for t in train.track_ids[take]], dtype=object
        )
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
        performers=performers,
        performer_weight=cfg.finetune.performer_weight,
        seed=seed,
    )
    return lambda desc: head((desc - mean) / np.where(std > 1e-12, std, 1.0))


def feature_baselines(
    audio: np.ndarray, sample_rate: int, head, seed: int = 0, desc: np.ndarray | None = None
):
    """Every baseline's vectors for one evaluated set of segments (feature baselines z-scored
    over that set; ``head`` from :func:`train_head` or None; ``desc``: the segments' descriptor
    matrix when already computed)."""
    from mess_ray.descriptors import descriptor_matrix, zscore
    from mess_ray.eval import baselines as bl

    out: dict[str, np.ndarray] = {}
    log.info("protocol baselines on %d segments", len(audio))
    if desc is None:
        desc = descriptor_matrix(list(audio), sample_rate)
    z, _, _ = zscore(desc)
    out[bl.DESCRIPTORS] = z.astype(np.float32)
    out[bl.CHROMA] = bl.feature_embeddings(bl.CHROMA, audio, sample_rate)
    out[bl.MFCC] = bl.feature_embeddings(bl.MFCC, audio, sample_rate)
    for name in bl.TIMELINES:
        out[name] = bl.feature_embeddings(name, audio, sample_rate)
    if head is not None:
        out[bl.DESCRIPTOR_HEAD] = head(desc)
    out[bl.CHANCE] = bl.chance_embeddings(len(audio), seed)
    return out


AUDIO_EXPRESSION = "audio-expression"
MIDI_REFERENCE = "midi-reference"
WORK_REL = "+work-rel"
REC_REL = "+rec-rel"


def expression_vectors(
    perf, held_desc: np.ndarray, sr: int, expression: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The audio expression features and the performed-MIDI reference (z-scored over the
    evaluated set ``perf``, a PerformanceSet, NaN imputed by the column mean), and the
    chain-normalised ``+rec-rel`` variants of the descriptors and the expression features (level
    columns relative to the recording's median)."""
    from mess_ray.descriptors import (
        CHAIN_LEVEL_DESCRIPTORS,
        CHAIN_LEVEL_EXPRESSION,
        DESCRIPTOR_NAMES,
        EXPRESSION_NAMES,
        expression_matrix,
        impute_columns,
        zscore,
    )
    from mess_ray.work_relative import recording_relative

    out: dict[str, np.ndarray] = {}
    if expression is None:  # [N, len(EXPRESSION_NAMES)] raw features, NaN unknown
        expression = expression_matrix(list(perf.audio), sr, progress=True)
    expression = impute_columns(expression)
    out[AUDIO_EXPRESSION] = zscore(expression)[0].astype(np.float32)
    if perf.has_midi.any():
        out[MIDI_REFERENCE] = zscore(impute_columns(perf.midi_descriptors))[0].astype(np.float32)
    recordings = perf.track_ids
    level_cols = [DESCRIPTOR_NAMES.index(n) for n in CHAIN_LEVEL_DESCRIPTORS]
    out["descriptors" + REC_REL] = zscore(recording_relative(held_desc, recordings, level_cols))[
        0
    ].astype(np.float32)
    expr_cols = [EXPRESSION_NAMES.index(n) for n in CHAIN_LEVEL_EXPRESSION]
    out[AUDIO_EXPRESSION + REC_REL] = zscore(recording_relative(expression, recordings, expr_cols))[
        0
    ].astype(np.float32)
    return out


def work_relative_systems(
    cfg, data: EvalData, systems: dict[str, np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    """``name+work-rel`` for each of ``names`` in ``systems``: every segment relative to its
    work's norm over the evaluated corpus (cfg.work_relative: mode, aligned, by_chain)."""
    from mess_ray.work_relative import WorkNorms, aligned_relative

    wcfg = cfg.work_relative
    works = np.asarray(data.perf.piece_ids, dtype=object)
    if wcfg.by_chain:
        works = np.asarray([f"{w}|{c}" for w, c in zip(works, data.labels.chain)], dtype=object)
    perfs = data.labels.performance
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name not in systems:
            continue
        x = np.asarray(plain_vectors(systems[name]), dtype=np.float64)
        if wcfg.aligned:
            rel = aligned_relative(
                x,
                works,
                perfs,
                data.perf.beat_spans,
                min_performances=wcfg.min_performances,
                mode=wcfg.mode,
            )
        else:
            norms = WorkNorms.fit(
                x, works, perfs, min_performances=wcfg.min_performances, mode=wcfg.mode
            )
            rel = norms.transform(x, works)
        out[name + WORK_REL] = rel.vectors.astype(np.float32)
    return out


def score_all(
    cfg,
    data: EvalData,
    systems: dict[str, np.ndarray],
    reference: str | None,
    splits=(VALIDATION, TEST),
    views: list[View] | None = None,
) -> list[dict[str, Any]]:
    """Segment-level rows of every view (``views``, built here when not given), then
    excerpt-level performer identity rows (content scorers have no vector to pool: left out)."""
    ecfg = cfg.eval
    if views is None:
        views = build_views(
            data,
            splits=splits,
            hop_s=cfg.audio.hop_s,
            max_queries=ecfg.max_queries_per_chain,
            seed=ecfg.seed,
        )
    kw = dict(ndcg_k=ecfg.ndcg_k, n_boot=ecfg.bootstrap_samples, seed=ecfg.seed)
    rows = score_table(views, systems, data, reference, **kw)
    groups, first = excerpt_groups(data)
    pooled = {
        name: pool_excerpts(plain_vectors(v), groups, first.size)
        for name, v in systems.items()
        if not isinstance(v, ContentScorer)
    }
    rows += score_table(excerpt_views(data, first, splits), pooled, data, reference, **kw)
    return rows


def baseline_vectors(
    cfg, storage, version: str, data: EvalData, train, seed: int = 0, head=None, expression=None
) -> dict[str, np.ndarray]:
    """Every baseline's vectors for the held-out segments (chroma, mfcc, descriptors, the learned
    descriptor head trained on the training pieces, chance, the expression features and their
    variants); ``head``: one already trained; ``expression``: precomputed expression features."""
    from mess_ray.descriptors import descriptor_matrix

    if head is None:
        head = train_head(cfg, storage, version, train, seed)
    sr = cfg.audio.sample_rate
    desc = descriptor_matrix(list(data.perf.audio), sr)
    out = feature_baselines(data.perf.audio, sr, head, seed, desc=desc)
    out.update(expression_vectors(data.perf, desc, sr, expression))
    return out


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
    precomputed_infos: dict[str, dict] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The full table for ``model_refs`` (plus the random-init encoder ``random_ref``) and every
    baseline. ``embed_system(cfg, storage, ref, held_out) -> (vectors, info)`` embeds one model
    (the evaluate stage passes its own, so this module does not import it back).
    Returns (rows, summary: split, counts, skipped systems)."""
    import time

    from mess_ray.eval import baselines as bl

    ecfg = cfg.eval
    data, train, tracks = load_eval_data(cfg, storage, version, ecfg.validation_share)
    systems: dict[str, Any] = {}
    infos: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    precomputed = precomputed or {}
    for ref in [*model_refs, random_ref]:
        if ref in systems:
            continue
        if ref in precomputed and len(precomputed[ref]) == len(data.perf):
            systems[ref] = precomputed[ref]
            infos[ref] = (precomputed_infos or {}).get(ref, {})
            continue
        try:
            systems[ref], infos[ref] = embed_system(cfg, storage, ref, data.perf)
        except FileNotFoundError as err:
            skipped[ref] = str(err)
    head = train_head(cfg, storage, version, train, ecfg.seed)
    systems.update(baseline_vectors(cfg, storage, version, data, train, ecfg.seed, head=head))
    # Unseen pianists: nobody behind an evaluated system heard them (the training manifests say
    # whom each stage heard; the descriptor head trained here on what `train` kept).
    heard, heard_from = heard_pianists(
        storage, [r for r in model_refs if r in systems and r != random_ref], tracks
    )
    if heard is not None and bl.DESCRIPTOR_HEAD in systems and train is not None:
        head_heard = {tracks[t][1] for t in set(train.track_ids) if t in tracks and tracks[t][1]}
        heard |= head_heard
        heard_from["descriptor_head"] = f"its training segments: {len(head_heard)} pianists"
    data.heard_pianists = heard
    t0 = time.perf_counter()
    cens = ContentScorer(
        bl.CensDtw(
            data.perf.track_ids,
            data.perf.start_s,
            data.perf.audio,
            cfg.audio.sample_rate,
            max_queries=ecfg.dtw_max_queries,
            seed=ecfg.seed,
        ),
        (PASSAGE,),
        "a content baseline (CENS alignment): no vector for this task",
    )
    cens.seconds = time.perf_counter() - t0  # features of every track and query, then alignments
    systems[bl.CENS_DTW] = cens
    reference = next(
        (r for r in model_refs if r in systems and not isinstance(systems[r], ContentScorer)),
        None,
    )
    if cfg.work_relative.enabled:
        systems.update(
            work_relative_systems(
                cfg,
                data,
                systems,
                [
                    *([reference] if reference else []),
                    bl.DESCRIPTORS,
                    bl.DESCRIPTOR_HEAD,
                    AUDIO_EXPRESSION,
                    MIDI_REFERENCE,
                ],
            )
        )
    views = build_views(
        data, hop_s=cfg.audio.hop_s, max_queries=ecfg.max_queries_per_chain, seed=ecfg.seed
    )
    with_query_variants(systems, infos, data, views, cfg.audio.sample_rate)
    rows = score_all(cfg, data, systems, reference, views=views)
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
        # models scored at their best query lag (QueryVariants): their content timeline record
        "query_lags": {
            name: (infos.get(name) or {}).get("content_timeline")
            for name, v in systems.items()
            if isinstance(v, QueryVariants)
        },
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
        "work_relative": cfg.work_relative.model_dump(mode="json"),
        "views": len(views),
        STYLE: style_summary,
        "bootstrap": {"samples": ecfg.bootstrap_samples, "over": "pieces", "level": 0.95},
        "unseen_pianists": {
            "test_pianist_fraction": ecfg.test_pianist_fraction,
            "left_out": list(
                pianist_holdout(tracks, ecfg.test_pianist_fraction, ecfg.seed).pianists
            ),
            "heard": None if heard is None else len(heard),
            "heard_from": heard_from,
            "coverage": [
                {
                    "split": v.split,
                    "chains": v.condition,
                    "pieces": int(len(set(v.clusters))),
                    "pianists": int(len(set(v.pianists))),
                    "queries": int(v.queries.size),
                }
                for v in views
                if v.task == PERFORMER_UNSEEN
            ],
        },
        "cens_dtw": {
            "seconds": round(cens.seconds, 1),
            "alignments": cens.scorer.alignments,
            "unscored_queries": cens.unscored,
            "max_queries_per_view": ecfg.dtw_max_queries,
            "feature_rate_hz": cens.scorer.feature_rate,
            "cens_smooth_frames": cens.scorer.cens_smooth,
        },
    }
    return rows, summary


# -- the report --------------------------------------------------------------------------------
# What a benchmark prints of a table row (one JSON line per figure).
FIGURE_KEYS = (
    "split",
    "task",
    "chains",
    "metric",
    "system",
    "value",
    "ci_low",
    "ci_high",
    "pieces",
    "queries",
    "chance",
    "ci_low_pianists",
    "ci_high_pianists",
    "pianists",
    "reference",
    "diff",
    "diff_low",
    "diff_high",
    "reference_verdict",
)


def figure_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The :data:`FIGURE_KEYS` a table row has (a benchmark's JSON line for that figure)."""
    return {k: row[k] for k in FIGURE_KEYS if k in row}


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
        if r["value"] is None:
            lines.append(
                f"| {r['split']} | {r['task']} | {r['chains']} | {r['metric']} | {r['system']} | "
                f"n/a | | {r['pieces']} | {r['queries']} | | | n/a |"
            )
            continue
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
    lines += _footnotes(summary)
    return "\n".join(lines) + "\n"


def _footnotes(summary: dict[str, Any]) -> list[str]:
    notes = []
    dtw = summary.get("cens_dtw")
    if dtw:
        sampled = (
            f"; {dtw['unscored_queries']} queries left unscored (at most "
            f"{dtw['max_queries_per_view']} per view, a seeded sample; its rows and verdicts cover "
            "the scored ones)"
            if dtw.get("unscored_queries")
            else "; every query scored"
        )
        notes.append(
            f"- cens_dtw: CENS ({dtw['feature_rate_hz']} Hz, {dtw['cens_smooth_frames']}-frame "
            f"smoothing) aligned by subsequence DTW to every candidate performance, passage tasks "
            f"only (n/a elsewhere); {dtw['alignments']} alignments in {dtw['seconds']} s{sampled}."
        )
    unseen = summary.get("unseen_pianists")
    if unseen:
        if unseen.get("heard") is None:
            notes.append(
                "- performer_identity_unseen: left out, who the models heard is unknown "
                f"({unseen['heard_from']})."
            )
        else:
            cover = "; ".join(
                f"{c['split']} {c['chains']}: {c['pieces']} pieces, {c['pianists']} pianists, "
                f"{c['queries']} queries"
                for c in unseen["coverage"]
            )
            notes.append(
                f"- performer_identity_unseen: queries whose pianist none of the evaluated "
                f"systems' training heard ({unseen['heard']} pianists heard, read from "
                f"{', '.join(unseen['heard_from'])}); eval.test_pianist_fraction "
                f"{unseen['test_pianist_fraction']} left out of training: "
                f"{', '.join(unseen['left_out']) or 'nobody'}. Coverage: {cover or 'none'}."
            )
    return ["", *notes] if notes else []


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

    head = [r for r in rows if r["metric"] == HEADLINE.get(r["task"]) and r["value"] is not None]
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
