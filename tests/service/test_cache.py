"""Caches against the real Redis: results and text embeddings, invalidation, Redis down → still 200."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from indexer.build import BuildOptions, build_or_add, remove
from indexer.encoder import DualEncoder
from service.app import create_app
from service.config import Settings
from service.names import CACHE_PREFIX
from service.pipeline.cache import QueryCache
from service.pipeline.stages import TextStage
from service.state import load_engine
from training.scenes import write_scenes

REDIS_URL = "redis://127.0.0.1:6379/0"
QUERY = {"text": "a large red square above a small green circle", "k": 3}


@pytest.fixture()
def clean_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{CACHE_PREFIX}*"):
        client.delete(key)
    yield client
    for key in client.scan_iter(f"{CACHE_PREFIX}*"):
        client.delete(key)
    client.close()


@pytest.fixture()
def index_dir(encoder: DualEncoder, tmp_path: Path) -> Path:
    write_scenes(tmp_path / "src", 12, seed=71, twins=True)
    build_or_add(tmp_path / "src" / "captions.jsonl", tmp_path / "idx", encoder, BuildOptions(workers=0), "build")
    return tmp_path / "idx"


def _client(index_dir: Path, url: str) -> TestClient:
    return TestClient(create_app(Settings(indexes=[str(index_dir)], rerankers=[], redis_url=url)))


def test_second_identical_query_is_served_from_redis(index_dir: Path, clean_redis: redis.Redis) -> None:
    with _client(index_dir, REDIS_URL) as client:
        first = client.post("/v1/search", json=QUERY).json()
        second = client.post("/v1/search", json=QUERY).json()
        other = client.post("/v1/search", json={**QUERY, "k": 4}).json()
    assert first["cached"] is False and second["cached"] is True and other["cached"] is False
    assert [h["id"] for h in second["hits"]] == [h["id"] for h in first["hits"]]
    keys = list(clean_redis.scan_iter(f"{CACHE_PREFIX}result:*"))
    assert len(keys) == 2 and all(0 < clean_redis.ttl(k) <= 3600 for k in keys)  # a TTL on every key
    texts = list(clean_redis.scan_iter(f"{CACHE_PREFIX}text:*"))
    assert len(texts) == 1 and 0 < clean_redis.ttl(texts[0]) <= 3600  # the two k's share one text encoding


def test_cache_switched_off_keeps_redis_for_the_rest_but_stores_nothing(index_dir: Path,
                                                                       clean_redis: redis.Redis) -> None:
    settings = Settings(indexes=[str(index_dir)], rerankers=[], redis_url=REDIS_URL, cache=False)
    with TestClient(create_app(settings)) as client:
        answers = [client.post("/v1/search", json=QUERY).json() for _ in range(2)]
        assert client.get("/readyz").json()["cache"] == "disabled"
    assert [a["cached"] for a in answers] == [False, False]
    assert not list(clean_redis.scan_iter(f"{CACHE_PREFIX}*"))


def test_text_embedding_cache_round_trips_and_ignores_case_and_spacing(encoder: DualEncoder,
                                                                       clean_redis: redis.Redis) -> None:
    cache, lookups = QueryCache(REDIS_URL, 60), []
    stage = TextStage(encoder, cache, False, lookups.append)  # with a cache, tokens are kept all the same
    [fresh] = stage(["A red  circle left of a blue square"])
    [again] = stage(["a red circle left of a blue square "])
    cache.close()
    assert lookups == [False, True] and len(list(clean_redis.scan_iter(f"{CACHE_PREFIX}text:*"))) == 1
    np.testing.assert_array_equal(again.pooled, fresh.pooled)
    np.testing.assert_allclose(again.tokens, np.where(fresh.mask[:, None], fresh.tokens, 0), atol=2e-3)
    assert (again.mask == fresh.mask).all()


def test_clear_needs_the_api_key_and_empties_the_cache(index_dir: Path, clean_redis: redis.Redis) -> None:
    settings = Settings(indexes=[str(index_dir)], rerankers=[], redis_url=REDIS_URL, api_key="s3cret")
    with TestClient(create_app(settings)) as client:
        client.post("/v1/search", json=QUERY)
        assert client.delete("/v1/cache").status_code == 401
        assert client.delete("/v1/cache", headers={"X-API-Key": "wrong"}).status_code == 403
        cleared = client.delete("/v1/cache", headers={"X-API-Key": "s3cret"})
        assert cleared.status_code == 200 and cleared.json()["removed"] == 2  # one result, one text
        assert client.post("/v1/search", json=QUERY).json()["cached"] is False


def test_a_new_index_version_invalidates_cached_results(index_dir: Path, clean_redis: redis.Redis,
                                                          encoder: DualEncoder) -> None:
    with _client(index_dir, REDIS_URL) as client:
        first = client.post("/v1/search", json=QUERY).json()
    remove(index_dir, ids=[first["hits"][0]["id"]])
    with _client(index_dir, REDIS_URL) as client:  # a process serving the new version
        after = client.post("/v1/search", json=QUERY).json()
    assert after["cached"] is False and after["index_version"] != first["index_version"]
    assert first["hits"][0]["id"] not in [h["id"] for h in after["hits"]]


def test_redis_down_means_bypass_not_errors(index_dir: Path) -> None:
    with _client(index_dir, "redis://127.0.0.1:1/0") as client:  # nothing listens on port 1
        responses = [client.post("/v1/search", json=QUERY) for _ in range(3)]
        ready = client.get("/readyz").json()
    assert all(r.status_code == 200 and r.json()["cached"] is False for r in responses)
    assert ready["status"] == "degraded" and ready["cache"] == "degraded"


def test_no_redis_configured_is_not_degraded(index_dir: Path) -> None:
    engine = load_engine(Settings(indexes=[str(index_dir)], rerankers=[]))
    assert not engine.cache.enabled and engine.cache.healthy()


def test_a_batch_of_keys_is_one_round_trip_in_order_with_ttls(clean_redis: redis.Redis) -> None:
    cache = QueryCache(REDIS_URL, 60)
    calls = clean_redis.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
    assert cache.put_many([(f"{CACHE_PREFIX}t:a", b"1"), (f"{CACHE_PREFIX}t:c", "3")]) == [True, True]
    assert cache.get_many([f"{CACHE_PREFIX}t:a", f"{CACHE_PREFIX}t:b", f"{CACHE_PREFIX}t:c"]) == [b"1", None, b"3"]
    assert clean_redis.info("commandstats")["cmdstat_mget"]["calls"] == calls + 1
    assert 0 < clean_redis.ttl(f"{CACHE_PREFIX}t:a") <= 60 and 0 < clean_redis.ttl(f"{CACHE_PREFIX}t:c") <= 60
    cache.close()
    down = QueryCache("redis://127.0.0.1:1/0", 60)
    assert down.get_many(["x", "y"]) == [None, None] and down.put_many([("x", b"1")]) == [False] and down.degraded
