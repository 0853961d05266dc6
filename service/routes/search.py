"""Routes: text, image and embedding search with a per-request rerank tier."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.cache import result_key
from service.deps import ApiKeyDep, EngineDep
from service.schemas import HitOut, SearchRequest, SearchResponse, Timings
from service.search import BadQuery, QueryInput, Searcher, SearchOutput, search, search_async
from service.state import Engine

router = APIRouter(prefix="/v1", tags=["search"])
COLUMNS = ("path", "caption")  # the metadata a hit carries


def _decode_base64(data: str) -> bytes:
    try:
        return base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise BadQuery("image must be base64 of the image file's bytes") from None


def _respond(engine: Engine, name: str | None, query: QueryInput, searcher: Searcher | None = None) -> SearchResponse:
    """Run the query on `searcher` (taken once per request, so one index version serves all of it)."""
    out: SearchOutput = search(engine.queries, searcher or engine.searcher(name), engine.rerankers, query,
                               engine.settings.max_pixels, COLUMNS)
    return _response(engine, name, query, out)


def _response(engine: Engine, name: str | None, query: QueryInput, out: SearchOutput) -> SearchResponse:
    engine.metrics.observe_search(out.timings_ms, query.rerank)
    hits = [HitOut(id=h.id, score=h.score, similarity=h.similarity, rerank_score=h.rerank_score,
                   url=f"/v1/images/{h.id}?index={name or engine.default_index}", path=h.meta.get("path"),
                   caption=h.meta.get("caption")) for h in out.hits]
    return SearchResponse(hits=hits, timings_ms=Timings(**out.timings_ms), index_version=out.index_version,
                          index=name or engine.default_index, rerank=query.rerank)


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
    searcher = engine.searcher(body.index)  # the version in the cache key is the version that answers
    if body.image is None:  # no image to decode
        return ModelJSON(await _awaited_search(engine, body, searcher))
    return ModelJSON(await engine.run(_cached_search, engine, body, searcher))


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
    response = _response(engine, body.index, query, out)
    if key is not None and engine.results is not None:
        await engine.results.put(key, response.model_dump_json(), inline)
    return response


def _result_key(engine: Engine, body: SearchRequest, searcher: Searcher) -> str | None:
    """The request's result-cache key (None when nothing is cached): the defaults it ran with included."""
    if not engine.cache.enabled:
        return None
    settings = engine.settings
    request = {**body.model_dump(), "defaults": [settings.default_rerank, settings.default_rerank_k]}
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
    image = _decode_base64(body.image) if body.image is not None else None
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
