"""Score sources for the render stage: what gets played.

Three kinds, chosen by ``cfg.render.source``:

* ``music21``: short pieces of the music21 corpus (offline, ships with the package);
* ``midi_folder``: every ``.mid``/``.midi`` file under ``source_path`` (local or fsspec URL),
  a score rendered in each style; with ``midi_as_played: true`` the files are performances
  (e-piano recordings, MAESTRO-style MIDI) rendered once each as played (variant ``played``);
* ``asap``: human piano performances of the ASAP dataset layout (``metadata.csv`` plus
  MIDI files); they are rendered as played, so each performance is its own *variant*.

Listing is cheap (:func:`list_score_refs`, run on the driver); loading parses MIDI
(:func:`load_score`, run in Ray tasks). :func:`iter_scores` does both, skipping pieces that
fail to load, and yields :class:`Score` tuples ``(piece_id, composer, title, midi)``.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
import random
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pretty_midi

from mess_ray.config import RenderConfig
from mess_ray.storage import make_filesystem

log = logging.getLogger(__name__)

# Short corpus works that parse and export to MIDI reliably (checked with music21 10.5).
# Chorales are interleaved with other composers so that small ``num_pieces`` still mix styles.
DEFAULT_MUSIC21_PIECES: tuple[str, ...] = (
    "bach/bwv66.6",
    "corelli/opus3no1/1grave",
    "bach/bwv3.6",
    "cpebach/h186",
    "bach/bwv6.6",
    "schubert/lindenbaum",
    "bach/bwv26.6",
    "joplin/maple_leaf_rag",
    "bach/bwv5.7",
    "ciconia/quod_jactatur",
    "bach/bwv13.6",
    "handel/rinaldo/lascia_chio_pianga",
    "bach/bwv2.6",
    "verdi/laDonnaEMobile",
    "bach/bwv14.5",
    "bach/bwv4.8",
)

# Fallback composer names by corpus folder (many corpus files carry no composer metadata).
_CORPUS_COMPOSERS = {
    "bach": "J.S. Bach",
    "cpebach": "C.P.E. Bach",
    "corelli": "Arcangelo Corelli",
    "schubert": "Franz Schubert",
    "joplin": "Scott Joplin",
    "ciconia": "Johannes Ciconia",
    "handel": "George Frideric Handel",
    "verdi": "Giuseppe Verdi",
    "mozart": "W.A. Mozart",
    "haydn": "Joseph Haydn",
    "beethoven": "Ludwig van Beethoven",
    "schumann": "Robert Schumann",
    "palestrina": "Giovanni Pierluigi da Palestrina",
    "luca": "D. Luca",
}

MIDI_SUFFIXES = (".mid", ".midi")


class Score(NamedTuple):
    """A loaded piece: what the source stage hands to the expressive transforms."""

    piece_id: str
    composer: str
    title: str
    midi: pretty_midi.PrettyMIDI


@dataclass(frozen=True)
class ScoreRef:
    """Where a piece lives, before it is parsed.

    ``variant`` distinguishes several recordings of one piece (the ASAP performer tag);
    it is empty for scores, which get their variants from styles instead.
    """

    piece_id: str
    composer: str
    title: str
    source: str
    locator: str
    variant: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def slugify(text: str) -> str:
    """Stable, file-name-safe id: lowercase ``[a-z0-9-]`` words joined by ``-``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make an id from {text!r}")
    return slug


# -- music21 ----------------------------------------------------------------------------------
def _music21_ref(corpus_path: str) -> ScoreRef:
    folder = corpus_path.split("/", 1)[0]
    composer = _CORPUS_COMPOSERS.get(folder, folder.replace("_", " ").title())
    title = corpus_path.split("/", 1)[-1].replace("/", " ").replace("_", " ")
    return ScoreRef(
        piece_id=slugify(corpus_path),
        composer=composer,
        title=title,
        source="music21",
        locator=corpus_path,
    )


