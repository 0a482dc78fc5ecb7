"""Models: HuBERT-style encoders, the EmbeddingModel and the Embedder used by every stage."""

from mess_ray.models.embedder import Embedder, MeanPooledEncoder
from mess_ray.models.embedding import EmbeddingModel
from mess_ray.models.encoder import build_encoder, count_parameters, encoder_config, load_encoder

__all__ = [
    "Embedder",
    "EmbeddingModel",
    "MeanPooledEncoder",
    "build_encoder",
    "count_parameters",
    "encoder_config",
    "load_encoder",
]
