"""Service pipeline, stages: encode, ANN search and rerank, each a plain batch function (pre → core → post)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import faiss
import numpy as np

from indexer.encoder import DualEncoder
from indexer.filters import Selection
from indexer.reader import decode_image
from indexer.store import Index
from reranker.score import Located, Query, Reranker, fuse
from service.names import text_key
from service.pipeline.cache import QueryCache, pack_text, unpack_text

T = TypeVar("T")


class BadQuery(ValueError):
    """A query the client must fix (the message says how)."""


def per_item(fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
    """fn of each item; an item's exception is its result (the others still get theirs)."""
    out: list[Any] = []
    for item in items:
        try:
            out.append(fn(item))
        except Exception as exc:  # noqa: BLE001 (handed to that item's caller)
            out.append(exc)
    return out


@dataclass
class TextEncoding:
    """One text: pooled (d,) L2-normalised, tokens (L, w) and mask (L,) for the rerankers (L = 0 where
    nobody asked for them)."""

    pooled: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray


class TextStage:
    """Texts → encodings: cached ones in one Redis round trip (pre), the rest in one forward (core),
    then cached (post)."""

    def __init__(self, encoder: DualEncoder, cache: QueryCache, tokens: bool,
                 lookup: Callable[[bool], None] = lambda _: None):
        self.encoder, self.cache, self.lookup = encoder, cache, lookup
        # without a cache a query that is not reranked skips the tokens (about 5 % of a one-text forward's
        # CPU, measured); with one they are always computed, so that one entry serves reranked queries too
        self.tokens = tokens or cache.enabled
        self.width = int(encoder.model.transformer.width)

    def __call__(self, texts: list[str]) -> list[TextEncoding]:
        if not self.tokens:
            empty = (np.zeros((0, self.width), np.float32), np.zeros(0, bool))
            return [TextEncoding(row, *empty) for row in self.encoder.encode_texts(texts)]
        keys = [text_key(self.encoder.model_id, text) for text in texts] if self.cache.enabled else []
        out: list[TextEncoding | None] = self._cached(keys) if keys else [None] * len(texts)
        missing = [i for i, enc in enumerate(out) if enc is None]
        if missing:
            pooled, tokens, mask = self.encoder.encode_texts_and_tokens([texts[i] for i in missing])
            for row, i in enumerate(missing):
                out[i] = TextEncoding(pooled[row], tokens[row], mask[row])
            if keys:
                packed = [pack_text(pooled[r], tokens[r], mask[r]) for r in range(len(missing))]
                self.cache.put_many([(keys[i], raw) for i, raw in zip(missing, packed, strict=True)])
        return [enc for enc in out if enc is not None]

    def _cached(self, keys: list[str]) -> list[TextEncoding | None]:
        out: list[TextEncoding | None] = []
        for raw in self.cache.get_many(keys):
            self.lookup(raw is not None)
            out.append(None if raw is None else TextEncoding(*unpack_text(raw, self.encoder.embed_dim, self.width)))
        return out


class ImageStage:
    """Image files → (d,) vectors: each decoded and checked on its own (pre), the good ones in one forward."""

    def __init__(self, encoder: DualEncoder, max_pixels: int):
        self.encoder, self.max_pixels = encoder, max_pixels

    def _decode(self, data: bytes) -> Any:
        try:
            return decode_image(data, self.max_pixels)
        except ValueError as exc:
            raise BadQuery(f"image: {exc}") from None

    def __call__(self, files: list[bytes]) -> list[Any]:
        decoded = per_item(self._decode, files)
        good = [d for d in decoded if not isinstance(d, Exception)]
        vectors = iter(self.encoder.encode_images(good) if good else [])
        return [d if isinstance(d, Exception) else next(vectors) for d in decoded]


@dataclass
class AnnQuery:
    index: Index  # the version the request took at its start
    vector: np.ndarray
    depth: int
    only: Selection | None = None  # a metadata filter's ids: the search runs inside them


class AnnStage:
    """(d,) queries → (scores, ids) best first, without FAISS's -1 padding: one FAISS call per index version."""

    def __init__(self, threads: int = 0, observe: Callable[[int], None] = lambda _: None):
        self.threads = threads  # FAISS OpenMP threads (0: its default); see service.state.configure_process
        self.observe = observe  # queries per FAISS call

    def __call__(self, queries: list[AnnQuery]) -> list[tuple[np.ndarray, np.ndarray]]:
        if not queries:
            return []
        self.observe(len(queries))
        if self.threads:  # OpenMP thread counts are per calling thread: set in the stage's own
            faiss.omp_set_num_threads(self.threads)
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # query's position → its hits
        groups = {(id(q.index), id(q.only)): (q.index, q.only) for q in queries}  # one call per version and filter
        for index, only in groups.values():
            rows = [i for i, q in enumerate(queries) if q.index is index and q.only is only]
            scores, ids = index.search(np.stack([queries[i].vector for i in rows]).astype(np.float32),
                                       max(queries[i].depth for i in rows), only=only)
            for r, i in enumerate(rows):
                d = queries[i].depth
                keep = ids[r, :d] >= 0
                out[i] = (scores[r, :d][keep], ids[r, :d][keep])
        return [out[i] for i in range(len(queries))]


