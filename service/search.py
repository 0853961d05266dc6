"""Service core: one query through encode → ANN search → optional rerank, timed per stage."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np

from indexer.reader import LIST_EXTENSIONS, decode_image
from indexer.store import Index
from reranker.score import Query, Reranker, fuse
from service.admission import Admission, Ticket
from service.batching import AGAIN, Again, MicroBatcher, StagedBatcher
from service.encoding import QueryEncoder
from service.metrics import Metrics


class BadQuery(ValueError):
    """A query the client must fix (the message says how)."""


def decode_base64(data: str) -> bytes:
    """An image sent as base64 (a data: URL's prefix allowed), or BadQuery."""
    try:
        return base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise BadQuery("image must be base64 of the image file's bytes") from None


RERANK_NEEDS_TEXT = "reranking needs a text query; use rerank='none' for image or embedding queries"


def check_tier(rerankers: Mapping[str, Reranker], tier: str) -> None:
    """BadQuery unless the rerank tier is loaded."""
    if tier not in rerankers:
        raise BadQuery(f"rerank tier {tier!r} is not loaded; available: none, {', '.join(rerankers)}")


@dataclass
class QueryInput:
    """Exactly one of text, image (file bytes) or embedding."""

    text: str | None = None
    image: bytes | None = None
    embedding: list[float] | None = None
    k: int = 10
    rerank: str = "none"
    rerank_k: int = 16
    min_similarity: float | None = None


@dataclass
class Hit:
    id: int
    score: float
    similarity: float
    rerank_score: float | None
    meta: dict[str, Any]


def source_roots(manifest: Mapping[str, Any]) -> list[str]:
    """The folders an index's files were listed from ('/'-terminated): a folder source itself, or the
    folder holding a list file (its paths are relative to it)."""
    roots = []
    for source in manifest.get("roots") or [manifest.get("source") or ""]:
        folder = Path(source).parent if Path(source).suffix.lower() in LIST_EXTENSIONS else Path(source)
        roots.append(str(folder).rstrip("/") + "/")
    return roots


def shown_path(path: str | None, roots: Sequence[str]) -> str | None:
    """A stored path as a client sees it: relative to the folder it was indexed from, else its file name
    (the server's own layout is not the client's business)."""
    if path is None:
        return None
    root = next((r for r in roots if path.startswith(r)), None)
    return path[len(root):] if root else Path(path).name


@dataclass
class SearchOutput:
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    index_version: str = ""


class Searcher:
    """One index version behind a micro-batcher: concurrent queries share one FAISS search call."""

    def __init__(self, index: Index, metrics: Metrics | None = None, max_batch: int = 64, max_wait_ms: float = 1.0,
                 threads: int = 0):
        self.index = index
        self.metrics = metrics or Metrics()
        self.threads = threads  # FAISS OpenMP threads (0: its default); see service.state.configure_process
        self._batcher = MicroBatcher(self.search_batch, max_batch, max_wait_ms, f"search-{index.version}")

    def __call__(self, vector: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of one (d,) query, best first, without FAISS's -1 padding."""
        return self._batcher((vector, depth))

    async def asearch(self, vector: np.ndarray, depth: int, inline: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The same for a coroutine: awaited in a micro-batch, or run here when `inline` and idle."""
        return await self._batcher.acall((vector, depth), inline)

    def close(self) -> None:
        self._batcher.close()

    def search_batch(self, items: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`__call__` of several (vector, depth) queries, in one FAISS call in the calling thread."""
        self.metrics.batch.labels("search").observe(len(items))
        if self.threads:  # OpenMP thread counts are per calling thread: set it in the batcher's own
            faiss.omp_set_num_threads(self.threads)
        depth = max(d for _, d in items)
        scores, ids = self.index.search(np.stack([v for v, _ in items]).astype(np.float32), depth)
        out = []
        for row, (_, d) in enumerate(items):
            keep = ids[row, :d] >= 0
            out.append((scores[row, :d][keep], ids[row, :d][keep]))
        return out


RERANK_STEP = 32  # candidates scored per step: a larger rerank yields its worker between steps


class _Asked(NamedTuple):
    """A reranked text query as it waits for a rerank worker."""

    searcher: Searcher
    q: QueryInput
    columns: Sequence[str] | None
    queued: float  # clock mark
    ticket: Ticket


@dataclass
class _Prepared:
    """A reranked text query after its batch's encode and search: what its own rerank needs, and
    the log p(match) of the candidates scored so far."""

    asked: _Asked
    query: Query
    scores: np.ndarray
    ids: np.ndarray
    marks: tuple[float, float, float]  # clock marks: queued, encoded, searched (the last two: its batch's)
    scored: list[np.ndarray] = field(default_factory=list)

    @property
    def depth(self) -> int:
        """How many candidates this query reranks."""
        return min(self.asked.q.rerank_k, len(self.ids))

    @property
    def done(self) -> int:
        return sum(len(part) for part in self.scored)


class RerankedSearch:
    """Reranked text queries of one process: those that queued meanwhile are encoded in one forward
    and searched in one FAISS call per index, then each is reranked on its own, on `workers` threads.

    A rerank costs several times an encode and a search, so under load queries wait for a rerank
    worker; encoded on arrival, each would run alone (they arrive a rerank apart: 1.06 texts per
    forward, measured at 64 clients), whereas encoded when a worker frees up, the whole backlog
    shares one forward. Only the workers hold threads: the waiting queries are coroutines.

    `workers` is the process's share of the cores: a rerank is compute-bound (16 candidates are
    milliseconds of one core), and reranks beyond the cores only take turns on them, evicting each
    other's caches and contending for the GIL, so each takes longer and none finishes sooner.

    Candidates are scored RERANK_STEP at a time, smallest queries first, and queries of more than one
    step run on all workers but one: a query of 256 candidates cannot hold up one of 16. Each tier
    admits a bounded amount of queued work (Admission): past it a query is refused with Overloaded.
    """

    def __init__(self, encoder: QueryEncoder, rerankers: Mapping[str, Reranker], workers: int, max_batch: int = 32,
                 queue_candidates: int = 1024):
        self.encoder, self.rerankers = encoder, rerankers
        self.admission = Admission(queue_candidates, workers)
        self._staged = StagedBatcher(self._prepare, self._step, workers, max_batch, "rerank",
                                     key=lambda p: p.depth, heavy=lambda p: p.depth > RERANK_STEP)

    async def asearch(self, searcher: Searcher, q: QueryInput, columns: Sequence[str] | None = None) -> SearchOutput:
        """The query reranked by its tier (a text query; BadQuery otherwise), timed as `search` is;
        Overloaded when its tier's queue is full."""
        check_tier(self.rerankers, q.rerank)
        if q.text is None:
            raise BadQuery(RERANK_NEEDS_TEXT)
        ticket = self.admission.admit(q.rerank, q.rerank_k)
        try:
            return await self._staged.acall(_Asked(searcher, q, columns, time.perf_counter(), ticket))
        finally:  # answered, failed, or abandoned by its client (its remaining steps are then skipped)
            self.admission.release(ticket)

    def close(self) -> None:
        self._staged.close()

    def _prepare(self, asked: list[_Asked]) -> list[_Prepared]:
        start = time.perf_counter()
        texts = self.encoder.texts([str(a.q.text) for a in asked])
        encoded = time.perf_counter()
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for searcher in {id(a.searcher): a.searcher for a in asked}.values():  # one FAISS call per index version
            rows = [i for i, a in enumerate(asked) if a.searcher is searcher]
            results = searcher.search_batch([(texts[i].pooled, max(asked[i].q.k, asked[i].q.rerank_k)) for i in rows])
            found.update(zip(rows, results, strict=True))
        searched = time.perf_counter()
        return [_Prepared(a, Query(str(a.q.text), texts[i].tokens, texts[i].mask), *found[i],
                          (a.queued, a.queued + encoded - start, a.queued + searched - start))
                for i, a in enumerate(asked)]

    def _step(self, p: _Prepared) -> SearchOutput | Again:
        """Score the next RERANK_STEP candidates; once all are scored, order them and answer. The
        rerank time runs from the search to the answer (waits for a worker included)."""
        q, index = p.asked.q, p.asked.searcher.index
        reranker = self.rerankers[q.rerank]
        if p.done < p.depth:
            start, end = p.done, min(p.depth, p.done + RERANK_STEP)
            began = time.perf_counter()
            p.scored.append(reranker.log_match(p.query, index.tokens(p.ids[start:end])))
            self.admission.scored(p.asked.ticket, end - start, time.perf_counter() - began)
            if end < p.depth:
                return AGAIN
        log_p = np.concatenate(p.scored) if p.scored else np.zeros(0, np.float32)
        scores, ids, reranked = _order(log_p, p.scores, p.ids, reranker.fusion_weight)
        return _output(index, _hits(index, scores, ids, reranked, q, p.asked.columns), (*p.marks, time.perf_counter()))


def encode_query(encoder: QueryEncoder, q: QueryInput, dim: int, max_pixels: int) -> tuple[np.ndarray, Query | None]:
    """(d,) query vector, plus the reranker's text query when the query is text to rerank."""
    if q.text is not None:
        if q.rerank == "none":
            return encoder.pooled(q.text), None
        text = encoder.text(q.text)
        return text.pooled, Query(q.text, text.tokens, text.mask)
    if q.image is not None:
        try:
            image = decode_image(q.image, max_pixels)
        except ValueError as exc:
            raise BadQuery(f"image: {exc}") from None
        return encoder.image(image), None
    vector = np.asarray(q.embedding, dtype=np.float64)  # float64 first: a huge value must not overflow the cast
    if vector.shape[0] != dim:
        raise BadQuery(f"embedding has {vector.shape[0]} dimensions; this index expects {dim}")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing norm is inf, refused below
        norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else float("nan")
    if not np.isfinite(norm) or norm == 0.0:
        raise BadQuery("embedding must be a finite, non-zero vector")
    return (vector / norm).astype(np.float32), None


def search(encoder: QueryEncoder, searcher: Searcher, rerankers: Mapping[str, Reranker], q: QueryInput,
           max_pixels: int = 40_000_000, columns: Sequence[str] | None = None) -> SearchOutput:
    """Run one query; timings_ms holds encode, search, rerank and total; hits carry the metadata
    `columns` (default: all)."""
    if q.rerank != "none":
        check_tier(rerankers, q.rerank)
    index = searcher.index
    start = time.perf_counter()
    vector, text_query = encode_query(encoder, q, index.dim, max_pixels)
    encoded = time.perf_counter()
    if q.rerank != "none" and text_query is None:
        raise BadQuery(RERANK_NEEDS_TEXT)
    scores, ids = searcher(vector, max(q.k, q.rerank_k if q.rerank != "none" else 0))
    searched = time.perf_counter()
    reranked: tuple[np.ndarray, np.ndarray] | None = None  # (log p(match), fused score), NaN past rerank_k
    if q.rerank != "none" and text_query is not None:
        scores, ids, reranked = _rerank(rerankers[q.rerank], index, text_query, scores, ids, q.rerank_k)
    done = time.perf_counter()
    return _output(index, _hits(index, scores, ids, reranked, q, columns), (start, encoded, searched, done))


async def search_async(encoder: QueryEncoder, searcher: Searcher, q: QueryInput, columns: Sequence[str] | None = None,
                       inline: bool = False) -> SearchOutput:
    """`search` for a text or embedding query without rerank, awaited on the event loop.

    Its stages wait in the micro-batches without holding a thread, and each batch's worker wakes all
    of its coroutines at once: under load that replaces a pool thread and four thread hand-offs per
    query. `inline` (the request is alone): each stage runs here at once, without any hand-off.
    """
    if q.rerank != "none" or q.image is not None:
        raise ValueError("search_async takes text or embedding queries without rerank")
    index = searcher.index
    start = time.perf_counter()
    if q.text is not None:
        vector = await encoder.apooled(q.text, inline)
    else:
        vector, _ = encode_query(encoder, q, index.dim, 0)  # an embedding: only checked and normalised
    encoded = time.perf_counter()
    scores, ids = await searcher.asearch(vector, q.k, inline)
    searched = time.perf_counter()
    return _output(index, _hits(index, scores, ids, None, q, columns), (start, encoded, searched, searched))


def _output(index: Index, hits: list[Hit], marks: tuple[float, float, float, float]) -> SearchOutput:
    """Hits with the stage timings (ms) from the start, encoded, searched and reranked clock marks."""
    start, encoded, searched, done = marks
    timings = {"encode": encoded - start, "search": searched - encoded, "rerank": done - searched,
               "total": time.perf_counter() - start}
    return SearchOutput(hits, {k: round(v * 1000, 3) for k, v in timings.items()}, index.version)


def _rerank(reranker: Reranker, index: Index, query: Query, cosine: np.ndarray, ids: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Score the top k in one call, then _order."""
    return _order(reranker.log_match(query, index.tokens(ids[:k])), cosine, ids, reranker.fusion_weight)


def _order(log_p: np.ndarray, cosine: np.ndarray, ids: np.ndarray,
           weight: float) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Reorder the len(log_p) candidates at the head by fused score; the rest keep the dual encoder's
    order below them.

    Returns (cosine, ids, (log p(match), score)) in the new order: log p is NaN past the head, and
    the score goes on below the lowest fused score there, falling as the cosine falls, so that it is
    non-increasing in rank throughout (a client may sort on it).
    """
    k = len(log_p)
    head = ids[:k]
    fused = fuse(log_p, cosine[:k], weight)
    order = np.argsort(-fused, kind="stable")
    tail_cos = cosine[k:]
    tail_score = (fused.min() - (cosine[:k].min() - tail_cos)) if len(head) else tail_cos
    new_ids = np.concatenate([head[order], ids[k:]])
    new_cos = np.concatenate([cosine[:k][order], tail_cos])
    log_p = np.concatenate([log_p[order], np.full(len(tail_cos), np.nan)])
    return new_cos, new_ids, (log_p, np.concatenate([fused[order], tail_score]))


def _hits(index: Index, cosine: np.ndarray, ids: np.ndarray, reranked: tuple[np.ndarray, np.ndarray] | None,
          q: QueryInput, columns: Sequence[str] | None) -> list[Hit]:
    """The first k hits (after min_similarity); score is the ranking score of _rerank, else the cosine."""
    keep = np.ones(len(ids), bool) if q.min_similarity is None else cosine >= q.min_similarity
    ids, cosine = ids[keep][: q.k], cosine[keep][: q.k]
    log_p, score = (r[keep][: q.k] for r in reranked) if reranked else (None, cosine)
    metas = index.metadata(ids, columns) if len(ids) else []
    hits = []
    for i, (image_id, sim, meta) in enumerate(zip(ids, cosine, metas, strict=True)):
        rerank = None if log_p is None or np.isnan(log_p[i]) else float(log_p[i])
        hits.append(Hit(int(image_id), float(score[i]), float(sim), rerank, meta))
    return hits
