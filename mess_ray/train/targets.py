"""What fine-tuning learns from, built once on the driver: the training rows (training pieces
with a style, mined labels or performed MIDI), pseudo-labels mined by descriptor proximity,
the descriptor statistics that z-score facet targets, the facet -> descriptor groups, and the
performed-MIDI targets of pair source (b)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mess_ray.config import MessRayConfig
from mess_ray.descriptors import DESCRIPTOR_NAMES, FACET_DESCRIPTORS, descriptor_vector
from mess_ray.segments import (
    decode_audio,
    fit_length,
    segments_dataset,
    split_pieces,
    window_samples,
)
from mess_ray.splits import pianist_holdout, read_track_pianists
from mess_ray.storage import Storage

log = logging.getLogger(__name__)


def zscore_descriptors(matrix: np.ndarray, stats: dict[str, list[float]]) -> np.ndarray:
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    return (matrix - mean) / np.where(std > 1e-12, std, 1.0)


def facet_groups(descriptor_map: dict[str, tuple[str, ...]] | None = None) -> dict[str, list[int]]:
    """Facet -> indices into :data:`DESCRIPTOR_NAMES` (the map is read when called, so a
    descriptor added to FACET_DESCRIPTORS later is picked up)."""
    descriptor_map = FACET_DESCRIPTORS if descriptor_map is None else descriptor_map
    groups = {}
    for facet, names in descriptor_map.items():
        unknown = [n for n in names if n not in DESCRIPTOR_NAMES]
        if unknown:
            raise ValueError(f"facet {facet!r} names unknown descriptors {unknown}")
        groups[facet] = [DESCRIPTOR_NAMES.index(n) for n in names]
    return groups


def facet_agreement(
    embeddings: np.ndarray,
    layout: dict[str, tuple[int, int]],
    descriptors_z: np.ndarray,
    groups: dict[str, list[int]],
) -> dict[str, dict[str, float]]:
    """Does each facet score track its descriptor? Spearman rank correlation, over all pairs,
    between a part's cosine and the facet's descriptor similarity (minus the Euclidean distance
    of z-scored descriptor groups), for every facet and, as the reference, the overall part.

    Returns ``{facet: {part_name: rho}}`` so the facet's own part can be compared with the
    overall part (and with other models' parts) on the same pairs.
    """
    from scipy.stats import spearmanr

    embeddings = np.asarray(embeddings, dtype=np.float64)
    n = embeddings.shape[0]
    if n < 3:
        raise ValueError("facet agreement needs at least 3 segments")
    upper = np.triu_indices(n, k=1)
    part_cos = {}
    for name, (start, end) in layout.items():
        block = embeddings[:, start:end]
        block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        part_cos[name] = (block @ block.T)[upper]
    out: dict[str, dict[str, float]] = {}
    for facet, idx in groups.items():
        group = np.asarray(descriptors_z, dtype=np.float64)[:, idx]
        similarity = -np.linalg.norm(group[:, None, :] - group[None, :, :], axis=-1)[upper]
        out[facet] = {
            name: float(spearmanr(cos, similarity).statistic) for name, cos in part_cos.items()
        }
    return out


def training_selection(
    metadata: pa.Table,
    holdout_fraction: float,
    seed: int,
    require_styles: bool = True,
    left_out_tracks=(),
) -> tuple[list[str], list[str]]:
    """(train pieces, styles) for fine-tuning; the holdout pieces are left for evaluation (and
    the ``left_out_tracks`` of test-side pianists play no part in the styles)."""
    pieces = [p for p in metadata.column("piece_id").to_pylist() if p]
    if not pieces:
        raise ValueError(
            "no segment has a piece_id: fine-tuning needs pieces to split train/holdout"
        )
    train_pieces, _ = split_pieces(pieces, holdout_fraction, seed)
    keep = keep_mask(metadata, train_pieces, left_out_tracks)
    styles = sorted(set(metadata.filter(keep).column("style").to_pylist()))
    if require_styles and len(styles) < 2:
        raise ValueError(
            f"fine-tuning needs at least 2 styles among training pieces, found {styles}"
        )
    return train_pieces, styles


def keep_mask(table: pa.Table, train_pieces: list[str], left_out_tracks=()) -> pa.Array:
    in_train = pc.is_in(table.column("piece_id"), value_set=pa.array(train_pieces, pa.string()))
    has_style = pc.not_equal(pc.fill_null(table.column("style"), ""), "")
    keep = pc.and_(pc.fill_null(in_train, False), has_style)
    return pc.and_(keep, pc.invert(left_out(table, left_out_tracks)))


def left_out(table: pa.Table, tracks) -> pa.Array:
    """Rows of ``tracks`` (a test-side pianist's performances: :func:`mess_ray.splits.pianist_holdout`)."""
    if not len(tracks):
        return pa.array([False] * table.num_rows, pa.bool_())
    listed = pc.is_in(table.column("track_id"), value_set=pa.array(list(tracks), pa.string()))
    return pc.fill_null(listed, False)


def drop_excluded(batch: pa.Table, pieces: list[str], tracks=()) -> pa.Table:
    """Ray Data batch (pyarrow) without the rows of ``pieces`` or of ``tracks`` (the test-side
    pianists' performances, :func:`mess_ray.splits.pianist_holdout`): pretraining's row filter.

    It lives here, beside :func:`left_out`, so that the Ray tasks running it import Arrow and
    NumPy only, not the training stack."""
    listed = pc.fill_null(
        pc.is_in(batch.column("piece_id"), value_set=pa.array(list(pieces), pa.string())), False
    )
    return batch.filter(pc.invert(pc.or_(listed, left_out(batch, tracks))))


def filter_training_rows(
    batch: pa.Table,
    train_pieces: list[str],
    mined: dict[int, str] | None = None,
    with_midi: set[int] | None = None,
    left_out_tracks=(),
) -> pa.Table:
    """Labelled training rows, plus mined rows (their ``style`` set to the mined label), plus
    rows with MIDI targets (``with_midi`` segment ids; their style may stay empty); never a row
    of ``left_out_tracks`` (the test-side pianists)."""
    keep = keep_mask(batch, train_pieces)
    if with_midi:
        batch = batch.set_column(
            batch.schema.get_field_index("style"), "style", pc.fill_null(batch.column("style"), "")
        )
        has_midi = pa.array(
            [i in with_midi for i in batch.column("segment_id").to_pylist()], pa.bool_()
        )
        keep = pc.or_(keep, has_midi)
    if mined:
        ids = batch.column("segment_id").to_pylist()
        is_mined = pa.array([i in mined for i in ids], pa.bool_())
        styles = [mined.get(i, s) for i, s in zip(ids, batch.column("style").to_pylist())]
        batch = batch.set_column(
            batch.schema.get_field_index("style"), "style", pa.array(styles, pa.string())
        )
        keep = pc.or_(keep, is_mined)
    return batch.filter(pc.and_(keep, pc.invert(left_out(batch, left_out_tracks))))


class PerformerSampler:
    """Batches for the performer loss over rows with pianist ``codes`` (>= 0 known,
    :func:`mess_ray.train.losses.performer_codes`) and ``pieces``: the rows are grouped by
    pianist and piece once, then each :meth:`draw` picks ``players`` pianists who play two or
    more pieces, each with ``per_player`` rows split over two of their pieces, so every row has
    a positive. A draw is empty when no pianist plays two pieces."""

    def __init__(self, codes: np.ndarray, pieces: np.ndarray) -> None:
        codes = np.asarray(codes)
        pieces = np.asarray(pieces, dtype=object).astype(str)
        self.by_player: dict[int, dict[str, list[int]]] = {}
        for i, (c, p) in enumerate(zip(codes, pieces)):
            if c >= 0:
                self.by_player.setdefault(int(c), {}).setdefault(p, []).append(i)
        self.eligible = sorted(c for c, ps in self.by_player.items() if len(ps) >= 2)

    def draw(self, rng: np.random.Generator, players: int = 16, per_player: int = 4) -> np.ndarray:
        if not self.eligible:
            return np.zeros(0, dtype=np.int64)
        chosen = rng.choice(self.eligible, size=min(players, len(self.eligible)), replace=False)
        out: list[int] = []
        for c in chosen:
            two = rng.choice(sorted(self.by_player[int(c)]), size=2, replace=False)
            for k, piece in enumerate(two):
                rows = self.by_player[int(c)][piece]
                take = per_player // 2 + (k < per_player % 2)
                out.extend(rng.choice(rows, size=take, replace=len(rows) < take).tolist())
        return np.asarray(out, dtype=np.int64)


def performer_batch(
    rng: np.random.Generator,
    codes: np.ndarray,
    pieces: np.ndarray,
    players: int = 16,
    per_player: int = 4,
) -> np.ndarray:
    """One :meth:`PerformerSampler.draw` (row indices) without keeping the grouping."""
    return PerformerSampler(codes, pieces).draw(rng, players, per_player)


MINED_PREFIX = "mined:"


def mine_descriptor_labels(
    segment_ids: np.ndarray,
    piece_ids: np.ndarray,
    descriptors_z: np.ndarray,
    num_clusters: int,
    seed: int = 0,
) -> dict[int, str]:
    """Pseudo-style labels for unlabelled segments (human performances) by descriptor proximity.

    k-means (FAISS) over z-scored descriptors; a segment's label is its cluster, and two
    segments of one cluster are positives only across *different pieces* (see
    ``positive_mask``). Clusters drawn from a single piece carry no cross-piece positive and
    are dropped.
    """
    import faiss

    segment_ids = np.asarray(segment_ids)
    piece_ids = np.asarray(piece_ids, dtype=object)
    x = np.ascontiguousarray(descriptors_z, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != segment_ids.size or piece_ids.size != segment_ids.size:
        raise ValueError(
            "segment_ids, piece_ids and descriptors disagree on the number of segments"
        )
    if num_clusters < 2 or x.shape[0] < 2 * num_clusters:
        raise ValueError(
            f"mining {num_clusters} clusters needs at least {2 * num_clusters} segments, "
            f"got {x.shape[0]}"
        )
    kmeans = faiss.Kmeans(x.shape[1], num_clusters, niter=25, seed=seed, verbose=False)
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    assigned = assigned[:, 0]
    labels = {}
    for cluster in range(num_clusters):
        members = assigned == cluster
        if len(set(piece_ids[members])) < 2:
            continue
        labels.update({int(s): f"{MINED_PREFIX}{cluster:03d}" for s in segment_ids[members]})
    return labels


def mine_unlabelled_training_rows(
    storage: Storage,
    version: str,
    train_pieces: list[str],
    window: int,
    sample_rate: int,
    num_clusters: int,
    max_segments: int,
    seed: int,
    left_out_tracks=(),
) -> tuple[dict[int, str], dict[str, Any]]:
    """Mine labels for training-piece segments without a style (a seeded sample of at most
    ``max_segments``, none of ``left_out_tracks``): their descriptors are z-scored among
    themselves, then clustered."""
    dataset = segments_dataset(storage, version)
    unlabelled = pc.field("piece_id").isin(train_pieces) & (pc.field("style") == "")
    if len(left_out_tracks):
        unlabelled = unlabelled & ~pc.field("track_id").isin(list(left_out_tracks))
    meta = dataset.to_table(columns=["segment_id", "piece_id"], filter=unlabelled)
    if meta.num_rows == 0:
        return {}, {"unlabelled_segments": 0}
    rng = np.random.default_rng(seed)
    chosen = np.sort(
        rng.choice(
            meta["segment_id"].to_numpy(), size=min(max_segments, meta.num_rows), replace=False
        )
    )
    table = dataset.to_table(
        columns=["segment_id", "piece_id", "audio"],
        filter=pc.field("segment_id").isin(pa.array(chosen, pa.int64())),
    )
    matrix = np.stack(
        [
            descriptor_vector(fit_length(decode_audio(blob), window), sample_rate)
            for blob in table["audio"].to_pylist()
        ]
    )
    mean, std = matrix.mean(axis=0), matrix.std(axis=0)
    z = (matrix - mean) / np.where(std > 1e-12, std, 1.0)
    labels = mine_descriptor_labels(
        table["segment_id"].to_numpy(),
        np.asarray(table["piece_id"].to_pylist()),
        z,
        num_clusters,
        seed,
    )
    return labels, {
        "unlabelled_segments": meta.num_rows,
        "mined_segments": len(labels),
        "mined_clusters": len(set(labels.values())),
        "described_segments": int(matrix.shape[0]),
    }


def training_descriptor_stats(
    storage: Storage,
    version: str,
    train_pieces: list[str],
    window: int,
    sample_rate: int,
    max_segments: int,
    seed: int,
    left_out_tracks=(),
) -> dict[str, Any]:
    """Mean and std of every descriptor over a seeded sample of training-piece segments (none
    of ``left_out_tracks``: the z-scoring of facet targets; recorded in the manifest). Labels
    play no part here, so unlabelled human performances (pair source (b), mined labels) count
    like renderings."""
    dataset = segments_dataset(storage, version)
    in_train = pc.field("piece_id").isin(train_pieces)
    if len(left_out_tracks):
        in_train = in_train & ~pc.field("track_id").isin(list(left_out_tracks))
    ids = dataset.to_table(columns=["segment_id"], filter=in_train)["segment_id"].to_numpy()
    if ids.size == 0:
        raise ValueError(f"no training-piece segment in ingest {version} to z-score descriptors on")
    chosen = np.random.default_rng(seed).choice(
        ids, size=min(max_segments, ids.size), replace=False
    )
    table = dataset.to_table(
        columns=["audio"], filter=pc.field("segment_id").isin(pa.array(chosen, pa.int64()))
    )
    matrix = np.stack(
        [
            descriptor_vector(fit_length(decode_audio(blob), window), sample_rate)
            for blob in table["audio"].to_pylist()
        ]
    )
    return {
        "names": list(DESCRIPTOR_NAMES),
        "mean": matrix.mean(axis=0).tolist(),
        "std": matrix.std(axis=0).tolist(),
        "segments": int(matrix.shape[0]),
    }


def training_midi_targets(
    storage: Storage,
    version: str,
    holdout_fraction: float,
    seed: int,
    sample_rate: int,
    window_s: float,
    exclude: set[int] | None = None,
    left_out_tracks=(),
) -> tuple[dict[int, list[float]], list[str], dict[str, Any]]:
    """Z-scored expressive MIDI descriptors of every training-piece segment whose recording has
    performed MIDI (renderings keep theirs; ASAP-layout corpora name theirs): the targets of
    ``finetune.midi_weight``. The descriptors and their z-scoring over the training segments
    are those of benchmark task 3 on the held-out pieces (:func:`mess_ray.midi_descriptors.expressive_matrix`).
    Segments in ``exclude`` or of ``left_out_tracks`` get none and play no part in the z-scoring.
    Returns (segment id -> vector, descriptor names kept, counts)."""
    from mess_ray.midi_descriptors import expressive_matrix
    from mess_ray.performances import load_performance_set

    perf = load_performance_set(
        storage,
        version,
        holdout_fraction,
        seed,
        sample_rate,
        window_s,
        pieces="train",
        with_audio=False,
    )
    if perf is None or not perf.has_midi.any():
        raise ValueError(
            f"finetune.midi_weight > 0, but no training-piece segment of ingest {version} has "
            "performed MIDI (renderings keep theirs; recorded corpora need an ASAP/MAESTRO layout)"
        )
    wanted = (
        perf.has_midi
        & ~np.isin(perf.segment_ids, np.fromiter(exclude or (), dtype=np.int64))
        & ~np.isin(perf.track_ids, list(left_out_tracks))
    )
    if not wanted.any():
        raise ValueError(
            f"every training-piece segment with performed MIDI in ingest {version} has a style, "
            "and finetune.midi_targets_for is 'unstyled'"
        )
    rows = np.flatnonzero(wanted)
    matrix, names = expressive_matrix(perf.midi_descriptors[rows])
    targets = {
        int(perf.segment_ids[r]): [round(float(v), 5) for v in matrix[i]]
        for i, r in enumerate(rows)
    }
    counts = {
        "segments_with_midi": int(rows.size),
        "tracks": int(len(set(perf.track_ids[rows]))),
        "pieces": int(len(set(perf.piece_ids[rows]))),
        "tracks_with_problems": len(perf.problems),
    }
    return targets, names, counts


def training_performers(
    metadata: pa.Table,
    tracks: dict[str, tuple[str, str]],
    train_pieces: list[str],
    left_out_tracks=(),
) -> tuple[dict[int, int], dict[str, Any]]:
    """Performer positives' labels: segment id -> pianist code for every training-piece segment
    whose pianist (``tracks``: :func:`mess_ray.splits.read_track_pianists`) plays two or more
    training pieces (only they have a positive), never a row of ``left_out_tracks``; and the
    manifest's counts."""
    in_train, left = set(train_pieces), set(left_out_tracks)
    pieces_of: dict[str, set[str]] = {}
    for tid, (piece, pianist) in tracks.items():
        if pianist and piece in in_train and tid not in left:
            pieces_of.setdefault(pianist, set()).add(piece)
    eligible = sorted(p for p, ps in pieces_of.items() if len(ps) >= 2)
    code = {p: i for i, p in enumerate(eligible)}
    out: dict[int, int] = {}
    for sid, tid, piece in zip(
        *(metadata.column(c).to_pylist() for c in ("segment_id", "track_id", "piece_id"))
    ):
        pianist = tracks.get(tid, ("", ""))[1]
        if pianist in code and piece in in_train and tid not in left:
            out[int(sid)] = code[pianist]
    return out, {
        "pianists": len(eligible),
        "pianists_in_one_piece": len(pieces_of) - len(eligible),
        "segments": len(out),
    }


@dataclass
class TrainingRows:
    """Which segments fine-tuning trains on, and with what targets."""

    train_pieces: list[str]
    styles: list[str]  # style labels, then mined labels
    count: int  # training segments
    mined: dict[int, str] = field(default_factory=dict)  # segment id -> mined label
    mining_counts: dict[str, Any] = field(default_factory=dict)
    midi_targets: dict[int, list[float]] = field(default_factory=dict)
    midi_names: list[str] = field(default_factory=list)
    midi_counts: dict[str, Any] = field(default_factory=dict)
    left_out_tracks: list[str] = field(default_factory=list)  # test-side pianists' tracks
    pianists: dict[str, Any] = field(default_factory=dict)  # the manifest's record
    performers: dict[int, int] = field(default_factory=dict)  # segment id -> pianist code
    performer_counts: dict[str, Any] = field(default_factory=dict)


def select_training_rows(
    cfg: MessRayConfig, storage: Storage, version: str, metadata: pa.Table
) -> TrainingRows:
    """Training pieces with a style; plus, with ``finetune.midi_weight``, segments with performed
    MIDI (pair source (b)); plus, with ``finetune.mine_clusters``, unlabelled segments labelled
    by descriptor proximity. Raises when they cannot make a fine-tuning run."""
    ft = cfg.finetune
    mining = ft.mine_clusters > 0
    tracks = read_track_pianists(storage, version)
    holdout = pianist_holdout(tracks, cfg.eval.test_pianist_fraction, cfg.eval.seed)
    left = list(holdout.tracks)
    train_pieces, styles = training_selection(
        metadata,
        cfg.eval.holdout_fraction,
        cfg.eval.seed,
        require_styles=False,
        left_out_tracks=left,
    )
    keep = keep_mask(metadata, train_pieces, left)
    train_rows = int(pc.sum(keep.cast(pa.int64())).as_py() or 0)
    midi_targets, midi_names, midi_counts = {}, [], {}
    styled = set(metadata.filter(keep).column("segment_id").to_pylist())
    if ft.midi_weight > 0:
        try:
            midi_targets, midi_names, midi_counts = training_midi_targets(
                storage,
                version,
                cfg.eval.holdout_fraction,
                cfg.eval.seed,
                cfg.audio.sample_rate,
                cfg.audio.window_s,
                exclude=styled if ft.midi_targets_for == "unstyled" else None,
                left_out_tracks=left,
            )
        except ValueError as err:
            # Recorded corpora without MIDI still fine-tune on styles / mined labels: the manifest
            # says why this pair source was not used.
            log.warning("no MIDI targets: %s", err)
            midi_counts = {"skipped": str(err)}
        train_rows += sum(1 for i in midi_targets if i not in styled)
    with_midi = bool(midi_targets)
    if not (mining or with_midi) and len(styles) < 2:
        raise ValueError(
            f"fine-tuning needs at least 2 styles among training pieces, found {styles} "
            "(or performed MIDI for finetune.midi_weight, or finetune.mine_clusters > 0)"
        )
    mined, mining_counts = {}, {}
    if mining:
        # Source (b): human performances, labelled by descriptor proximity across pieces.
        mined, mining_counts = mine_unlabelled_training_rows(
            storage,
            version,
            train_pieces,
            window_samples(cfg.audio.window_s, cfg.audio.sample_rate),
            cfg.audio.sample_rate,
            ft.mine_clusters,
            ft.mine_max_segments,
            ft.seed,
            left_out_tracks=left,
        )
        train_rows += sum(1 for i in mined if i not in midi_targets)
        styles = styles + sorted(set(mined.values()))
        if len(styles) < 2 and not with_midi:
            raise ValueError(
                f"fine-tuning needs at least 2 styles or mined clusters, found {styles}"
            )
    performers, performer_counts = {}, {}
    if ft.performer_weight > 0:
        performers, performer_counts = training_performers(metadata, tracks, train_pieces, left)
        if not performers:
            log.warning(
                "finetune.performer_weight: no pianist plays two training pieces (performer tags "
                "from the catalog): no performer positives"
            )
    if train_rows < ft.batch_size * ft.num_workers:
        raise ValueError(
            f"{train_rows} labelled training segments cannot fill batch_size={ft.batch_size} "
            f"on {ft.num_workers} workers"
        )
    return TrainingRows(
        train_pieces=train_pieces,
        styles=styles,
        count=train_rows,
        mined=mined,
        mining_counts=mining_counts,
        midi_targets=midi_targets,
        midi_names=midi_names,
        midi_counts=midi_counts,
        left_out_tracks=left,
        pianists=holdout.record(tracks, train_pieces),
        performers=performers,
        performer_counts=performer_counts,
    )
