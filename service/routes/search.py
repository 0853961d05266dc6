"""Routes: text, image and embedding search with a per-request rerank tier."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from indexer.reader import LIST_EXTENSIONS
from indexer.store import Index
from service.deps import ApiKeyDep, EngineDep
from service.errors import CursorExpired, error_text
from service.pipeline.query import QueryInput, SearchOutput, Term, decode_base64
from service.pipeline.stages import BadQuery
from service.schemas import FilterIn, HitOut, SearchRequest, SearchResponse, Timings
from service.state import Engine

router = APIRouter(prefix="/v1", tags=["search"])
COLUMNS = ("path", "caption")  # the metadata a hit carries


def source_roots(manifest: Mapping[str, Any]) -> list[str]:
    """The folders an index's files were listed from ('/'-terminated): a folder source itself, or the
    folder holding a list file (its paths are relative to it)."""
    roots = []
    for source in manifest.get("roots") or [manifest.get("source") or ""]:
        folder = Path(source).parent if Path(source).suffix.lower() in LIST_EXTENSIONS else Path(source)
        roots.append(str(folder).rstrip("/") + "/")
    return roots


def shown_path(path: str | None, roots: Sequence[str]) -> str | None:
    """A stored path as a client sees it: relative to the folder it was indexed from, else its file name
    (the server's own layout is not the client's business)."""
    if path is None:
        return None
    root = next((r for r in roots if path.startswith(r)), None)
    return path[len(root):] if root else Path(path).name


def path_view(engine: Engine, index: Index) -> Callable[[str | None], str | None]:
    """How hits of this index show their paths: relative to the folder each was indexed from, unless
    IMSEARCH_HIT_PATHS=absolute."""
    if engine.settings.hit_paths == "absolute":
        return lambda path: path
    return partial(shown_path, roots=source_roots(index.manifest))


def image_url(name: str, image_id: int, version: str) -> str:
    """The image of a hit, from the version that answered (it stays reachable for a while after a swap)."""
    return f"/v1/images/{image_id}?index={name}&version={version}"


class ModelJSON(JSONResponse):
    """A response model serialised once by pydantic-core (FastAPI's response_model path validates it
    again and encodes it twice: as much time as the search itself on a small query)."""

    def render(self, content: Any) -> bytes:
        return content.model_dump_json().encode() if isinstance(content, BaseModel) else super().render(content)


FAST = {"response_model": None, "response_class": ModelJSON,
        "responses": {200: {"model": SearchResponse, "description": "hits, timings and the index version"}}}


async def answer(engine: Engine, name: str | None, query: QueryInput, page: Page | None = None) -> ModelJSON:
    """The query's hits on the named index (a page of them, from the version that answered the first page),
    as the API shows them."""
    name = name or engine.default_index
    index = engine.index(name) if page is None else page.index(engine, name)  # whose paths and URLs hits show
    offset = page.offset if page else 0
    out: SearchOutput = await engine.pipeline.search(index, replace(query, k=offset + query.k), COLUMNS)
    shown = path_view(engine, index)
    hits = [HitOut(id=h.id, score=h.score, similarity=h.similarity, rerank_score=h.rerank_score,
                   url=image_url(name, h.id, out.index_version), path=shown(h.meta.get("path")),
                   caption=h.meta.get("caption"), explain=h.explain) for h in out.hits[offset:]]
    # an ordered answer is one recalled set in another order: a page of it would order another set
    more = len(hits) == query.k and offset + 2 * query.k <= engine.settings.max_k and query.order_by is None
    cursor = Page.after(query, out.index_version, offset + query.k) if more else None
    return ModelJSON(SearchResponse(hits=hits, timings_ms=Timings(**out.timings_ms), index_version=out.index_version,
                                    index=name, rerank=query.rerank, cached=out.cached, reranked=out.reranked,
                                    next_cursor=cursor))


@dataclass(frozen=True)
class Page:
    """Where a page starts: the index version of the first page, the hits before it, and the query it pages."""

    version: str
    offset: int
    query: str  # a digest of the query: a cursor pages only the query that made it

    @staticmethod
    def after(query: QueryInput, version: str, offset: int) -> str:
        raw = json.dumps({"v": version, "o": offset, "q": _digest(query)}).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @classmethod
    def read(cls, cursor: str, query: QueryInput, max_k: int) -> Page:
        try:
            data = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            page = cls(str(data["v"]), int(data["o"]), str(data["q"]))
        except (ValueError, TypeError, KeyError, binascii.Error):
            raise BadQuery("cursor is not one this service gave (pass next_cursor as it came)") from None
        if query.order_by is not None:
            raise BadQuery("order_by orders the k hits recalled: ask for a larger k instead of pages")
        if page.query != _digest(query):
            raise BadQuery("this cursor pages another query: send the same query with it")
        if not 1 <= page.offset <= max_k - query.k:
            raise BadQuery(f"a page ends at most {max_k} hits deep")
        return page

    def index(self, engine: Engine, name: str) -> Index:
        index = engine.image_source(name, self.version)
        if index.version != self.version:
            raise CursorExpired(f"the cursor's index version {self.version} is no longer served (a version is "
                                f"kept 5 minutes after a swap): search again for pages of {index.version}")
        return index


def _digest(query: QueryInput) -> str:
    fields = {k: v for k, v in asdict(query).items() if k not in ("image", "terms")}
    data = [fields, query.image, [(t.text, t.image, t.weight) for t in query.terms or []]]
    return hashlib.sha256(repr(data).encode()).hexdigest()[:16]


@router.post("/search", **FAST)  # type: ignore[arg-type]
async def search_json(body: SearchRequest, engine: EngineDep) -> ModelJSON:
    """Search by text, base64 image or embedding; `rerank` picks none, mid or early fusion.

    Results are cached in Redis (when configured) under the index version, so a new version
    invalidates them; a cached answer says `cached: true` and times only the lookup.
    """
    settings = engine.settings
    query = QueryInput(text=body.text, image=decode_base64(body.image) if body.image is not None else None,
                       embedding=body.embedding, k=min(body.k, settings.max_k),
                       rerank=body.rerank or settings.default_rerank,
                       rerank_k=min(body.rerank_k or settings.default_rerank_k, settings.max_rerank_k),
                       min_similarity=body.min_similarity, filter=body.filter.to_filter() if body.filter else None,
                       terms=[Term(t.text, decode_base64(t.image) if t.image is not None else None, t.weight)
                              for t in body.terms] if body.terms else None, min_score_ratio=body.min_score_ratio,
                       order_by=(body.order_by.field, body.order_by.descending) if body.order_by else None,
                       explain=body.explain)
    page = Page.read(body.cursor, query, settings.max_k) if body.cursor else None
    return await answer(engine, body.index, query, page)


@router.post("/search/image", **FAST)  # type: ignore[arg-type]
async def search_upload(
    engine: EngineDep,
    file: Annotated[UploadFile, File(description="an image file")],
    k: Annotated[int, Form(ge=1, le=1000)] = 10,
    index: Annotated[str | None, Form(min_length=1, max_length=200)] = None,
    filter: Annotated[str | None, Form(max_length=4000, description="a filter as in /v1/search, as JSON")] = None,
) -> ModelJSON:
    """Search by an uploaded image (multipart)."""
    data = await file.read(engine.settings.max_body_bytes + 1)
    if not data:
        raise BadQuery("the uploaded file is empty")
    try:
        conditions = FilterIn.model_validate_json(filter).to_filter() if filter else None
    except ValidationError as exc:
        raise BadQuery(error_text(exc.errors(), "filter")) from None
    # image queries rank by the dual encoder: the rerankers match text against images
    return await answer(engine, index, QueryInput(image=data, k=min(k, engine.settings.max_k), filter=conditions))


@router.delete("/cache", dependencies=[ApiKeyDep])
def clear_cache(engine: EngineDep) -> dict[str, int]:
    """Drop every cached result and text embedding (API key required)."""
    return {"removed": engine.cache.clear()}
