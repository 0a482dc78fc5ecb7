"""Training on Ray Train: HuBERT-style SSL pretraining and contrastive fine-tuning.

The stage entry points are imported on first use (PEP 562): Ray task workers that only
deserialise a row filter from :mod:`mess_ray.train.targets` or :mod:`mess_ray.train.pairs`
then import NumPy and Arrow, not torch and transformers (seconds per fresh worker)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["run_pretrain", "run_finetune"]
_ENTRY_POINTS = {
    "run_pretrain": "mess_ray.train.pretrain",
    "run_finetune": "mess_ray.train.finetune",
}


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'mess_ray.train' has no attribute {name!r}")
