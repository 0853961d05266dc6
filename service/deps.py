"""Service wiring: typed dependencies that hand the loaded state to the routes."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from service.state import Engine


# async although nothing here awaits: FastAPI runs a sync dependency in its thread pool, a hop per
# request that cost a tenth of a text search's time (profiled)
async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


NO_KEY = ("this endpoint changes the service's state, and no API key is configured: set IMSEARCH_API_KEY "
          "and send it in the X-API-Key header (or, for a local demo only, IMSEARCH_OPEN_WRITES=true)")


async def require_api_key(engine: EngineDep, x_api_key: Annotated[str | None, Header()] = None) -> None:
    """Guards mutating endpoints, closed by default: 403 while no key is configured (unless writes were
    opened explicitly), 401 without the key, 403 with a wrong one (constant-time compare)."""
    expected = engine.settings.api_key
    if expected is None:
        if engine.settings.open_writes:
            return
        raise HTTPException(status_code=403, detail=NO_KEY)
    if not x_api_key:
        raise HTTPException(status_code=401, detail="this endpoint needs an API key in the X-API-Key header")
    if not hmac.compare_digest(x_api_key.encode(), expected.encode()):
        raise HTTPException(status_code=403, detail="wrong API key")


ApiKeyDep = Depends(require_api_key)
