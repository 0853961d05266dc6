"""Service state: the encoder, indexes and rerankers, loaded once in the lifespan and shared."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from indexer.encoder import DualEncoder, EncoderSpec, EncoderUnavailable, load_encoder
from indexer.store import Index, IndexNotFound
from reranker.score import Reranker, load_tier
from service.cache import QueryCache
from service.config import Settings
from service.encoding import QueryEncoder
from service.errors import StartupError, UnknownIndex
from service.metrics import Metrics
from service.search import Searcher

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """Everything a request needs, loaded once."""

    settings: Settings
    encoder: DualEncoder
    indexes: dict[str, Index]
    rerankers: dict[str, Reranker]
    cache: QueryCache
    metrics: Metrics
    queries: QueryEncoder
    searchers: dict[str, Searcher]

    @property
    def default_index(self) -> str:
        return next(iter(self.indexes))

    def index(self, name: str | None) -> Index:
        return self.searcher(name).index

    def searcher(self, name: str | None) -> Searcher:
        key = name or self.default_index
        if key not in self.searchers:
            raise UnknownIndex(f"unknown index {key!r}; served: {', '.join(self.indexes)}")
        return self.searchers[key]

    def close(self) -> None:
        self.queries.close()
        for searcher in self.searchers.values():
            searcher.close()


def load_engine(settings: Settings) -> Engine:
    """Load model, indexes and rerankers; refuse (clearly) an index built with another model."""
    if not settings.indexes:
        raise StartupError("no index configured: pass --index DIR (or set IMSEARCH_INDEXES)")
    try:
        encoder = load_encoder(EncoderSpec(settings.model, settings.pretrained, settings.device))
        indexes = {name: Index.open(folder) for name, folder in settings.index_dirs().items()}
    except (EncoderUnavailable, IndexNotFound) as exc:
        raise StartupError(str(exc)) from None
    for name, index in indexes.items():
        built = index.manifest["model"]["id"]
        if built != encoder.model_id:
            raise StartupError(f"index {name!r} was built with model {built}, but the service is configured "
                               f"with {encoder.model_id}; set IMSEARCH_MODEL/IMSEARCH_PRETRAINED to match")
    rerankers: dict[str, Reranker] = {}
    for tier in settings.rerankers:
        try:
            rerankers[tier] = load_tier(tier, encoder)
        except (FileNotFoundError, ValueError) as exc:
            log.warning("rerank tier %s unavailable: %s", tier, exc)
    return assemble(settings, encoder, indexes, rerankers)


def assemble(settings: Settings, encoder: DualEncoder, indexes: dict[str, Index],
             rerankers: dict[str, Reranker]) -> Engine:
    """Wire loaded models and indexes into an engine: cache, metrics, batched encoder and searchers."""
    cache = QueryCache(settings.redis_url, settings.cache_ttl_s)
    metrics = Metrics()
    queries = QueryEncoder(encoder, cache, metrics, settings.max_batch, settings.max_wait_ms)
    searchers = {name: Searcher(index, metrics, settings.max_batch, settings.max_wait_ms)
                 for name, index in indexes.items()}
    return Engine(settings, encoder, indexes, rerankers, cache, metrics, queries, searchers)
