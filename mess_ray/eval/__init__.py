"""eval stage: retrieval metrics, audio descriptors, the style-retrieval benchmark and its report."""

from mess_ray.eval.benchmark import build_protocol, run_evaluate, score_system
from mess_ray.eval.descriptors import (
    DESCRIPTOR_NAMES,
    describe,
    descriptor_embeddings,
    descriptor_vector,
)

__all__ = [
    "DESCRIPTOR_NAMES",
    "build_protocol",
    "describe",
    "descriptor_embeddings",
    "descriptor_vector",
    "run_evaluate",
    "score_system",
]
