"""HTTP API (FastAPI) of the search service and its Ray Serve deployment.

:func:`create_app` builds the FastAPI app around a :class:`SearchService` (testable with
FastAPI's TestClient, no Ray). :class:`SearchDeployment` is the Ray Serve ingress: each
replica loads the index and Embedder in its constructor and then builds the same app
(``__serve_build_asgi_app__``, Serve's late-bound ingress). Errors map to 404 (unknown ids,
missing source audio), 413 (oversize upload), 415 (not audio) and 422 (bad parameters).
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from mess_ray.config import MessRayConfig
from mess_ray.index.searcher import Hit
from mess_ray.serve.service import PayloadTooLarge, SearchService, UnsupportedMedia

log = logging.getLogger(__name__)
APP_NAME = "mess-ray"


# -- response models -------------------------------------------------------------------
class SearchResponse(BaseModel):
    query: dict[str, Any] = Field(description="What was searched (upload info or track span).")
    hits: list[Hit]  # the searcher's own dataclass: one definition of a hit
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


class HealthModel(BaseModel):
    status: str


class ReadyModel(BaseModel):
    status: str
    index_version: str | None
    count: int
    dim: int
    index_type: str
    model: dict[str, Any]


class ErrorModel(BaseModel):
    detail: str


ERRORS = {404: {"model": ErrorModel}, 413: {"model": ErrorModel}, 415: {"model": ErrorModel},
          422: {"model": ErrorModel}}


def _message(err: BaseException) -> str:
    # KeyError's str() is the repr of its argument; show the plain message.
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _json_error(status: int):
    async def handler(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": _message(err)}, status_code=status)

    return handler


def create_app(service: SearchService) -> FastAPI:
    """The FastAPI app serving ``service``."""
    app = FastAPI(title="mess-ray", version="0.1.0",
                  description="Expressive music similarity search: find passages played alike.")

    # Domain errors to HTTP statuses; the most specific class first (the first two subclass ValueError).
    for error, status in ((PayloadTooLarge, 413), (UnsupportedMedia, 415), (ValueError, 422),
                          (KeyError, 404), (FileNotFoundError, 404)):
        app.add_exception_handler(error, _json_error(status))

    @app.middleware("http")
    async def _reject_oversize(request: Request, call_next):
        # Refuse before the multipart body is parsed and spooled when the client declares its size.
        length = request.headers.get("content-length")
        if request.url.path == "/search" and length and length.isdigit() and int(length) > service.max_upload_bytes + 2**16:
            return JSONResponse({"detail": f"upload exceeds the {service.cfg.serve.max_upload_mb} MiB limit"},
                                status_code=413)
        return await call_next(request)

    @app.post("/search", response_model=SearchResponse, responses=ERRORS, summary="Search with an audio clip")
    def search(file: UploadFile = File(..., description="WAV, FLAC, MP3 or OGG at any sample rate"),
               k: int | None = Query(None, ge=1, le=1000, description="Number of hits (default: serve.default_k)"),
               exclude_track: str | None = Query(None, description="Drop hits from this track"),
               min_gap_s: float = Query(0.0, ge=0, description="Min distance between hits of one track")) -> dict:
        data = file.file.read(service.max_upload_bytes + 1)
        return service.search_upload(data, k, exclude_track, min_gap_s)

    @app.get("/search/by-track", response_model=SearchResponse, responses=ERRORS,
             summary="Search with a passage of an indexed track")
    def search_by_track(track_id: str = Query(..., min_length=1),
                        start_s: float = Query(..., ge=0),
                        end_s: float | None = Query(None, gt=0),
                        k: int | None = Query(None, ge=1, le=1000),
                        exclude_track: str | None = Query(None),
                        min_gap_s: float = Query(0.0, ge=0)) -> dict:
        return service.search_by_track(track_id, start_s, end_s, k, exclude_track, min_gap_s)

    @app.get("/tracks", response_model=list[TrackModel], summary="Indexed tracks")
    def tracks() -> list[dict]:
        return service.index.tracks()

    @app.get("/tracks/{track_id}", response_model=TrackDetail, responses=ERRORS, summary="One track and its segments")
    def track(track_id: str = Path(...)) -> dict:
        return service.index.track(track_id)

    @app.get("/audio/{track_id}", responses={200: {"content": {"audio/wav": {}}}, **ERRORS},
             response_class=Response, summary="WAV of a passage of a track, for playback")
    def audio(track_id: str = Path(...), start_s: float = Query(0.0, ge=0),
              end_s: float | None = Query(None, gt=0)) -> Response:
        return Response(service.audio(track_id, start_s, end_s), media_type="audio/wav")

    @app.get("/healthz", response_model=HealthModel, summary="Liveness")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyModel, summary="Readiness: index and model loaded")
    def readyz() -> Any:
        if len(service.index) == 0:
            return JSONResponse({"detail": "index is empty"}, status_code=503)
        return {"status": "ready", **service.describe()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("mess_ray.serve").joinpath("static/index.html").read_text()

    return app


# -- Ray Serve -------------------------------------------------------------------------
def _deployment_class():
    from ray import serve

    @serve.deployment(name="SearchDeployment")
    @serve.ingress()
    class SearchDeployment:
        """One replica: the index and Embedder are loaded once, then the FastAPI app serves them."""

        def __init__(self, cfg_json: dict[str, Any]) -> None:
            self.service = SearchService.from_config(MessRayConfig.model_validate(cfg_json))

        def __serve_build_asgi_app__(self) -> FastAPI:
            return create_app(self.service)

        def check_health(self) -> None:
            if len(self.service.index) == 0:
                raise RuntimeError("index is empty")

    return SearchDeployment


def build_app(cfg: MessRayConfig):
    """The bound Ray Serve application (deploy with ``serve.run(app, route_prefix="/")``)."""
    deployment = _deployment_class().options(
        num_replicas=cfg.serve.num_replicas, ray_actor_options={"num_cpus": cfg.serve.cpus_per_replica})
    return deployment.bind(cfg.model_dump(mode="json"))


def run_service(cfg: MessRayConfig, blocking: bool = True):
    """Start Serve on cfg.serve.host:port and deploy the search app at "/".

    Returns the deployment handle when ``blocking`` is False; otherwise serves until interrupted.
    """
    from ray import serve

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
