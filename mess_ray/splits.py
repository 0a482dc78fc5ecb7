"""The fixed train / validation / test split by piece, and the split by pianist.

Both are deterministic from the ids (a seeded hash per id), so a new corpus splits stably:
adding pieces or pianists never moves an existing one to another side (outside the small-corpus
clamp of :func:`mess_ray.segments.split_pieces`).

* **By piece.** The hold-out side is exactly :func:`mess_ray.segments.split_pieces` on
  ``eval.holdout_fraction`` / ``eval.seed`` (so pretraining's ``exclude_eval_holdout`` and
  fine-tuning, which train on its training side, already leave validation *and* test out);
  a second hash divides the hold-out into validation (settings are chosen there) and test
  (reported once per model).
* **By pianist** (performer identity with unseen pianists): a pianist is a test pianist when
  its own seeded hash is below ``test_fraction``. Pianists come from ASAP performer tags
  (``Yarden03``, ``ParkJH05``, ``Shi05M``: the name before the take number).
* **Unseen pianists** (:func:`pianist_holdout`, ``eval.test_pianist_fraction``): the one rule by
  which pretraining, fine-tuning and the evaluation's descriptor head leave out every track of a
  test-side pianist; each training manifest records the pianists it heard
  (:meth:`PianistHoldout.record`), and the protocol reads them back from there.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from mess_ray.segments import split_pieces

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)
_PERFORMER = re.compile(r"^([A-Za-z][A-Za-z_\-]*?)[-_]?(\d+)[A-Za-z]*$")


def _score(key: str, seed: int, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}\x00{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass(frozen=True)
class PieceSplit:
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def side(self, piece_id: str) -> str | None:
        """The side a piece is on (None: unknown piece)."""
        for name in SPLITS:
            if piece_id in getattr(self, name):
                return name
        return None

    @property
    def held_out(self) -> tuple[str, ...]:
        return tuple(sorted(self.validation + self.test))

    def as_dict(self) -> dict[str, list[str]]:
        return {name: list(getattr(self, name)) for name in SPLITS}


def split_by_piece(
    piece_ids, holdout_fraction: float, seed: int = 0, validation_share: float = 0.5
) -> PieceSplit:
    """Train / validation / test pieces (each sorted). The hold-out is ``split_pieces``'s;
    within it a piece is validation when its second seeded hash is below ``validation_share``.
    With two or more held-out pieces each of validation and test keeps at least one."""
    if not 0.0 < validation_share < 1.0:
        raise ValueError(f"validation_share must be in (0, 1), got {validation_share}")
    pieces = sorted({str(p) for p in piece_ids if p})
    train, held_out = split_pieces(pieces, holdout_fraction, seed)
    order = sorted(held_out, key=lambda p: (_score(p, seed, "validation"), p))
    n_val = sum(_score(p, seed, "validation") < validation_share for p in order)
    if len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return PieceSplit(tuple(train), tuple(sorted(order[:n_val])), tuple(sorted(order[n_val:])))


def pianist_of(performer: str) -> str:
    """The pianist of an ASAP performer tag: ``Yarden03`` -> ``yarden``, ``ParkJH05`` ->
    ``parkjh``, ``Shi05M`` -> ``shi``; a tag without a take number is its own pianist."""
    if not isinstance(performer, str) or not performer.strip():
        raise ValueError(f"performer tag must be a non-empty string, got {performer!r}")
    tag = performer.strip()
    match = _PERFORMER.match(tag)
    return (match.group(1) if match else tag).lower()


# ASAP piece ids name one piece of a larger work in two ways: the prelude and the fugue of one
# BWV number (``bach-prelude-bwv-885``, ``bach-fugue-bwv-885``: one key), and the movements of a
# numbered sonata (``beethoven-piano-sonatas-18-2``, ``haydn-keyboard-sonatas-50-1-no-repeat``).
_BWV_PAIR = re.compile(r"^(?P<composer>[a-z]+)-(?:prelude|fugue)-bwv-(?P<number>\d+)")
_SONATA_MOVEMENT = re.compile(r"^(?P<work>.*-sonatas?-\d+)-\d+(?:-.*)?$")


def work_of(piece_id: str) -> str:
    """The work a piece belongs to: the prelude and fugue of one BWV number are one work
    (``bach-bwv-885``), the movements of one numbered sonata are one
    (``beethoven-piano-sonatas-18``); any other piece is its own work. A pianist's other
    *work* is then not the other half of the same pair, which shares its key and its material."""
    if not isinstance(piece_id, str) or not piece_id:
        raise ValueError(f"piece id must be a non-empty string, got {piece_id!r}")
    pair = _BWV_PAIR.match(piece_id)
    if pair:
        return f"{pair.group('composer')}-bwv-{pair.group('number')}"
    movement = _SONATA_MOVEMENT.match(piece_id)
    return movement.group("work") if movement else piece_id


@dataclass(frozen=True)
class PianistSplit:
    train: tuple[str, ...]
    test: tuple[str, ...]


def split_by_pianist(pianists, test_fraction: float = 0.5, seed: int = 0) -> PianistSplit:
    """Train / test pianists by a seeded hash of each name (stable when pianists are added)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    names = sorted({str(p) for p in pianists if p})
    test = [p for p in names if _score(p, seed, "pianist") < test_fraction]
    return PianistSplit(tuple(p for p in names if p not in set(test)), tuple(test))


