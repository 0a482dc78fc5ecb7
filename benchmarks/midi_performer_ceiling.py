"""How much of the pianist does the *performed MIDI* carry, and over how long a stretch? (issue 20)

Performer identity from the performed-MIDI descriptors (:mod:`mess_ray.midi_descriptors`: tempo
against the score, rubato, timing, velocity level / range / slope, articulation, pedal) of the
first ``L`` seconds of every ASAP performance, for several ``L`` up to the whole performance:
relevant = the same pianist in *another piece*, candidates = every performance of the other
pieces. No audio, no rendering and no learning: an upper reference for any audio system scored
on excerpts of that length, and a check of the issue's figures (excerpt-level mAP 0.22 with the
descriptors z-scored over the corpus, 0.37 z-scored within each piece). One JSON line per
figure; 95 % CIs by the bootstrap over pieces; chance is the expected AP of a random ranking.

    python -m benchmarks.midi_performer_ceiling [--source ../shared/datasets/asap-dev]
        [--seconds 4 20 60 120 0]          # 0: the whole performance
        [--pieces all|protocol-heldout|protocol-validation|protocol-test]
        [--ablate]                        # each MIDI system without one descriptor at a time

``protocol-*`` keeps the held-out (validation, test or both) pieces of ``configs/protocol.yaml``'s
split, so the figures compare with its ``performer_identity_excerpt`` rows (20 s excerpts).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from benchmarks.common import emit_with_load
from mess_ray.midi_descriptors import (
    EXPRESSIVE_MIDI_DESCRIPTORS,
    MIDI_DESCRIPTOR_NAMES,
    expressive_matrix,
    midi_descriptor_vector,
    read_beat_annotations,
)


def performances(source: str, min_performances: int = 2):
    """(piece, pianist, midi path, beats path, score beats path) of every ASAP performance of a
    piece with ``min_performances`` or more performances."""
    from mess_ray.config import RenderConfig
    from mess_ray.render.sources import list_score_refs
    from mess_ray.splits import pianist_of

    cfg = RenderConfig(
        source="asap", source_path=source, num_pieces=10**6, min_performances=min_performances
    )
    out = []
    for ref in list_score_refs(cfg):
        extra = dict(ref.extra)
        out.append(
            (
                ref.piece_id,
                pianist_of(extra["performer"]),
                ref.locator,
                extra.get("performance_annotations_uri"),
                extra.get("midi_score_annotations_uri"),
            )
        )
    return out


def protocol_pieces(config: str, which: str) -> set[str]:
    """The held-out pieces of the protocol corpus's split (``which``: validation, test, both)."""
    from mess_ray.config import load_config
    from mess_ray.render.sources import list_score_refs
    from mess_ray.splits import split_by_piece

    cfg = load_config(config)
    pieces = sorted({r.piece_id for r in list_score_refs(cfg.render)})
    split = split_by_piece(
        pieces, cfg.eval.holdout_fraction, cfg.eval.seed, cfg.eval.validation_share
    )
    if which == "validation":
        return set(split.validation)
    if which == "test":
        return set(split.test)
    return set(split.validation) | set(split.test)


def descriptor_rows(perfs, seconds: list[float]) -> np.ndarray:
    """[len(perfs), len(seconds), D] descriptors of the first L seconds (0: all of it)."""
    import fsspec
    import pretty_midi
    from tqdm.auto import tqdm

    def read_text(uri: str) -> str:
        with fsspec.open(uri, "r") as f:
            return f.read()

    out = np.full((len(perfs), len(seconds), len(MIDI_DESCRIPTOR_NAMES)), np.nan)
    for i, (_, _, midi_path, beats_path, score_path) in enumerate(tqdm(perfs, desc="MIDI")):
        with fsspec.open(midi_path, "rb") as f:
            midi = pretty_midi.PrettyMIDI(f)
        beats = score = None
        if beats_path and score_path:
            try:
                beats = read_beat_annotations(read_text(beats_path))
                score = read_beat_annotations(read_text(score_path))
            except (OSError, ValueError):  # missing or unreadable: no beat descriptors
                beats = score = None
            if beats is not None and beats.size != score.size:  # not one to one
                score = None
        end = midi.get_end_time()
        for j, length in enumerate(seconds):
            stop = end if length <= 0 else min(length, end)
            if stop > 0:
                out[i, j] = midi_descriptor_vector(midi, 0.0, stop, beats, score)
    return out