@dataclass
class Found:
    """A query's encoding and its ANN candidates, with the seconds its batch's search took."""

    encoding: Any  # a TextEncoding, or an image's (d,) vector
    scores: np.ndarray
    ids: np.ndarray
    search_s: float


class EncodeThenSearch:
    """encode → ANN as one batch call, (query, index version, depth, filter's selection) → Found: a query's
    two stages cost one hand-off to a worker thread and back, not two, and each batch is one forward and one
    FAISS call per version and filter."""

    def __init__(self, encode: Callable[[list[Any]], list[Any]], ann: AnnStage, vector: Callable[[Any], np.ndarray]):
        self.encode, self.ann, self.vector = encode, ann, vector

    def __call__(self, items: list[tuple[Any, Index, int, Selection | None]]) -> list[Any]:
        out: list[Any] = list(self.encode([item[0] for item in items]))
        good = [i for i, enc in enumerate(out) if not isinstance(enc, Exception)]
        start = time.perf_counter()
        found = self.ann([AnnQuery(items[i][1], self.vector(out[i]), items[i][2], items[i][3]) for i in good])
        seconds = time.perf_counter() - start
        for i, (scores, ids) in zip(good, found, strict=True):
            out[i] = Found(out[i], scores, ids, seconds)
        return out


@dataclass
class RerankChunk:
    """Some of a query's candidates, to score together."""

    reranker: Reranker
    query: Query
    index: Index
    ids: np.ndarray
    explain: bool = False  # locate the objects the text names too


@dataclass
class Scored:
    """A chunk's log p(match), where its objects are (with explain), and the seconds its scoring took."""

    log_p: np.ndarray
    located: list[list[Located]] | None
    seconds: float


def scored_features(reranker: Reranker, index: Index) -> tuple[str, bool]:
    """The feature set the tier scores on this index, and whether it is the tier's image side: the side when the
    index stored it from these weights (a third of a mid rerank's cost saved), else the tier's own features."""
    side = reranker.side
    if side is not None and index.feature_sets.get(side.features, {}).get("model") == side.feature_model:
        return side.features, True
    return reranker.features, False


def rerank_stage(chunks: list[RerankChunk]) -> list[Any]:
    """Each chunk Scored (the queue's wait left out of its seconds)."""

    def score(chunk: RerankChunk) -> Scored:
        start = time.perf_counter()
        name, prepared = scored_features(chunk.reranker, chunk.index)
        features = chunk.index.features(name, chunk.ids)
        log_p, located = chunk.reranker.rescore(chunk.query, features, prepared, chunk.explain)
        return Scored(log_p, located, time.perf_counter() - start)

    return per_item(score, chunks)


@dataclass
class Reranked:
    """A reranked answer in its new order: the cosines and ids, log p(match) (NaN past the head) and the fused
    score, and with explain where each reranked candidate's named objects are, by image id."""

    cosine: np.ndarray
    ids: np.ndarray
    log_p: np.ndarray
    fused: np.ndarray
    located: dict[int, list[Located]] = field(default_factory=dict)


def order(log_p: np.ndarray, cosine: np.ndarray, ids: np.ndarray, weight: float) -> Reranked:
    """The len(log_p) candidates at the head reordered by fused score; the rest keep the dual encoder's
    order below them. The score goes on below the lowest fused score of the head, falling as the cosine
    falls, so that it is non-increasing in rank throughout (a client may sort on it)."""
    k = len(log_p)
    head = ids[:k]
    fused = fuse(log_p, cosine[:k], weight)
    rank = np.argsort(-fused, kind="stable")
    tail_cos = cosine[k:]
    tail_score = (fused.min() - (cosine[:k].min() - tail_cos)) if len(head) else tail_cos
    return Reranked(np.concatenate([cosine[:k][rank], tail_cos]), np.concatenate([head[rank], ids[k:]]),
                    np.concatenate([log_p[rank], np.full(len(tail_cos), np.nan)]),
                    np.concatenate([fused[rank], tail_score]))
