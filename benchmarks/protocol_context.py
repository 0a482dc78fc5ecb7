"""Longer context on the yardstick's **validation** pieces (issue 20, item 2): does a phrase-level
view, each segment's vector pooled with its neighbours in the same recording
(:func:`mess_ray.segments.pool_neighbours`), help the protocol's tasks?

One trained model is embedded once on the validation segments; every pooling width is scored on
the same views against the unpooled vectors (paired difference over pieces, 95 % CI, verdict of
the unpooled model against each width). Test pieces are embedded only with ``--split test``: the
chosen setting's one report.

    python -m benchmarks.protocol_context --set storage.root=./protocol-data
    python -m benchmarks.protocol_context --model finetune --neighbours 1 2 4 --decay 0.7
    python -m benchmarks.protocol_context --model finetune --compare <model folder> --neighbours
    python -m benchmarks.protocol_context --model finetune --neighbours --timeline 16 32 \
        --timeline-weight 0.25 0.5

``--timeline K``: the model's encoder frames (the hidden states its overall head pools, weighted
as it weights them) kept *in time order*: averaged into K equal bins, centred over the bins,
flattened (:func:`mess_ray.models.embedding.timeline_pool`), and, per ``--timeline-weight w``,
joined to the model's own vector (``sqrt(1 - w)`` times it beside ``sqrt(w)`` times the timeline,
so a cosine is ``(1 - w) * model + w * timeline``). A model with a trained timeline part
(``model.timeline_bins``) is also scored without it (``<ref>[no timeline]``: its search with
the timeline weighed 0), on it alone (``<ref>[timeline]``) and re-weighted per
``--timeline-weight`` (``<ref>[timeline@w]``). ``--baselines`` scores the protocol's chroma
statistics and timeline baselines (``chroma_timeline``, ``onset_timeline``) on the same views;
``--reference`` pairs every verdict against another scored system than ``--model``.
``--baselines`` also scores the descriptor family (``descriptors``, ``descriptors+rec-rel``,
``descriptor_head`` unless ``--no-head``, ``audio-expression``, ``audio-expression+rec-rel``, as
the protocol computes them). ``--fuse NAME@w`` joins a baseline's vectors (``chroma_timeline``,
``onset_timeline``, ``chroma``, ``timelines``: the two timelines side by side, equally weighted,
at ``--timelines-rates`` frames per second, or one of the descriptor family) to the model's the
same way (``<model>+NAME@w``: a cosine is ``(1 - w) * model + w * baseline``; a model searched at
query lags keeps them, the baseline's vector computed once per window); with ``--baselines``
each joined baseline is scored on its own too.
``--facet-weights NAME=W,...``: the model also searched with per-part query weights, as the
service's facet weights (``<model>[facets NAME=W,...]``; unnamed parts weigh 0; a model with
query lags keeps them).
``--query-lags L ...``: the model (and each ``--compare``) whose vectors end in the content
timeline also scored with its queries tried at lags up to +-L ms every ``--query-step`` ms, each
candidate at its best lag (``<ref>@lags<L>``, :class:`mess_ray.eval.protocol.QueryVariants`, as
``model.content_timeline_query_shift_ms`` searches); a model that declares lags is scored with
them anyway; with ``--timeline-weight w`` each lagged model is also scored with its timeline
part re-weighted to ``w`` (``<ref>@lags<L>[timeline@w]``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.common import emit_protocol_rows, emit_with_load
from mess_ray.config import load_config
from mess_ray.content import timelines
from mess_ray.facets import join


def _full(n: int, rows: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[n, D] with ``v`` in ``rows`` and zeros elsewhere (test rows: no view reads them)."""
    out = np.zeros((n, v.shape[1]), dtype=np.float64)
    out[rows] = v
    return out


def timeline_systems(cfg, storage, ref, audio, model_full, rows, bins, weights):
    """The model's time-ordered frames per bin count (and each joined to its vector per
    weight), as full-size arrays (rows outside ``rows`` zero)."""
    import torch

    from mess_ray.models import Embedder
    from mess_ray.models.embedding import EmbeddingModel, timeline_pool

    model = Embedder.from_ref(cfg, storage, ref).model
    if not isinstance(model, EmbeddingModel):
        raise SystemExit(f"--timeline needs an EmbeddingModel folder; {ref!r} is not one")
    out: dict[str, np.ndarray] = {}
    frames = []
    with torch.inference_mode():
        for start in range(0, len(audio), cfg.eval.batch_size):
            chunk = torch.from_numpy(
                np.ascontiguousarray(audio[start : start + cfg.eval.batch_size])
            )
            frames.append(model.frames(chunk).float())
    frames = torch.cat(frames)
    own = model_full[rows]
    for k in bins:
        tl = timeline_pool(frames, k).numpy().astype(np.float64)
        out[f"{ref}+timeline{k}"] = _full(len(model_full), rows, tl)
        for w in weights:
            out[f"{ref}+timeline{k}@{w:g}"] = _full(
                len(model_full), rows, join([own, tl], [1 - w, w])
            )
    return out


