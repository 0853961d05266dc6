"""Routes: indexed images by id (never a path taken from the request), whole or as thumbnails."""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam

from indexer.reader import DEFAULT_MAX_BYTES, BadImage, decode_image, read_regular_file
from indexer.store import UnknownImage
from service.deps import EngineDep

router = APIRouter(prefix="/v1", tags=["images"])
CACHE_CONTROL = "public, max-age=86400"


def read_indexed(image_id: int, row: dict[str, Any], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of an indexed file, only while it is still the file that was indexed: a regular file
    reached without any symbolic link, whose size and sha256 match the index; UnknownImage otherwise
    (a file replaced by a link to /etc/passwd, or edited since, is not served)."""
    path = str(row["path"])
    if os.path.realpath(path) != path:  # a link in some folder of the path: stored paths are resolved
        raise UnknownImage(image_id)
    try:
        data = read_regular_file(path, max_bytes)
    except OSError:
        raise UnknownImage(image_id) from None
    size = row.get("bytes")
    if (size is not None and len(data) != size) or hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise UnknownImage(image_id)
    return data


def thumbnail_jpeg(data: bytes, side: int, max_pixels: int) -> bytes:
    """A JPEG of the image with its longest side at most `side` pixels (BadImage when it does not decode)."""
    rgb = decode_image(data, max_pixels)
    rgb.thumbnail((side, side))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@router.get("/images/{image_id}", response_class=Response, responses={
    200: {"content": {"image/*": {}}, "description": "the indexed file, or a JPEG thumbnail (?thumb=N)"},
    304: {"description": "not modified (If-None-Match matched the ETag)"}})
def image(image_id: Annotated[int, PathParam(ge=0, lt=2**63, description="an id from a search")], request: Request,
          engine: EngineDep, index: str | None = None,
          version: Annotated[str | None, Query(max_length=32, description="the index version of the hit")] = None,
          thumb: Annotated[int | None, Query(ge=16, le=1024, description="longest side of a JPEG thumbnail")] = None,
          ) -> Response:
    """The indexed file of an id (or its thumbnail), with an ETag; 404 for ids the index does not hold,
    or whose file is no longer the one indexed."""
    row = engine.image_source(index, version).metadata([image_id])[0]
    etag = f'"{row["sha256"]}{f"-t{thumb}" if thumb else ""}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    data = read_indexed(image_id, row)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}
    if thumb is None:
        kind = mimetypes.guess_type(str(row["path"]))[0] or "application/octet-stream"
        return Response(data, media_type=kind, headers=headers)
    try:
        data = thumbnail_jpeg(data, thumb, engine.settings.max_pixels)
    except BadImage:
        raise UnknownImage(image_id) from None
    return Response(data, media_type="image/jpeg", headers=headers)
