"""Models shipped inside the package: a default for ``--model`` when nothing was trained locally.

Each shipped model is a folder ``mess_ray/models/shipped/<name>/`` holding

- ``model/``: an :class:`~mess_ray.models.embedding.EmbeddingModel` folder (encoder weights,
  ``head.pt``, ``embedding_config.json``);
- ``manifest.json``: the recipe (config, seeds, command), the training artifacts it came from,
  and the evaluate stage's benchmark figures with the split they were measured on;
- ``reference.npz``: a generated clip's seed and the vectors this model gave for it when shipped
  (``tests/test_shipped_model.py`` checks the weights still embed it identically).

A *derived* shipped model has no ``model/`` of its own: its manifest names the shipped model
whose weights it uses (``weights_of``) and what it adds to that model's vectors
(``content_timeline``: the passage's chroma and onset timelines appended as a last part, see
``model.content_timeline``, and optionally the query lags they are tried at,
``query_shift_ms`` / ``query_step_ms``, see ``model.content_timeline_query_shift_ms``), and
optionally the per-part weights its queries are searched with by default
(``query_facet_weights``: the indexed vectors stay those of the model without them). Its
reference vectors are its own.

Refs: ``shipped`` (the default, :data:`DEFAULT_SHIPPED`) or ``shipped:<name>``; ``auto`` means the
latest local ``finetune`` artifact if there is one, else the shipped default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"
DEFAULT_SHIPPED = "tiny-asap-v4"
SHIPPED_PREFIX = "shipped"
AUTO = "auto"
MANIFEST = "manifest.json"
REFERENCE = "reference.npz"
MODEL_DIR = "model"


def is_shipped_ref(ref: str) -> bool:
    return ref == SHIPPED_PREFIX or ref.startswith(SHIPPED_PREFIX + ":")


def shipped_name(ref: str) -> str:
    """``shipped`` -> the default name; ``shipped:<name>`` -> name."""
    if not is_shipped_ref(ref):
        raise ValueError(f"{ref!r} is not a shipped model ref ('shipped' or 'shipped:<name>')")
    name = ref.partition(":")[2] or DEFAULT_SHIPPED
    return name


def available() -> list[str]:
    if not SHIPPED_ROOT.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_ROOT.iterdir() if (p / MANIFEST).is_file())


def shipped_dir(name: str = DEFAULT_SHIPPED) -> Path:
    folder = SHIPPED_ROOT / name
    if not (folder / MANIFEST).is_file() or "/" in name or name.startswith("."):
        raise FileNotFoundError(
            f"no shipped model {name!r} in {SHIPPED_ROOT} (available: {available() or 'none'})"
        )
    return folder


def shipped_manifest(name: str = DEFAULT_SHIPPED) -> dict[str, Any]:
    return json.loads((shipped_dir(name) / MANIFEST).read_text())


def model_dir(name: str = DEFAULT_SHIPPED) -> Path:
    """The model folder a shipped model embeds with: its own, or that of the shipped model its
    manifest names as ``weights_of`` (one level: a derived model's source has its own)."""
    source = shipped_manifest(name).get("weights_of") or name
    folder = shipped_dir(source) / MODEL_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"shipped model {name!r}: no model folder {folder}"
            + (f" (weights_of {source!r})" if source != name else "")
        )
    return folder


def declared_content_timeline(name: str = DEFAULT_SHIPPED) -> dict[str, float] | None:
    """The content timeline a shipped model declares as part of its vectors (the rates, as an
    embedder records them), or None."""
    from mess_ray.content import timeline_record

    return timeline_record(shipped_manifest(name).get("content_timeline"))


def declared_query_facet_weights(name: str = DEFAULT_SHIPPED) -> dict[str, float] | None:
    """The per-part weights a shipped model's queries are searched with when a query names
    none (``query_facet_weights`` in its manifest, as the service's facet weights; the indexed
    vectors are unchanged), or None: every part weighs the same."""
    raw = shipped_manifest(name).get("query_facet_weights")
    return {str(k): float(v) for k, v in raw.items()} if raw else None


def reference_clip(seed: int, sample_rate: int, seconds: float) -> np.ndarray:
    """The generated clip the reference vectors were recorded on: a few decaying partial tones
    with a seeded melody and level contour (deterministic from ``seed``)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    audio = np.zeros(n, dtype=np.float64)
    note_len = max(1, n // 8)
    for i, start in enumerate(range(0, n, note_len)):
        freq = 220.0 * 2 ** (int(rng.integers(0, 24)) / 12)
        seg = slice(start, min(n, start + note_len))
        tt = t[seg] - t[start]
        level = 0.1 + 0.4 * rng.random()
        for h in (1, 2, 3):
            audio[seg] += level / h * np.sin(2 * np.pi * freq * h * tt) * np.exp(-3.0 * tt)
        del i
    return audio.astype(np.float32)