def standardise(x: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Expressive columns z-scored over all rows, or within each group (piece); NaN -> 0.
    Within a piece this is a plain z-score of the piece's performances (a column unknown in a
    whole piece: 0), not :class:`mess_ray.work_relative.WorkNorms`, whose imputation and
    spread floor differ (whole performances: 0.050 against 0.059 over all pieces)."""
    if groups is None:
        return expressive_matrix(x)[0]
    out = np.zeros((x.shape[0], len(EXPRESSIVE_MIDI_DESCRIPTORS)))
    for g in np.unique(groups):
        rows = groups == g
        block = x[rows][:, [MIDI_DESCRIPTOR_NAMES.index(n) for n in EXPRESSIVE_MIDI_DESCRIPTORS]]
        with warnings.catch_warnings():  # a column unknown for a whole piece stays NaN -> 0
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(block, axis=0)
            std = np.nanstd(block, axis=0)
        z = (block - mean) / np.where(std > 1e-12, std, np.inf)
        out[rows] = np.where(np.isnan(z), 0.0, z)
    return out


def performer_map(vectors: np.ndarray, pieces: np.ndarray, pianists: np.ndarray, n_boot: int):
    """Performer identity over performances: per-query AP, its CI over pieces, and chance."""
    from mess_ray.eval import metrics
    from mess_ray.eval.bootstrap import cluster_bootstrap

    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    other = pieces[:, None] != pieces[None, :]
    relevant = other & (pianists[:, None] == pianists[None, :])
    queries = relevant.any(axis=1)
    sim = (v @ v.T)[queries]
    ap = metrics.average_precision(sim, relevant[queries].astype(float), other[queries])
    chance = metrics.chance_level(relevant[queries], other[queries])
    ci = cluster_bootstrap(ap, pieces[queries], n_boot=n_boot)
    return ci, float(np.nanmean(chance)), int(queries.sum()), len(set(pianists[queries]))


def ablations(x: np.ndarray, pieces: np.ndarray) -> dict[str, np.ndarray]:
    """Both MIDI z-scorings of descriptors ``x`` [N, D] without one expressive descriptor at a
    time (its column blanked before standardising: over the corpus it is dropped, within a
    piece it is 0)."""
    out = {}
    for column in EXPRESSIVE_MIDI_DESCRIPTORS:
        blank = x.copy()
        blank[:, MIDI_DESCRIPTOR_NAMES.index(column)] = np.nan
        out[f"midi z-scored over the corpus without {column}"] = standardise(blank, None)
        out[f"midi z-scored within each piece without {column}"] = standardise(blank, pieces)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="../shared/datasets/asap-dev")
    parser.add_argument("--seconds", type=float, nargs="+", default=[4, 20, 60, 120, 0])
    parser.add_argument(
        "--pieces",
        default="all",
        choices=["all", "protocol-heldout", "protocol-validation", "protocol-test"],
    )
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also score each z-scoring without one descriptor at a time ('<system> without "
        "<descriptor>'): which of them carry the pianist",
    )
    args = parser.parse_args(argv)

    perfs = performances(args.source)
    if args.pieces != "all":
        keep = protocol_pieces(args.config, args.pieces.split("-", 1)[1])
        perfs = [p for p in perfs if p[0] in keep]
    if not perfs:
        raise SystemExit("no performances")
    pieces = np.array([p[0] for p in perfs], dtype=object)
    pianists = np.array([p[1] for p in perfs], dtype=object)
    x = descriptor_rows(perfs, args.seconds)
    rng = np.random.default_rng(0)
    for j, length in enumerate(args.seconds):
        systems = {
            "midi z-scored over the corpus": standardise(x[:, j], None),
            "midi z-scored within each piece": standardise(x[:, j], pieces),
            "random vectors": rng.normal(size=(len(perfs), 8)),
        }
        if args.ablate:
            systems |= ablations(x[:, j], pieces)
        for name, vectors in systems.items():
            ci, chance, queries, n_pianists = performer_map(vectors, pieces, pianists, args.boot)
            emit_with_load(
                {
                    "figure": "midi_performer_ceiling",
                    "pieces": args.pieces,
                    "seconds": "whole performance" if length <= 0 else length,
                    "system": name,
                    "map": round(ci.value, 4),
                    "ci": [round(ci.low, 4), round(ci.high, 4)],
                    "chance": round(chance, 4),
                    "queries": queries,
                    "pianists": n_pianists,
                    "piece_count": int(ci.clusters),
                }
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
