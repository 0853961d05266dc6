"""Filters on the search API and the CLI: every hit meets them, k hits whenever k match, bad ones are 422s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from imsearch.cli import app as cli
from indexer.encoder import DualEncoder
from service.app import create_app
from service.config import Settings
from tests.listing import index_with_columns


@pytest.fixture(scope="module")
def index_dir(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def columns(i: int, row: dict[str, Any]) -> None:
        row.update(album="work" if i % 4 == 0 else "home", rating=i % 5)

    return index_with_columns(encoder, tmp_path_factory.mktemp("filter-api"), 20, 63, columns)


@pytest.fixture(scope="module")
def client(index_dir: Path) -> TestClient:
    with TestClient(create_app(Settings(indexes=[f"s={index_dir}"], rerankers=["mid"], redis_url=None))) as c:
        yield c


def _hits(client: TestClient, body: dict) -> list[dict]:
    answer = client.post("/v1/search", json={"text": "a red circle", **body})
    assert answer.status_code == 200, answer.text
    return answer.json()["hits"]


def test_every_hit_meets_the_filter_and_k_hits_come_back_when_k_match(client: TestClient) -> None:
    hits = _hits(client, {"k": 10, "filter": {"where": {"album": "work"}}})
    ids = {h["id"] for h in hits}
    assert len(hits) == 10 and all(i % 4 == 0 for i in ids)  # ids follow the listing's order
    reranked = _hits(client, {"k": 5, "rerank": "mid", "filter": {"caption_contains": "RED",
                                                                  "where": {"rating": {"gte": 2, "lte": 3}}}})
    assert reranked and all("red" in h["caption"] and h["id"] % 5 in (2, 3) for h in reranked)
    assert all(h["rerank_score"] is not None for h in reranked)
    assert _hits(client, {"filter": {"path_glob": "*/nothing-*.png"}}) == []


@pytest.mark.parametrize(("flt", "needle"), [
    ({"where": {"colour": "red"}}, "unknown metadata field 'colour'"),
    ({"where": {"rating": "high"}}, "holds numbers"),
    ({"where": {"rating": {}}}, "a range takes gte, gt, lte and lt"),
    ({"where": {"rating": {"above": 1}}}, "above"),
    ({"colour": "red"}, "colour"),
    ({"where": {"rating": [1, 2]}}, "where.rating holds numbers"),
])
def test_a_filter_that_cannot_apply_is_a_422_that_says_why(client: TestClient, flt: dict, needle: str) -> None:
    answer = client.post("/v1/search", json={"text": "a red circle", "filter": flt})
    assert answer.status_code == 422 and needle in answer.json()["detail"], answer.text


def test_the_cli_filters_with_where_path_glob_and_caption_contains(index_dir: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(cli, ["search", "a red circle", "--index", str(index_dir), "-k", "20", "--json",
                               "--where", "album=work", "--where", "rating>=1", "--where", "rating<4"])
    assert done.exit_code == 0, done.output
    hits = json.loads(done.stdout)["hits"]
    assert hits and all(h["id"] % 4 == 0 and 1 <= h["id"] % 5 < 4 for h in hits)
    ordered = runner.invoke(cli, ["search", "a red circle", "--index", str(index_dir), "-k", "8", "--json",
                                  "--order-by", "rating", "--descending", "--min-score-ratio", "0.5",
                                  "--rerank", "auto"])
    assert ordered.exit_code == 0, ordered.output
    ratings = [h["id"] % 5 for h in json.loads(ordered.stdout)["hits"]]
    assert len(ratings) == 8 and ratings == sorted(ratings, reverse=True)
    bad = runner.invoke(cli, ["search", "x", "--index", str(index_dir), "--where", "rating"])
    assert bad.exit_code == 2 and "write FIELD=VALUE" in bad.output
    unknown = runner.invoke(cli, ["search", "x", "--index", str(index_dir), "--where", "colour=red"])
    assert unknown.exit_code == 2 and "unknown metadata field 'colour'" in unknown.output


def test_hits_order_by_a_source_column_inside_a_filter(client: TestClient) -> None:
    hits = _hits(client, {"k": 10, "filter": {"where": {"album": "home"}},
                          "order_by": {"field": "rating", "descending": True}})
    ratings = [h["id"] % 5 for h in hits]  # rating = the row's number mod 5; ids follow the listing
    assert len(hits) == 10 and ratings == sorted(ratings, reverse=True) and all(h["id"] % 4 for h in hits)


def test_an_uploaded_image_query_takes_the_same_filter(client: TestClient, index_dir: Path) -> None:
    picture = sorted((index_dir.parent / "src").glob("*.png"))[1].read_bytes()
    flt = json.dumps({"where": {"album": "work"}})
    answer = client.post("/v1/search/image", files={"file": ("q.png", picture)}, data={"k": "5", "filter": flt})
    assert answer.status_code == 200, answer.text
    hits = answer.json()["hits"]
    assert len(hits) == 5 and all(h["id"] % 4 == 0 for h in hits)
    for bad, needle in (("{not json", "filter"), (json.dumps({"where": {"colour": 1}}), "unknown metadata field")):
        refused = client.post("/v1/search/image", files={"file": ("q.png", picture)}, data={"filter": bad})
        assert refused.status_code == 422 and needle in refused.json()["detail"], refused.text
