"""Search pipeline: text, image and embedding queries, rerank tiers, timings, clear errors for bad queries."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.store import Index
from reranker.score import Located, Query, Reranker, load_tier
from service.config import Settings
from service.metrics import Metrics
from service.pipeline.batcher import Overloaded
from service.pipeline.cache import QueryCache
from service.pipeline.query import QueryInput, SearchOutput
from service.pipeline.search import Pipeline
from service.pipeline.stages import BadQuery
from training.scenes import write_scenes


@pytest.fixture(scope="module")
def index(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Index:
    root = tmp_path_factory.mktemp("svc")
    write_scenes(root / "src", 40, seed=51, twins=True)
    build_or_add(root / "src" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0), "build")
    return Index.open(root / "idx")


@pytest.fixture(scope="module")
def rerankers(encoder: DualEncoder) -> dict[str, Reranker]:
    return {"mid": load_tier("mid", encoder)}


def make_pipeline(encoder: DualEncoder, rerankers: dict[str, Any], **settings: Any) -> Pipeline:
    return Pipeline(encoder, rerankers, QueryCache(None, 1), Metrics(), Settings(**settings))


@pytest.fixture(scope="module")
def pipeline(encoder: DualEncoder, rerankers: dict[str, Reranker]) -> Iterator[Pipeline]:
    out = make_pipeline(encoder, rerankers)
    yield out
    out.close()


@pytest.fixture(scope="module")
def search(pipeline: Pipeline, index: Index) -> Callable[[QueryInput], SearchOutput]:
    """One query at a time, as a blocking call."""
    return lambda q: asyncio.run(pipeline.search(index, q))


def test_text_search_returns_hits_with_metadata_and_timings(search, index) -> None:
    caption = index.metadata(index.ids()[:1])[0]["caption"]
    out = search(QueryInput(text=caption, k=5))
    assert len(out.hits) == 5 and out.index_version == index.version
    assert [h.score for h in out.hits] == sorted((h.score for h in out.hits), reverse=True)
    assert all(h.rerank_score is None and h.meta["path"] for h in out.hits)
    assert set(out.timings_ms) == {"encode", "search", "rerank", "fetch", "total"} and out.timings_ms["rerank"] < 1.0


def test_rerank_reorders_only_the_head_and_reports_scores(search, index) -> None:
    caption = index.metadata(index.ids()[:1])[0]["caption"]
    fast = search(QueryInput(text=caption, k=20))
    deep = search(QueryInput(text=caption, k=20, rerank="mid", rerank_k=8))
    assert {h.id for h in deep.hits[:8]} == {h.id for h in fast.hits[:8]}  # same candidates, new order
    assert [h.id for h in deep.hits[8:]] == [h.id for h in fast.hits[8:]]
    assert all(h.rerank_score is not None for h in deep.hits[:8])
    assert all(h.rerank_score is None for h in deep.hits[8:])
    head = [h.score for h in deep.hits[:8]]
    assert head == sorted(head, reverse=True)


def test_image_and_embedding_queries(search, index) -> None:
    row = index.metadata(index.ids()[3:4])[0]
    data = Path(row["path"]).read_bytes()
    out = search(QueryInput(image=data, k=1))
    assert out.hits[0].id == row["id"]
    vector = index.vectors([row["id"]])[0] * 3.0  # any scale: normalised on the way in
    out = search(QueryInput(embedding=vector.tolist(), k=1))
    assert out.hits[0].id == row["id"] and out.hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    huge = (index.vectors([row["id"]])[0].astype(np.float64) * 1e38).tolist()  # beyond float32: no overflow
    assert search(QueryInput(embedding=huge, k=1)).hits[0].id == row["id"]


def test_min_similarity_filters(search, index) -> None:
    out = search(QueryInput(text="a small red circle", k=50, min_similarity=0.99))
    assert all(h.similarity >= 0.99 for h in out.hits)


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        (QueryInput(embedding=[0.1, 0.2]), "dimensions"),
        (QueryInput(embedding=[0.0] * 128), "non-zero"),
        (QueryInput(embedding=[float("inf")] + [0.0] * 127), "finite"),
        (QueryInput(embedding=[1e308] * 128), "finite"),  # its norm overflows
        (QueryInput(image=b"not an image"), "image:"),
        (QueryInput(text="a red circle", rerank="deepest"), "not loaded"),
        (QueryInput(embedding=[1.0] * 128, rerank="mid"), "needs a text query"),
    ],
)
def test_bad_queries_are_client_errors(search, query: QueryInput, needle: str) -> None:
    with pytest.raises(BadQuery, match=needle):
        search(query)


def test_pixel_bomb_query_is_refused_and_its_batch_neighbour_answered(encoder, index) -> None:
    from PIL import Image

    small = make_pipeline(encoder, {}, max_pixels=10_000)
    bomb, fine = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (300, 300)).save(bomb, format="PNG")
    Image.new("RGB", (90, 90), "red").save(fine, format="PNG")

    async def both() -> list[SearchOutput | BaseException]:
        queries = [QueryInput(image=bomb.getvalue()), QueryInput(image=fine.getvalue(), k=1)]
        return await asyncio.gather(*(small.search(index, q) for q in queries), return_exceptions=True)

    refused, answered = asyncio.run(both())
    small.close()
    assert isinstance(refused, BadQuery) and "decompression bomb" in str(refused)
    assert isinstance(answered, SearchOutput) and len(answered.hits) == 1


class _Overlaps:
    """A reranker that records how many of its calls ran at the same time."""

    name = "probe"

    def __init__(self, inner: Reranker):
        self.inner, self.running, self.most = inner, 0, 0
        self.fusion_weight = inner.fusion_weight
        self.features, self.feature_model, self.text_from_encoder = inner.features, inner.feature_model, True
        self.feature_shape, self.side = inner.feature_shape, inner.side
        self.lock = threading.Lock()

    def prepare(self, text: str) -> Query:
        return self.inner.prepare(text)

    def rescore(self, query: Query, image_tokens: np.ndarray, prepared: bool = False,
                explain: bool = False) -> tuple[np.ndarray, list[list[Located]] | None]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return self.inner.rescore(query, image_tokens, prepared, explain)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_reranked_queries_run_at_most_the_workers_reranks_at_once_with_the_same_results(
        encoder, index, rerankers, search, workers: int) -> None:
    probe = _Overlaps(rerankers["mid"])
    pipeline = make_pipeline(encoder, {"mid": probe}, rerank_slots=workers, max_batch=4)
    texts = [row["caption"] for row in index.metadata(index.ids()[:12])]
    asked = [QueryInput(text=text, k=5, rerank="mid", rerank_k=16) for text in texts]

    async def together() -> list[SearchOutput]:
        return list(await asyncio.gather(*(pipeline.search(index, q) for q in asked)))

    joint = asyncio.run(together())
    pipeline.close()
    assert probe.most == workers  # never more at once, although twelve queries asked together
    for q, out in zip(asked, joint, strict=True):
        alone = search(q)  # one query at a time, by the reranker the probe wraps
        assert [h.id for h in out.hits] == [h.id for h in alone.hits]
        np.testing.assert_allclose([h.rerank_score for h in out.hits], [h.rerank_score for h in alone.hits],
                                   rtol=1e-5, atol=1e-5)
        assert out.timings_ms["total"] >= out.timings_ms["rerank"] > 0


def test_a_large_rerank_in_steps_equals_one_call_and_a_full_tier_refuses(encoder, index, rerankers) -> None:
    pipeline = make_pipeline(encoder, rerankers, rerank_slots=2, max_batch=4, rerank_queue=80)
    text = index.metadata(index.ids()[:1])[0]["caption"]
    big = QueryInput(text=text, k=70, rerank="mid", rerank_k=70)  # three steps of 32

    async def crowd() -> list[SearchOutput | BaseException]:
        first = asyncio.ensure_future(pipeline.search(index, big))
        await asyncio.sleep(0)  # admitted: 70 of the 80 candidates the tier may queue
        return await asyncio.gather(first, pipeline.search(index, big), return_exceptions=True)

    stepped, refused = asyncio.run(crowd())
    assert isinstance(refused, Overloaded) and refused.retry_after_s >= 1 and "queued ahead" in str(refused)
    assert isinstance(stepped, SearchOutput)
    steps = pipeline.metrics.registry.get_sample_value("imsearch_batch_size_count", {"batcher": "rerank"})
    assert steps == 3
    ids = np.asarray([h.id for h in stepped.hits])
    log_p = rerankers["mid"].log_match(rerankers["mid"].prepare(text), index.tokens(ids))  # in one call
    np.testing.assert_allclose([h.rerank_score for h in stepped.hits], log_p, rtol=1e-4, atol=1e-4)
    small = asyncio.run(pipeline.search(index, QueryInput(text=text, k=5, rerank="mid", rerank_k=16)))
    assert len(small.hits) == 5 and pipeline.admission.queued("mid") == 0
    pipeline.close()

