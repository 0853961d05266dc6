"""Service state: the encoder, indexes and rerankers, loaded once in the lifespan and shared."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from indexer.encoder import DualEncoder, EncoderSpec, EncoderUnavailable, load_encoder
from indexer.store import Index, IndexNotFound
from reranker.score import Reranker, load_tier
from service.cache import ResultCache
from service.config import Settings
from service.errors import StartupError, UnknownIndex

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """Everything a request needs, loaded once."""

    settings: Settings
    encoder: DualEncoder
    indexes: dict[str, Index]
    rerankers: dict[str, Reranker]
    cache: ResultCache

    @property
    def default_index(self) -> str:
        return next(iter(self.indexes))

    def index(self, name: str | None) -> Index:
        key = name or self.default_index
        if key not in self.indexes:
            raise UnknownIndex(f"unknown index {key!r}; served: {', '.join(self.indexes)}")
        return self.indexes[key]


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
    return Engine(settings, encoder, indexes, rerankers, ResultCache(settings.redis_url, settings.cache_ttl_s))
