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
    """A plain-text table of hits: rank, track, start-end, similarity, its percentile among the
    query's similarities to the corpus, the facet that made it close, style and piece."""
    hits = result.get("hits", [])
    if not hits:
        return "no results"
    rows = [
        (
            "rank",
            "track",
            "passage (s)",
            "similarity",
            "percentile",
            "closest facet",
            "style",
            "piece",
        )
    ]
    for hit in hits:
        pct = hit.get("percentile")
        rows.append(
            (
                str(hit["rank"]),
                str(hit["track_id"]),
                f"{hit['start_s']:.2f}-{hit['end_s']:.2f}",
                f"{hit['similarity']:.4f}",
                "-" if pct is None else f"{pct:.1f}",
                hit.get("closest_facet") or "-",
                str(hit.get("style", "")),
                str(hit.get("piece_id", "")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 2, 3, 4}
    lines = [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(h.get("percentile") is not None for h in hits):
        lines.append(
            "percentile: share of the corpus less similar to the query (from a fixed random "
            "sample of up to 2048 passages); closest facet: the part of the embedding that ranks "
            "the hit highest"
        )
    return "\n".join(lines)


# -- the content view: GET/POST /passages ---------------------------------------------------
def passages_by_track(
    base_url: str, track_id: str, start_s: float, end_s: float, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """GET /passages: [start_s, end_s) of an indexed track in every other performance of its work."""
    response = httpx.get(
        f"{base_url.rstrip('/')}/passages",
        params={"track_id": track_id, "start_s": start_s, "end_s": end_s},
        timeout=timeout,
    )
    return _check(response)


def passages_file(
    base_url: str, path_or_bytes: str | Path | bytes, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """POST /passages: an audio clip aligned in the indexed performances of its work."""
    if isinstance(path_or_bytes, bytes):
        data, name = path_or_bytes, "query.wav"
    else:
        data, name = Path(path_or_bytes).read_bytes(), Path(path_or_bytes).name
    response = httpx.post(
        f"{base_url.rstrip('/')}/passages", files={"file": (name, data)}, timeout=timeout
    )
    return _check(response)


def format_passages(result: dict[str, Any]) -> str:
    """A plain-text table: rank (most alike first), track, aligned span, cost, tempo, distances."""
    rows = [("rank", "track", "aligned (s)", "cost", "tempo x", "d_tempo", "d_loud", "piece")]
    for p in result.get("performances", []):
        rows.append(
            (
                str(p["rank"]),
                str(p["track_id"]),
                f"{p['start_s']:.2f}-{p['end_s']:.2f}",
                f"{p['cost']:.3f}",
                f"{p['tempo_ratio']:.2f}",
                f"{p['distance']['tempo']:.3f}",
                f"{p['distance']['loudness']:.3f}",
                str(p.get("piece_id", "")),
            )
        )
    if len(rows) == 1:
        return "no other performance"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i != 1 and i != 7 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
