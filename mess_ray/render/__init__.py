"""render stage: expressive renderings of MIDI (scores x styles, or human performances) to WAV."""

from mess_ray.render.expressive import apply_style, as_played
from mess_ray.render.job import CATALOG_SCHEMA, read_catalog, run_render, track_id
from mess_ray.render.sources import Score, ScoreRef, iter_scores, list_score_refs, load_score
from mess_ray.render.synth import render_midi, render_to_wav

__all__ = [
    "CATALOG_SCHEMA",
    "Score",
    "ScoreRef",
    "apply_style",
    "as_played",
    "iter_scores",
    "list_score_refs",
    "load_score",
    "read_catalog",
    "render_midi",
    "render_to_wav",
    "run_render",
    "track_id",
]
