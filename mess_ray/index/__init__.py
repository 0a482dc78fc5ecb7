"""index stage: embed segments on a Ray Data actor pool, build a sharded FAISS index, search it."""

from mess_ray.index.job import IndexIntegrityError, reconcile_ids, run_index
from mess_ray.index.searcher import Hit, SearchIndex

__all__ = ["run_index", "SearchIndex", "Hit", "IndexIntegrityError", "reconcile_ids"]
