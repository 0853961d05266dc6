"""HTTP schemas: constrained request and response models of the search API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

TIER_NAME = r"^[a-z][a-z0-9_-]{0,31}$"


class SearchRequest(BaseModel):
    """Exactly one of text, image (base64 file bytes) or embedding."""

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

    @field_validator("text")
    @classmethod
    def _words(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("text is empty: it holds only whitespace")
        return value

    @model_validator(mode="after")
    def _exactly_one_query(self) -> SearchRequest:
        given = [name for name in ("text", "image", "embedding") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image or embedding (got {', '.join(given) or 'none'})")
        return self


class HitOut(BaseModel):
    id: int
    score: float = Field(description="the ranking score: hits are in descending order of it")
    similarity: float = Field(description="the dual encoder's cosine")
    rerank_score: float | None = Field(None, description="the reranker's log p(match); null past rerank_k")
    url: str = Field(description="the image, from the index version that answered (add ?thumb=N for a JPEG)")
    path: str | None = Field(None, description="the file, relative to the folder it was indexed from")
    caption: str | None = None


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


class ErrorResponse(BaseModel):
    detail: str