def _strip_repeat_marks(score: Any) -> None:
    """Turn repeat barlines into plain ones and drop D.C./D.S. marks (unexpandable repeats)."""
    from music21 import bar, repeat

    for barline in list(score.recurse().getElementsByClass(bar.Repeat)):
        site = barline.activeSite
        plain = bar.Barline("regular")
        if site is not None and getattr(site, "rightBarline", None) is barline:
            site.rightBarline = plain
        elif site is not None and getattr(site, "leftBarline", None) is barline:
            site.leftBarline = plain
        elif site is not None:
            site.remove(barline)
    for mark in list(score.recurse().getElementsByClass(repeat.RepeatExpression)):
        if mark.activeSite is not None:
            mark.activeSite.remove(mark)


def load_music21(corpus_path: str) -> tuple[pretty_midi.PrettyMIDI, dict[str, str]]:
    """Parse a music21 corpus work and export it to PrettyMIDI; also returns its metadata."""
    import music21
    from music21 import corpus

    # Integer ticks per quarter that every note value divides well (music21's default,
    # 10080, makes huge files; other values give rounding errors on tuplets).
    music21.defaults.ticksPerQuarter = 480
    try:
        score = corpus.parse(corpus_path)
    except Exception as exc:  # music21 raises many types for a missing or broken work
        raise ValueError(f"music21 corpus work {corpus_path!r} could not be parsed: {exc}") from exc
    try:
        score = score.expandRepeats()
    except Exception:
        # Malformed or absent repeat structure: play it straight through instead.
        _strip_repeat_marks(score)
    meta: dict[str, str] = {}
    if score.metadata is not None:
        meta = {"composer": score.metadata.composer or "", "title": score.metadata.title or ""}
    with tempfile.TemporaryDirectory(prefix="mess-ray-m21-") as tmp:
        out = Path(tmp) / "score.mid"
        score.write("midi", fp=str(out))
        midi = pretty_midi.PrettyMIDI(str(out))
    return midi, meta


# -- MIDI folder --------------------------------------------------------------------------------
AS_PLAYED_VARIANT = "played"


def _midi_folder_refs(source_path: str, as_played: bool = False) -> list[ScoreRef]:
    fs, base = make_filesystem(source_path)
    if not fs.isdir(base):
        raise ValueError(f"render.source_path {source_path!r} is not a folder")
    files = sorted(p for p in fs.find(base) if p.lower().endswith(MIDI_SUFFIXES))
    if not files:
        raise ValueError(f"no .mid/.midi files under {source_path!r}")
    refs = []
    for path in files:
        rel = posixpath.relpath(path, base)
        stem = posixpath.splitext(rel)[0]
        parent = posixpath.dirname(rel)
        refs.append(
            ScoreRef(
                piece_id=slugify(stem),
                composer=parent.split("/")[0].replace("_", " ") if parent else "unknown",
                title=posixpath.basename(stem).replace("_", " "),
                source="midi_folder",
                locator=_join_url(source_path, rel),
                # A performance plays once, unstyled (render_track renders variants as played).
                variant=AS_PLAYED_VARIANT if as_played else "",
                extra={"midi_performance": rel} if as_played else {},
            )
        )
    _require_unique_ids(refs)
    return sorted(refs, key=lambda r: r.piece_id)


