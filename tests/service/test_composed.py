"""Composed queries: texts and images with weights (negative: less like it) on the API and the CLI."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from imsearch.cli import app as cli
from indexer.encoder import DualEncoder
from indexer.reader import decode_image
from service.app import create_app
from service.config import Settings
from tests.listing import index_with_columns


@pytest.fixture(scope="module")
def index_dir(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return index_with_columns(encoder, tmp_path_factory.mktemp("composed"), 20, 67)


@pytest.fixture(scope="module")
def client(index_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(indexes=[f"s={index_dir}"], rerankers=["mid"], redis_url=None))) as c:
        yield c


def _search(client: TestClient, body: dict) -> list[tuple[int, float]]:
    answer = client.post("/v1/search", json={"k": 8, **body})
    assert answer.status_code == 200, answer.text
    return [(h["id"], h["similarity"]) for h in answer.json()["hits"]]


def test_a_composed_query_is_the_weighted_sum_of_its_parts(client: TestClient, encoder: DualEncoder,
                                                           index_dir: Path) -> None:
    picture = sorted((index_dir.parent / "src").glob("*.png"))[3]
    terms = [("a red circle", None, 1.0), (None, picture.read_bytes(), 0.5), ("a blue square", None, -0.5)]
    parts = [encoder.encode_texts([t])[0] if t else encoder.encode_images([decode_image(i)])[0] for t, i, _ in terms]
    total = sum(w * v.astype(np.float64) for (_, _, w), v in zip(terms, parts, strict=True))
    expected = (total / np.linalg.norm(total)).astype(np.float32)
    body = [{"text": t, "weight": w} if t else {"image": base64.b64encode(i).decode(), "weight": w}
            for t, i, w in terms]
    composed = _search(client, {"terms": body})
    by_vector = _search(client, {"embedding": expected.tolist()})
    assert [i for i, _ in composed] == [i for i, _ in by_vector]
    np.testing.assert_allclose([s for _, s in composed], [s for _, s in by_vector], atol=1e-4)
    assert composed != _search(client, {"text": "a red circle"})  # the other terms moved the query
    # a single text, whatever its weight, is that text's query
    assert [i for i, _ in _search(client, {"terms": [{"text": "a red circle", "weight": 3}]})] == \
        [i for i, _ in _search(client, {"text": "a red circle"})]


def test_a_composed_query_is_reranked_against_its_one_positive_text(client: TestClient, index_dir: Path) -> None:
    picture = sorted((index_dir.parent / "src").glob("*.png"))[3]
    terms = [{"image": base64.b64encode(picture.read_bytes()).decode(), "weight": 1},
             {"text": "a red circle", "weight": 1}, {"text": "a blue square", "weight": -0.5}]
    body = {"terms": terms, "k": 8, "rerank_k": 8}
    fast = client.post("/v1/search", json=body).json()
    deep = client.post("/v1/search", json={**body, "rerank": "mid"}).json()
    assert deep["reranked"] and {h["id"] for h in deep["hits"]} == {h["id"] for h in fast["hits"]}  # its candidates
    # scored against "a red circle": each image's log p(match) is the text query's own for that image
    text = client.post("/v1/search", json={"text": "a red circle", "k": 40, "rerank": "mid", "rerank_k": 40}).json()
    by_text = {h["id"]: h["rerank_score"] for h in text["hits"]}
    shared = [h for h in deep["hits"] if h["id"] in by_text]
    assert shared and all(abs(h["rerank_score"] - by_text[h["id"]]) < 1e-4 for h in shared)
    assert [h["id"] for h in deep["hits"]] != [h["id"] for h in fast["hits"]]  # the reranker re-ordered them


@pytest.mark.parametrize(("body", "needle"), [
    ({"terms": [{"text": "a red circle"}, {"text": "a red circle", "weight": -1}]}, "cancel out"),
    ({"terms": [{"text": "a red circle"}, {"text": "a blue square"}], "rerank": "mid"}, "exactly one text of positive"),
    ({"terms": [{"image": "AAAA"}, {"text": "a blue square", "weight": -1}], "rerank": "mid"}, "reranking needs"),
    ({"terms": [{"text": "a", "image": "AAAA"}]}, "exactly one of text or image"),
    ({"terms": [{"text": "a", "weight": 0}]}, "must not be 0"),
    ({"terms": [{"image": "not base64!"}]}, "base64"),
    ({"terms": []}, "terms"),
    ({"terms": [{"text": "a"}], "text": "b"}, "exactly one of text, image, embedding or terms"),
])
def test_a_composed_query_that_cannot_run_is_a_422_that_says_why(client: TestClient, body: dict, needle: str) -> None:
    answer = client.post("/v1/search", json=body)
    assert answer.status_code == 422 and needle in answer.json()["detail"], answer.text


def test_the_cli_composes_text_and_image_terms(index_dir: Path) -> None:
    picture = sorted((index_dir.parent / "src").glob("*.png"))[3]
    runner = CliRunner()
    done = runner.invoke(cli, ["search", "a red circle", "--index", str(index_dir), "--json", "-k", "3",
                               "--term", f"0.5:@{picture}", "--term", "-0.5:a blue square"])
    assert done.exit_code == 0, done.output
    assert len(json.loads(done.stdout)["hits"]) == 3
    bad = runner.invoke(cli, ["search", "--index", str(index_dir), "--term", "0:a blue square"])
    assert bad.exit_code == 2 and "non-zero weight" in bad.output
