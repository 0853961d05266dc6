"""Service errors: domain exceptions mapped to HTTP status codes in one place, never a traceback."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from indexer.integrity import IndexCorrupt
from indexer.store import UnknownImage
from service.admission import Overloaded
from service.jobs.api import JobNotFound, JobRejected
from service.search import BadQuery

log = logging.getLogger(__name__)


class UnknownIndex(LookupError):
    """An index name the service does not serve."""


class StartupError(RuntimeError):
    """The configured model, indexes or rerankers cannot be served together."""


def _detail(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def install_handlers(app: FastAPI) -> None:
    """Map domain errors to 4xx; anything unexpected to a bare 500 (logged, never echoed)."""

    @app.exception_handler(BadQuery)
    async def bad_query(_: Request, exc: BadQuery) -> JSONResponse:
        return _detail(422, str(exc))

    @app.exception_handler(UnknownIndex)
    async def unknown_index(_: Request, exc: UnknownIndex) -> JSONResponse:
        return _detail(404, str(exc.args[0]))

    @app.exception_handler(UnknownImage)
    async def unknown_image(_: Request, exc: UnknownImage) -> JSONResponse:
        return _detail(404, f"no image with id {exc.args[0]} in this index")

    @app.exception_handler(JobRejected)
    async def job_rejected(_: Request, exc: JobRejected) -> JSONResponse:
        return _detail(exc.status, str(exc))

    @app.exception_handler(JobNotFound)
    async def job_not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return _detail(404, f"no job with id {exc.args[0]}")

    @app.exception_handler(IndexCorrupt)
    async def damaged(_: Request, exc: IndexCorrupt) -> JSONResponse:
        # a file of the served version changed under it (say, truncated in place): this request fails,
        # the service goes on; the file's path is the operator's to see, not the client's
        log.error("index damaged while serving: %s", exc)
        return _detail(503, "a file of the index version serving this request is damaged; the operator has been "
                            "told (run `imsearch index verify`)")

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        response = _detail(503, str(exc))
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(RecursionError)
    async def too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # only a body nested thousands deep gets here (the JSON decoders recurse per level)
        return _detail(400, "the request body is nested too deeply")

    @app.exception_handler(redis.RedisError)
    async def redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        # the job queue lives in Redis (searches never get here: the cache treats Redis as optional)
        log.warning("job queue unavailable: %s", exc)
        response = _detail(503, "the job queue (Redis) is unavailable right now; retry in a few seconds")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _detail(422, f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", ""))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _detail(500, "internal error")
