"""Routes: indexed images by id (never a path taken from the request), whole or as thumbnails."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from PIL import Image

from indexer.store import UnknownImage
from service.deps import EngineDep

router = APIRouter(prefix="/v1", tags=["images"])
CACHE_CONTROL = "public, max-age=86400"


def thumbnail_jpeg(path: Path, side: int) -> bytes:
    """A JPEG of the file with its longest side at most `side` pixels."""
    with Image.open(path) as opened:
        rgb = opened.convert("RGB")
    rgb.thumbnail((side, side))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@router.get("/images/{image_id}", response_class=Response, responses={
    200: {"content": {"image/*": {}}, "description": "the indexed file, or a JPEG thumbnail (?thumb=N)"},
    304: {"description": "not modified (If-None-Match matched the ETag)"}})
def image(image_id: Annotated[int, PathParam(ge=0, lt=2**63, description="an id from a search")], request: Request,
          engine: EngineDep, index: str | None = None,
          thumb: Annotated[int | None, Query(ge=16, le=1024, description="longest side of a JPEG thumbnail")] = None,
          ) -> Response:
    """The indexed file of an id (or its thumbnail), with an ETag; 404 for ids the index does not hold."""
    row = engine.index(index).metadata([image_id])[0]
    etag = f'"{row["sha256"]}{f"-t{thumb}" if thumb else ""}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    path = Path(row["path"])
    if not path.is_file():
        raise UnknownImage(image_id)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if thumb is None:
        return FileResponse(path, headers=headers)
    try:
        data = thumbnail_jpeg(path, thumb)
    except (OSError, ValueError):
        raise UnknownImage(image_id) from None  # the file changed since indexing into something unreadable
    return Response(data, media_type="image/jpeg", headers=headers)
