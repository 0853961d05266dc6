"""rerank "auto": the margin gate's decision on hand-made margins, and the pipeline following it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.encoder import DualEncoder
from reranker.gate import auto_depth
from service.app import create_app
from service.config import Settings
from tests.listing import index_with_columns

QUERY = {"text": "a small red circle left of a large blue square", "k": 6, "rerank_k": 12}


@pytest.mark.parametrize(("cosine", "margin", "depth"), [
    ([0.80, 0.79, 0.5], 0.02, 2),  # the best two within the margin: a twin may be first; the third is clearly out
    ([0.80, 0.79, 0.785, 0.781, 0.5], 0.02, 4),  # every candidate close to the best
    ([0.80, 0.70, 0.5], 0.02, 0),  # clearly apart: the dual encoder's answer stands
    ([0.80, 0.78], 0.02, 0),  # exactly the margin apart is apart
    ([0.80], 0.02, 0),  # nothing to confuse it with
    ([], 0.02, 0),
])
def test_auto_reranks_only_the_candidates_not_clearly_apart_from_the_best(cosine: list[float], margin: float,
                                                                          depth: int) -> None:
    assert auto_depth(np.array(cosine, np.float32), margin) == depth


@pytest.fixture(scope="module")
def index_dir(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return index_with_columns(encoder, tmp_path_factory.mktemp("auto"), 15, 73)


def _answer(index_dir: Path, margin: float, rerank: str) -> dict:
    settings = Settings(indexes=[f"s={index_dir}"], rerankers=["mid"], redis_url=None, auto_margin=margin)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["auto"] == "mid"
        answer = client.post("/v1/search", json={**QUERY, "rerank": rerank})
        assert answer.status_code == 200, answer.text
        return answer.json()


def test_auto_reranks_with_mid_when_the_gate_opens_and_answers_fast_when_it_does_not(index_dir: Path) -> None:
    opened, closed = _answer(index_dir, 2.0, "auto"), _answer(index_dir, 0.0, "auto")
    assert opened["reranked"] and opened["rerank"] == "auto" and not closed["reranked"]
    assert opened["hits"] == _answer(index_dir, 0.0, "mid")["hits"]  # the mid tier's answer, whatever the margin
    assert closed["hits"] == _answer(index_dir, 0.0, "none")["hits"]  # the dual encoder's
    assert all(h["rerank_score"] is None for h in closed["hits"]) and closed["timings_ms"]["rerank"] < 1.0


def test_auto_reranks_only_the_head_within_the_margin_and_keeps_the_rest_in_order(index_dir: Path) -> None:
    fast = _answer(index_dir, 0.0, "none")["hits"]
    gaps = [fast[0]["similarity"] - h["similarity"] for h in fast]
    assert gaps[2] < gaps[3]
    margin = (gaps[2] + gaps[3]) / 2  # the best three are within it
    auto = _answer(index_dir, margin, "auto")
    assert auto["reranked"] and [h["rerank_score"] is not None for h in auto["hits"]] == [True] * 3 + [False] * 3
    assert {h["id"] for h in auto["hits"][:3]} == {h["id"] for h in fast[:3]}  # the head, reordered by mid
    assert [h["id"] for h in auto["hits"][3:]] == [h["id"] for h in fast[3:6]]  # the rest: the dual encoder's order


def test_auto_without_its_tier_is_a_422_that_says_which(index_dir: Path) -> None:
    settings = Settings(indexes=[f"s={index_dir}"], rerankers=["early"], redis_url=None)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["auto"] is None
        answer = client.post("/v1/search", json={**QUERY, "rerank": "auto"})
        assert answer.status_code == 422 and "auto reranks with the mid tier" in answer.json()["detail"]
