"""Service jobs, execution: one indexing job run in a worker process, or in the API's own thread."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from indexer.build import BuildOptions, build_or_add, remove
from indexer.encoder import DualEncoder, EncoderSpec, load_encoder
from indexer.features import Source
from indexer.integrity import IndexNotFound, read_manifest
from indexer.reader import list_source
from indexer.versions import version_dir
from reranker.score import feature_source, load_kind, tier_entry
from service.jobs.api import JobRejected, JobSpec
from service.names import VERSIONS_CHANNEL
from service.workers import signal_on_parent_death

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5

_ENCODERS: dict[tuple[str, str | None, str], DualEncoder] = {}
_FEATURES: dict[tuple[str, str], Source] = {}


def _device(spec: JobSpec) -> str:
    from service.config import Settings

    return spec.device or Settings().device  # "" = the worker's own IMSEARCH_DEVICE (a GPU worker: cuda)


def _encoder(spec: JobSpec) -> DualEncoder:
    device = _device(spec)
    key = (spec.model, spec.pretrained, device)
    if key not in _ENCODERS:  # once per worker process, shared by its jobs
        _ENCODERS[key] = load_encoder(EncoderSpec(spec.model, spec.pretrained, device))
    return _ENCODERS[key]


def _features(spec: JobSpec) -> tuple[Source, ...]:
    """What the served tiers need stored (spec.tiers: blip=DIR's features, mid's image side), loaded once per
    worker: a build stores each one's features, an add those its index already holds."""
    if spec.mode == "remove" or not spec.tiers:
        return ()
    held = None
    if spec.mode == "add":
        with contextlib.suppress(IndexNotFound):
            held = set(read_manifest(version_dir(Path(spec.index_dir))).get("features") or ())
    sources = []
    for entry in spec.tiers:
        kind, folder = tier_entry(entry)
        if held is not None and kind not in held:
            continue
        key = (entry, _device(spec))
        if key not in _FEATURES:  # blip is its own vision tower; mid's image side comes with it
            _FEATURES[key] = feature_source(load_kind(kind, _encoder(spec), folder, key[1]))
        sources.append(_FEATURES[key])
    return tuple(sources)


def _options(spec: JobSpec) -> BuildOptions:
    options = spec.options
    budget = (options["memory_budget_mb"] or 0) * 2**20 or None
    return BuildOptions(batch_size=options["batch_size"], shard_size=options["shard_size"],
                        index_kind=options["index_kind"], memory_budget=budget, replace=spec.mode == "build",
                        roots=tuple(spec.roots), tokens=options.get("tokens"), features=_features(spec))


def execute(spec: JobSpec, report: Callable[[dict[str, float]], None]) -> dict[str, Any]:
    """Run one indexing job; `report` gets throttled progress and may raise JobCancelled."""
    if not spec.roots:  # never unchecked: a job reads only under the roots its source was checked against
        raise JobRejected("the job names no allowed roots (IMSEARCH_JOB_ROOTS)", 403)
    opts = _options(spec)
    start, last = time.perf_counter(), 0.0

    def progress(done: int, total: int, indexed: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S or done == total:
            last = now
            report({"done": done, "total": total, "images_per_s": round(indexed / max(1e-9, now - start), 1)})

    if spec.mode == "remove":
        paths = [item.path for item in list_source(Path(spec.source))]
        return remove(Path(spec.index_dir), paths=paths, opts=opts).to_json()
    return build_or_add(Path(spec.source), Path(spec.index_dir), _encoder(spec), opts, spec.mode, progress).to_json()


def announce(client: redis.Redis | None, index_dir: str, version: str) -> None:
    """Tell every API process that an index has a new version (they also poll, in case this is missed)."""
    if client is None:
        return
    try:
        client.publish(VERSIONS_CHANNEL, json.dumps({"index_dir": index_dir, "version": version}))
    except redis.RedisError as exc:
        log.warning("could not announce version %s of %s: %s", version, index_dir, exc)


def rq_job(payload: dict[str, Any]) -> dict[str, Any]:
    """The function RQ workers run (importable by name): progress goes to the job's meta."""
    from rq import get_current_job

    # RQ runs each job in a forked process of its own process group, which would otherwise outlive a
    # killed worker and race the retried job
    signal_on_parent_death(signal.SIGKILL, os.getppid())
    job = get_current_job()
    spec = JobSpec(**payload)

    def report(progress: dict[str, float]) -> None:
        if job is not None:
            try:
                job.meta["progress"] = progress
                job.save_meta()
            except redis.RedisError as exc:  # Redis away: the indexing goes on, the progress waits
                log.warning("job %s: progress not saved: %s", spec.job_id, exc)

    result = execute(spec, report)
    announce(job.connection if job is not None else None, spec.index_dir, str(result["version"]))
    return result