#: the descriptor family: hand-crafted statistics, their learned head (trained on the training
#: pieces) and the audio expression features, each as the protocol scores it
DESCRIPTOR_FAMILY = (
    "descriptors",
    "descriptors+rec-rel",
    "descriptor_head",
    "audio-expression",
    "audio-expression+rec-rel",
)
FUSABLE = ("chroma", "chroma_timeline", "onset_timeline", "timelines", *DESCRIPTOR_FAMILY)


def parse_fuse(text: str) -> tuple[str, float]:
    name, _, weight = text.rpartition("@")
    try:
        w = float(weight)
    except ValueError:
        raise ValueError(f"--fuse takes NAME@w, got {text!r}") from None
    if name not in FUSABLE or not 0 < w < 1:
        raise ValueError(f"--fuse takes NAME@w, NAME one of {FUSABLE}, w in (0, 1); got {text!r}")
    return name, w


def timeline_part_systems(ref: str, vectors: np.ndarray, layout, weights) -> dict[str, np.ndarray]:
    """A model with a timeline part: without it, on it alone, and re-weighted (the cosine
    ``(1 - w) * rest + w * timeline``); {} for a model without one."""
    from mess_ray.facets import TIMELINE

    if not layout or TIMELINE not in layout:
        return {}
    start, end = layout[TIMELINE]
    rest, timeline = join([vectors[:, :start]], [1.0]), join([vectors[:, start:end]], [1.0])
    out = {f"{ref}[no timeline]": rest, f"{ref}[timeline]": timeline}
    for w in weights:
        out[f"{ref}[timeline@{w:g}]"] = join([rest, timeline], [1 - w, w])
    return out


def reweighted_variants(system, layout, w: float):
    """A model searched at several query lags (:class:`QueryVariants`) with its timeline part
    re-weighted to ``w`` of the cosine (the rest ``1 - w``), indexed vectors and every variant."""
    from mess_ray.eval.protocol import QueryVariants
    from mess_ray.facets import TIMELINE

    start, end = layout[TIMELINE]

    def rw(x: np.ndarray) -> np.ndarray:
        return join([x[:, :start], x[:, start:end]], [1 - w, w])

    return QueryVariants(rw(system.vectors), np.stack([rw(q) for q in system.queries]))


def fused(system, feature: np.ndarray, w: float):
    """``system`` (vectors, or a :class:`QueryVariants` searched at several query lags) joined
    to a baseline's ``feature`` vectors: a cosine is ``(1 - w) * system + w * feature``, the
    feature unchanged at every lag (it is computed once per window)."""
    from mess_ray.eval.protocol import QueryVariants

    if isinstance(system, QueryVariants):
        return QueryVariants(
            join([system.vectors, feature], [1 - w, w]),
            np.stack([join([q, feature], [1 - w, w]) for q in system.queries]),
        )
    return join([system, feature], [1 - w, w])


def descriptor_family(cfg, storage, version, perf, train, wanted, no_head: bool):
    """The descriptor family's vectors for ``perf`` (the split's segments), as the protocol
    scores them (z-scored over the evaluated set; the head trained on the training pieces)."""
    from mess_ray.descriptors import descriptor_matrix, zscore
    from mess_ray.eval import baselines as bl
    from mess_ray.eval.protocol import expression_vectors, train_head

    sr = cfg.audio.sample_rate
    desc = descriptor_matrix(list(perf.audio), sr)
    out = {bl.DESCRIPTORS: zscore(desc)[0].astype(np.float32)}
    if bl.DESCRIPTOR_HEAD in wanted:
        if no_head:
            raise SystemExit("--fuse descriptor_head needs the head: leave out --no-head")
        head = train_head(cfg, storage, version, train, cfg.eval.seed)
        if head is None:
            raise SystemExit("no training pieces: the descriptor head cannot be trained")
        out[bl.DESCRIPTOR_HEAD] = head(desc)
    if wanted & {"descriptors+rec-rel", "audio-expression", "audio-expression+rec-rel"}:
        out.update(expression_vectors(perf, desc, sr))
    return {k: v for k, v in out.items() if k in wanted}


