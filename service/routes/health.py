"""Routes: liveness, readiness, Prometheus metrics, the served indexes' manifests and what the model knows."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from indexer.encoder import EMBEDDED
from reranker.score import Reranker
from service.deps import EngineDep
from service.pipeline.query import missing_features
from service.pipeline.stages import scored_features
from service.state import Engine
from training.descriptions import VOCABULARY, example_queries

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, Any]:
    """The process is up (`pid`: which worker process answered, with `imsearch serve --workers N`)."""
    return {"status": "ok", "pid": os.getpid()}


@router.get("/readyz")
def readyz(engine: EngineDep) -> dict[str, Any]:
    """Model, indexes and rerankers loaded: `ready`; `degraded` (still 200: searches are answered) when a
    configured Redis is unreachable or a configured rerank tier failed to load (`failed_rerankers` says why).
    `tiers` says which image features each loaded tier scores, from which model, which indexes hold them,
    whether it can explain its matches (say where the named objects are), and its image side (`side`: which
    indexes store it, reranked faster)."""
    cache = "disabled" if not engine.cache.enabled else ("ok" if engine.cache.healthy() else "degraded")
    healthy = cache != "degraded" and not engine.failed_tiers
    return {"status": "ready" if healthy else "degraded", "cache": cache, "model": engine.encoder.model_id,
            "indexes": list(engine.indexes), "rerankers": ["none", *engine.rerankers],
            "failed_rerankers": engine.failed_tiers, "tiers": _tiers(engine),
            "auto": engine.settings.auto_tier if engine.settings.auto_tier in engine.rerankers else None}


def _tiers(engine: Engine) -> dict[str, dict[str, Any]]:
    return {name: {"features": r.features, "model": r.feature_model, "shape": list(r.feature_shape),
                   "indexes": [i for i, index in engine.indexes.items() if missing_features(r, index) is None],
                   "explains": r.explains, "side": _side(engine, r)}
            for name, r in engine.rerankers.items()}


def _side(engine: Engine, reranker: Reranker) -> dict[str, Any] | None:
    """The tier's image side (None: it has none), and the indexes that store it: those it reranks faster."""
    if reranker.side is None:
        return None
    held = [i for i, index in engine.indexes.items() if scored_features(reranker, index)[1]]
    return {"features": reranker.side.features, "model": reranker.side.feature_model, "indexes": held}


@router.get("/v1/index")
def index_info(engine: EngineDep, index: str | None = None) -> dict[str, Any]:
    """Manifest and counts of an index (the default one unless named)."""
    served = engine.index(index)
    return {"name": index or engine.default_index, "version": served.version, "count": len(served),
            "search_device": served.search_device, "manifest": served.manifest}


@router.get("/v1/model")
def model_info(engine: EngineDep) -> dict[str, Any]:
    """The served encoder; for the embedded model, the words it was trained on (`vocabulary`: colours,
    shapes, sizes, relations) and `examples` of queries it understands. Both are null for other models,
    whose vocabulary is open."""
    embedded = engine.encoder.model_name == EMBEDDED
    return {"model": engine.encoder.model_id, "vocabulary": VOCABULARY if embedded else None,
            "examples": example_queries() if embedded else None}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"}})
def metrics(engine: EngineDep) -> Response:
    """Prometheus text format: latency per stage and rerank tier, HTTP latency, cache hits, batch sizes."""
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)
