"""index stage: embed segments on a Ray Data actor pool, build a sharded FAISS index, search it."""

from mess_ray.index.job import IndexIntegrityError, reconcile_ids, run_index
from mess_ray.index.reindex import run_reindex
from mess_ray.index.searcher import Hit, SearchIndex

__all__ = ["run_index", "run_reindex", "SearchIndex", "Hit", "IndexIntegrityError", "reconcile_ids"]