def parse_facet_weights(text: str) -> dict[str, float]:
    """``name=w,name=w``: per-part query weights as the service takes them (unnamed parts 0)."""
    from mess_ray.facets import parse_weight_items

    return parse_weight_items(text.split(","), "--facet-weights")


def facet_weighted(system, layout, weights: dict[str, float]):
    """``system`` searched with per-part query weights (:func:`mess_ray.facets.weighted_query`,
    as the service's facet weights search): every query variant scaled, the indexed vectors
    unchanged."""
    from mess_ray.eval.protocol import QueryVariants
    from mess_ray.facets import weighted_query

    if isinstance(system, QueryVariants):
        vectors, queries = system.vectors, system.queries
    else:
        vectors, queries = system, np.asarray(system)[None]
    return QueryVariants(vectors, np.stack([weighted_query(q, layout, weights) for q in queries]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--model", default="finetune")
    parser.add_argument(
        "--split",
        choices=["validation", "test"],
        default="validation",
        help="validation chooses; test is scored once, after the choice",
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        default=[],
        help="further model refs (folders) scored on the same views, paired against --model",
    )
    parser.add_argument("--neighbours", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--decay", type=float, default=0.7)
    parser.add_argument("--timeline", nargs="*", type=int, default=[], help="bins per segment")
    parser.add_argument("--timeline-weight", nargs="*", type=float, default=[])
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also chroma statistics, the timelines and the descriptor family",
    )
    parser.add_argument(
        "--fuse",
        nargs="*",
        default=[],
        help="NAME@w: a baseline (chroma_timeline, onset_timeline, chroma, timelines, or the "
        "descriptor family: descriptors, descriptors+rec-rel, descriptor_head, audio-expression, "
        "audio-expression+rec-rel) joined to the model's vector with weight w",
    )
    parser.add_argument(
        "--timelines-rates",
        nargs=2,
        type=float,
        default=[20.0, 50.0],
        metavar=("CHROMA", "ONSET"),
        help="frames per second of the joined 'timelines' (chroma, onset envelope)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="the system every verdict is paired against (default: --model), e.g. "
        "'<folder>[timeline]' or chroma_timeline",
    )
    parser.add_argument(
        "--query-lags",
        nargs="*",
        type=float,
        default=[],
        metavar="L",
        help="also score models with a content timeline at query lags up to +-L ms",
    )
    parser.add_argument("--query-step", type=float, default=20.0, help="ms between query lags")
    parser.add_argument(
        "--facet-weights",
        nargs="*",
        default=[],
        metavar="NAME=W,...",
        help="the model searched with these per-part query weights (unnamed parts 0), as the "
        "service's facet weights",
    )
    parser.add_argument(
        "--no-head",
        action="store_true",
        help="with --baselines, leave the descriptor head out (it is trained on the training pieces)",
    )
    args = parser.parse_args(argv)
    if any(lag <= 0 for lag in args.query_lags) or args.query_step <= 0:
        parser.error("--query-lags and --query-step take positive milliseconds")
    if any(k < 2 for k in args.timeline) or any(not 0 < w < 1 for w in args.timeline_weight):
        parser.error("--timeline needs K >= 2 bins and --timeline-weight values in (0, 1)")
    try:
        fuse = [parse_fuse(text) for text in args.fuse]
        facet_weights = [parse_facet_weights(text) for text in args.facet_weights]
    except ValueError as err:
        parser.error(str(err))

    from mess_ray.eval.benchmark import embed_system
    from mess_ray.eval.protocol import (
        QueryVariants,
        build_views,
        load_eval_data,
        with_query_variants,
    )
    from mess_ray.segments import pool_neighbours
    from mess_ray.storage import Storage

    cfg = load_config(args.config, args.set)
    storage = Storage.from_config(cfg.storage)
    version = storage.require_latest("ingest")
    started = time.time()
    data, train, _ = load_eval_data(cfg, storage, version, cfg.eval.validation_share)
    side = data.labels.side == args.split
    vectors, info = embed_system(cfg, storage, args.model, data.perf.subset(side))
    full = np.zeros((len(data.perf), vectors.shape[1]), dtype=np.float64)
    full[side] = vectors  # the other split's rows stay zero: no view below reads them
    embedded_s = time.time() - started
    systems = {args.model: full}
    infos = {args.model: info}
    parted = timeline_part_systems(
        args.model, vectors, info.get("facet_layout"), args.timeline_weight
    )
    for ref in args.compare:
        other, other_info = embed_system(cfg, storage, ref, data.perf.subset(side))
        systems[ref] = _full(len(data.perf), side, other)
        infos[ref] = other_info
        parted.update(
            timeline_part_systems(ref, other, other_info.get("facet_layout"), args.timeline_weight)
        )
    for name, v in parted.items():
        systems[name] = _full(len(data.perf), side, v)
    from mess_ray.eval import baselines as bl

    features: dict[str, np.ndarray] = {}
    wanted = {name for name, _ in fuse}
    if args.baselines:
        wanted |= {bl.CHROMA, *bl.TIMELINES, *DESCRIPTOR_FAMILY}
        if args.no_head:
            wanted.discard(bl.DESCRIPTOR_HEAD)
    side_audio = data.perf.audio[side]
    for name in sorted(wanted - {"timelines", *DESCRIPTOR_FAMILY}):
        features[name] = bl.feature_embeddings(name, side_audio, cfg.audio.sample_rate)
    if wanted & set(DESCRIPTOR_FAMILY):
        features.update(
            descriptor_family(
                cfg, storage, version, data.perf.subset(side), train, wanted, args.no_head
            )
        )
    if "timelines" in wanted:
        chroma_rate, onset_rate = args.timelines_rates
        features["timelines"] = timelines(
            side_audio, cfg.audio.sample_rate, chroma_rate, onset_rate
        )
    if args.baselines:
        for name, v in features.items():
            systems[name] = _full(len(data.perf), side, v)
    for k in args.neighbours:
        pooled = np.zeros_like(full)
        pooled[side] = pool_neighbours(
            vectors,
            data.perf.track_ids[side],
            data.perf.start_s[side],
            cfg.audio.hop_s,
            k,
            args.decay,
        )
        systems[f"{args.model}+context{k}"] = pooled
    if args.timeline:
        systems.update(
            timeline_systems(
                cfg,
                storage,
                args.model,
                data.perf.audio[side],
                systems[args.model],
                side,
                args.timeline,
                args.timeline_weight,
            )
        )
    views = build_views(
        data,
        splits=(args.split,),
        hop_s=cfg.audio.hop_s,
        max_queries=cfg.eval.max_queries_per_chain,
        seed=cfg.eval.seed,
    )
    for ref, ref_info in list(infos.items()):
        record = ref_info.get("content_timeline")
        for lag in args.query_lags if record else ():
            name = f"{ref}@lags{lag:g}"
            systems[name] = systems[ref]
            infos[name] = {
                **ref_info,
                "content_timeline": {
                    **record,
                    "query_shift_ms": lag,
                    "query_step_ms": args.query_step,
                },
            }
    with_query_variants(systems, infos, data, views, cfg.audio.sample_rate)
    for name in [n for n, v in systems.items() if isinstance(v, QueryVariants)]:
        layout = infos[name].get("facet_layout")
        if f"{name}[timeline]" in systems:  # the timeline alone, at the model's lags too
            systems[f"{name}[timeline]"] = reweighted_variants(systems[name], layout, 1.0)
        for w in args.timeline_weight:
            systems[f"{name}[timeline@{w:g}]"] = reweighted_variants(systems[name], layout, w)
    for name, w in fuse:  # after the lags: a lagged model is fused at every query lag
        systems[f"{args.model}+{name}@{w:g}"] = fused(
            systems[args.model], _full(len(data.perf), side, features[name]), w
        )
    for text, weights in zip(args.facet_weights, facet_weights):
        layout = info.get("facet_layout")
        if not layout:
            raise SystemExit(f"--facet-weights: {args.model} has no facet layout")
        if info.get("query_facet_weights"):
            raise SystemExit(
                f"--facet-weights: {args.model} searches with its own query weights; give the "
                "model without them (e.g. shipped:tiny-asap-v3 for shipped:tiny-asap-v4)"
            )
        try:
            systems[f"{args.model}[facets {text}]"] = facet_weighted(
                systems[args.model], layout, weights
            )
        except ValueError as err:
            raise SystemExit(f"--facet-weights {text}: {err}") from None
    reference = args.reference or args.model
    if reference not in systems:
        raise SystemExit(f"--reference {reference!r} is not a scored system: {sorted(systems)}")
    emit_protocol_rows(cfg, views, systems, data, reference, "protocol_context", decay=args.decay)
    emit_with_load(
        figure="protocol_context_run",
        model=info.get("version"),
        ingest=version,
        split=args.split,
        segments=int(side.sum()),
        embed_seconds=round(embedded_s, 1),
        seconds=round(time.time() - started, 1),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
