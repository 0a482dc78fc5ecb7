"""HTTP client of the search service (used by the `mess-ray search` CLI verb and the demo)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 120.0


class ServiceError(RuntimeError):
    """The service answered with an error status; ``status`` and ``detail`` say which."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"search service error {status}: {detail}")
        self.status = status
        self.detail = detail


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.is_success:
        return response.json()
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # FastAPI's default validation errors (older servers)
        detail = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
        )
    raise ServiceError(response.status_code, str(detail))


def _headers() -> dict[str, str]:
    """The API key of a service that asks for one (MESS_RAY_API_KEY), as X-API-Key."""
    key = os.environ.get("MESS_RAY_API_KEY")
    return {"X-API-Key": key} if key else {}


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def wait_ready(base_url: str, timeout_s: float = 120.0, poll_s: float = 0.5) -> dict[str, Any]:
    """Poll ``/readyz`` until the service has loaded its index and model."""
    import time

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=5.0, headers=_headers())
            if response.status_code == 200:
                return response.json()
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as err:  # proxy not listening yet
            last = repr(err)
        time.sleep(poll_s)
    raise TimeoutError(f"search service at {base_url} not ready after {timeout_s} s: {last}")


def search_file(
    base_url: str,
    path_or_bytes: str | Path | bytes,
    k: int = 10,
    *,
    exclude_track: str | None = None,
    min_gap_s: float | None = None,
    filename: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    **options: Any,
) -> dict[str, Any]:
    """POST an audio file (path or bytes) to /search; returns the SearchResponse dict.

    ``options`` are the other query parameters of the API: ``w_tempo=1`` (facet weights),
    ``mmr_lambda=0.5``, ``composer="Bach"``, ``filter=["catalog=BWV 846"]``, ``explain=False``.
    """
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data, name = bytes(path_or_bytes), filename or "query.wav"
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise FileNotFoundError(f"no such audio file: {path}")
        data, name = path.read_bytes(), filename or path.name
    response = httpx.post(
        f"{base_url.rstrip('/')}/search",
        params=_params(k=k, exclude_track=exclude_track, min_gap_s=min_gap_s, **options),
        files={"file": (name, data, "application/octet-stream")},
        timeout=timeout,
        headers=_headers(),
    )
    return _check(response)


def search_by_track(
    base_url: str,
    track_id: str,
    start_s: float,
    end_s: float | None = None,
    k: int = 10,
    *,
    exclude_track: str | None = None,
    min_gap_s: float | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    **options: Any,
) -> dict[str, Any]:
    """GET /search/by-track: passages like [start_s, end_s] of an indexed track (``options`` as in search_file)."""
    response = httpx.get(
        f"{base_url.rstrip('/')}/search/by-track",
        params=_params(
            track_id=track_id,
            start_s=start_s,
            end_s=end_s,
            k=k,
            exclude_track=exclude_track,
            min_gap_s=min_gap_s,
            **options,
        ),
        timeout=timeout,
        headers=_headers(),
    )
    return _check(response)


def list_tracks(base_url: str, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    response = httpx.get(f"{base_url.rstrip('/')}/tracks", timeout=timeout, headers=_headers())
    if not response.is_success:
        _check(response)
    return response.json()


def format_hits(result: dict[str, Any]) -> str:
    """A plain-text table of hits: rank, track, start-end, similarity (plus style and piece)."""
    hits = result.get("hits", [])
    if not hits:
        return "no results"
    rows = [("rank", "track", "passage (s)", "similarity", "style", "piece")]
    for hit in hits:
        rows.append(
            (
                str(hit["rank"]),
                str(hit["track_id"]),
                f"{hit['start_s']:.2f}-{hit['end_s']:.2f}",
                f"{hit['similarity']:.4f}",
                str(hit.get("style", "")),
                str(hit.get("piece_id", "")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 2, 3}
    lines = [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
