"""The FastAPI app behind `tuneloop serve` (see the module docs of its siblings for the parts).

Endpoints: GET /v1/models, POST /v1/chat/completions (OpenAI-compatible, streaming too),
POST /v1/feedback, GET /v1/interactions/{id}, GET /v1/admin/summary, the review queue
(GET /v1/review/queue, POST /v1/review/{id}: `review.py`), the web pages at /, /admin and
/review, and the OpenAPI schema at /openapi.json (public; every error it declares has the JSON
error shape). Everything the app needs hangs off `app.state` (no module-level mutable state), so tests
can build several apps side by side.

Endpoints are plain `def` functions (FastAPI runs them in its thread pool), except the chat
endpoint, which runs retrieval and generation on threads of its own limiter: requests waiting for
a model (each loaded model has a lock) never take the threads feedback requests need.
"""
from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI, Header, Request, Security
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer

from tuneloop.config import Project
from tuneloop.errors import ConfigError
from tuneloop.models.registry import build_embedder
from tuneloop.serve.auth import AuthMiddleware, BodyLimitMiddleware, KeyRing, caller_of
from tuneloop.serve.chat import SSE_HEADERS, ChatHandler
from tuneloop.serve.errors import ApiError, CatchAllMiddleware, install_error_handlers
from tuneloop.serve.limits import KeyLimits, RateLimitMiddleware
from tuneloop.serve.records import admin_summary, interaction_json, save_feedback
from tuneloop.serve.review import add_review_routes
from tuneloop.serve.schemas import (
    PUBLIC_ID_PATTERN,
    AdminSummary,
    ChatCompletion,
    ChatRequest,
    ErrorBody,
    FeedbackRequest,
    FeedbackStored,
    InteractionView,
    ModelList,
    check_feedback,
)
from tuneloop.serve.state import ModelFactory, ModelState
from tuneloop.store import open_store
from tuneloop.versions import ensure_base_version

