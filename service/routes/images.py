"""Routes: indexed images by id (never a path taken from the request)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from indexer.store import UnknownImage
from service.deps import EngineDep

router = APIRouter(prefix="/v1", tags=["images"])


@router.get("/images/{image_id}")
def image(image_id: int, request: Request, engine: EngineDep, index: str | None = None) -> Response:
    """The indexed file of an id, with a content ETag; 404 for ids the index does not hold."""
    row = engine.index(index).metadata([image_id])[0]
    etag = f'"{row["sha256"]}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    path = Path(row["path"])
    if not path.is_file():
        raise UnknownImage(image_id)
    return FileResponse(path, headers={"ETag": etag, "Cache-Control": "public, max-age=86400"})
