"""Service jobs, what the API speaks: the request, the job as a worker receives it, its state, the errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from indexer.tokens import PATTERN as TOKEN_FORMATS
from service.names import JobState


class JobRejected(ValueError):
    """A job the client must fix: a source outside the allowed roots, a missing source."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class JobNotFound(LookupError):
    """No job with this id."""


class JobCancelled(RuntimeError):
    """Raised inside a running job when it is cancelled."""


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shard_size: StrictInt = Field(2048, ge=1, le=1_000_000)
    batch_size: StrictInt = Field(64, ge=1, le=4096)
    index_kind: Literal["auto", "flat", "hnsw", "ivf", "ivfpq"] = "auto"
    memory_budget_mb: StrictInt | None = Field(None, ge=1)
    tokens: str | None = Field(None, pattern=TOKEN_FORMATS, description=(
        "token store: fp16, int8 or int4, optionally +keepK (K patches kept, the rest as their mean); "
        "default: the index's"))


class JobRequest(BaseModel):
    """POST /v1/jobs/index: what to index into which served index."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., min_length=1, max_length=4096, description="folder or list file under IMSEARCH_JOB_ROOTS")
    mode: Literal["build", "add", "remove"] = "add"
    index: str | None = Field(None, min_length=1, max_length=200, description="a served index (default: the first)")
    job_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="idempotency key")
    replace: bool = Field(False, description="a build replaces the served index: say so explicitly")
    options: JobOptions = Field(default_factory=JobOptions)


@dataclass
class JobSpec:
    """A validated job, as the worker receives it (plain JSON types only)."""

    job_id: str
    source: str
    mode: str
    index_name: str
    index_dir: str
    options: dict[str, Any]
    model: str
    pretrained: str | None
    device: str  # "" lets the worker choose (its IMSEARCH_DEVICE)
    roots: list[str] = field(default_factory=list)  # every file the job reads must resolve under one of these
    tiers: list[str] = field(default_factory=list)  # served tiers with features an index stores (blip=DIR, mid)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class JobInfo:
    job_id: str
    status: JobState
    mode: str
    source: str
    index: str
    progress: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0


def new_job_id() -> str:
    return uuid.uuid4().hex