# -- leaving the test pianists out of training --------------------------------------------------
def pianist_from_metadata(meta: dict) -> str:
    """A segment's pianist from its catalog metadata: the performer tag a rendering carries in
    ``style_params_json`` (ASAP renders) or a catalog's own ``performer`` column; "" unknown."""
    raw = meta.get("style_params_json")
    params: dict = {}
    if isinstance(raw, str) and raw:
        try:
            params = json.loads(raw)
        except json.JSONDecodeError:
            params = {}
    performer = params.get("performer") or meta.get("performer") or ""
    return pianist_of(performer) if isinstance(performer, str) and performer.strip() else ""


def track_pianists(table) -> dict[str, tuple[str, str]]:
    """``{track id: (piece id, pianist or "")}`` from a segment table (pyarrow) holding
    ``track_id``, ``piece_id`` and ``metadata_json`` (a track's first row speaks for it)."""
    out: dict[str, tuple[str, str]] = {}
    for tid, piece, blob in zip(
        *(table.column(c).to_pylist() for c in ("track_id", "piece_id", "metadata_json"))
    ):
        if tid not in out:
            out[tid] = (piece or "", pianist_from_metadata(json.loads(blob or "{}")))
    return out


@dataclass(frozen=True)
class PianistHoldout:
    """The performances training leaves out so that the test-side pianists stay unheard: every
    track (all chains, all pieces) of a pianist on the test side of :func:`split_by_pianist`
    over the corpus's pianists. ``test_fraction`` 0: nothing is left out."""

    test_fraction: float
    seed: int
    pianists: tuple[str, ...]
    tracks: tuple[str, ...]

    def heard(self, tracks: dict[str, tuple[str, str]], pieces=None) -> list[str]:
        """The pianists a stage training on ``pieces`` (None: every piece) hears."""
        left_out = set(self.tracks)
        wanted = None if pieces is None else set(pieces)
        return sorted(
            {
                pianist
                for tid, (piece, pianist) in tracks.items()
                if pianist and tid not in left_out and (wanted is None or piece in wanted)
            }
        )

    def record(self, tracks: dict[str, tuple[str, str]], pieces=None) -> dict:
        """The training manifest's ``pianists`` block; the evaluation reads ``heard`` from it."""
        return {
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "left_out": list(self.pianists),
            "left_out_tracks": len(self.tracks),
            "heard": self.heard(tracks, pieces),
        }


