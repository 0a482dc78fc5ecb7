"""Ingest stage: decode recordings with Ray Data and cut them into timestamped segments."""

from mess_ray.ingest.catalog import (
    build_catalog,
    catalog_from_folder,
    catalog_from_manifest,
    catalog_from_render,
)
from mess_ray.ingest.corpora import catalog_from_asap, catalog_from_maestro, detect_corpus
from mess_ray.ingest.decode import REJECT_REASONS, RejectError, decode_stream
from mess_ray.ingest.job import run_ingest
from mess_ray.ingest.segment import Segmenter, segment_track, window_starts

__all__ = [
    "REJECT_REASONS",
    "RejectError",
    "Segmenter",
    "build_catalog",
    "catalog_from_asap",
    "catalog_from_folder",
    "catalog_from_maestro",
    "catalog_from_manifest",
    "catalog_from_render",
    "decode_stream",
    "detect_corpus",
    "run_ingest",
    "segment_track",
    "window_starts",
]
