"""eval stage: retrieval metrics, the style-retrieval benchmark and its report (the audio
descriptors it scores as a baseline live in :mod:`mess_ray.descriptors`)."""

from mess_ray.eval.benchmark import build_protocol, run_evaluate, score_system

__all__ = [
    "build_protocol",
    "run_evaluate",
    "score_system",
]
