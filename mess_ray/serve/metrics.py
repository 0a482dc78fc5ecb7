"""Request metrics of the search service: Prometheus through Ray, plus local counts.

Inside a Ray worker (a Serve replica) counters and histograms are ``ray.util.metrics``
objects, which Ray's metrics agent exports in Prometheus format next to Serve's own
``ray_serve_*`` metrics (custom metric names get Ray's ``ray_`` prefix). Outside Ray (the
FastAPI app under TestClient, the CLI) only the local counts are kept; they are also shown
in ``/readyz`` so a single replica can be inspected without a Prometheus server.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

# Milliseconds: a by-id query takes ~1 ms, an upload tens to hundreds (model call).
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class ServiceMetrics:
    """Queries, latency, errors and embedding batch sizes, per route."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        self._ray = self._ray_metrics()

    @staticmethod
    def _ray_metrics() -> dict[str, Any] | None:
        try:
            import ray

            if not ray.is_initialized():
                return None
            from ray.util import metrics
        except ImportError:
            return None
        return {
            "queries": metrics.Counter(
                "mess_ray_requests",
                "Requests answered, by route and status.",
                tag_keys=("route", "status"),
            ),
            "errors": metrics.Counter(
                "mess_ray_errors",
                "Requests answered with an error status (4xx/5xx).",
                tag_keys=("route", "status"),
            ),
            "latency": metrics.Histogram(
                "mess_ray_latency_ms",
                "Request latency in milliseconds, by route.",
                boundaries=LATENCY_BOUNDARIES_MS,
                tag_keys=("route",),
            ),
            "batch": metrics.Histogram(
                "mess_ray_embed_batch_size",
                "Uploads embedded per model call.",
                boundaries=BATCH_BOUNDARIES,
            ),
        }

    def record_request(self, route: str, status: int, latency_ms: float) -> None:
        with self._lock:
            self.requests[route] += 1
            if status >= 400:
                self.errors[f"{route} {status}"] += 1
        if self._ray is not None:
            tags = {"route": route, "status": str(status)}
            self._ray["queries"].inc(1, tags=tags)
            if status >= 400:
                self._ray["errors"].inc(1, tags=tags)
            self._ray["latency"].observe(latency_ms, tags={"route": route})

    def record_batch(self, size: int) -> None:
        if self._ray is not None:
            self._ray["batch"].observe(size)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "exported_through_ray": self._ray is not None,
            }
