"""Service vocabulary: every Redis name, TTL and job state the API, the workers and the cache share."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from enum import StrEnum
from typing import Any

NAMESPACE = "imsearch:"
# the caches live under a prefix of their own: DELETE /v1/cache scans it, and must never reach the jobs
CACHE_PREFIX = f"{NAMESPACE}cache:"
VERSIONS_CHANNEL = f"{NAMESPACE}versions"  # pub/sub: {"index_dir", "version"} after every publish
QUEUE = f"{NAMESPACE}index"  # the RQ queue of indexing jobs (RQ keeps it as rq:queue:imsearch:index)
RECENT_JOBS = f"{NAMESPACE}jobs:recent"  # sorted set: job id → time enqueued
JOB_KEEP_S = 7 * 86400  # how long a finished job's result, failure and place in RECENT_JOBS are kept
RECENT_JOBS_MAX = 10_000  # RECENT_JOBS holds at most this many ids (the oldest go first)
TIER_NAME = r"^[a-z][a-z0-9_-]{0,31}$"  # a rerank tier's name, as settings and requests give it


class JobState(StrEnum):
    """A job's life: queued → running → succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def result_key(model_id: str, index_version: str, request: dict[str, Any]) -> str:
    """Keyed by index version, so publishing a new version invalidates every cached result."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    return f"{CACHE_PREFIX}result:{model_id}:{index_version}:{digest}"


def normalise_text(text: str) -> str:
    """The text as the tokenizer sees it (CLIP's BPE lower-cases and collapses whitespace)."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def text_key(model_id: str, text: str) -> str:
    digest = hashlib.sha256(normalise_text(text).encode()).hexdigest()[:32]
    return f"{CACHE_PREFIX}text:{model_id}:{digest}"
