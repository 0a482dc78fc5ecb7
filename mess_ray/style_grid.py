"""The style parameter grid (issue 15, task 6): style *parameters*, not presets.

Each numeric parameter of :class:`~mess_ray.config.StyleSpec` the grid varies has seven levels
(:data:`LEVELS`); the **training** side uses the even levels (0, 2, 4, 6) and the **evaluation**
side the odd ones (1, 3, 5), so every evaluation value lies strictly between two training values
and is never rendered for training. ``pedal`` is binary: both sides use both values, so for it
only the *combinations* are new. Every evaluation level also differs from every value of the
render presets (:func:`mess_ray.config.default_styles`, ``configs/m21-bench.yaml``), and the
render job refuses presets that use one (:func:`preset_collisions`).

Fixed for every grid rendering: one instrument (GM program 0, acoustic grand), a hairpin
dynamics arc, no beat accents, 4-bar phrases, pedalling per bar; the audio is loudness-normalised
to ``render.style_grid.lufs`` (pyloudnorm), so absolute level carries nothing.

Which combinations a piece gets is a seeded sample (:func:`sample_combinations`, keyed by the
render seed, the side and the piece id): deterministic, and adding pieces changes no other piece.
The evaluation reads each rendering's values back from its catalog row (``style_grid`` in
``style_params_json``) and compares them as :func:`parameter_vector`: each parameter
standardised over its seven levels (pedal over {0, 1}).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Any

import numpy as np

from mess_ray.config import StyleSpec

TRAIN, EVAL = "train", "eval"
SIDES = (TRAIN, EVAL)
PREFIX = "grid-"  # style names of grid renderings: grid-<t|e>-<level codes>
CHAIN = "dry-lufs"  # render.soundfont, nothing after it but loudness normalisation
PARAMETER_KEY = "style_grid"  # key of the grid values in a rendering's style_params_json

LEVELS: dict[str, tuple[float, ...]] = {
    "tempo_scale": (0.76, 0.83, 0.90, 0.97, 1.04, 1.11, 1.18),
    "rubato": (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65),
    "tempo_jitter": (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07),
    "velocity": (45, 52, 59, 66, 73, 80, 87),
    "velocity_range": (3, 7, 11, 15, 19, 23, 27),
    "articulation": (0.52, 0.62, 0.72, 0.82, 0.92, 1.02, 1.12),
}
BINARY = ("pedal",)
PARAMETERS = (*LEVELS, *BINARY)
FIXED: dict[str, Any] = {
    "program": 0,
    "dynamics_arc": "hairpin",
    "accent_every": 0,
    "phrase_bars": 4,
    "pedal_mode": "bar",
}
_INT_PARAMETERS = ("velocity", "velocity_range")


def _check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"grid side must be 'train' or 'eval', got {side!r}")
    return side


def side_levels(name: str, side: str) -> tuple[int, ...]:
    """Level indices of parameter ``name`` on ``side`` (train: even, eval: odd; pedal: both)."""
    _check_side(side)
    if name in BINARY:
        return (0, 1)
    if name not in LEVELS:
        raise ValueError(f"unknown grid parameter {name!r}")
    return tuple(range(0 if side == TRAIN else 1, len(LEVELS[name]), 2))


def side_values(name: str, side: str) -> tuple[Any, ...]:
    """The values of parameter ``name`` that ``side`` renders."""
    if name in BINARY:
        return (False, True)
    return tuple(LEVELS[name][i] for i in side_levels(name, side))


def _value(name: str, level: int) -> Any:
    if name in BINARY:
        return bool(level)
    value = LEVELS[name][level]
    return int(value) if name in _INT_PARAMETERS else float(value)


def _rng(seed: int, side: str, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}\x00{side}\x00{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def sample_combinations(side: str, count: int, seed: int, key: str) -> list[dict[str, Any]]:
    """``count`` distinct parameter combinations of ``side`` for one piece (``key``), seeded.

    Each combination maps every name in :data:`PARAMETERS` to its value."""
    _check_side(side)
    if count < 0:
        raise ValueError("count must be >= 0")
    grids = [side_levels(name, side) for name in PARAMETERS]
    total = math.prod(len(g) for g in grids)
    if count > total:
        raise ValueError(f"the {side} grid has only {total} combinations, asked for {count}")
    picks = _rng(seed, side, key).choice(total, size=count, replace=False)
    product = list(itertools.product(*grids))
    return [
        {name: _value(name, level) for name, level in zip(PARAMETERS, product[int(i)])}
        for i in picks
    ]


def combination_side(combo: dict[str, Any]) -> str:
    """The side whose values every numeric parameter of ``combo`` takes (error when mixed)."""
    sides = set()
    for name in LEVELS:
        matches = [s for s in SIDES if any(_close(combo[name], v) for v in side_values(name, s))]
        if len(matches) != 1:
            raise ValueError(f"{name}={combo[name]!r} is not a grid value")
        sides.add(matches[0])
    if len(sides) != 1:
        raise ValueError(f"combination mixes train and eval values: {combo}")
    return sides.pop()


def _close(a: Any, b: Any) -> bool:
    return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)


def style_name(combo: dict[str, Any], side: str) -> str:
    """``grid-<t|e>-<level index of each parameter>``: unique per combination."""
    _check_side(side)
    codes = []
    for name in PARAMETERS:
        if name in BINARY:
            codes.append(str(int(bool(combo[name]))))
        else:
            codes.append(str(next(i for i, v in enumerate(LEVELS[name]) if _close(combo[name], v))))
    return f"{PREFIX}{side[0]}-{''.join(codes)}"


def is_grid_style(style: str | None) -> bool:
    return bool(style) and str(style).startswith(PREFIX)


def style_spec(combo: dict[str, Any], side: str) -> StyleSpec:
    """The StyleSpec that renders ``combo`` (plus the :data:`FIXED` settings)."""
    missing = [n for n in PARAMETERS if n not in combo]
    if missing:
        raise ValueError(f"grid combination lacks {missing}")
    return StyleSpec(name=style_name(combo, side), **FIXED, **{n: combo[n] for n in PARAMETERS})


def parameter_vector(combo: dict[str, Any]) -> np.ndarray:
    """[len(PARAMETERS)]: each value standardised over its parameter's seven levels (pedal over
    {0, 1}), so every parameter weighs the same in a distance."""
    out = []
    for name in PARAMETERS:
        if name not in combo:
            raise ValueError(f"grid values lack {name!r}")
        if name in BINARY:
            out.append((float(bool(combo[name])) - 0.5) / 0.5)
        else:
            levels = np.asarray(LEVELS[name], dtype=np.float64)
            out.append((float(combo[name]) - levels.mean()) / levels.std())
    return np.asarray(out, dtype=np.float64)


def preset_collisions(styles: list[StyleSpec]) -> list[str]:
    """``style.parameter=value`` for every preset value that is an evaluation grid value (a
    model trained on such a preset would have heard an evaluation value)."""
    hits = []
    for style in styles:
        if is_grid_style(style.name):
            hits.append(f"{style.name}: the 'grid-' prefix is reserved for grid renderings")
            continue
        for name in LEVELS:
            value = getattr(style, name)
            if any(_close(value, v) for v in side_values(name, EVAL)):
                hits.append(f"{style.name}.{name}={value}")
    return hits