STATIC_DIR = Path(__file__).parent / "static"
GENERATION_THREADS = 32  # chat requests being served or waiting for a model; more queue without a thread
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# Documents the bearer key in the OpenAPI schema; the check itself is AuthMiddleware's.
BEARER = [Security(HTTPBearer(auto_error=False, description="a client or reviewer key (admin: the admin token)"))]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: all have the JSON error shape."""
    out: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in statuses}
    if 429 in statuses:
        out[429]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return out


API_ERRORS = (400, 401, 413, 422, 429)  # any /v1 request: bad JSON, key, body size, validation, rate limit


def create_app(project: Project, *, model_factory: ModelFactory | None = None, auth: bool = True,
               static_dir: Path | None = None) -> FastAPI:
    """Build the serving app for a project, with the champion (and challenger) loaded.

    `model_factory(project, version) -> ChatModel` builds the model of a version (default: the
    student role with the version's LoRA adapter). `auth=False` is `--no-auth`: clients need no
    key (they are recorded as "anonymous"); admin endpoints still need the admin token.
    Raises ConfigError when no client key is configured (and `auth`), StateError when there is
    no champion or no retrieval index. A fresh project gets the base model registered as champion.
    """
    settings = project.settings.serve
    keys = KeyRing.from_env(settings, auth)
    if auth and not keys.clients:
        raise ConfigError(f"no client API key configured: set {settings.api_keys_env} (comma-separated "
                          f"'name:key' entries), or pass --no-auth")
    sessions = open_store(project.store_url)
    with sessions() as s:
        ensure_base_version(project, s)
        s.commit()
    models = ModelState(project, sessions, model_factory, build_embedder(project, engine="local"))
    models.load()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        models.start()  # checks the store for a new champion every serve.reload_seconds
        try:
            yield
        finally:
            models.stop()

    app = FastAPI(title="tuneloop", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.project, app.state.sessions, app.state.models, app.state.keys = project, sessions, models, keys
    app.state.limits = KeyLimits(settings.requests_per_minute, settings.tokens_per_minute)
    app.state.chat = ChatHandler(project, sessions, app.state.limits)
    # SQLite has one writer at a time; contending writers sleep in growing busy-retry waits.
    # Queuing feedback writes in-process instead cut the load bench's p99 from ~1000 ms to ~220 ms.
    # Other databases (PostgreSQL) take concurrent writes, so they get no lock.
    app.state.write_lock = threading.Lock() if project.store_url.startswith("sqlite") else nullcontext()
    app.state.static_dir = static_dir or STATIC_DIR
    install_error_handlers(app)
    # added innermost first: CatchAll -> Auth -> RateLimit -> BodyLimit -> FastAPI's own handling
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitMiddleware, limits=app.state.limits)
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(CatchAllMiddleware)
    _add_api_routes(app)
    add_review_routes(app, _errors(*API_ERRORS, 403), BEARER)
    _add_page_routes(app)
    return app


def _add_api_routes(app: FastAPI) -> None:
    @app.get("/v1/models", response_model=ModelList, responses=_errors(*API_ERRORS), dependencies=BEARER)
    def list_models(request: Request) -> dict[str, Any]:
        served = request.app.state.models.current()
        data = [{"id": served.champion.name, "object": "model", "owned_by": "tuneloop", "role": "champion"}]
        if served.challenger is not None:
            data.append({"id": served.challenger.name, "object": "model", "owned_by": "tuneloop",
                         "role": "challenger"})
        return {"object": "list", "data": data}

    chat_responses = _errors(*API_ERRORS, 404, 500, 504)
    # OpenAPI 3.1: the schema of an event stream describes one event (server-sent events' fields)
    sse_event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "a JSON chat.completion.chunk (the last one with usage, interaction_id "
                                         "and citations), an error, or [DONE]"}, "event": {"type": "string"}}}
    chat_responses[200] = {"content": {"text/event-stream": {"schema": sse_event}},
                           "description": "the answer (JSON), or server-sent events with `stream: true`"}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=chat_responses, dependencies=BEARER)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        state = request.app.state
        if getattr(state, "generation_limiter", None) is None:  # created inside the event loop
            state.generation_limiter = CapacityLimiter(GENERATION_THREADS)
        limiter = state.generation_limiter
        result = await to_thread.run_sync(state.chat, body, state.models.current(), caller_of(request),
                                          limiter=limiter)
        if isinstance(result, Response):
            return result
        return StreamingResponse(_in_threads(result, limiter), media_type="text/event-stream", headers=SSE_HEADERS)

    feedback_responses = _errors(*API_ERRORS, 404)
    feedback_responses[200] = {"model": FeedbackStored, "description": "an earlier verdict of this key updated, "
                                                                       "or an Idempotency-Key retry answered again"}

    @app.post("/v1/feedback", status_code=201, response_model=FeedbackStored, responses=feedback_responses,
              dependencies=BEARER)
    def feedback(body: FeedbackRequest, request: Request,
                 idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None) -> JSONResponse:
        state = request.app.state
        body = check_feedback(body, state.project.settings.serve.max_feedback_chars)
        with state.write_lock, state.sessions() as s:  # committed before the response
            status, stored = save_feedback(s, body, caller_of(request), idempotency_key)
        return JSONResponse(stored, status_code=status)

    @app.get("/v1/interactions/{interaction_id}", response_model=InteractionView,
             responses=_errors(*API_ERRORS, 404), dependencies=BEARER)
    def get_interaction(interaction_id: Annotated[str, PathParam(min_length=1, max_length=64,
                                                                 pattern=PUBLIC_ID_PATTERN)],
                        request: Request) -> dict[str, Any]:
        with request.app.state.sessions() as s:
            return interaction_json(s, interaction_id, caller_of(request))

    @app.get("/v1/admin/summary", response_model=AdminSummary, responses=_errors(*API_ERRORS, 403),
             dependencies=BEARER)
    def summary(request: Request) -> dict[str, Any]:
        with request.app.state.sessions() as s:
            return {**admin_summary(s), "primary_metric": request.app.state.project.settings.eval.primary_metric}


async def _in_threads(events: Iterator[str], limiter: CapacityLimiter) -> AsyncIterator[str]:
    """Iterate a blocking iterator on the generation threads (not the shared thread pool).

    When the client goes away the response task is cancelled here; the iterator is then closed
    at once (not whenever it is garbage-collected), so its generation stops at its next step."""
    done = object()
    try:
        while True:
            event = await to_thread.run_sync(next, events, done, limiter=limiter)
            if event is done:
                return
            yield event  # type: ignore[misc]
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # quick: it only signals the generating thread


def _page(request: Request, name: str) -> FileResponse:
    path = request.app.state.static_dir / name
    if not _STATIC_NAME.match(name) or not path.is_file():
        raise ApiError(404, f"page '{name}' is not installed", "not_found")
    return FileResponse(path)


def _add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index(request: Request) -> FileResponse:
        return _page(request, "index.html")

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request) -> FileResponse:
        return _page(request, "admin.html")

    @app.get("/review", include_in_schema=False)
    def review_page(request: Request) -> FileResponse:
        return _page(request, "review.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str, request: Request) -> FileResponse:
        return _page(request, name)
