"""Routes: the web page and the API docs pages (static files shipped with the packages, no CDN)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# swagger-ui-dist and redoc's standalone bundle, byte for byte as npm ships them (fastapi-offline is pinned)
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
DOCS_URL = "/static/docs"

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def page() -> FileResponse:
    """Fast vs reranked, side by side."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI on the OpenAPI schema, its script and styles served from here (works offline)."""
    root, app = _root(request), request.app
    return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                               swagger_js_url=f"{root}{DOCS_URL}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{DOCS_URL}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{DOCS_URL}/favicon.png")


@router.get("/redoc", response_class=HTMLResponse)
def redoc(request: Request) -> HTMLResponse:
    """ReDoc on the OpenAPI schema, served from here without web fonts (works offline)."""
    root, app = _root(request), request.app
    return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                          redoc_js_url=f"{root}{DOCS_URL}/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{DOCS_URL}/favicon.png", with_google_fonts=False)


def _root(request: Request) -> str:
    """The path prefix a proxy serves the app under (as FastAPI's own docs pages use it)."""
    return str(request.scope.get("root_path", "")).rstrip("/")
