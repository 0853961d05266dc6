"""Routes: text, image and embedding search with a per-request rerank tier."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexer.store import Index
from service.deps import ApiKeyDep, EngineDep
from service.names import result_key
from service.schemas import HitOut, SearchRequest, SearchResponse, Timings
from service.search import (
    BadQuery,
    QueryInput,
    Searcher,
    SearchOutput,
    decode_base64,
    search,
    search_async,
    shown_path,
    source_roots,
)
from service.state import Engine

router = APIRouter(prefix="/v1", tags=["search"])
COLUMNS = ("path", "caption")  # the metadata a hit carries


def _respond(engine: Engine, name: str | None, query: QueryInput, searcher: Searcher | None = None) -> SearchResponse:
    """Run the query on `searcher` (taken once per request, so one index version serves all of it)."""
    searcher = searcher or engine.searcher(name)
    out: SearchOutput = search(engine.queries, searcher, engine.rerankers, query, engine.settings.max_pixels, COLUMNS)
    return _response(engine, name, query, out, searcher)


def path_view(engine: Engine, index: Index) -> Callable[[str | None], str | None]:
    """How hits of this index show their paths: relative to the folder each was indexed from, unless
    IMSEARCH_HIT_PATHS=absolute."""
    if engine.settings.hit_paths == "absolute":
        return lambda path: path
    return partial(shown_path, roots=source_roots(index.manifest))


def image_url(name: str, image_id: int, version: str) -> str:
    """The image of a hit, from the version that answered (it stays reachable for a while after a swap)."""
    return f"/v1/images/{image_id}?index={name}&version={version}"


def _response(engine: Engine, name: str | None, query: QueryInput, out: SearchOutput,
              searcher: Searcher) -> SearchResponse:
    engine.metrics.observe_search(out.timings_ms, query.rerank)
    name = name or engine.default_index
    shown = path_view(engine, searcher.index)
    hits = [HitOut(id=h.id, score=h.score, similarity=h.similarity, rerank_score=h.rerank_score,
                   url=image_url(name, h.id, out.index_version), path=shown(h.meta.get("path")),
                   caption=h.meta.get("caption")) for h in out.hits]
    return SearchResponse(hits=hits, timings_ms=Timings(**out.timings_ms), index_version=out.index_version,
                          index=name, rerank=query.rerank)


def _tier(engine: Engine, body: SearchRequest) -> str:
    """The rerank tier a request asks for, or the configured default."""
    return body.rerank or engine.settings.default_rerank


def _query(engine: Engine, body: SearchRequest, image: bytes | None) -> QueryInput:
    settings = engine.settings
    return QueryInput(text=body.text, image=image, embedding=body.embedding, k=min(body.k, settings.max_k),
                      rerank=_tier(engine, body),
                      rerank_k=min(body.rerank_k or settings.default_rerank_k, settings.max_rerank_k),
                      min_similarity=body.min_similarity)


class ModelJSON(JSONResponse):
    """A response model serialised once by pydantic-core (FastAPI's response_model path validates it
    again and encodes it twice: as much time as the search itself on a small query)."""

    def render(self, content: Any) -> bytes:
        return content.model_dump_json().encode() if isinstance(content, BaseModel) else super().render(content)


FAST = {"response_model": None, "response_class": ModelJSON,
        "responses": {200: {"model": SearchResponse, "description": "hits, timings and the index version"}}}


@router.post("/search", **FAST)  # type: ignore[arg-type]
async def search_json(body: SearchRequest, engine: EngineDep) -> ModelJSON:
    """Search by text, base64 image or embedding; `rerank` picks none, mid or early fusion.

    Results are cached in Redis (when configured) under the index version, so a new version
    invalidates them; a cached answer says `cached: true` and times only the lookup.
    """
    return ModelJSON(await _answer(engine, body))


async def _answer(engine: Engine, body: SearchRequest) -> SearchResponse:
    searcher = engine.searcher(body.index)  # the version in the cache key is the version that answers
    if body.image is None:  # no image to decode
        return await _awaited_search(engine, body, searcher)
    return await engine.run(_cached_search, engine, body, searcher)


class FastSearch:
    """ASGI middleware: `POST /v1/search` with a valid JSON body, answered without the per-request
    machinery between the app's middleware and the endpoint.

    There Starlette and FastAPI match the route, build a Request, parse the content type, decode
    the JSON, validate it, solve the dependencies and wrap the call in three exception and exit-stack
    layers: a quarter of a millisecond per request, a tenth of a text search (profiled). Here
    pydantic-core parses and validates the body in one call, and the same endpoint code runs. Any
    other request, and any body the route would refuse, goes to the app as before (the body
    replayed), so its 4xx messages stay the route's; errors raised by the search go to the app's
    exception handlers, as they would from the route.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        self.route = next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is search_json)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.route.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        if not complete:  # the client left: nobody to answer
            return
        query = _json_query(scope, body)
        if query is None:
            await self.app(scope, _replay(body, receive), send)
            return
        scope["route"] = self.route  # what the router would have set (TimedRoutes labels by it)
        app: FastAPI = scope["app"]
        try:
            response: Response = ModelJSON(await _answer(app.state.engine, query))
        except Exception as exc:  # noqa: BLE001 (handed to the app's handler for its type, as the route's would be)
            response = await _handled(app, Request(scope, receive), exc)
        await response(scope, receive, send)


