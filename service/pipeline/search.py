"""Service pipeline: one way for every query, result cache → encode → ANN search → rerank → hits, timed per stage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from indexer.encoder import DualEncoder
from indexer.filters import BadFilter, Selection
from indexer.store import Index
from reranker.gate import auto_depth
from reranker.score import Located, Query, Reranker
from service.config import Settings
from service.metrics import Metrics
from service.names import result_key
from service.pipeline.admission import Admission, Ticket
from service.pipeline.batcher import Batcher
from service.pipeline.cache import QueryCache
from service.pipeline.query import (
    AUTO,
    RERANK_NEEDS_TEXT,
    Hit,
    QueryInput,
    SearchOutput,
    cannot_explain,
    missing_features,
    normalised,
    rerank_term,
    rerank_text,
)
from service.pipeline.stages import (
    AnnQuery,
    AnnStage,
    BadQuery,
    EncodeThenSearch,
    Found,
    ImageStage,
    RerankChunk,
    Reranked,
    TextEncoding,
    TextStage,
    order,
    rerank_stage,
)

STAGES = ("encode", "search", "rerank", "fetch")  # in order: each one's time runs from one clock mark to the next
RERANK_STEP = 32  # candidates scored per step: between steps a worker takes the smallest query waiting
class Pipeline:
    """The stages of one process, each behind its Batcher, and the coroutine that takes a query through them.

    Reranked texts are encoded apart from the others, held while the rerank workers are kept busy by work
    that runs before theirs (no larger): under load they arrive a rerank apart (1.06 texts per forward at 64
    clients, measured), so encoded on arrival each would take a forward of its own, whereas held until a
    worker frees up, the backlog shares one. A small query behind large ones is never held. Candidates are
    scored RERANK_STEP at a time, the query reranking fewest first, and a query of several steps runs on all
    rerank workers but one, so a query of 256 cannot hold up one of 16; each tier admits a bounded amount of
    queued work.
    """

    def __init__(self, encoder: DualEncoder, rerankers: Mapping[str, Reranker], cache: QueryCache, metrics: Metrics,
                 settings: Settings | None = None):
        s = settings or Settings()
        workers = s.rerank_workers()
        self.encoder, self.rerankers, self.cache, self.metrics = encoder, rerankers, cache, metrics
        self.auto_tier, self.auto_margin = s.auto_tier, s.auto_margin
        self.admission = Admission(s.rerank_queue, workers)

        def stage(fn: Any, name: str, **kw: Any) -> Batcher[Any, Any]:
            return Batcher(fn, name, max_batch=kw.pop("max_batch", s.max_batch), max_wait_ms=s.max_wait_ms,
                           observe=metrics.batch.labels(name.split("-")[0]).observe, **kw)

        lookup = lambda hit: metrics.cache_lookup("text", hit)  # noqa: E731
        ann = AnnStage(s.threads, metrics.batch.labels("search").observe)
        pooled = lambda enc: enc.pooled  # noqa: E731
        self.rerank = stage(rerank_stage, "rerank", max_batch=1, workers=workers, long_key=RERANK_STEP)
        self.texts = stage(EncodeThenSearch(TextStage(encoder, cache, False, lookup), ann, pooled), "text")
        self.rerank_texts = stage(EncodeThenSearch(TextStage(encoder, cache, True, lookup), ann, pooled),
                                  "text-rerank", hold=self.rerank.busy_before)
        self.images = stage(EncodeThenSearch(ImageStage(encoder, s.max_pixels), ann, lambda v: v), "image")
        # a composed query's parts; a text term may be what its reranker scores against: with tokens
        self.text_vectors = stage(TextStage(encoder, cache, True, lookup), "text-term")
        self.image_vectors = stage(ImageStage(encoder, s.max_pixels), "image-term")
        self.ann: Batcher[AnnQuery, tuple[np.ndarray, np.ndarray]] = Batcher(  # embedding queries
            ann, "search", max_batch=s.max_batch, max_wait_ms=s.max_wait_ms)
        self.reads = stage(cache.get_many, "cache-get")
        self.writes = stage(cache.put_many, "cache-put")
        self.stages = [self.rerank, self.texts, self.rerank_texts, self.images, self.text_vectors, self.image_vectors,
                       self.ann, self.reads, self.writes]

    def close(self) -> None:
        for batcher in self.stages:
            batcher.close()

    async def search(self, index: Index, q: QueryInput, columns: Sequence[str] | None = None) -> SearchOutput:
        """The query's hits (carrying the metadata `columns`, default all) with encode, search, rerank, fetch
        (the hits' metadata) and total ms; a cached answer (the index version is in its key) times only the lookup."""
        start = time.perf_counter()
        self._check(q, index)
        key = self._key(index, q, columns)
        if key is not None and (raw := (await self.reads(key))) is not None:
            self.metrics.cache_lookup("result", True)
            return _from_cache(json.loads(raw), start)
        if key is not None:
            self.metrics.cache_lookup("result", False)
        ticket = self.admission.admit(self._tier(q), q.rerank_k) if q.rerank != "none" else None
        try:
            out = await self._run(index, q, columns, ticket)
        finally:  # answered, failed, or abandoned by its client
            if ticket is not None:
                self.admission.release(ticket)
        if key is not None:
            await self.writes((key, json.dumps(asdict(out))))
        self.metrics.observe_search(out.timings_ms, q.rerank)
        return out

    def _tier(self, q: QueryInput) -> str:
        """The tier that reranks the query: its own, or for "auto" the auto tier (when the gate lets it)."""
        return self.auto_tier if q.rerank == AUTO else q.rerank

    def _check(self, q: QueryInput, index: Index) -> None:
        if q.rerank == "none":
            if q.explain:
                raise BadQuery("explain says where a rerank tier found the named objects: pick a rerank tier")
            return
        if self._tier(q) not in self.rerankers:
            why = f" (auto reranks with the {self.auto_tier} tier)" if q.rerank == AUTO else ""
            raise BadQuery(f"rerank tier {self._tier(q)!r} is not loaded{why}; available: none, "
                           f"{', '.join(self.rerankers)}")
        if rerank_text(q) is None:
            raise BadQuery(RERANK_NEEDS_TEXT)
        problem = (missing_features(self.rerankers[self._tier(q)], index)
                   or (cannot_explain(self.rerankers, self._tier(q)) if q.explain else None))
        if problem:
            raise BadQuery(problem)

    def _key(self, index: Index, q: QueryInput, columns: Sequence[str] | None) -> str | None:
        """The result-cache key (None when nothing is cached): the index folder and version, the query, the columns."""
        if not self.cache.enabled:
            return None
        digest = lambda data: hashlib.sha256(data).hexdigest() if data is not None else None  # noqa: E731
        terms = [[t.text, digest(t.image), t.weight] for t in q.terms] if q.terms else None
        request = {**asdict(q), "image": digest(q.image), "terms": terms, "index": str(index.root),
                   "columns": list(columns or [])}
        return result_key(self.encoder.model_id, index.version, request)

    async def _run(self, index: Index, q: QueryInput, columns: Sequence[str] | None,
                   ticket: Ticket | None) -> SearchOutput:
        start = time.perf_counter()
        found = await self._find(index, q)
        searched = time.perf_counter()
        reranked: Reranked | None = None
        # "auto" reranks only the head whose cosines are not clearly apart from the best, when there is one
        depth = (min(q.rerank_k, len(found.ids)) if q.rerank != AUTO
                 else auto_depth(found.scores[: q.rerank_k], self.auto_margin))
        if ticket is not None and depth:
            reranker = self.rerankers[self._tier(q)]
            text = str(rerank_text(q))
            query = (Query(text, found.encoding.tokens, found.encoding.mask) if reranker.text_from_encoder
                     else reranker.prepare(text))  # its own tokenizer: no model runs
            reranked = await self._rerank(index, q, query, found, depth, ticket)
        reranked_at = time.perf_counter()
        hits = _hits(index, found, reranked, q, columns)
        marks = (start, searched - found.search_s, searched, reranked_at, time.perf_counter())
        return SearchOutput(hits, _timings(marks), index.version, reranked=reranked is not None)

    async def _find(self, index: Index, q: QueryInput) -> Found:
        """The query encoded (a text for a reranker: with its tokens) and its candidates found."""
        depth = max(q.k, q.rerank_k if q.rerank != "none" else 0)
        start = time.perf_counter()
        only = await self._selection(index, q)
        selected = time.perf_counter() - start
        found = await self._candidates(index, q, depth, only)
        found.search_s += selected  # the filter is part of the search (its first use per version reads the metadata)
        return found

    async def _selection(self, index: Index, q: QueryInput) -> Selection | None:
        """The ids the query's filter allows (None: no filter), off the event loop: evaluated once per
        version and filter (index.select keeps the last few)."""
        if q.filter is None or q.filter.empty:
            return None
        try:
            return await asyncio.to_thread(index.select, q.filter)
        except BadFilter as exc:
            raise BadQuery(str(exc)) from None

    async def _candidates(self, index: Index, q: QueryInput, depth: int, only: Selection | None) -> Found:
        if q.text is not None:
            if q.rerank == "none":
                return await self.texts((q.text, index, depth, only))
            return await self.rerank_texts((q.text, index, depth, only), key=q.rerank_k)  # the rerank's own key
        if q.image is not None:
            return await self.images((q.image, index, depth, only))
        if q.terms:
            vector, encoding = await self._compose(q, index.dim)
        else:
            vector = encoding = normalised(q.embedding or [], index.dim)
        start = time.perf_counter()
        scores, ids = await self.ann(AnnQuery(index, vector, depth, only))
        return Found(encoding, scores, ids, time.perf_counter() - start)

    async def _compose(self, q: QueryInput, dim: int) -> tuple[np.ndarray, Any]:
        """The unit vector of a composed query: its parts encoded (each through its stage's batcher), weighted
        and summed; BadQuery when they cancel out. And its encoding for a reranker: its one positive text's
        (with tokens), else the vector."""
        terms = q.terms or []
        parts = await asyncio.gather(*(self.text_vectors(t.text) if t.text is not None else self.image_vectors(t.image)
                                       for t in terms))
        vectors = [p.pooled if isinstance(p, TextEncoding) else p for p in parts]
        total = sum((t.weight * v.astype(np.float64) for t, v in zip(terms, vectors, strict=True)), np.zeros(dim))
        if np.linalg.norm(total) < 1e-6:
            raise BadQuery("the terms cancel out: their weighted embeddings sum to zero")
        vector, at = normalised(total.tolist(), dim), rerank_term(terms)
        return vector, vector if at is None else parts[at]

    async def _rerank(self, index: Index, q: QueryInput, query: Query, found: Found, depth: int,
                      ticket: Ticket) -> Reranked:
        """Score the first `depth` candidates found, RERANK_STEP at a time (each step queued again, smallest
        query first), then order them all."""
        reranker, ids = self.rerankers[self._tier(q)], found.ids
        parts: list[np.ndarray] = []
        located: dict[int, list[Located]] = {}
        for at in range(0, depth, RERANK_STEP):
            chunk = ids[at : min(depth, at + RERANK_STEP)]
            scored = await self.rerank(RerankChunk(reranker, query, index, chunk, q.explain), key=depth)
            self.admission.scored(ticket, len(chunk), scored.seconds)
            parts.append(scored.log_p)
            located.update(zip(chunk.tolist(), scored.located or [], strict=False))
        reranked = order(np.concatenate(parts) if parts else np.zeros(0, np.float32), found.scores, ids,
                         reranker.fusion_weight)
        reranked.located = located
        return reranked


def _from_cache(data: dict[str, Any], start: float) -> SearchOutput:
    lookup = round((time.perf_counter() - start) * 1000, 3)
    hits = [Hit(**h) for h in data["hits"]]
    return SearchOutput(hits, {**dict.fromkeys(STAGES, 0.0), "total": lookup}, data["index_version"], cached=True,
                        reranked=bool(data.get("reranked")))


def _timings(marks: tuple[float, ...]) -> dict[str, float]:
    """The STAGES' timings (ms) from their clock marks (the start, then the end of each stage): every
    moment of the answer is in one stage, so the stages add up to the total."""
    spans = {stage: end - begin for stage, begin, end in zip(STAGES, marks[:-1], marks[1:], strict=True)}
    return {k: round(v * 1000, 3) for k, v in {**spans, "total": marks[-1] - marks[0]}.items()}


def _hits(index: Index, found: Found, reranked: Reranked | None, q: QueryInput,
          columns: Sequence[str] | None) -> list[Hit]:
    """The first k hits (after min_similarity), in the rerank's order when there is one; score is the fused
    score of a rerank, else the cosine."""
    cosine, ids = (reranked.cosine, reranked.ids) if reranked is not None else (found.scores, found.ids)
    keep = np.ones(len(ids), bool) if q.min_similarity is None else cosine >= q.min_similarity
    if q.min_score_ratio is not None and len(cosine) and cosine.max() > 0:  # relative to the best similarity
        keep &= cosine >= q.min_score_ratio * float(cosine.max())
    ids, cosine = ids[keep][: q.k], cosine[keep][: q.k]
    log_p, score = (r[keep][: q.k] for r in (reranked.log_p, reranked.fused)) if reranked else (None, cosine)
    located = reranked.located if reranked and q.explain else None
    metas = index.metadata(ids, columns) if len(ids) else []
    hits = []
    for i, (image_id, sim, meta) in enumerate(zip(ids, cosine, metas, strict=True)):
        rerank = None if log_p is None or np.isnan(log_p[i]) else float(log_p[i])
        places = [asdict(p) for p in located[int(image_id)]] if located and int(image_id) in located else None
        hits.append(Hit(int(image_id), float(score[i]), float(sim), rerank, meta, places))
    return _ordered(index, hits, q.order_by) if q.order_by and hits else hits


def _ordered(index: Index, hits: list[Hit], order_by: tuple[str, bool]) -> list[Hit]:
    """The hits sorted by a metadata field (rows without it last, in rank order); BadQuery for no such field."""
    name, descending = order_by
    try:
        values = index.field([h.id for h in hits], name)
    except BadFilter as exc:
        raise BadQuery(str(exc)) from None
    given = sorted((i for i, v in enumerate(values) if v is not None), key=lambda i: values[i], reverse=descending)
    return [hits[i] for i in given] + [h for h, v in zip(hits, values, strict=True) if v is None]
