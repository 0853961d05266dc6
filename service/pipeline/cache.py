"""Service pipeline, cache: Redis keys (prefixed, a TTL on every key) for results and text embeddings; never fatal."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import redis

from service.names import CACHE_PREFIX

log = logging.getLogger(__name__)

WARN_EVERY_S = 30.0  # one warning per interval while Redis is down, not one per request
RETRY_AFTER_S = 1.0  # after a failure, requests skip Redis this long (a hung Redis must not cost each one a timeout)


def pack_text(pooled: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> bytes:
    """pooled float32 (d,), then the unmasked rows of tokens as float16; the mask is a prefix."""
    length = int(mask.sum())
    return (np.uint32(length).tobytes() + np.uint32(tokens.shape[0]).tobytes()
            + pooled.astype(np.float32).tobytes() + tokens[:length].astype(np.float16).tobytes())


def unpack_text(raw: bytes, dim: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    length, context = (int(v) for v in np.frombuffer(raw[:8], dtype=np.uint32))
    pooled = np.frombuffer(raw[8 : 8 + 4 * dim], dtype=np.float32).copy()
    tokens = np.zeros((context, width), np.float32)
    tokens[:length] = np.frombuffer(raw[8 + 4 * dim :], dtype=np.float16).reshape(length, width)
    return pooled, tokens, np.arange(context) < length


class QueryCache:
    """Get/put JSON results and packed text embeddings; with Redis unset or down every call is a miss."""

    def __init__(self, url: str | None, ttl_s: int):
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2) if url else None
        self.degraded = False
        self._warned_at = 0.0
        self._retry_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def _live(self) -> redis.Redis | None:
        """The client, unless none is configured or Redis failed less than RETRY_AFTER_S ago."""
        return None if time.monotonic() < self._retry_at else self.client

    def _failed(self, exc: Exception) -> None:
        self.degraded = True
        self._retry_at = time.monotonic() + RETRY_AFTER_S
        if time.monotonic() - self._warned_at > WARN_EVERY_S:
            self._warned_at = time.monotonic()
            log.warning("Redis cache unavailable, bypassing it: %s", exc)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One round trip (MGET) for a micro-batch's keys; None for each miss."""
        if not keys or (client := self._live()) is None:
            return [None] * len(keys)
        try:
            raws = client.mget(keys)
        except redis.RedisError as exc:
            self._failed(exc)
            return [None] * len(keys)
        self.degraded = False
        return [raw if isinstance(raw, bytes) else None for raw in raws]

    def put_many(self, items: Sequence[tuple[str, bytes | str]]) -> list[bool]:
        """Store each value under its key with the TTL, in one pipelined round trip; True where stored."""
        if not items or (client := self._live()) is None:
            return [False] * len(items)
        try:
            pipe = client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, ex=self.ttl_s)
            return [bool(ok) for ok in pipe.execute()]
        except redis.RedisError as exc:
            self._failed(exc)
            return [False] * len(items)

    def clear(self) -> int:
        """Delete every cached result and text embedding (the jobs' keys stay); returns how many were removed."""
        if self.client is None:
            return 0
        removed = 0
        try:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=f"{CACHE_PREFIX}*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    removed += int(self.client.delete(*batch))
                    batch = []
            if batch:
                removed += int(self.client.delete(*batch))
        except redis.RedisError as exc:
            self._failed(exc)
        return removed

    def close(self) -> None:
        """Close the pooled connections (several threads may have opened one each)."""
        if self.client is not None:
            self.client.close()

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
        self._retry_at = 0.0
        return True

