"""Service stage, observability: Prometheus metrics for stages, rerank tiers, caches and batches."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's: worker processes write their values there

# milliseconds matter here: a query is 2 ms fast and 20 ms reranked
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """One registry per engine, so several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage = Histogram("imsearch_stage_seconds", "Time per search stage and rerank tier",
                               ["stage", "rerank"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.http = Histogram("imsearch_http_request_seconds", "HTTP latency by route and status",
                              ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.cache = Counter("imsearch_cache_requests", "Cache lookups by cache and outcome",
                             ["cache", "outcome"], registry=self.registry)
        self.batch = Histogram("imsearch_batch_size", "Items per micro-batch", ["batcher"],
                               buckets=BATCH_BUCKETS, registry=self.registry)

    def observe_search(self, timings_ms: dict[str, float], rerank: str) -> None:
        for stage, ms in timings_ms.items():
            self.stage.labels(stage, rerank).observe(ms / 1000)

    def cache_lookup(self, cache: str, hit: bool) -> None:
        self.cache.labels(cache, "hit" if hit else "miss").inc()

    def render(self) -> bytes:
        """This engine's metrics; under `imsearch serve --workers N` (PROMETHEUS_MULTIPROC_DIR set for
        the workers) the sum over every worker process, whichever one answers the scrape."""
        if os.environ.get(MULTIPROC_ENV):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
