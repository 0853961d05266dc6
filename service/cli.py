"""Command line, service floor: `imsearch serve`, `search` and `worker`."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from indexer.cli import DeviceOpt, IndexDirOpt, ModelOpt, PretrainedOpt, err, fail

if TYPE_CHECKING:
    from service.config import Settings


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
    from pydantic import ValidationError

    from service.config import Settings

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
    # the workers read their settings from IMSEARCH_*: the parent puts its command-line options there
    os.environ.update({f"IMSEARCH_{k.upper()}": json.dumps(v) if isinstance(v, list) else str(v)
                       for k, v in given.items() if v})
    _serve_many(settings, host, port)


def _serve_many(settings: Settings, host: str, port: int) -> None:
    """Worker processes, each loading its own engine (one process's Python holds one GIL: a loaded
    server keeps about one core busy) and accepting on its own SO_REUSEPORT socket (see service.workers);
    shard embeddings and tokens are memory-mapped, so shared."""
    from service.metrics import MULTIPROC_ENV
    from service.workers import Listen, Supervisor, check_settings, claim_port

    if not sys.platform.startswith("linux"):
        fail("--workers above 1 needs Linux (each worker's own SO_REUSEPORT socket); serve one process here")
    lock = claim_port(host, port)
    if lock is None:
        fail(f"cannot listen on {host}:{port}: the address is in use")
    try:
        names = check_settings(settings)  # a bad index or model is refused here, once
    except ValueError as exc:
        fail(str(exc))
    err.print(f"serving {', '.join(names)} on http://{host}:{port} with {settings.workers} worker processes")
    with tempfile.TemporaryDirectory(prefix="imsearch-metrics-") as shared, lock:
        os.environ[MULTIPROC_ENV] = shared  # /metrics sums what every worker writes there
        Supervisor(Listen(host, port, settings.header_timeout_s, settings.access_log), settings.workers).run()


def _serve_one(settings: Settings, host: str, port: int) -> None:
    """One process: the port taken first (a busy one is refused before any model loads), then the
    engine, then uvicorn on that socket."""
    import uvicorn

    from service.app import create_app
    from service.errors import StartupError
    from service.server import server_config
    from service.state import configure_process, load_engine
    from service.workers import open_socket

    try:  # not shared: a taken port is refused before any model loads
        sock = open_socket(host, port, listen=False, reuse_port=False)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    configure_process(settings)
    try:
        engine = load_engine(settings)
    except StartupError as exc:
        sock.close()
        fail(str(exc))
    err.print(f"serving {', '.join(engine.indexes)} on http://{host}:{port}")
    config = server_config(create_app(settings, engine, own_engine=True), host, port, settings.header_timeout_s,
                           settings.access_log)
    uvicorn.Server(config).run(sockets=[sock])


def search(
    index_dir: IndexDirOpt,
    text: Annotated[str | None, typer.Argument(help="what to look for, in words")] = None,
    image: Annotated[Path | None, typer.Option(help="search by this image file instead of text")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="how many results")] = 10,
    rerank: Annotated[str, typer.Option(help="rerank tier: none, mid, early, blip (--checkpoint) or auto")] = "none",
    rerank_k: Annotated[int, typer.Option(min=1, max=256, help="candidates the reranker rescores")] = 16,
    checkpoint: Annotated[Path | None, typer.Option(help="the --rerank tier's checkpoint (default: the committed "
                                                    "one), e.g. from `imsearch train reranker --data`; for blip "
                                                    "its model folder")] = None,
    where: Annotated[list[str] | None, typer.Option(help=(
        "only images whose metadata meet FIELD=VALUE or FIELD>=, >, <=, < VALUE (repeatable; FIELD: path, caption, "
        "width, height, bytes or a source column; a VALUE that reads as a number is one)"))] = None,
    path_glob: Annotated[str | None, typer.Option(help="only images whose path matches this glob")] = None,
    min_score_ratio: Annotated[float | None, typer.Option(min=0.001, max=1.0, help=(
        "keep only hits whose similarity is at least this share of the best hit's"))] = None,
    order_by: Annotated[str | None, typer.Option(help="re-order the k hits by this metadata field")] = None,
    descending: Annotated[bool, typer.Option(help="with --order-by: largest first")] = False,
    term: Annotated[list[str] | None, typer.Option(help=(
        "a part of a composed query, [WEIGHT:]TEXT or [WEIGHT:]@IMAGE_FILE (repeatable; a negative weight: less "
        "like it), e.g. --term '-0.5:a blue square' --term 0.5:@photo.jpg"))] = None,
    caption_contains: Annotated[str | None, typer.Option(help="only images whose caption holds this text")] = None,
    explain: Annotated[bool, typer.Option(help=(
        "with --rerank mid or early: where in each reranked hit the tier found each object the text names"))] = False,
    model: ModelOpt = "tiny", pretrained: PretrainedOpt = None, device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Search an index from the terminal: rank, score and path of the best matches."""
    from indexer.filters import Filter
    from service.config import Settings

    query = replace(_query(text, image, term, k, rerank, rerank_k), explain=explain, min_score_ratio=min_score_ratio,
                    filter=Filter(path_glob, caption_contains, parse_where(where or [])),
                    order_by=(order_by, descending) if order_by else None)
    tier = "mid" if rerank == "auto" else rerank  # auto reranks with mid when its gate opens
    settings = Settings(indexes=[str(index_dir)], model=model, pretrained=pretrained, device=device,
                        rerankers=[] if rerank == "none" else [f"{tier}={checkpoint}" if checkpoint else tier],
                        redis_url=None, threads=0)
    _print_hits(_answer(settings, tier, query), as_json)


