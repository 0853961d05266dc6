"""clip-retrieval compatibility: requests exactly as ClipClient and the web front send them."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.store import Index
from service.app import create_app
from service.config import Settings
from training.scenes import write_scenes


def client_body(**overrides: object) -> dict[str, object]:
    """All 14 keys, unused ones null, as clip_retrieval.clip_client.ClipClient sends them."""
    body: dict[str, object] = {
        "text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
        "use_safety_model": False, "use_violence_detector": False, "indice_name": "scenes", "use_mclip": False,
        "aesthetic_score": None, "aesthetic_weight": None, "modality": "image", "num_images": 4,
        "num_result_ids": 10,
    }
    return {**body, **overrides}


@pytest.fixture(scope="module")
def index_dir(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clipback")
    manifest = write_scenes(root / "src", 24, seed=81, twins=True)
    build_or_add(manifest, root / "idx", encoder, BuildOptions(workers=0), "build")
    first = json.loads(manifest.read_text().splitlines()[0])
    copy = root / "copy.jpg"  # the same picture re-encoded: a near duplicate with other bytes
    Image.open(root / "src" / first["file"]).save(copy, quality=95)
    (root / "more.txt").write_text(f"{copy}\n")
    build_or_add(root / "more.txt", root / "idx", encoder, BuildOptions(workers=0), "add")
    return root / "idx"


@pytest.fixture(scope="module")
def client(index_dir: Path) -> Iterator[TestClient]:
    settings = Settings(indexes=[f"scenes={index_dir}", f"other={index_dir}"], rerankers=[])
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def knn(client: TestClient, body: dict[str, object], content_type: str | None = None):  # noqa: ANN201
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post("/knn-service", content=json.dumps(body), headers=headers)


def test_indices_list(client: TestClient) -> None:
    assert client.get("/indices-list").json() == ["scenes", "other"]


def test_text_query_without_content_type_returns_the_flat_list(client: TestClient) -> None:
    response = knn(client, client_body(text="a large red circle", deduplicate=False))
    assert response.status_code == 200, response.text
    items = response.json()
    assert len(items) == 10 and all(isinstance(i["id"], int) for i in items)
    sims = [i["similarity"] for i in items]
    assert sims == sorted(sims, reverse=True)
    for item in items[:4]:
        assert {"id", "similarity", "url", "caption", "image_path", "image"} <= set(item)
        assert base64.b64decode(item["image"])[:3] == b"\xff\xd8\xff"  # a JPEG
    assert all(set(i) == {"id", "similarity"} for i in items[4:])


def test_web_front_text_plain_and_image_and_embedding_queries(client: TestClient, index_dir: Path) -> None:
    index = Index.open(index_dir)
    row = index.metadata(index.ids()[5:6])[0]
    image = base64.b64encode(Path(row["path"]).read_bytes()).decode()
    by_image = knn(client, client_body(image=image, num_images=1, num_result_ids=1), "text/plain;charset=UTF-8")
    assert by_image.status_code == 200 and by_image.json()[0]["id"] == row["id"]
    vector = index.vectors([row["id"]])[0].tolist()
    by_vector = knn(client, client_body(embedding_input=vector, num_images=1, num_result_ids=None))
    assert by_vector.json()[0]["id"] == row["id"] and len(by_vector.json()) == 1


def test_deduplicate_drops_the_re_encoded_copy(client: TestClient, index_dir: Path) -> None:
    index = Index.open(index_dir)
    copy_id = int(index.ids()[-1])
    vector = index.vectors([copy_id])[0].tolist()
    plain = knn(client, client_body(embedding_input=vector, deduplicate=False)).json()
    deduped = knn(client, client_body(embedding_input=vector, deduplicate=True)).json()
    assert plain[1]["similarity"] > 0.995  # the copy and its original are both there
    assert len(deduped) == 10 and deduped[0]["id"] == plain[0]["id"]
    vectors = index.vectors([i["id"] for i in deduped])
    cos = vectors @ vectors.T
    assert (cos[~np.eye(len(cos), dtype=bool)] < 0.995).all()


def test_aesthetic_fields_accept_empty_null_and_numeric_strings(client: TestClient) -> None:
    for score, weight in ((None, None), ("", ""), ("9", "0.5"), (9, 0.5)):
        body = client_body(text="a blue square", aesthetic_score=score, aesthetic_weight=weight)
        assert knn(client, body).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ("{not json", 422, "JSON"),
        (client_body(text="a", modality="text"), 422, "caption index"),
        (client_body(image_url="http://example.com/cat.jpg"), 422, "image_url"),
        (client_body(text="a", aesthetic_score="high"), 422, "aesthetic_score"),
        (client_body(text="a", indice_name="nope"), 404, "nope"),
        ({"text": "a"}, 422, "num_images"),
        (client_body(), 422, "one of"),
        (client_body(image="%%%"), 422, "base64"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(client: TestClient, body: object, status: int, needle: str) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/knn-service", content=raw)
    assert response.status_code == status and needle in response.json()["detail"]


def test_metadata_pages_lazily_and_skips_unknown_ids(client: TestClient, index_dir: Path) -> None:
    ids = [int(i) for i in Index.open(index_dir).ids()[:3]]
    response = client.post("/metadata", content=json.dumps({"ids": [*ids, 987654], "indice_name": "other"}))
    assert response.status_code == 200
    rows = response.json()
    assert [r["id"] for r in rows] == ids
    assert all(r["metadata"]["caption"] and "index=other&version=v" in r["metadata"]["url"] for r in rows)
