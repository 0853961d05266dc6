"""Service pipeline, query: what a search asks (QueryInput, its Terms) and answers (Hits), and the checks
on its parts that need no stage."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.features import ENCODER_TOKENS
from indexer.filters import Filter
from indexer.store import Index
from reranker.score import Reranker
from service.pipeline.stages import BadQuery

AUTO = "auto"  # rerank only the queries the margin gate picks, with the auto tier
RERANK_NEEDS_TEXT = ("reranking needs a text query, or terms with exactly one text of positive weight (the text it "
                     "scores the candidates against); use rerank='none' for image or embedding queries")


def decode_base64(data: str) -> bytes:
    """An image sent as base64 (a data: URL's prefix allowed), or BadQuery."""
    try:
        return base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise BadQuery("image must be base64 of the image file's bytes") from None


@dataclass
class Term:
    """One part of a composed query: a text or an image's file bytes, weighted (negative: less like it)."""

    text: str | None = None
    image: bytes | None = None
    weight: float = 1.0


@dataclass
class QueryInput:
    """Exactly one of text, image (file bytes), embedding or terms (a composed query)."""

    text: str | None = None
    image: bytes | None = None
    embedding: list[float] | None = None
    k: int = 10
    rerank: str = "none"
    rerank_k: int = 16
    min_similarity: float | None = None
    filter: Filter | None = None  # metadata conditions every hit meets (inside the search, not after it)
    terms: list[Term] | None = None  # searched by the normalised weighted sum of their embeddings
    min_score_ratio: float | None = None  # hits below this share of the best hit's similarity are dropped
    order_by: tuple[str, bool] | None = None  # (metadata field, descending): the k hits re-ordered by it
    explain: bool = False  # per reranked hit, where the tier located each object the text names


@dataclass
class Hit:
    id: int
    score: float
    similarity: float
    rerank_score: float | None
    meta: dict[str, Any]
    explain: list[dict[str, Any]] | None = None  # asdict of reranker.score.Located, per named object


@dataclass
class SearchOutput:
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    index_version: str = ""
    cached: bool = False
    reranked: bool = False  # whether a reranker scored the head (rerank "auto" decides per query)


def rerank_term(terms: list[Term]) -> int | None:
    """The term a composed query is reranked against: its one text of positive weight (an image + text
    query is reranked by its text); None when it has none or several."""
    positive = [i for i, t in enumerate(terms) if t.text is not None and t.weight > 0]
    return positive[0] if len(positive) == 1 else None


def rerank_text(q: QueryInput) -> str | None:
    """The text a reranker scores the candidates against: the query's text, or its rerank_term's."""
    if q.text is not None or not q.terms:
        return q.text
    at = rerank_term(q.terms)
    return None if at is None else q.terms[at].text


def normalised(embedding: list[float], dim: int) -> np.ndarray:
    """A client's embedding as a unit (d,) vector, or BadQuery."""
    vector = np.asarray(embedding, dtype=np.float64)  # float64 first: a huge value must not overflow the cast
    if vector.shape[0] != dim:
        raise BadQuery(f"embedding has {vector.shape[0]} dimensions; this index expects {dim}")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing norm is inf, refused below
        norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else float("nan")
    if not np.isfinite(norm) or norm == 0.0:
        raise BadQuery("embedding must be a finite, non-zero vector")
    return (vector / norm).astype(np.float32)


def cannot_explain(rerankers: Mapping[str, Reranker], tier: str) -> str | None:
    """Why the tier cannot say where the named objects are (None: it can)."""
    if rerankers[tier].explains:
        return None
    able = [name for name, r in rerankers.items() if r.explains]
    return f"the {tier} tier cannot explain its matches; tiers that can: {', '.join(able) or 'none'}"


def missing_features(reranker: Reranker, index: Index) -> str | None:
    """Why the index cannot be reranked by this tier (None: it can): a tier with its own vision tower scores
    the features stored for it at index time by the same weights, never another model's tokens."""
    if reranker.features == ENCODER_TOKENS:  # every index holds them (their model is checked at startup)
        return None
    held = index.feature_sets.get(reranker.features)
    if held is None:
        return (f"index {index.root.name!r} holds no {reranker.features} image features, which the rerank tier "
                f"{reranker.name!r} scores: rebuild it with `imsearch index build --tiers {reranker.name}=MODEL_DIR`")
    if held.get("model") != reranker.feature_model or held.get("shape") != list(reranker.feature_shape):
        return (f"index {index.root.name!r} holds {reranker.features} features of model {held.get('model')}, "
                f"but the tier {reranker.name!r} is {reranker.feature_model}: rebuild it with this tier's model")
    return None
