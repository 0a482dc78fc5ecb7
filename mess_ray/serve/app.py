"""HTTP API (FastAPI) of the search service and its Ray Serve deployment.

:func:`create_app` builds the FastAPI app around a :class:`SearchService` (testable with
FastAPI's TestClient, no Ray). :class:`SearchDeployment` is the Ray Serve ingress: each
replica loads the index and Embedder in its constructor and then builds the same app
(``__serve_build_asgi_app__``, Serve's late-bound ingress), embeds uploads in batches across
concurrent requests (:class:`BatchedEmbedder`, ``@serve.batch``; decoding stays outside the
batch) and polls the index LATEST pointer to swap to new versions. Errors map to 404 (unknown
ids, missing source audio), 413 (oversize upload), 415 (not audio), 416 (bad byte range) and
422 (bad parameters).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve

from mess_ray.config import MessRayConfig
from mess_ray.serve.passages import add_passage_routes
from mess_ray.serve.service import (
    IndexState,
    PayloadTooLarge,
    SearchOptions,
    SearchService,
    UnsupportedMedia,
    _plain,
)

log = logging.getLogger(__name__)
APP_NAME = "mess-ray"


# -- response models -------------------------------------------------------------------
class FacetExplanation(BaseModel):
    facet: str
    label: str
    query: dict[str, float] = Field(description="The query passage's descriptors of this facet.")
    hit: dict[str, float] = Field(description="The hit passage's descriptors of this facet.")
    closeness: float = Field(
        description="exp(-|difference| / scale) averaged over the facet's descriptors, 0..1."
    )
    embedding_similarity: float | None = Field(
        description="Cosine of this facet's part of a faceted embedding."
    )
    text: str = Field(
        description='E.g. "tempo and rubato: onsets 4.1 vs 4.3/s, timing variability 0.12 vs 0.15".'
    )


class HitModel(BaseModel):
    rank: int
    segment_id: int
    track_id: str
    piece_id: str
    style: str
    start_s: float
    end_s: float
    similarity: float = Field(
        description="Inner product with the (facet-weighted) query; cosine without weights."
    )
    source_uri: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    facet_similarities: dict[str, float] = Field(default_factory=dict)
    percentile: float | None = Field(
        None,
        description="Where this similarity stands among the query's similarities to the corpus: "
        "the percentage of a fixed random sample of indexed passages (up to 2048, seed 0) that are "
        "less similar to the query. 99.9 = closer than almost everything; 60 = barely above average.",
    )
    closest_facet: str | None = Field(
        None,
        description="The facet (tempo, dynamics, articulation, timbre, or timeline: the same "
        "notes at the same moments) whose part of the embedding ranks this hit highest against "
        "the same corpus sample: what made it close. None without facet heads.",
    )
    facet_percentiles: dict[str, float] = Field(
        default_factory=dict, description="Each facet part's percentile against the sample."
    )
    work_relative: str | None = Field(
        None,
        description="Work-relative search only: the norm the query was compared by (its work's, "
        "or why it fell back to the corpus-wide norm).",
    )
    explanation: list[FacetExplanation] | None = Field(
        None,
        description="Per-facet descriptor comparison with the query, most alike first (None: not asked "
        "for, or the audio is unavailable).",
    )


class SearchResponse(BaseModel):
    query: dict[str, Any] = Field(description="What was searched (upload info or track span).")
    hits: list[HitModel]
    index_version: str | None
    took_ms: float


class TrackModel(BaseModel):
    track_id: str
    piece_id: str
    style: str
    source_uri: str
    num_segments: int
    duration_s: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class SegmentModel(BaseModel):
    segment_id: int
    start_s: float
    end_s: float


class TrackDetail(TrackModel):
    segments: list[SegmentModel]


class WaveformModel(BaseModel):
    track_id: str
    duration_s: float
    points: int
    min: list[float]
    max: list[float]


class HealthModel(BaseModel):
    status: str


class InfoModel(BaseModel):
    index_version: str | None
    count: int
    dim: int
    index_type: str
    model: dict[str, Any]
    facet_layout: dict[str, list[int]] | None = Field(
        description="Parts of a faceted embedding; None: no facets."
    )
    filter_fields: list[str]
    stats: dict[str, Any]


class ReadyModel(InfoModel):
    status: str


class ErrorModel(BaseModel):
    detail: str = Field(description="What was wrong, in words.")
    errors: list[dict[str, Any]] | None = Field(
        None, description="Per-field validation errors (422 only)."
    )


ERRORS = {
    400: {"model": ErrorModel, "description": "Malformed request (e.g. a broken multipart body)"},
    404: {"model": ErrorModel},
    413: {"model": ErrorModel},
    415: {"model": ErrorModel},
    422: {"model": ErrorModel},
}

FILTER_PATTERN = re.compile(r"^([A-Za-z0-9_.\-]+)=(.*)$", re.S)


def _message(err: BaseException) -> str:
    # KeyError's str() is the repr of its argument; show the plain message, never object reprs.
    return _plain(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))


async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    # One readable sentence (e.g. "query.k: Input should be less than or equal to 1000"), plus
    # the field list: the same {"detail": str} shape as every other error of this API.
    errors = jsonable_encoder(
        err.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")}
    )
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors
    )
    for e in errors:
        e.pop("input", None)  # may echo a whole upload back
        e.pop("ctx", None)
    return JSONResponse({"detail": detail or "invalid request", "errors": errors}, status_code=422)


def _json_error(status: int):
    async def handler(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": _message(err)}, status_code=status)

    return handler


def search_options(
    k: int | None = Query(
        None, ge=1, le=1000, description="Number of hits (default: serve.default_k)"
    ),
    exclude_track: str | None = Query(
        None, description="Drop hits from this track (e.g. the query's own)"
    ),
    min_gap_s: float = Query(
        0.0, ge=0, le=1e6, description="Min distance between hits of one track (s)"
    ),
    mmr_lambda: float | None = Query(
        None,
        ge=0,
        le=1,
        description="Diversity: 1 = pure similarity, lower values prefer hits unlike those above",
    ),
    w_overall: float | None = Query(
        None, ge=0, le=1e6, description="Facet weight: overall expression"
    ),
    w_tempo: float | None = Query(None, ge=0, le=1e6, description="Facet weight: tempo and rubato"),
    w_dynamics: float | None = Query(None, ge=0, le=1e6, description="Facet weight: dynamics"),
    w_articulation: float | None = Query(
        None, ge=0, le=1e6, description="Facet weight: articulation"
    ),
    w_timbre: float | None = Query(None, ge=0, le=1e6, description="Facet weight: timbre"),
    w_timeline: float | None = Query(
        None,
        ge=0,
        le=1e6,
        description="Weight of the timeline part (the passage's chroma and onset timelines of "
        "the shipped models tiny-asap-v3 and v4 or model.content_timeline, or a part trained "
        "with model.timeline_bins): the same notes at the same moments, e.g. this very "
        "recording through another recording chain (they score it at the best query lag up to "
        "+-140 ms); 0 searches the other parts alone. Any facet weight given replaces the "
        "model's own query weights (tiny-asap-v4: timbre 0.5, the other parts 1)",
    ),
    composer: str | None = Query(
        None, max_length=200, description="Metadata filter (substring, any case)"
    ),
    title: str | None = Query(
        None, max_length=200, description="Metadata filter (substring, any case)"
    ),
    piece_id: str | None = Query(None, max_length=200, description="Only this piece"),
    style: str | None = Query(None, max_length=200, description="Only this style"),
    filter: list[str] = Query(
        [],
        description="More metadata filters as field=value (any metadata_json "
        "field, e.g. catalog=BWV 846)",
    ),
    explain: bool = Query(
        True, description="Compare audio descriptors of the query and each hit per facet"
    ),
    work_relative: bool = Query(
        False,
        description="Rank by how passages are played relative to other performances of their "
        "work (the index's per-work norms); the query's work is its track's piece, or for an "
        "upload the one the content view identifies. Each hit says which norm was used.",
    ),
) -> SearchOptions:
    """The search options shared by both search endpoints."""
    weights = {
        name: value
        for name, value in (
            ("overall", w_overall),
            ("tempo", w_tempo),
            ("dynamics", w_dynamics),
            ("articulation", w_articulation),
            ("timbre", w_timbre),
            ("timeline", w_timeline),
        )
        if value is not None
    }
    filters = {
        name: value
        for name, value in (
            ("composer", composer),
            ("title", title),
            ("piece_id", piece_id),
            ("style", style),
        )
        if value
    }
    for item in filter:
        match = FILTER_PATTERN.match(item)
        if not match:
            raise ValueError(f"filter {item!r} must be field=value")
        filters[match.group(1)] = match.group(2)
    return SearchOptions(
        k=k,
        exclude_track=exclude_track,
        min_gap_s=min_gap_s,
        facet_weights=weights or None,
        filters=filters or None,
        mmr_lambda=mmr_lambda,
        explain=explain,
        work_relative=work_relative,
    )


SINGLE_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def range_applies(header: str) -> bool:
    """Whether a ``Range`` header is one this API answers (a single ``bytes`` range).

    Other units and multi-range requests are ignored (RFC 9110: a server may ignore Range),
    so they get the whole passage with 200.
    """
    match = SINGLE_RANGE.fullmatch(header)
    return bool(match) and bool(match.group(1) or match.group(2))


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The byte span [first, last] of a single-range ``Range`` header; None when unsatisfiable."""
    match = SINGLE_RANGE.fullmatch(header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    if not match.group(1):  # suffix range: the last N bytes
        n = int(match.group(2))
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else None
    first = int(match.group(1))
    last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    return (first, last) if first <= last and first < size else None


Embed = Callable[[np.ndarray], Awaitable[tuple[np.ndarray, IndexState]]]

# Multipart framing around an upload of exactly max_upload_mb.
MULTIPART_SLACK = 2**16


class BodyLimit:
    """ASGI middleware: refuse a request body above ``limit`` bytes with 413 while it arrives.

    A declared Content-Length above the limit is refused before anything is read; a chunked
    body (no Content-Length) is counted as it arrives and stopped at the limit, so no body
    larger than the limit is ever buffered (the multipart parser spools what it reads).
    """

    def __init__(self, app: Any, limit: Callable[[], int], paths: tuple[str, ...]) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1").strip()
        if length.isdigit() and int(length) > limit:
            await self._refuse(send, limit)
            return
        state = {"received": 0, "over": False, "started": False}

        async def counted_receive() -> dict:
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise PayloadTooLarge(f"upload exceeds the {limit / 2**20:.1f} MiB limit")
            return message

        async def guarded_send(message: dict) -> None:
            if state["over"]:
                return  # the app's answer to a cut body is replaced by the 413 below
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send: Callable, limit: int) -> None:
        body = JSONResponse(
            {"detail": f"upload exceeds the {limit / 2**20:.1f} MiB limit"}, status_code=413
        )
        await body(
            {"type": "http"},
            _no_receive,
            send,
        )


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