def _query(text: str | None, image: Path | None, term: list[str] | None, k: int, rerank: str,
           rerank_k: int) -> Any:
    """The QueryInput of a text, an image, or a composed query (the text and the image, if given, are
    terms of weight 1 beside the --term ones)."""
    from service.pipeline.query import QueryInput, Term

    if text is not None and not text.strip():
        fail("the text is empty")
    if term:
        terms = [*([Term(text)] if text else []), *([Term(None, _read_query_image(image))] if image else []),
                 *(parse_term(t) for t in term)]
        return QueryInput(k=k, rerank=rerank, rerank_k=rerank_k, terms=terms)
    if (text is None) == (image is None):
        fail("give a text to search for, or --image FILE (one of them), or --term")
    return QueryInput(text=text, image=_read_query_image(image) if image else None, k=k, rerank=rerank,
                      rerank_k=rerank_k)


def _answer(settings: Any, tier: str, query: Any) -> Any:
    """The query answered by an engine loaded for it (and closed after); a clear error for what cannot run."""
    from service.errors import StartupError
    from service.pipeline.stages import BadQuery
    from service.state import load_engine

    if settings.rerankers == ["blip"]:  # no folder given: say how the command takes one
        fail("--rerank blip needs --checkpoint MODEL_DIR, the folder of an HF BLIP ITM model")
    try:
        engine = load_engine(settings)
    except StartupError as exc:
        fail(str(exc))
    try:
        if tier in engine.failed_tiers:
            fail(f"rerank tier {tier!r} is unavailable: {engine.failed_tiers[tier]}")
        return asyncio.run(engine.pipeline.search(engine.index(None), query))
    except BadQuery as exc:
        fail(str(exc))
    finally:
        engine.close()


WHERE = re.compile(r"^([^<>=]+?)\s*(>=|<=|=|>|<)\s*(.*)$")
OPS = {">=": "gte", ">": "gt", "<=": "lte", "<": "lt"}


def parse_where(conditions: list[str]) -> dict[str, Any]:
    """--where FIELD=VALUE / FIELD>=VALUE ... as a filter's where: bounds on one field combine."""
    where: dict[str, Any] = {}
    for text in conditions:
        match = WHERE.match(text)
        if match is None or not match.group(3):
            fail(f"--where {text!r}: write FIELD=VALUE, or FIELD>=VALUE (also >, <=, <)")
        name, op, raw = match.group(1).strip(), match.group(2), match.group(3)
        try:
            value: Any = json.loads(raw) if re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", raw) else raw
        except ValueError:
            value = raw
        if op == "=":
            where[name] = value
        else:
            bounds = where.setdefault(name, {})
            if not isinstance(bounds, dict):
                fail(f"--where {name}: give either a value or bounds, not both")
            bounds[OPS[op]] = value
    return where


def parse_term(text: str) -> Any:
    """--term [WEIGHT:]TEXT or [WEIGHT:]@IMAGE_FILE as a composed query's Term."""
    from service.pipeline.query import Term

    head, sep, rest = text.partition(":")
    try:
        weight = float(head) if sep else 1.0
    except ValueError:
        weight, rest = 1.0, text  # a colon inside the text itself
    if not rest.strip() or weight == 0 or not math.isfinite(weight):
        fail(f"--term {text!r}: write [WEIGHT:]TEXT or [WEIGHT:]@IMAGE_FILE with a non-zero weight")
    return Term(None, _read_query_image(Path(rest[1:])), weight) if rest.startswith("@") else Term(rest, None, weight)


def _read_query_image(path: Path) -> bytes:
    from indexer.reader import DEFAULT_MAX_BYTES, read_regular_file

    try:
        return read_regular_file(path, DEFAULT_MAX_BYTES)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")


def _print_hits(out: Any, as_json: bool) -> None:
    """rank, score and path per hit (tab-separated, for pipes) on stdout; the timings on stderr."""
    if as_json:
        hits = [{"rank": r, "id": h.id, "score": h.score, "similarity": h.similarity, "rerank_score": h.rerank_score,
                 **h.meta, "explain": h.explain} for r, h in enumerate(out.hits, 1)]
        sys.stdout.write(json.dumps({"hits": hits, "timings_ms": out.timings_ms, "index_version": out.index_version,
                                     "reranked": out.reranked}) + "\n")
        return
    for rank, hit in enumerate(out.hits, 1):
        places = "".join(f"\t{p['phrase']} at ({p['x']:.2f}, {p['y']:.2f})" for p in hit.explain or [])
        sys.stdout.write(f"{rank}\t{hit.score:.4f}\t{hit.meta.get('path')}{places}\n")
    how = ", reranked" if out.reranked else ""  # rerank auto says whether its gate opened
    err.print(f"{len(out.hits)} hits in {out.timings_ms['total']:.1f} ms (index version {out.index_version}{how})",
              highlight=False)


def worker(
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (default: IMSEARCH_REDIS_URL)")] = None,
    burst: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False,
) -> None:
    """Run an indexing-job worker on the Redis queue (start as many as you like)."""
    import logging

    from service.config import Settings
    from service.jobs.worker import run_worker
    from service.names import QUEUE

    url = redis_url or Settings().redis_url
    if not url:
        fail("a worker needs Redis: pass --redis-url or set IMSEARCH_REDIS_URL")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    err.print(f"worker on {url}, queue {QUEUE}")
    run_worker(str(url), burst=burst)


def register(root: typer.Typer) -> None:
    """Attach the service's commands to the root CLI."""
    root.command()(serve)
    root.command()(search)
    root.command()(worker)
