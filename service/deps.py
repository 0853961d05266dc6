"""Service wiring: typed dependencies that hand the loaded state to the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.state import Engine


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
