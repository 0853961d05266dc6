"""Service app: the FastAPI factory; the lifespan loads the shared state once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from service.config import Settings
from service.errors import install_handlers
from service.routes import clip_back, health, images, jobs, page, search
from service.routes.page import STATIC_DIR
from service.state import Engine, load_engine


def create_app(settings: Settings | None = None, engine: Engine | None = None, own_engine: bool = False) -> FastAPI:
    """Build the app; the engine is loaded in the lifespan unless one is given (and then the caller
    closes it, unless `own_engine`)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = engine or load_engine(settings)
        app.state.engine.start()
        yield
        if engine is None or own_engine:
            app.state.engine.close()

    app = FastAPI(title="imsearch", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Content-Type", "X-API-Key"])
    app.middleware("http")(_timed)
    app.middleware("http")(_body_limit(settings.max_body_bytes))
    install_handlers(app)
    for router in (search.router, images.router, jobs.router, health.router, clip_back.router, page.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _timed(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """HTTP latency per route template (not per raw path: ids would explode the label set)."""
    start = time.perf_counter()
    response = await call_next(request)
    engine = getattr(request.app.state, "engine", None)
    route = request.scope.get("route")
    if engine is not None and route is not None:
        engine.metrics.http.labels(request.method, getattr(route, "path", "?"), str(response.status_code)).observe(
            time.perf_counter() - start)
    return response


def _body_limit(limit: int) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse(status_code=413, content={"detail": f"request body over {limit} bytes"})
        return await call_next(request)

    return check
