"""Routes: the clip-retrieval back-end API (/indices-list, /knn-service, /metadata) over our search core."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from indexer.reader import BadImage
from indexer.store import Index, UnknownImage
from service.deps import EngineDep
from service.errors import error_text
from service.pipeline.query import QueryInput, SearchOutput, decode_base64
from service.pipeline.stages import BadQuery
from service.routes.images import read_indexed, thumbnail_jpeg
from service.routes.search import image_url, path_view
from service.state import Engine

router = APIRouter(tags=["clip-retrieval"])

DEDUP_COSINE = 0.995  # near-identical pictures (re-encodes, resizes) count as duplicates
PREVIEW_SIDE = 256


class KnnRequest(BaseModel):
    """What ClipClient and clip-retrieval-front send: all 14 keys, unused ones null."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = Field(None, max_length=1000)
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[float] | None = Field(None, max_length=8192)
    modality: str = "image"
    num_images: StrictInt = Field(..., ge=1, le=10_000)
    num_result_ids: StrictInt | None = Field(None, ge=1, le=10_000)
    indice_name: str | None = None
    use_mclip: bool | None = False
    deduplicate: bool | None = False
    use_safety_model: bool | None = False
    use_violence_detector: bool | None = False
    aesthetic_score: float | str | None = None
    aesthetic_weight: float | str | None = None

    @field_validator("aesthetic_score", "aesthetic_weight")
    @classmethod
    def _numeric_or_empty(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, str) and value.strip():
            float(value)  # a non-numeric string is a client error (the reference server crashes)
        return value


MAX_METADATA_IDS = 256  # each id costs a thumbnail: a page of the web front, not the whole index at once


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[Annotated[StrictInt, Field(ge=0, lt=2**63)]] = Field(..., max_length=MAX_METADATA_IDS)  # int64
    indice_name: str | None = None


async def _json_body(request: Request) -> Any:
    """The body as JSON whatever the Content-Type (the client sends none, the web front text/plain)."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadQuery("the request body must be JSON") from None
    except RecursionError:
        raise BadQuery("the request body is JSON nested too deeply") from None


def _parse(model: type[KnnRequest] | type[MetadataRequest], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadQuery(error_text(exc.errors())) from None


def _query(body: KnnRequest, engine: Engine) -> QueryInput:
    """The first usable query of text → image → image_url → embedding_input, as the reference does."""
    if body.modality != "image":
        raise BadQuery("modality 'text' needs a caption index; this service indexes images (use 'image')")
    depth = min(max(body.num_result_ids or body.num_images, body.num_images), engine.settings.max_k)
    if body.deduplicate:
        depth = min(2 * depth, engine.settings.max_k)  # room for the duplicates we drop
    if body.text and body.text.strip():
        return QueryInput(text=body.text, k=depth)
    if body.image:
        return QueryInput(image=decode_base64(body.image), k=depth)
    if body.image_url:
        raise BadQuery("image_url is not fetched (this service makes no outbound requests); send `image` as base64")
    if body.embedding_input:
        return QueryInput(embedding=body.embedding_input, k=depth)
    raise BadQuery("give one of text, image or embedding_input")


def _deduplicate(index: Index, ids: list[int]) -> list[int]:
    """Keep the best-ranked of each group of identical files or near-identical embeddings."""
    if not ids:
        return ids
    vectors = index.vectors(ids)
    hashes = [row["sha256"] for row in index.metadata(ids)]
    kept: list[int] = []  # rows of ids
    seen: set[str] = set()
    for i in range(len(ids)):
        near = bool(kept) and float(np.max(vectors[kept] @ vectors[i])) >= DEDUP_COSINE
        if hashes[i] not in seen and not near:
            seen.add(hashes[i])
            kept.append(i)
    return [ids[i] for i in kept]


def _preview(image_id: int, row: dict[str, Any], max_pixels: int) -> str | None:
    """A base64 JPEG of the indexed file (at most 256 px a side), as the reference's `image` column;
    None when the file is no longer the one indexed (see images.read_indexed)."""
    try:
        return base64.b64encode(thumbnail_jpeg(read_indexed(image_id, row), PREVIEW_SIDE, max_pixels)).decode()
    except (UnknownImage, BadImage):
        return None


def _metadata(engine: Engine, name: str, index: Index, image_id: int, row: dict[str, Any],
              shown: Callable[[str | None], str | None]) -> dict[str, Any]:
    meta = {"url": image_url(name, image_id, index.version), "image_path": shown(row.get("path")),
            "caption": row.get("caption")}
    meta = {k: v for k, v in meta.items() if v is not None}
    preview = _preview(image_id, row, engine.settings.max_pixels)
    if preview is not None:
        meta["image"] = preview
    return meta


@router.get("/indices-list")
def indices_list(engine: EngineDep) -> list[str]:
    """The served index names, the default first."""
    return list(engine.indexes)


def _documented(model: type[BaseModel]) -> dict[str, Any]:
    """The body schema for the OpenAPI document (the route reads the raw body itself, see _json_body)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.post("/knn-service", openapi_extra=_documented(KnnRequest))
async def knn_service(request: Request, engine: EngineDep) -> list[dict[str, Any]]:
    """clip-retrieval's query endpoint: a flat list, metadata on the first `num_images` items."""
    body: KnnRequest = _parse(KnnRequest, await _json_body(request))
    name = body.indice_name or engine.default_index
    index = engine.index(name)
    out = await engine.pipeline.search(index, _query(body, engine))
    return await engine.run(_knn, engine, body, name, index, out)  # previews read files: off the event loop


def _knn(engine: Engine, body: KnnRequest, name: str, index: Index, out: SearchOutput) -> list[dict[str, Any]]:
    similarity = {h.id: h.similarity for h in out.hits}
    rows = {h.id: h.meta for h in out.hits}
    ids = [h.id for h in out.hits]
    if body.deduplicate:
        ids = _deduplicate(index, ids)
    ids = ids[: body.num_result_ids or body.num_images]
    results: list[dict[str, Any]] = []
    shown = path_view(engine, index)
    for rank, image_id in enumerate(ids):
        item: dict[str, Any] = {"id": image_id, "similarity": similarity[image_id]}
        if rank < body.num_images:
            item.update(_metadata(engine, name, index, image_id, rows[image_id], shown))
        results.append(item)
    return results


@router.post("/metadata", openapi_extra=_documented(MetadataRequest))
async def metadata(request: Request, engine: EngineDep) -> list[dict[str, Any]]:
    """Metadata of ids (unknown ids are left out), for the web front's lazy paging."""
    body: MetadataRequest = _parse(MetadataRequest, await _json_body(request))
    return await engine.run(_metadata_rows, engine, body)


def _metadata_rows(engine: Engine, body: MetadataRequest) -> list[dict[str, Any]]:
    name = body.indice_name or engine.default_index
    index = engine.index(name)
    shown = path_view(engine, index)
    out = []
    for image_id in body.ids:
        try:
            row = index.metadata([image_id])[0]
        except UnknownImage:
            continue
        out.append({"id": image_id, "metadata": _metadata(engine, name, index, image_id, row, shown)})
    return out