# Open without an API key: liveness probes and the page itself (it calls the API with the key).
OPEN_PATHS = {"/healthz", "/"}


def api_key_of(service: SearchService) -> str | None:
    """serve.api_key, else the MESS_RAY_API_KEY environment variable; None: no key asked."""
    return service.cfg.serve.api_key or os.environ.get("MESS_RAY_API_KEY") or None


def key_matches(expected: str, request: Request) -> bool:
    """X-API-Key or ``Authorization: Bearer`` equal to ``expected`` (constant-time compare)."""
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(given.encode(), expected.encode())


class BatchedEmbedder:
    """Embeds uploads of concurrent requests in one model call (``@serve.batch``).

    Requests decode their own upload first (in the thread pool); only the model call is
    batched. The batch runs in a worker thread so the replica's event loop keeps serving.
    """

    def __init__(self, service: SearchService) -> None:
        self.service = service
        self.embed.set_max_batch_size(service.cfg.serve.batch_max_size)
        self.embed.set_batch_wait_timeout_s(service.cfg.serve.batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def embed(self, clips: list[np.ndarray]) -> list[tuple[np.ndarray, IndexState]]:
        vectors, state = await asyncio.to_thread(self.service.embed_clips, clips)
        return [(vector, state) for vector in vectors]


def create_app(service: SearchService, embed: Embed | None = None) -> FastAPI:
    """The FastAPI app serving ``service``; ``embed`` turns decoded uploads into query vectors
    (default: one model call per request in the thread pool; the Serve replica batches)."""
    app = FastAPI(
        title="mess-ray",
        version="0.1.0",
        description="Expressive music similarity search: find passages played alike.",
    )

    async def embed_alone(samples: np.ndarray) -> tuple[np.ndarray, IndexState]:
        vectors, state = await run_in_threadpool(service.embed_clips, [samples])
        return vectors[0], state

    embed_upload = embed or embed_alone

    # Domain errors to HTTP statuses; the most specific class first (the first two subclass ValueError).
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(
        BodyLimit,
        limit=lambda: service.max_upload_bytes + MULTIPART_SLACK,
        paths=("/search", "/passages"),
    )
    api_key = api_key_of(service)
    for error, status in (
        (PayloadTooLarge, 413),
        (UnsupportedMedia, 415),
        (ValueError, 422),
        (KeyError, 404),
        (FileNotFoundError, 404),
    ):
        app.add_exception_handler(error, _json_error(status))

    @app.middleware("http")
    async def _reject_oversize_and_measure(request: Request, call_next):
        started = time.perf_counter()
        if api_key and request.url.path not in OPEN_PATHS and not key_matches(api_key, request):
            response = JSONResponse(
                {"detail": "missing or wrong API key (X-API-Key or Authorization: Bearer)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        service.metrics.record_request(
            getattr(route, "path", "unmatched"),
            response.status_code,
            1000 * (time.perf_counter() - started),
        )
        return response

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="Search with an audio clip",
    )
    async def search(
        file: UploadFile = File(..., description="WAV, FLAC, MP3 or OGG at any sample rate"),
        options: SearchOptions = Depends(search_options),
    ) -> dict:
        started = time.perf_counter()
        data = await file.read(service.max_upload_bytes + 1)
        await file.close()
        samples, info = await run_in_threadpool(service.prepare_upload, data)
        vector, state = await embed_upload(samples)
        return await run_in_threadpool(
            service.search_vector,
            vector,
            state,
            options,
            {"kind": "upload", **info},
            samples,
            started,
        )

    @app.get(
        "/search/by-track",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="Search with a passage of an indexed track",
    )
    def search_by_track(
        track_id: str = Query(..., min_length=1),
        start_s: float = Query(..., ge=0, le=1e7),
        end_s: float | None = Query(None, gt=0, le=1e7),
        options: SearchOptions = Depends(search_options),
    ) -> dict:
        return service.search_by_track(track_id, start_s, end_s, options)

    @app.get("/tracks", response_model=list[TrackModel], summary="Indexed tracks")
    def tracks() -> list[dict]:
        return service.tracks()

    # Track ids may contain "/" (ASAP and MAESTRO ids are paths): path-typed parameters. The
    # waveform route comes first, so ".../waveform" is never read as part of an id.
    @app.get(
        "/tracks/{track_id:path}/waveform",
        response_model=WaveformModel,
        responses=ERRORS,
        summary="Min/max peaks of a track, for drawing its waveform",
    )
    def waveform(track_id: str = Path(...), points: int = Query(800, ge=16, le=4000)) -> dict:
        return service.waveform(track_id, points)

    @app.get(
        "/tracks/{track_id:path}",
        response_model=TrackDetail,
        responses=ERRORS,
        summary="One track and its segments",
    )
    def track(track_id: str = Path(...)) -> dict:
        return service.track(track_id)

    @app.get(
        "/audio/{track_id:path}",
        responses={
            200: {"content": {"audio/wav": {}}},
            206: {"description": "Partial content (Range)"},
            416: {"model": ErrorModel},
            **ERRORS,
        },
        response_class=Response,
        summary="WAV of a passage of a track, for playback (HTTP range requests)",
    )
    def audio(
        request: Request,
        track_id: str = Path(...),
        start_s: float = Query(0.0, ge=0, le=1e7),
        end_s: float | None = Query(None, gt=0, le=1e7),
    ) -> Response:
        # Only the frames under the requested bytes are decoded; HEAD decodes nothing.
        headers = {"Accept-Ranges": "bytes"}
        requested = request.headers.get("range")
        if requested is not None and not range_applies(requested):
            requested = None  # multi-range or another unit: ignored, the whole passage
        head = request.method == "HEAD"
        if requested is None:
            if head:
                size = service.audio_size(track_id, start_s, end_s)
                return Response(
                    media_type="audio/wav", headers={**headers, "Content-Length": str(size)}
                )
            # Sized (and 404/422 raised) from the header first; then streamed block by block.
            size = service.audio_size(track_id, start_s, end_s)
            return StreamingResponse(
                service.audio_stream(track_id, start_s, end_s),
                media_type="audio/wav",
                headers={**headers, "Content-Length": str(size)},
            )
        size = service.audio_size(track_id, start_s, end_s)
        span = parse_range(requested, size)
        if span is None:
            return JSONResponse(
                {"detail": f"range {requested!r} not satisfiable for {size} bytes"},
                status_code=416,
                headers={"Content-Range": f"bytes */{size}"},
            )
        first, last = span
        range_headers = {**headers, "Content-Range": f"bytes {first}-{last}/{size}"}
        if head:
            return Response(
                status_code=206,
                media_type="audio/wav",
                headers={**range_headers, "Content-Length": str(last - first + 1)},
            )
        data, _ = service.audio(track_id, start_s, end_s, byte_span=span)
        return Response(data, status_code=206, media_type="audio/wav", headers=range_headers)

    # HEAD answers the same headers without decoding (players probe the size first).
    app.add_api_route(
        "/audio/{track_id:path}",
        audio,
        methods=["HEAD"],
        response_class=Response,
        include_in_schema=False,
    )

    @app.get("/healthz", response_model=HealthModel, summary="Liveness")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=ReadyModel,
        responses={503: {"model": ErrorModel}},
        summary="Readiness: index and model loaded (with the served version and counters)",
    )
    def readyz() -> Any:
        if len(service.index) == 0:
            return JSONResponse({"detail": "index is empty"}, status_code=503)
        return {"status": "ready", **service.describe()}

    @app.get(
        "/info", response_model=InfoModel, summary="Served index, model, facets and filter fields"
    )
    def info() -> dict:
        return service.describe()

    # The content view: GET/POST /passages (mess_ray/serve/passages.py).
    add_passage_routes(app, service, ERRORS)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("mess_ray.serve").joinpath("static/index.html").read_text()

    return app