async def _handled(app: FastAPI, request: Request, exc: Exception) -> Response:
    """The response of the app's exception handler for the exception's nearest type (as Starlette
    looks it up; this app has one for Exception itself, a bare 500)."""
    handler = next((app.exception_handlers[kind] for kind in type(exc).__mro__ if kind in app.exception_handlers), None)
    if handler is None:
        raise exc
    response = handler(request, exc)
    return await response if inspect.isawaitable(response) else response


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body, and False if the client left before sending all of it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _json_query(scope: Scope, body: bytes) -> SearchRequest | None:
    """The body as a query when it is declared as JSON and valid; None otherwise (the route decides)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            if value.split(b";", 1)[0].strip().lower() != b"application/json":
                return None
            try:
                return SearchRequest.model_validate_json(body)
            except ValidationError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body already read, then whatever the client sends next."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _awaited_search(engine: Engine, body: SearchRequest, searcher: Searcher) -> SearchResponse:
    """A text or embedding query, on the event loop: the cache lookup, then the stages, each awaited
    in its batch (without rerank and alone, each runs here at once: a few ms), then the cache store."""
    inline = await engine.alone()
    start = time.perf_counter()
    key = _result_key(engine, body, searcher)
    if key is not None and engine.results is not None:
        hit = await engine.results.get(key, inline)
        engine.metrics.cache_lookup("result", hit is not None)
        if hit is not None:
            return _from_cache(hit, start)
    query = _query(engine, body, None)
    if query.rerank == "none":
        out = await search_async(engine.queries, searcher, query, COLUMNS, inline)
    else:
        out = await engine.reranked.asearch(searcher, query, COLUMNS)
    response = _response(engine, body.index, query, out, searcher)
    if key is not None and engine.results is not None:
        await engine.results.put(key, response.model_dump_json(), inline)
    return response


def _result_key(engine: Engine, body: SearchRequest, searcher: Searcher) -> str | None:
    """The request's result-cache key (None when nothing is cached): the defaults it ran with and the
    settings that shape its answer included."""
    if not engine.cache.enabled:
        return None
    settings = engine.settings
    request = {**body.model_dump(), "defaults": [settings.default_rerank, settings.default_rerank_k,
                                                 settings.hit_paths]}
    return result_key(engine.encoder.model_id, searcher.index.version, request)


def _from_cache(hit: dict[str, Any], start: float) -> SearchResponse:
    lookup = round((time.perf_counter() - start) * 1000, 3)
    hit.update(cached=True, timings_ms={"encode": 0.0, "search": 0.0, "rerank": 0.0, "total": lookup})
    return SearchResponse(**hit)


def _cached_search(engine: Engine, body: SearchRequest, searcher: Searcher) -> SearchResponse:
    """The cached answer if there is one, else the search's, then cached (blocking: Redis included)."""
    start = time.perf_counter()
    key = _result_key(engine, body, searcher)
    if key is not None:
        hit = engine.cache.get(key)
        engine.metrics.cache_lookup("result", hit is not None)
        if hit is not None:
            return _from_cache(hit, start)
    image = decode_base64(body.image) if body.image is not None else None
    response = _respond(engine, body.index, _query(engine, body, image), searcher)
    if key is not None:
        engine.cache.put(key, response.model_dump_json())
    return response


@router.post("/search/image", **FAST)  # type: ignore[arg-type]
async def search_upload(
    engine: EngineDep,
    file: Annotated[UploadFile, File(description="an image file")],
    k: Annotated[int, Form(ge=1, le=1000)] = 10,
    index: Annotated[str | None, Form(min_length=1, max_length=200)] = None,
) -> ModelJSON:
    """Search by an uploaded image (multipart)."""
    data = await file.read(engine.settings.max_body_bytes + 1)
    if not data:
        raise BadQuery("the uploaded file is empty")
    # image queries rank by the dual encoder: the rerankers match text against images
    query = QueryInput(image=data, k=min(k, engine.settings.max_k))
    return ModelJSON(await engine.run(_respond, engine, index, query))


@router.delete("/cache", dependencies=[ApiKeyDep])
def clear_cache(engine: EngineDep) -> dict[str, int]:
    """Drop every cached result and text embedding (API key required)."""
    return {"removed": engine.cache.clear()}
