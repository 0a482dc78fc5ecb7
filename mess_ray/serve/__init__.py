"""serve stage: the search service (FastAPI on Ray Serve), its web page and HTTP client."""

from mess_ray.serve.app import build_app, create_app, run_service
from mess_ray.serve.service import SearchService

__all__ = ["build_app", "create_app", "run_service", "SearchService"]
