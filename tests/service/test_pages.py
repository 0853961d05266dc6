"""Relevance and order: a cutoff relative to the best hit, and pages (a cursor) that keep the index version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from service.app import create_app
from service.config import Settings
from service.pipeline.query import QueryInput
from service.routes.search import Page
from training.scenes import write_scenes

QUERY = {"text": "a red circle above a blue square", "k": 5}


@pytest.fixture()
def served(encoder: DualEncoder, tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    build_or_add(write_scenes(tmp_path / "src", 15, seed=71, twins=True), tmp_path / "idx", encoder,
                 BuildOptions(workers=0), "build")
    settings = Settings(indexes=[f"s={tmp_path / 'idx'}"], rerankers=["mid"], redis_url=None, max_k=20)
    with TestClient(create_app(settings)) as client:
        yield client, tmp_path


def _post(client: TestClient, body: dict) -> dict:
    answer = client.post("/v1/search", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_pages_follow_one_another_without_repeats_or_gaps(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    for extra in ({}, {"rerank": "mid", "rerank_k": 8}):  # reranked pages too: the head is reranked once
        whole = [h["id"] for h in _post(client, {**QUERY, **extra, "k": 20})["hits"]]
        pages = [_post(client, {**QUERY, **extra})]
        while pages[-1]["next_cursor"]:
            pages.append(_post(client, {**QUERY, **extra, "cursor": pages[-1]["next_cursor"]}))
        ids = [h["id"] for page in pages for h in page["hits"]]
        assert len(pages) == 4 and ids == whole and len(set(ids)) == 20  # a fifth page would end past max_k


def test_a_page_keeps_the_version_of_the_first_across_a_swap(served: tuple[TestClient, Path],
                                                             encoder: DualEncoder) -> None:
    client, root = served
    whole = [h["id"] for h in _post(client, {**QUERY, "k": 10})["hits"]]
    first = _post(client, QUERY)
    build_or_add(write_scenes(root / "more", 15, seed=72, twins=True), root / "idx", encoder,
                 BuildOptions(workers=0), "add")
    assert client.app.state.engine.swapper.refresh() == ["s"]  # the new version is served now
    second = _post(client, {**QUERY, "cursor": first["next_cursor"]})
    assert second["index_version"] == first["index_version"]
    assert [h["id"] for h in first["hits"] + second["hits"]] == whole
    assert _post(client, QUERY)["index_version"] != first["index_version"]


@pytest.mark.parametrize(("cursor", "status", "needle"), [
    ("not a cursor", 422, "not one this service gave"),
    (Page.after(QueryInput(text="another query", k=5), "v000001", 5), 422, "pages another query"),
    (Page.after(QueryInput(text=QUERY["text"], k=5), "v000001", 18), 422, "at most 20 hits deep"),
    (Page.after(QueryInput(text=QUERY["text"], k=5), "v000009", 5), 410, "v000009 is no longer served"),
])
def test_a_cursor_that_cannot_page_says_why(served: tuple[TestClient, Path], cursor: str, status: int,
                                            needle: str) -> None:
    client, _ = served
    answer = client.post("/v1/search", json={**QUERY, "cursor": cursor})
    assert answer.status_code == status and needle in answer.json()["detail"], answer.text


def test_a_relevance_cutoff_keeps_hits_near_the_best(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    every = _post(client, {**QUERY, "k": 15})["hits"]
    best = every[0]["similarity"]
    kept = _post(client, {**QUERY, "k": 15, "min_score_ratio": 0.97})["hits"]
    assert kept == [h for h in every if h["similarity"] >= 0.97 * best] and 0 < len(kept) < 15
    assert client.post("/v1/search", json={**QUERY, "min_score_ratio": 0}).status_code == 422


def test_order_by_reorders_the_recalled_hits_by_a_metadata_field(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    recalled = _post(client, {**QUERY, "k": 12})["hits"]
    ordered = _post(client, {**QUERY, "k": 12, "order_by": {"field": "path", "descending": True}})
    assert [h["path"] for h in ordered["hits"]] == sorted((h["path"] for h in recalled), reverse=True)
    assert ordered["next_cursor"] is None  # one recalled set, in another order: no pages of it
    unknown = client.post("/v1/search", json={**QUERY, "order_by": {"field": "taken"}})
    assert unknown.status_code == 422 and "unknown metadata field 'taken'" in unknown.json()["detail"]
