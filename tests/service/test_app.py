"""The HTTP app with its lifespan: search, images, health, and 4xx (never 5xx) for bad requests."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from PIL import Image

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.store import Index
from service.app import create_app
from service.config import Settings
from service.deps import get_engine
from service.errors import StartupError
from service.pipeline.query import QueryInput, SearchOutput
from service.state import Engine, load_engine
from training.scenes import write_scenes


@pytest.fixture(scope="module")
def index_dir(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("app")
    write_scenes(root / "src", 30, seed=61, twins=True)
    build_or_add(root / "src" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0), "build")
    return root / "idx"


@pytest.fixture(scope="module")
def client(index_dir: Path) -> Iterator[TestClient]:
    settings = Settings(indexes=[f"scenes={index_dir}"], rerankers=["mid"], max_body_bytes=200_000)
    with TestClient(create_app(settings)) as test_client:  # runs the lifespan
        yield test_client


def test_text_search_with_and_without_rerank(client: TestClient) -> None:
    fast = client.post("/v1/search", json={"text": "a small red circle left of a large blue square", "k": 5})
    assert fast.status_code == 200, fast.text
    body = fast.json()
    assert len(body["hits"]) == 5 and body["index"] == "scenes" and body["rerank"] == "none"
    assert set(body["timings_ms"]) == {"encode", "search", "rerank", "fetch", "total"} and body["index_version"]
    deep = client.post("/v1/search", json={"text": "a small red circle left of a large blue square", "k": 5,
                                           "rerank": "mid", "rerank_k": 16}).json()
    assert deep["rerank"] == "mid" and all(h["rerank_score"] is not None for h in deep["hits"])
    assert deep["timings_ms"]["rerank"] > 0


def test_image_queries_base64_and_upload_find_the_image(client: TestClient, index_dir: Path) -> None:
    hit = client.post("/v1/search", json={"text": "a large green cross", "k": 1}).json()["hits"][0]
    data = (index_dir.parent / "src" / hit["path"]).read_bytes()
    by_b64 = client.post("/v1/search", json={"image": base64.b64encode(data).decode(), "k": 1}).json()
    assert by_b64["hits"][0]["id"] == hit["id"]
    upload = client.post("/v1/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "1"})
    assert upload.status_code == 200 and upload.json()["hits"][0]["id"] == hit["id"]


def test_images_route_serves_indexed_files_only(client: TestClient, index_dir: Path) -> None:
    hit = client.post("/v1/search", json={"text": "a small blue square", "k": 1}).json()["hits"][0]
    image = client.get(hit["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == (index_dir.parent / "src" / hit["path"]).read_bytes()
    again = client.get(hit["url"], headers={"If-None-Match": image.headers["etag"]})
    assert again.status_code == 304
    thumb = client.get(hit["url"] + "&thumb=32")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 32 and thumb.headers["etag"] != image.headers["etag"]
    assert client.get(hit["url"] + "&thumb=5000").status_code == 422
    assert client.get("/v1/images/999999").status_code == 404
    assert client.get("/v1/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"text": "a", "embedding": [0.1]}, 422),
        ({"text": "a", "k": 0}, 422),
        ({"text": "a", "k": 5000}, 422),
        ({"text": "a", "rerank": "deepest"}, 422),
        ({"embedding": [0.1, 0.2]}, 422),
        ({"image": "not base64!!"}, 422),
        ({"image": base64.b64encode(b"plain text").decode()}, 422),
        ({"text": "a", "index": "nope"}, 404),
        ({"text": "a", "unknown_field": 1}, 422),
        ({"text": "   "}, 422),
        ({"text": "\t\n"}, 422),
    ],
)
def test_bad_requests_are_clear_4xx(client: TestClient, body: dict, status: int) -> None:
    response = client.post("/v1/search", json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in detail


def test_oversized_body_is_413(client: TestClient) -> None:
    response = client.post("/v1/search", content=b"x" * 300_000, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "200000 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"text": "' + b"a" * 150_000
        yield b"b" * 150_000 + b'"}'

    streamed = client.post("/v1/search", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "200000 bytes" in streamed.json()["detail"]

    def multipart():  # a streamed upload, as browsers send large files
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        yield from chunks()
        yield b"\r\n--b--\r\n"

    upload = client.post("/v1/search/image", content=multipart(),
                         headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert upload.status_code == 413, upload.text


def test_every_search_request_takes_fastapis_routing_and_dependencies(client: TestClient) -> None:
    app = client.app
    solved: list[int] = []

    async def counted(request: Request) -> Engine:  # FastAPI solves this dependency on the route's way
        solved.append(1)
        return await get_engine(request)

    app.dependency_overrides[get_engine] = counted  # type: ignore[attr-defined]
    try:
        query = json.dumps({"text": "a large red square right of a small blue circle", "k": 6}).encode()
        plain = client.post("/v1/search", content=query, headers={"Content-Type": "application/json; charset=utf-8"})
        assert plain.status_code == 200 and len(solved) == 1
        other = client.post("/v1/search", content=query, headers={"Content-Type": "application/vnd.query+json"})
        assert other.status_code == 200 and len(solved) == 2
        assert [h["id"] for h in plain.json()["hits"]] == [h["id"] for h in other.json()["hits"]]
        invalid = client.post("/v1/search", json={"text": "", "k": 3})  # refused by validation, with its message
        assert invalid.status_code == 422 and invalid.json()["detail"].startswith("text: ")
        untiered = client.post("/v1/search", json={"text": "a red circle", "rerank": "early"})  # raised by the search
        assert untiered.status_code == 422 and "'early' is not loaded" in untiered.json()["detail"]
        unknown = client.post("/v1/search", json={"text": "a red circle", "index": "nope"})
        assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
        assert len(solved) == 5  # every request, the refused ones too
    finally:
        app.dependency_overrides.clear()  # type: ignore[attr-defined]


def test_scores_follow_the_order_when_only_the_head_is_reranked(client: TestClient) -> None:
    body = client.post("/v1/search", json={"text": "a small red circle left of a large blue square", "k": 30,
                                           "rerank": "mid", "rerank_k": 8}).json()
    hits = body["hits"]
    scores = [h["score"] for h in hits]
    assert len(hits) == 30 and scores == sorted(scores, reverse=True)
    assert all(h["rerank_score"] is not None for h in hits[:8]) and all(h["rerank_score"] is None for h in hits[8:])
    tail = [h["similarity"] for h in hits[8:]]
    assert tail == sorted(tail, reverse=True)  # past rerank_k, the dual encoder's order
    gaps = [a - b for a, b in zip(scores[8:], scores[9:], strict=False)]
    assert gaps == pytest.approx([a - b for a, b in zip(tail, tail[1:], strict=False)], abs=1e-5)


def test_a_hit_url_still_answers_after_its_image_is_removed_by_a_swap(index_dir: Path, tmp_path: Path) -> None:
    from indexer.build import remove

    folder = tmp_path / "idx"
    shutil.copytree(index_dir, folder)
    with TestClient(create_app(Settings(indexes=[f"scenes={folder}"], rerankers=[]))) as client:
        hit = client.post("/v1/search", json={"text": "a large green cross", "k": 1}).json()["hits"][0]
        assert hit["url"].endswith(f"&version={Index.open(folder).version}")
        remove(folder, ids=[hit["id"]])
        assert client.app.state.engine.swapper.refresh() == ["scenes"]  # type: ignore[attr-defined]
        assert client.get(hit["url"]).status_code == 200  # the version that answered still serves it
        assert client.get(f"/v1/images/{hit['id']}?index=scenes").status_code == 404  # the current one does not
        after = client.post("/v1/search", json={"text": "a large green cross", "k": 5}).json()
        assert hit["id"] not in [h["id"] for h in after["hits"]]


def test_health_ready_and_index_info(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "pid": os.getpid()}  # the app runs in this process
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["indexes"] == ["scenes"] and "mid" in ready["rerankers"]
    info = client.get("/v1/index").json()
    assert info["count"] == 60 and info["manifest"]["model"]["id"] == ready["model"]
    model = client.get("/v1/model").json()  # the embedded model: its words and queries it understands
    assert model["model"] == ready["model"] and "circle" in model["vocabulary"]["shapes"]
    assert "beside" in model["vocabulary"]["relations"] and len(model["examples"]) == 5


def test_service_refuses_an_index_of_another_model(index_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "other.safetensors"
    from indexer.encoder import create_embedded, save_checkpoint

    save_checkpoint(create_embedded(seed=5).model, tmp_path)
    (tmp_path / "open_clip_model.safetensors").rename(weights)
    with pytest.raises(StartupError, match="was built with model"):
        load_engine(Settings(indexes=[str(index_dir)], pretrained=str(weights)))
    with pytest.raises(StartupError, match="no index configured"):
        load_engine(Settings())


def test_a_tier_that_fails_to_load_is_reported_and_the_default_tier_must_load(index_dir: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), TestClient(
            create_app(Settings(indexes=[str(index_dir)], rerankers=["mid", "deepest"]))) as client:
        ready = client.get("/readyz").json()
    assert any("rerank tier deepest unavailable" in r.getMessage() for r in caplog.records)  # the server's log
    assert ready["status"] == "degraded" and ready["rerankers"] == ["none", "mid"]
    assert "deepest" in ready["failed_rerankers"] and "unknown rerank tier" in ready["failed_rerankers"]["deepest"]
    with pytest.raises(StartupError, match="IMSEARCH_DEFAULT_RERANK is 'early'.*not in IMSEARCH_RERANKERS"):
        load_engine(Settings(indexes=[str(index_dir)], rerankers=["mid"], default_rerank="early"))


def test_metrics_count_stages_per_rerank_tier_and_http_routes(client: TestClient) -> None:
    client.post("/v1/search", json={"text": "a small green cross", "k": 3, "rerank": "mid"})
    client.post("/v1/search", json={"text": "a small green cross", "k": 3})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for series in ('imsearch_stage_seconds_count{rerank="mid",stage="rerank"}',
                   'imsearch_stage_seconds_count{rerank="none",stage="encode"}',
                   'imsearch_http_request_seconds_count{method="POST",route="/v1/search",status="200"}',
                   'imsearch_batch_size_count{batcher="text"}'):
        line = next((row for row in text.splitlines() if row.startswith(series)), None)
        assert line is not None and float(line.split()[-1]) >= 1, series


def test_blocking_calls_go_to_the_request_pool(client: TestClient) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]

    async def threads() -> tuple[int, int]:
        return threading.get_ident(), await engine.run(threading.get_ident)

    loop, pool = asyncio.run(threads())
    assert pool != loop


def test_concurrent_searches_await_shared_batches_and_match_one_at_a_time(client: TestClient) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    texts = [f"a {size} {colour} circle left of a square" for size in ("small", "large")
             for colour in ("red", "blue", "green", "yellow", "purple", "orange", "white", "cyan")]
    one_by_one = [client.post("/v1/search", json={"text": t, "k": 5}).json() for t in texts]
    batches = engine.metrics.registry.get_sample_value("imsearch_batch_size_count", {"batcher": "text"})

    async def together() -> list[SearchOutput]:
        index = engine.index(None)
        return list(await asyncio.gather(*(engine.pipeline.search(index, QueryInput(text=t, k=5)) for t in texts)))

    for alone, joint in zip(one_by_one, asyncio.run(together()), strict=True):
        assert [h["id"] for h in alone["hits"]] == [h.id for h in joint.hits]
        assert [h["score"] for h in alone["hits"]] == pytest.approx([h.score for h in joint.hits], abs=1e-5)
    shared = engine.metrics.registry.get_sample_value("imsearch_batch_size_count", {"batcher": "text"}) - batches
    assert 1 <= shared < len(texts)  # the coroutines met in batches (waiting without a thread each)


def test_concurrent_reranked_searches_share_encodes_and_match_one_at_a_time(client: TestClient) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    texts = [f"a {colour} {shape} above a small white circle" for colour in ("red", "blue", "green", "yellow")
             for shape in ("square", "cross", "triangle")]
    one_by_one = [client.post("/v1/search", json={"text": t, "k": 5, "rerank": "mid"}).json() for t in texts]
    batches = engine.metrics.registry.get_sample_value("imsearch_batch_size_count", {"batcher": "text"})

    async def together() -> list[SearchOutput]:
        index, asked = engine.index(None), [QueryInput(text=t, k=5, rerank="mid") for t in texts]
        return list(await asyncio.gather(*(engine.pipeline.search(index, q) for q in asked)))

    for alone, joint in zip(one_by_one, asyncio.run(together()), strict=True):
        assert alone["rerank"] == "mid" and [h["id"] for h in alone["hits"]] == [h.id for h in joint.hits]
        assert [h["rerank_score"] for h in alone["hits"]] == pytest.approx([h.rerank_score for h in joint.hits],
                                                                           abs=1e-4)
        stages = sum(joint.timings_ms[stage] for stage in ("encode", "search", "rerank", "fetch"))
        assert joint.timings_ms["total"] == pytest.approx(stages, abs=0.01)  # the wait for a slot counts as rerank
    shared = engine.metrics.registry.get_sample_value("imsearch_batch_size_count", {"batcher": "text"}) - batches
    assert 1 <= shared < len(texts)  # queued behind a rerank, the texts met in one forward


def test_web_page_and_its_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "/static/app.js" in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/v1/search" in script.text
    assert client.get("/static/../config.py").status_code == 404
