"""Service state: the encoder, indexes, rerankers, caches and job queue, loaded once and shared."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from threadpoolctl import threadpool_limits

from indexer.encoder import DualEncoder, EncoderSpec, EncoderUnavailable, load_encoder
from indexer.integrity import IndexNotFound
from indexer.store import Index
from reranker.score import Reranker, feature_source, load_kind, tier_entry
from service.config import Settings
from service.errors import StartupError, UnknownIndex
from service.jobs.queues import JobQueue, LocalJobs, RQJobs
from service.metrics import Metrics
from service.pipeline.cache import QueryCache
from service.pipeline.search import Pipeline
from service.swap import IndexSwapper, VersionWatcher

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Engine:
    """Everything a request needs, loaded once; indexes follow new versions through the swapper."""

    settings: Settings
    encoder: DualEncoder
    rerankers: dict[str, Reranker]
    cache: QueryCache
    metrics: Metrics
    pipeline: Pipeline
    swapper: IndexSwapper
    jobs: JobQueue
    watcher: VersionWatcher | None = None
    # blocking request work (thumbnails, previews) runs here, off the event loop: a plain executor hands a
    # call over in a third of the time of FastAPI's default thread pool (anyio)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(64, "request"))
    failed_tiers: dict[str, str] = field(default_factory=dict)  # configured rerank tiers that did not load, and why

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (thumbnails, previews) on the request pool and await it."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @property
    def feature_tiers(self) -> set[str]:
        """The loaded tiers with features an index stores for them (blip's own, mid's image side), which indexing
        jobs compute."""
        return {name for name, reranker in self.rerankers.items() if feature_source(reranker) is not None}

    @property
    def indexes(self) -> dict[str, Index]:
        """Name → the version served now (the default first)."""
        return dict(self.swapper.indexes)

    @property
    def default_index(self) -> str:
        return next(iter(self.swapper.indexes))

    def index(self, name: str | None) -> Index:
        """Taken once per request: the request finishes on this version even if a swap happens."""
        key = name or self.default_index
        index = self.swapper.indexes.get(key)
        if index is None:
            raise UnknownIndex(f"unknown index {key!r}; served: {', '.join(self.swapper.indexes)}")
        return index

    def image_source(self, name: str | None, version: str | None) -> Index:
        """The index version whose metadata answers an image URL: the version named there while it is
        kept (a hit fetched just before a swap), else the version served now."""
        key = name or self.default_index
        self.index(key)
        return self.swapper.version(key, version)

    def index_dir(self, name: str | None) -> tuple[str, Path]:
        """(name, folder) of a served index; UnknownIndex for any other name."""
        key = name or self.default_index
        self.index(key)
        return key, self.swapper.dirs[key]

    def start(self) -> None:
        """Follow new index versions (pub/sub + polling)."""
        if self.watcher is None:
            self.watcher = VersionWatcher(self.swapper.refresh, self.settings.redis_url, self.settings.version_poll_s)
            self.watcher.start()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.jobs.close()
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.pipeline.close()
        self.cache.close()
        self.swapper.close()


def configure_process(settings: Settings) -> None:
    """Logging and per-call thread counts for an API process.

    The service's own log lines (versions swapped in, tiers unavailable, who may write) go to stderr
    at INFO, beside uvicorn's.

    Queries are small (one text, tens of candidates): splitting one forward over cores gains little,
    and between forwards the idle OpenMP workers spin, taking the core that the thread holding the
    next request needs (a 3 ms hand-off on 2 cores). With one thread per call, concurrent requests
    and pipeline stages run side by side on separate cores instead.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("service").setLevel(logging.INFO)  # libraries' INFO (open_clip's) stays quiet
    if settings.threads:
        torch.set_num_threads(settings.threads)  # every thread torch runs in follows this
        threadpool_limits(settings.threads)  # numpy's and FAISS's BLAS (OpenMP: this thread; see AnnStage)


def load_engine(settings: Settings) -> Engine:
    """Load model, indexes and rerankers; refuse (clearly) an index built with another model."""
    if not settings.indexes:
        raise StartupError("no index configured: pass --index DIR (or set IMSEARCH_INDEXES)")
    try:
        indexes = {name: Index.open(folder, version) for name, (folder, version) in settings.index_dirs().items()}
        encoder = load_encoder(EncoderSpec(settings.model, settings.pretrained, settings.device))
    except (EncoderUnavailable, IndexNotFound) as exc:
        raise StartupError(str(exc)) from None
    for name, index in indexes.items():
        built = index.manifest["model"]["id"]
        if not encoder.is_model(built):
            raise StartupError(f"index {name!r} was built with model {built}, but the service is configured "
                               f"with {encoder.model_id}; set IMSEARCH_MODEL/IMSEARCH_PRETRAINED to match")
    rerankers, failed = load_tiers(settings.rerankers, encoder, settings.device)
    default = settings.default_rerank
    if default != "none" and default not in rerankers:
        why = failed.get(default, "it is not in IMSEARCH_RERANKERS")
        raise StartupError(f"IMSEARCH_DEFAULT_RERANK is {default!r}, but that tier is not loaded ({why}); "
                           f"loaded tiers: none{''.join(', ' + t for t in rerankers)}")
    engine = assemble(settings, encoder, indexes, rerankers)
    engine.failed_tiers = failed
    return engine


def load_tiers(tiers: list[str], encoder: DualEncoder,
               device: str = "cpu") -> tuple[dict[str, Reranker], dict[str, str]]:
    """(loaded tier → reranker, failed tier → why) from TIER or TIER=CHECKPOINT entries (a reranker of that
    kind trained for this encoder, e.g. by `imsearch train reranker --data`, or blip=MODEL_FOLDER); a tier
    that cannot load is served without, and reported (the caller says so: a server in its log, the CLI as its error)."""
    rerankers: dict[str, Reranker] = {}
    failed: dict[str, str] = {}
    for entry in tiers:
        tier, checkpoint = tier_entry(entry)
        try:
            rerankers[tier] = load_kind(tier, encoder, checkpoint, device)
        except (EncoderUnavailable, OSError, ValueError) as exc:
            failed[tier] = str(exc)
    return rerankers, failed


def assemble(settings: Settings, encoder: DualEncoder, indexes: dict[str, Index],
             rerankers: dict[str, Reranker]) -> Engine:
    """Wire loaded models and indexes into an engine: cache, metrics, the pipeline, the swapper and the jobs."""
    cache = QueryCache(settings.redis_url if settings.cache else None, settings.cache_ttl_s)
    metrics = Metrics()
    pipeline = Pipeline(encoder, rerankers, cache, metrics, settings)

    def placed(index: Index) -> Index:
        where = index.use_device(settings.search_device)
        log.info("index %s version %s: FAISS search on %s", index.root.name, index.version, where)
        return index

    held = {name for name, (_, version) in settings.index_dirs().items() if version}
    swapper = IndexSwapper({name: index.root for name, index in indexes.items()},
                           {name: placed(index) for name, index in indexes.items()},
                           lambda folder: placed(Index.open(folder)), held)
    jobs: JobQueue = (RQJobs(settings.redis_url, settings.job_timeout_s) if settings.redis_url
                      else LocalJobs(lambda _dir, _version: swapper.refresh()))
    return Engine(settings, encoder, rerankers, cache, metrics, pipeline, swapper, jobs)
