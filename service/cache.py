"""Service cache: Redis keys (prefixed, a TTL on every key) for search results; never fatal."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import redis

log = logging.getLogger(__name__)

PREFIX = "imsearch:"
WARN_EVERY_S = 30.0  # one warning per interval while Redis is down, not one per request


def result_key(model_id: str, index_version: str, request: dict[str, Any]) -> str:
    """Keyed by index version, so publishing a new version invalidates every cached result."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    return f"{PREFIX}result:{model_id}:{index_version}:{digest}"


class ResultCache:
    """Get/put JSON results; with Redis unset or down every call is a miss and `degraded` is set."""

    def __init__(self, url: str | None, ttl_s: int):
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2) if url else None
        self.degraded = False
        self._warned_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def _failed(self, exc: Exception) -> None:
        self.degraded = True
        if time.monotonic() - self._warned_at > WARN_EVERY_S:
            self._warned_at = time.monotonic()
            log.warning("Redis cache unavailable, bypassing it: %s", exc)

    def get(self, key: str) -> dict[str, Any] | None:
        if self.client is None:
            return None
        try:
            raw = self.client.get(key)
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        self.degraded = False
        return json.loads(raw) if isinstance(raw, bytes | str) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.client is None:
            return
        try:
            self.client.set(key, json.dumps(value), ex=self.ttl_s)
        except redis.RedisError as exc:
            self._failed(exc)

    def healthy(self) -> bool:
        """Ping Redis (True when no Redis is configured: nothing to be degraded)."""
        if self.client is None:
            return True
        try:
            self.client.ping()
        except redis.RedisError as exc:
            self._failed(exc)
            return False
        self.degraded = False
        return True