# -- Ray Serve -------------------------------------------------------------------------
def _deployment_class():
    @serve.deployment(name="SearchDeployment")
    @serve.ingress()
    class SearchDeployment:
        """One replica: the index and Embedder are loaded once, then the FastAPI app serves them."""

        def __init__(self, cfg_json: dict[str, Any]) -> None:
            self.service = SearchService.from_config(MessRayConfig.model_validate(cfg_json))
            self.embedder = BatchedEmbedder(self.service)
            self.service.start_reloader()  # serve.reload_interval_s; 0 or a pinned version: off

        def __serve_build_asgi_app__(self) -> FastAPI:
            return create_app(self.service, self.embedder.embed)

        def __del__(self) -> None:
            self.service.stop_reloader()

        def check_health(self) -> None:
            if len(self.service.index) == 0:
                raise RuntimeError("index is empty")

    return SearchDeployment


def build_app(cfg: MessRayConfig):
    """The bound Ray Serve application (deploy with ``serve.run(app, route_prefix="/")``)."""
    deployment = _deployment_class().options(
        num_replicas=cfg.serve.num_replicas,
        ray_actor_options={
            "num_cpus": cfg.serve.cpus_per_replica,
            "num_gpus": cfg.serve.gpus_per_replica,
        },
        # A replica must accept at least a full batch of uploads at once for batching to fill.
        max_ongoing_requests=max(16, 2 * cfg.serve.batch_max_size),
    )
    return deployment.bind(cfg.model_dump(mode="json"))


def run_service(cfg: MessRayConfig, blocking: bool = True):
    """Start Serve on cfg.serve.host:port and deploy the search app at "/".

    Returns the deployment handle when ``blocking`` is False; otherwise serves until interrupted.
    """
    from mess_ray.raylocal import ensure_ray

    ensure_ray(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=blocking)
    log.info("mess-ray search service on http://%s:%d/", cfg.serve.host, cfg.serve.port)
    return handle


def app_builder(args: dict[str, Any]):
    """Application builder for `serve deploy serve_config.yaml` / `serve run`.

    ``args`` come from the Serve config: ``config`` (a mess-ray YAML path) and ``set`` (a list
    of ``section.key=value`` overrides). Replicas, autoscaling and resources are left to the
    Serve config file, which is where operators tune them.
    """
    from mess_ray.config import load_config

    cfg = load_config(args.get("config"), list(args.get("set") or []))
    return _deployment_class().bind(cfg.model_dump(mode="json"))