def _join_url(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if "://" in root else str(Path(root) / rel)


def load_midi_file(url: str) -> pretty_midi.PrettyMIDI:
    """Read a MIDI file from a local path or any fsspec URL."""
    fs, path = make_filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise ValueError(f"MIDI file not found: {url}") from exc
    try:
        return pretty_midi.PrettyMIDI(io.BytesIO(data))
    except Exception as exc:  # mido/pretty_midi raise assorted errors on corrupt files
        raise ValueError(f"{url} is not a readable MIDI file: {exc}") from exc


# -- ASAP ---------------------------------------------------------------------------------------
ASAP_REQUIRED_COLUMNS = ("composer", "title", "folder", "midi_performance")


def _asap_refs(source_path: str) -> list[ScoreRef]:
    """One ref per performance in ``metadata.csv``; the piece id is the slug of its folder."""
    fs, base = make_filesystem(source_path)
    meta_path = posixpath.join(base, "metadata.csv")
    if not fs.exists(meta_path):
        raise ValueError(f"{source_path!r} has no metadata.csv: not an ASAP-layout folder")
    with fs.open(meta_path, "r") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ASAP_REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{meta_path}: missing columns {missing}")
        rows = list(reader)
    refs = []
    for row in rows:
        performance = row["midi_performance"]
        performer = posixpath.splitext(posixpath.basename(performance))[0]
        extra = {"performer": performer, "midi_performance": performance}
        for column in ("performance_annotations", "midi_score", "midi_score_annotations"):
            if row.get(column):
                extra[column] = row[column]
                # Resolved too, so the evaluation can read the beat annotations of a rendering
                # (they travel through the render catalog into every segment's metadata_json).
                extra[f"{column}_uri"] = _join_url(source_path, row[column])
        refs.append(
            ScoreRef(
                piece_id=slugify(row["folder"]),
                composer=row["composer"],
                title=row["title"].replace("_", " "),
                source="asap",
                locator=_join_url(source_path, performance),
                variant=slugify(performer),
                extra=extra,
            )
        )
    _require_unique_ids(refs)
    return refs


def _require_unique_ids(refs: list[ScoreRef]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for ref in refs:
        key = (ref.piece_id, ref.variant)
        if key in seen:
            raise ValueError(f"{ref.locator} and {seen[key]} map to the same id {key}")
        seen[key] = ref.locator


# -- public API ---------------------------------------------------------------------------------
def select_pieces(
    refs: list[ScoreRef], num_pieces: int, seed: int, shuffle: bool
) -> list[ScoreRef]:
    """Keep all variants of the first ``num_pieces`` distinct pieces (seeded order if shuffle)."""
    piece_ids = list(dict.fromkeys(ref.piece_id for ref in refs))
    if shuffle:
        random.Random(seed).shuffle(piece_ids)
    chosen = set(piece_ids[:num_pieces])
    return [ref for ref in refs if ref.piece_id in chosen]


def with_min_performances(refs: list[ScoreRef], minimum: int) -> list[ScoreRef]:
    """Only the pieces that have at least ``minimum`` performances (variants)."""
    counts: dict[str, int] = {}
    for ref in refs:
        counts[ref.piece_id] = counts.get(ref.piece_id, 0) + 1
    return [ref for ref in refs if counts[ref.piece_id] >= minimum]


def list_score_refs(cfg: RenderConfig) -> list[ScoreRef]:
    """The pieces a render run covers, without parsing them."""
    if cfg.source == "music21":
        paths = list(cfg.pieces) or list(DEFAULT_MUSIC21_PIECES)
        refs = [_music21_ref(p) for p in dict.fromkeys(paths)]
        _require_unique_ids(refs)
        return select_pieces(refs, cfg.num_pieces, cfg.seed, shuffle=False)
    if not cfg.source_path:
        raise ValueError(f"render.source={cfg.source!r} needs render.source_path")
    if cfg.source == "midi_folder":
        return select_pieces(
            _midi_folder_refs(cfg.source_path, cfg.midi_as_played),
            cfg.num_pieces,
            cfg.seed,
            shuffle=False,
        )
    if cfg.source == "asap":
        # Shuffled so that a few pieces are not all from the alphabetically first composer.
        refs = with_min_performances(_asap_refs(cfg.source_path), cfg.min_performances)
        if not refs:
            raise ValueError(
                f"no piece under {cfg.source_path!r} has {cfg.min_performances} or more "
                "performances (render.min_performances)"
            )
        return select_pieces(refs, cfg.num_pieces, cfg.seed, shuffle=True)
    raise ValueError(f"unknown render.source {cfg.source!r}")


def load_score(ref: ScoreRef) -> Score:
    """Parse one piece. Raises ValueError when it cannot be read or holds no notes."""
    composer, title = ref.composer, ref.title
    if ref.source == "music21":
        midi, meta = load_music21(ref.locator)
        composer = meta.get("composer") or composer
        title = meta.get("title") or title
    elif ref.source in ("midi_folder", "asap"):
        midi = load_midi_file(ref.locator)
    else:
        raise ValueError(f"unknown score source {ref.source!r}")
    if not any(inst.notes for inst in midi.instruments if not inst.is_drum):
        raise ValueError(f"{ref.locator} has no pitched notes")
    return Score(ref.piece_id, composer, title, midi)


def iter_scores(cfg: RenderConfig) -> Iterator[Score]:
    """Yield every loadable piece (each variant of an ASAP piece); log and skip the rest."""
    for ref in list_score_refs(cfg):
        try:
            yield load_score(ref)
        except ValueError as exc:
            log.warning("skipping %s: %s", ref.piece_id, exc)
