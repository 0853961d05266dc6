"""Routes: the web page (static files shipped with the package, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def page() -> FileResponse:
    """Fast vs reranked, side by side."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
