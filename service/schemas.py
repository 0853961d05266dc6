"""HTTP schemas: constrained request and response models of the search API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from indexer.filters import RANGE_OPS, Filter
from service.names import TIER_NAME


class FilterIn(BaseModel):
    """Conditions on the stored metadata, applied inside the search: k hits whenever k images match. Each
    `where` condition is checked against the index's columns when the search applies it (indexer.filters)."""

    model_config = ConfigDict(extra="forbid")

    path_glob: str | None = Field(None, min_length=1, max_length=500, description="e.g. */2024/*.jpg")
    caption_contains: str | None = Field(None, min_length=1, max_length=200, description="case-insensitive")
    where: dict[Annotated[str, Field(min_length=1, max_length=100)], Any] = Field(
        default_factory=dict, max_length=16, description=(
            "FIELD: VALUE (equal), or FIELD: {gte, gt, lte, lt: VALUE} (numbers, or text compared as text: ISO "
            "dates sort as dates); FIELD: path, caption, width, height, bytes, sha256 or a column of the source list"),
        json_schema_extra={"additionalProperties": {"anyOf": [
            {"type": ["string", "number", "boolean"]},
            {"type": "object", "properties": {k: {"type": ["string", "number"]} for k in RANGE_OPS},
             "additionalProperties": False, "minProperties": 1}]}})

    def to_filter(self) -> Filter:
        return Filter(self.path_glob, self.caption_contains, dict(self.where))


class TermIn(BaseModel):
    """One part of a composed query: a text or an image, weighted; a negative weight steers away from it."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, min_length=1, max_length=1000)
    image: str | None = Field(None, min_length=1, description="base64 of the image file's bytes")
    weight: float = Field(1.0, ge=-10.0, le=10.0)

    @model_validator(mode="after")
    def _one_part(self) -> TermIn:
        if (self.text is None) == (self.image is None):
            raise ValueError("a term is exactly one of text or image")
        if self.weight == 0:
            raise ValueError("a term's weight must not be 0")
        return self


class OrderIn(BaseModel):
    """A metadata field to order the recalled hits by (rows without it come last)."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(min_length=1, max_length=100)
    descending: bool = False


class SearchRequest(BaseModel):
    """Exactly one of text, image (base64 file bytes), embedding or terms (text and images, weighted)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, min_length=1, max_length=1000)
    image: str | None = Field(None, min_length=1, description="base64 of the image file's bytes")
    embedding: list[float] | None = Field(None, min_length=1, max_length=8192)
    k: StrictInt = Field(10, ge=1, le=1000)  # strict: JSON true is not a count, nor "10"
    rerank: str | None = Field(None, pattern=TIER_NAME, description=(
        "none, or a rerank tier this service loaded (this schema lists them; /readyz too)"))
    rerank_k: StrictInt | None = Field(None, ge=1, le=256)
    min_similarity: float | None = Field(None, ge=-1.0, le=1.0)
    index: str | None = Field(None, min_length=1, max_length=200)
    filter: FilterIn | None = None
    min_score_ratio: float | None = Field(None, gt=0.0, le=1.0, description=(
        "keep only hits whose similarity is at least this share of the best hit's (a relevance cutoff)"))
    order_by: OrderIn | None = Field(None, description="the k hits re-ordered by a metadata field (e.g. a date)")
    cursor: str | None = Field(None, min_length=1, max_length=400, description=(
        "next_cursor of the previous page: the next k hits of the same query, from the same index version"))
    explain: bool = Field(False, description=(
        "per reranked hit, where the tier found each object the text names (a tier with a grounding head)"))
    terms: list[TermIn] | None = Field(None, min_length=1, max_length=8, description=(
        "a composed query: the normalised weighted sum of the terms' embeddings, e.g. a text, an image at 0.5 "
        "and a text at -0.5 (less like it)"))

    @field_validator("text")
    @classmethod
    def _words(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("text is empty: it holds only whitespace")
        return value

    @model_validator(mode="after")
    def _exactly_one_query(self) -> SearchRequest:
        given = [name for name in ("text", "image", "embedding", "terms") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, embedding or terms (got {', '.join(given) or 'none'})")
        return self


class LocatedOut(BaseModel):
    phrase: str = Field(description='the words of the query that name the object, e.g. "large red circle"')
    x: float = Field(description="the object's centre, as a share of the image's width from its left edge")
    y: float = Field(description="the object's centre, as a share of the image's height from its top edge")


class HitOut(BaseModel):
    id: int
    score: float = Field(description="the ranking score: hits are in descending order of it")
    similarity: float = Field(description="the dual encoder's cosine")
    rerank_score: float | None = Field(None, description="the reranker's log p(match); null past rerank_k")
    url: str = Field(description="the image, from the index version that answered (add ?thumb=N for a JPEG)")
    path: str | None = Field(None, description="the file, relative to the folder it was indexed from")
    caption: str | None = None
    explain: list[LocatedOut] | None = Field(None, description="with explain: where each named object is")


class Timings(BaseModel):
    encode: float
    search: float
    rerank: float
    fetch: float = Field(description="reading the hits' metadata")
    total: float = Field(description="the whole answer, the sum of the stages (a cached answer: its lookup)")


class SearchResponse(BaseModel):
    hits: list[HitOut]
    timings_ms: Timings
    index_version: str
    index: str
    rerank: str
    cached: bool = False
    reranked: bool = Field(False, description="whether a reranker scored the head (rerank auto decides per query)")
    next_cursor: str | None = Field(None, description="pass as `cursor` with the same query for the next page")


class ErrorResponse(BaseModel):
    detail: str
