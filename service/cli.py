"""Command line root: `imsearch` with every floor's subcommands (indexer, reranker, service)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Annotated, Any

import typer

from indexer.cli import app, err, eval_app, fail, train_app
from reranker.cli import register

register(train_app, eval_app)

if TYPE_CHECKING:
    from service.config import Settings


@app.command()
def serve(
    index: Annotated[list[str] | None, typer.Option(
        help="DIR or NAME=DIR; repeat to serve several (first = default); default: IMSEARCH_INDEXES")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model: Annotated[str | None, typer.Option(help="the model the indexes were built with (IMSEARCH_MODEL)")] = None,
    pretrained: Annotated[str | None, typer.Option(help="its pretrained tag (IMSEARCH_PRETRAINED)")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="API processes (IMSEARCH_WORKERS); more than one needs IMSEARCH_REDIS_URL")] = None,
) -> None:
    """Serve the search API and web page with uvicorn."""
    import uvicorn
    from pydantic import ValidationError

    from service.config import Settings
    from service.metrics import MULTIPROC_ENV
    from service.workers import APP, Listen, Supervisor, check_settings, claim_port, reuse_port_supported

    given: dict[str, Any] = {"indexes": index, "model": model, "pretrained": pretrained, "workers": workers}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v})  # the rest from IMSEARCH_* and .env
    except ValidationError as exc:
        fail(str(exc))
    if settings.workers == 1:
        _serve_one(settings, host, port)
        return
    if not settings.redis_url:
        fail("--workers above 1 needs Redis (IMSEARCH_REDIS_URL): the worker processes share indexing jobs, "
             "caches and new index versions through it")
    try:
        names = check_settings(settings)  # a bad index or model is refused here, once
    except ValueError as exc:
        fail(str(exc))
    err.print(f"serving {', '.join(names)} on http://{host}:{port} with {settings.workers} worker processes")
    # one process's Python holds one GIL (a loaded server keeps about one core busy): each worker
    # loads its own engine (shard embeddings and tokens are memory-mapped, so those pages are shared;
    # each holds its own model and FAISS structure)
    os.environ.update({f"IMSEARCH_{k.upper()}": json.dumps(v) if isinstance(v, list) else str(v)
                       for k, v in given.items() if v})
    with tempfile.TemporaryDirectory(prefix="imsearch-metrics-") as shared:
        os.environ[MULTIPROC_ENV] = shared  # /metrics sums what every worker writes there
        if not reuse_port_supported():  # uvicorn's workers then share one socket (see service.workers)
            uvicorn.run(APP, factory=True, workers=settings.workers, host=host, port=port, log_level="info",
                        access_log=settings.access_log)
            return
        lock = claim_port(host, port)
        if lock is None:
            fail(f"cannot listen on {host}:{port}: the address is in use")
        with lock:
            Supervisor(Listen(host, port, "info", settings.access_log), settings.workers).run()


def _serve_one(settings: Settings, host: str, port: int) -> None:
    """One process: the engine loaded here, then uvicorn on it."""
    import uvicorn

    from service.app import create_app
    from service.errors import StartupError
    from service.state import configure_process, load_engine

    configure_process(settings)
    try:
        engine = load_engine(settings)
    except StartupError as exc:
        fail(str(exc))
    err.print(f"serving {', '.join(engine.indexes)} on http://{host}:{port}")
    uvicorn.run(create_app(settings, engine, own_engine=True), host=host, port=port, log_level="info",
                access_log=settings.access_log)


@app.command()
def worker(
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (default: IMSEARCH_REDIS_URL)")] = None,
    burst: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False,
) -> None:
    """Run an indexing-job worker on the Redis queue (start as many as you like)."""
    import logging

    from service.config import Settings
    from service.jobs import run_worker

    url = redis_url or Settings().redis_url
    if not url:
        fail("a worker needs Redis: pass --redis-url or set IMSEARCH_REDIS_URL")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    err.print(f"worker on {url}, queue imsearch-index")
    run_worker(str(url), burst=burst)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
