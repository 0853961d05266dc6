"""Service settings: the one place that reads the environment (prefix IMSEARCH_, .env supported)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reranker import DEFAULT_TIERS
from reranker.gate import AUTO_MARGIN
from service.names import TIER_NAME

PINNED = re.compile(r"(.+)@(v\d{6,})")  # DIR@VERSION in an index spec


class Settings(BaseSettings):
    """Settings of the API process."""

    model_config = SettingsConfigDict(env_prefix="IMSEARCH_", env_file=".env", extra="ignore")

    indexes: list[str] = Field(default_factory=list,
                               description="NAME=DIR or DIR (DIR@vNNNNNN holds that version); the first is the default")
    model: str = "tiny"
    pretrained: str | None = None
    device: str = "cpu"
    search_device: str = Field("auto", pattern="^(cpu|cuda|auto)$",
                               description="FAISS search on a GPU copy of each index (auto: when faiss-gpu sees one)")
    rerankers: list[str] = Field(default_factory=lambda: list(DEFAULT_TIERS))
    default_rerank: str = Field("none", pattern=TIER_NAME)  # none, or a tier of `rerankers`
    max_k: int = Field(1000, ge=1)
    max_rerank_k: int = Field(256, ge=1)
    auto_tier: str = Field("mid", pattern=TIER_NAME)  # the tier rerank "auto" uses when it does
    auto_margin: float = Field(AUTO_MARGIN, ge=0.0, le=2.0)  # reranker.gate.auto_depth: its fitted default
    default_rerank_k: int = Field(16, ge=1)
    redis_url: str | None = None
    api_key: str | None = None
    open_writes: bool = Field(False, description="without api_key, let anyone call the mutating routes (a local demo)")
    hit_paths: Literal["relative", "absolute"] = Field(
        "relative", description="hits show file paths relative to the folder they were indexed from, or as on disk")
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this (else 408)")
    max_pixels: int = Field(40_000_000, ge=1)
    cache: bool = Field(True, description="cache text embeddings and results in Redis (when redis_url is set)")
    cache_ttl_s: int = Field(3600, ge=1)
    max_batch: int = Field(32, ge=1, description="most queries per micro-batch (encoder forward, FAISS search)")
    job_roots: list[str] = Field(default_factory=list, description="folders indexing jobs may read")
    job_timeout_s: int = Field(6 * 3600, ge=10)
    version_poll_s: float = Field(5.0, gt=0, description="fallback check for new index versions")
    threads: int = Field(1, ge=0, description="intra-op threads per torch/FAISS call (0: library default)")
    workers: int = Field(1, ge=1, description="API processes; more than one needs redis_url (shared jobs)")
    rerank_slots: int = Field(0, ge=0, description="reranks a process runs at once, all tiers (0: cores / workers)")
    rerank_queue: int = Field(1024, ge=1, description="candidates a tier may hold queued ahead of a request (else 503)")
    access_log: bool = Field(True, description="a log line per request (uvicorn's; /metrics counts them either way)")
    max_wait_ms: float = Field(1.0, ge=0.0, le=50.0, description="wait for stragglers, only under load")

    @field_validator("indexes")
    @classmethod
    def _named(cls, value: list[str]) -> list[str]:
        for spec in value:
            name, _, folder = spec.rpartition("=")
            if not folder:
                raise ValueError(f"index spec {spec!r} must be DIR or NAME=DIR")
        return value

    def rerank_workers(self) -> int:
        """Reranks a process runs at once: the machine's cores shared by the worker processes (each
        process sees only its own reranks)."""
        return self.rerank_slots or max(1, (os.cpu_count() or 1) // self.workers)

    def index_dirs(self) -> dict[str, tuple[Path, str | None]]:
        """Index name → (folder, the version to hold, or None to follow CURRENT); an unnamed DIR is
        named after its folder. DIR@v000004 serves that kept version (say, while CURRENT is damaged)."""
        out: dict[str, tuple[Path, str | None]] = {}
        for spec in self.indexes:
            name, _, where = spec.rpartition("=")
            pinned = PINNED.fullmatch(where)
            folder, version = (pinned.group(1), pinned.group(2)) if pinned else (where, None)
            out[name or Path(folder).name] = (Path(folder), version)
        return out
