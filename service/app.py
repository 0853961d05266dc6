"""Service app: the FastAPI factory; the lifespan loads the shared state once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reranker.score import tier_entry
from service.config import Settings
from service.errors import install_handlers
from service.routes import clip_back, health, images, jobs, page, search
from service.routes.page import DOCS_ASSETS, DOCS_URL, STATIC_DIR
from service.schemas import ErrorResponse
from service.state import Engine, configure_process, load_engine

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: Engine | None = None, own_engine: bool = False) -> FastAPI:
    """Build the app; the engine is loaded in the lifespan unless one is given (and then the caller
    closes it, unless `own_engine`)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = engine or load_engine(settings)
        for tier, why in app.state.engine.failed_tiers.items():  # served without it: /readyz says degraded
            log.warning("rerank tier %s unavailable: %s", tier, why)
        app.state.engine.start()
        log_write_policy(settings)
        yield
        if engine is None or own_engine:
            app.state.engine.close()

    app = FastAPI(title="imsearch", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Content-Type", "X-API-Key"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(TimedRoutes)  # added last = outermost: times the 413s too
    install_handlers(app)
    for router in (search.router, images.router, jobs.router, health.router, clip_back.router, page.router):
        app.include_router(router)
    app.mount(DOCS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")  # page.py: /docs, /redoc offline
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    return app


def log_write_policy(settings: Settings) -> None:
    """Say at startup who may call the mutating routes (jobs, cache flush)."""
    if settings.api_key:
        log.info("mutating routes (jobs, DELETE /v1/cache) need the API key (X-API-Key)")
    elif settings.open_writes:
        log.warning("IMSEARCH_OPEN_WRITES is on and no API key is set: ANYONE who reaches this port may start "
                    "indexing jobs and flush the cache")
    else:
        log.info("mutating routes (jobs, DELETE /v1/cache) are closed: set IMSEARCH_API_KEY to use them")


def app_from_env() -> FastAPI:
    """One worker process of `imsearch serve --workers N`: settings from IMSEARCH_* (where the parent
    put its command-line options), the engine loaded by the lifespan in this process."""
    settings = Settings()
    configure_process(settings)
    return create_app(settings)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the errors this service really sends: every 4xx is `{"detail": "..."}`
    (FastAPI would document its 422 as a list of validation errors, which service.errors flattens)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorResponse"] = ErrorResponse.model_json_schema()
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                responses["4XX"] = {"description": "a client error, explained in `detail`", **error}
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        _list_tiers(app, schemas)
        app.openapi_schema = schema
    return app.openapi_schema


def _list_tiers(app: FastAPI, schemas: dict[str, Any]) -> None:
    """The `rerank` values a request may name: none and the tiers loaded (configured, before startup)."""
    engine = getattr(app.state, "engine", None)
    names = list(engine.rerankers) if engine else [tier_entry(e)[0] for e in app.state.settings.rerankers]
    names += ["auto"] if app.state.settings.auto_tier in names else []
    for option in schemas.get("SearchRequest", {}).get("properties", {}).get("rerank", {}).get("anyOf", []):
        if option.get("type") == "string":
            option.pop("pattern", None)
            option["enum"] = ["none", *names]


class TimedRoutes:
    """HTTP latency per route template (not per raw path: ids would explode the label set).

    Plain ASGI rather than `@app.middleware("http")`: that wrapper runs every request through an
    extra task and memory stream, which cost more than the search itself on small queries.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        engine = getattr(scope["app"].state, "engine", None) if "app" in scope else None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on this same scope
            if engine is not None and route is not None:
                engine.metrics.http.labels(scope["method"], getattr(route, "path", "?"), str(status)).observe(
                    time.perf_counter() - start)


class BodyLimit:
    """413 for a body over `limit` bytes, whether it declares its length or streams in chunks; 408 for
    a body still incomplete `timeout_s` after its first read (a client dribbling it holds a worker)."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = 30.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await _refuse(413, f"request body over {self.limit} bytes", scope, receive, send)
            return
        seen, started, complete, deadline = 0, False, False, 0.0

        async def counted() -> Message:
            nonlocal seen, complete, deadline
            if complete:  # after the body: a wait for the client to leave, which has no deadline
                return await receive()
            deadline = deadline or time.monotonic() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise _Refused(408, f"the request body did not arrive within {self.timeout_s:g} s") from None
            seen += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if seen > self.limit:
                raise _Refused(413, f"request body over {self.limit} bytes")
            return message

        async def track(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, track)
        except _Refused as exc:
            if not started:
                await _refuse(exc.status_code, str(exc.detail), scope, receive, send)


async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
    headers = {"Connection": "close"} if status == 408 else None
    await JSONResponse(status_code=status, content={"detail": message}, headers=headers)(scope, receive, send)


class _Refused(HTTPException):
    """Raised inside the app's receive when a body passes the limit or its deadline (an HTTPException,
    so FastAPI's body parsing passes it on instead of calling it a parse error)."""