def pianist_holdout(
    tracks: dict[str, tuple[str, str]], test_fraction: float, seed: int = 0
) -> PianistHoldout:
    """The one rule pretraining, fine-tuning and the evaluation share (``eval.test_pianist_fraction``,
    ``eval.seed``): which pianists are test-side and which tracks training therefore leaves out."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_pianist_fraction must be in [0, 1), got {test_fraction}")
    if test_fraction == 0.0:
        return PianistHoldout(0.0, seed, (), ())
    names = {pianist for _, pianist in tracks.values() if pianist}
    test = split_by_pianist(names, test_fraction, seed).test if names else ()
    chosen = set(test)
    left_out = tuple(sorted(t for t, (_, pianist) in tracks.items() if pianist in chosen))
    return PianistHoldout(test_fraction, seed, tuple(test), left_out)


def read_track_pianists(storage, version: str) -> dict[str, tuple[str, str]]:
    """:func:`track_pianists` of an ingest artifact."""
    from mess_ray.segments import segments_dataset

    table = segments_dataset(storage, version).to_table(
        columns=["track_id", "piece_id", "metadata_json"]
    )
    return track_pianists(table)


# -- pretraining on a fraction of the audio (learning curves) -----------------------------------
@dataclass(frozen=True)
class PretrainAudio:
    """The audio a pretraining run uses: the tracks it keeps and leaves out (beyond the pieces
    and tracks excluded for evaluation), how many segments they hold and how many seconds of
    audio those segments cover (overlapping windows counted once)."""

    fraction: float
    kept_tracks: tuple[str, ...]
    left_out_tracks: tuple[str, ...]
    segments: int
    seconds: float

    def counts(self) -> dict:
        return {
            "audio_fraction": self.fraction,
            "pretrain_tracks": len(self.kept_tracks),
            "pretrain_segments": self.segments,
            "pretrain_audio_s": round(self.seconds, 3),
            "pretrain_audio_hours": round(self.seconds / 3600.0, 4),
        }


def covered_seconds(starts, ends) -> float:
    """Seconds of one track's timeline covered by segments [start, end) (overlaps once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(zip(starts, ends)):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def pretrain_audio(
    table,
    fraction: float = 1.0,
    seed: int = 0,
    exclude_pieces=(),
    exclude_tracks=(),
) -> PretrainAudio:
    """Which tracks pretraining keeps when it uses ``fraction`` of the eligible performances
    (``pretrain.audio_fraction``, ``pretrain.seed``), from a segment table (pyarrow) holding
    ``track_id``, ``piece_id``, ``start_s``, ``end_s`` and ``metadata_json``.

    A performance (every chain of it, ``performance_id`` in the metadata; the track id when
    there is none) is kept when its seeded hash is below ``fraction``, so the subsets are nested
    (a smaller fraction keeps a subset of a larger one) and stable as the corpus grows; 1 keeps
    every eligible track. Tracks of ``exclude_pieces`` / ``exclude_tracks`` are never kept nor
    counted as left out (they were never eligible)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"audio_fraction must be in (0, 1], got {fraction}")
    pieces, excluded = set(exclude_pieces), set(exclude_tracks)
    spans: dict[str, tuple[list[float], list[float]]] = {}
    group: dict[str, str] = {}
    for tid, piece, start, end, blob in zip(
        *(
            table.column(c).to_pylist()
            for c in ("track_id", "piece_id", "start_s", "end_s", "metadata_json")
        )
    ):
        if tid in excluded or (piece and piece in pieces):
            continue
        if tid not in group:
            meta = json.loads(blob or "{}")
            group[tid] = str(meta.get("performance_id") or tid)
            spans[tid] = ([], [])
        spans[tid][0].append(float(start))
        spans[tid][1].append(float(end))
    kept = tuple(
        sorted(
            t for t, g in group.items() if fraction >= 1.0 or _score(g, seed, "audio") < fraction
        )
    )
    if not kept:
        raise ValueError(
            f"audio_fraction {fraction} keeps none of the {len(group)} eligible tracks; raise it"
        )
    left_out = tuple(sorted(set(group) - set(kept)))
    return PretrainAudio(
        fraction=fraction,
        kept_tracks=kept,
        left_out_tracks=left_out,
        segments=sum(len(spans[t][0]) for t in kept),
        seconds=sum(covered_seconds(*spans[t]) for t in kept),
    )


def read_pretrain_audio(
    storage,
    version: str,
    fraction: float = 1.0,
    seed: int = 0,
    exclude_pieces=(),
    exclude_tracks=(),
) -> PretrainAudio:
    """:func:`pretrain_audio` of an ingest artifact."""
    from mess_ray.segments import segments_dataset

    table = segments_dataset(storage, version).to_table(
        columns=["track_id", "piece_id", "start_s", "end_s", "metadata_json"]
    )
    return pretrain_audio(table, fraction, seed, exclude_pieces, exclude_tracks)
