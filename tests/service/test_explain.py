"""Explain: where the mid tier found each object the query names, on hand-made scenes, through the API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from reranker.model import Matcher, RerankerConfig, save_reranker
from reranker.score import Query, load_tier
from service.app import create_app
from service.config import Settings
from service.names import CACHE_PREFIX
from training.scenes import SIZES, Scene, SceneObject, object_position, render

REDIS_URL = "redis://127.0.0.1:6379/0"
# (file, scene, query, the object each located phrase names in order)
SCENES = {
    "pair.png": (Scene((SceneObject("red", "circle", "large", 0, 1), SceneObject("blue", "square", "small", 2, 1)),
                       "horizontal"), "a large red circle to the left of a small blue square", [0, 1]),
    "stack.png": (Scene((SceneObject("green", "triangle", "large", 1, 0),
                         SceneObject("yellow", "cross", "large", 1, 2)), "vertical"),
                  "A yellow cross below a green triangle.", [1, 0]),
    "corner.png": (Scene((SceneObject("purple", "diamond", "small", 2, 1),), "single"), "a purple diamond", [0]),
    "trio.png": (Scene((SceneObject("orange", "square", "large", 0, 1), SceneObject("cyan", "circle", "small", 1, 1),
                        SceneObject("white", "triangle", "large", 2, 1)), "horizontal"),
                 "a white triangle right of a small cyan circle", [2, 1]),
}


@pytest.fixture(scope="module")
def index_dir(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explain")
    (root / "src").mkdir()
    for name, (scene, _, _) in SCENES.items():
        render(scene, 64).save(root / "src" / name)
    build_or_add(root / "src", root / "idx", encoder, BuildOptions(workers=0), "build")
    return root / "idx"


def _inside(obj: SceneObject, x: float, y: float) -> bool:
    (cx, cy), half = object_position(obj), SIZES[obj.size]
    return abs(x - cx) <= half and abs(y - cy) <= half


def _search(client: TestClient, **body: object) -> dict:
    answer = client.post("/v1/search", json={"k": len(SCENES), "rerank": "mid", "explain": True, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_each_named_object_is_located_inside_it(index_dir: Path) -> None:
    with TestClient(create_app(Settings(indexes=[f"s={index_dir}"], rerankers=["mid"], redis_url=None))) as client:
        for name, (scene, text, named) in SCENES.items():
            hit = next(h for h in _search(client, text=text)["hits"] if h["path"] == name)
            phrases = [p["phrase"] for p in hit["explain"]]
            assert len(phrases) == len(named), (text, hit["explain"])
            for place, i in zip(hit["explain"], named, strict=True):
                obj = scene.objects[i]
                assert place["phrase"].endswith(obj.shape) and obj.colour in place["phrase"], (text, place)
                assert _inside(obj, place["x"], place["y"]), (text, place, obj)


def test_explain_needs_a_tier_with_a_grounding_head(index_dir: Path, encoder: DualEncoder, tmp_path: Path) -> None:
    plain = Matcher(RerankerConfig(kind="mid", layers=1, width=64, text_width=128, image_width=encoder.token_shape[1],
                                   image_tokens=encoder.token_shape[0], encoder_id=encoder.model_id))
    save_reranker(plain, tmp_path / "reranker-mid.safetensors")  # trained without grounding: cannot say where
    settings = Settings(indexes=[f"s={index_dir}"], rerankers=["mid"], redis_url=None)
    with TestClient(create_app(settings)) as client:
        none = client.post("/v1/search", json={"text": "a red circle", "rerank": "none", "explain": True})
        assert none.status_code == 422 and "pick a rerank tier" in none.json()["detail"]
        without = client.post("/v1/search", json={"text": "a red circle", "rerank": "mid"})
        assert all(h["explain"] is None for h in without.json()["hits"])
    settings = Settings(indexes=[f"s={index_dir}"], rerankers=[f"mid={tmp_path / 'reranker-mid.safetensors'}"],
                        redis_url=None)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/search", json={"text": "a red circle", "rerank": "mid", "explain": True})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"] == "the mid tier cannot explain its matches; tiers that can: none"


@pytest.fixture()
def clean_redis() -> Iterator[None]:
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{CACHE_PREFIX}*"):
        client.delete(key)
    yield
    for key in client.scan_iter(f"{CACHE_PREFIX}*"):
        client.delete(key)
    client.close()


def test_a_cached_answer_keeps_its_explain_and_is_not_served_to_a_query_without(index_dir: Path,
                                                                               clean_redis: None) -> None:
    text = SCENES["pair.png"][1]
    with TestClient(create_app(Settings(indexes=[f"s={index_dir}"], rerankers=["mid"], redis_url=REDIS_URL))) as client:
        first, again = _search(client, text=text), _search(client, text=text)
        plain = _search(client, text=text, explain=False)
    assert again["cached"] and again["hits"] == first["hits"] and first["hits"][0]["explain"]
    assert not plain["cached"] and all(h["explain"] is None for h in plain["hits"])


def test_phrases_are_the_nouns_with_their_modifiers_as_the_head_knows_them(encoder: DualEncoder) -> None:
    mid = load_tier("mid", encoder)
    _, tokens = encoder.encode_images_and_tokens([render(SCENES["pair.png"][0], 64)])

    def phrases(text: str) -> list[str]:
        _, t, m = encoder.encode_texts_and_tokens([text])
        return [p.phrase for p in mid.explain(Query(text, t[0], m[0]), tokens)[0]]

    assert phrases("Large RED circle, left of a small blue square!") == ["large red circle", "small blue square"]
    assert phrases("a red shape") == ["red shape"]  # "shape": an object whose shape the text leaves out
    assert phrases("two red shapes") == []  # a count names no one object
    assert phrases("a cat on a sofa") == []  # outside the vocabulary the head was trained on
    _, t, m = encoder.encode_texts_and_tokens(["a red circle"])
    assert mid.explain(Query("a red circle", t[0], m[0]), np.zeros((0, *encoder.token_shape), np.float16)) == []
