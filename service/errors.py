"""Service errors: domain exceptions mapped to HTTP status codes in one place, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from indexer.integrity import IndexCorrupt
from indexer.store import UnknownImage
from service.jobs.api import JobNotFound, JobRejected
from service.pipeline.batcher import Overloaded
from service.pipeline.stages import BadQuery

log = logging.getLogger(__name__)


class UnknownIndex(LookupError):
    """An index name the service does not serve."""


class CursorExpired(LookupError):
    """A page cursor whose index version is no longer served."""


class StartupError(RuntimeError):
    """The configured model, indexes or rerankers cannot be served together."""


def _detail(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(status_code=status, content={"detail": message}, headers=headers)


def _damaged(exc: IndexCorrupt) -> JSONResponse:
    # a file of the served version changed under it (say, truncated in place): this request fails,
    # the service goes on; the file's path is the operator's to see, not the client's
    log.error("index damaged while serving: %s", exc)
    return _detail(503, "a file of the index version serving this request is damaged; the operator has been told "
                        "(run `imsearch index verify`)")


def _queue_down(exc: redis.RedisError) -> JSONResponse:
    # the job queue lives in Redis (searches never get here: the cache treats Redis as optional)
    log.warning("job queue unavailable: %s", exc)
    return _detail(503, "the job queue (Redis) is unavailable right now; retry in a few seconds", 5)


def error_text(errors: Sequence[Mapping[str, Any]], *prefix: str) -> str:
    """A validation's first error as "where: what" (FastAPI's `body` left out of where)."""
    first = errors[0] if errors else {}
    where = ".".join([*prefix, *(str(p) for p in first.get("loc", ()) if p != "body")])
    what = str(first.get("msg", "invalid request"))
    return f"{where}: {what}" if where else what


def _unexpected(exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _detail(500, "internal error")


RESPONSES: dict[type[Exception], Callable[[Any], JSONResponse]] = {
    BadQuery: lambda exc: _detail(422, str(exc)),
    UnknownIndex: lambda exc: _detail(404, str(exc.args[0])),
    CursorExpired: lambda exc: _detail(410, str(exc.args[0])),
    UnknownImage: lambda exc: _detail(404, f"no image with id {exc.args[0]} in this index"),
    JobRejected: lambda exc: _detail(exc.status, str(exc)),
    JobNotFound: lambda exc: _detail(404, f"no job with id {exc.args[0]}"),
    IndexCorrupt: _damaged,
    Overloaded: lambda exc: _detail(503, str(exc), exc.retry_after_s),
    # only a body nested thousands deep gets here (the JSON decoders recurse per level)
    RecursionError: lambda _: _detail(400, "the request body is nested too deeply"),
    redis.RedisError: _queue_down,
    RequestValidationError: lambda exc: _detail(422, error_text(exc.errors())),
    Exception: _unexpected,  # a bare 500, logged, never echoed
}


def install_handlers(app: FastAPI) -> None:
    """Map domain errors to 4xx (and 503s that say when to retry); anything unexpected to a bare 500."""
    for kind, respond in RESPONSES.items():
        app.add_exception_handler(kind, _handler(respond))


def _handler(respond: Callable[[Any], JSONResponse]) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return respond(exc)

    return handle
