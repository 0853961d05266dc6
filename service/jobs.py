"""Service stage, jobs: batch-indexing jobs on an RQ queue in Redis, or on an in-process worker without it."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import redis
from pydantic import BaseModel, ConfigDict, Field
from rq.serializers import JSONSerializer  # job payloads and results are JSON: Redis is never unpickled

from indexer.build import BuildOptions, build_or_add, remove
from indexer.encoder import DualEncoder, EncoderSpec, load_encoder
from indexer.reader import list_source, within
from service.workers import signal_on_parent_death

log = logging.getLogger(__name__)

QUEUE = "imsearch-index"
VERSIONS_CHANNEL = "imsearch:versions"  # pub/sub: {"index_dir", "version"} after every publish
PROGRESS_EVERY_S = 0.5
RETRIES = 2  # a job whose worker died is run again (the indexer resumes from its last shard)
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobRejected(ValueError):
    """A job the client must fix: a source outside the allowed roots, a missing source."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class JobNotFound(LookupError):
    """No job with this id."""


class JobCancelled(RuntimeError):
    """Raised inside a running job when it is cancelled."""


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(2048, ge=1, le=1_000_000)
    batch_size: int = Field(64, ge=1, le=4096)
    index_kind: Literal["auto", "flat", "hnsw", "ivf", "ivfpq"] = "auto"
    memory_budget_mb: int | None = Field(None, ge=1)


class JobRequest(BaseModel):
    """POST /v1/jobs/index: what to index into which served index."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., min_length=1, max_length=4096, description="folder or list file under IMSEARCH_JOB_ROOTS")
    mode: Literal["build", "add", "remove"] = "add"
    index: str | None = Field(None, min_length=1, max_length=200, description="a served index (default: the first)")
    job_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="idempotency key")
    replace: bool = Field(False, description="a build replaces the served index: say so explicitly")
    options: JobOptions = Field(default_factory=JobOptions)


@dataclass
class JobSpec:
    """A validated job, as the worker receives it (plain JSON types only)."""

    job_id: str
    source: str
    mode: str
    index_name: str
    index_dir: str
    options: dict[str, Any]
    model: str
    pretrained: str | None
    device: str  # "" lets the worker choose (its IMSEARCH_DEVICE)
    roots: list[str] = field(default_factory=list)  # every file the job reads must resolve under one of these

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class JobInfo:
    job_id: str
    status: JobStatus
    mode: str
    source: str
    index: str
    progress: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0


def check_source(source: str, roots: list[str]) -> Path:
    """The source, resolved (symlinks too), when it lies under an allowed root; else JobRejected.

    Only the source itself: each file it lists is checked again when the job reads it (indexer.reader).
    """
    if not roots:
        raise JobRejected("indexing jobs are disabled: set IMSEARCH_JOB_ROOTS to the folders jobs may read", 403)
    if "\0" in source:
        raise JobRejected("source must be a path (it holds a NUL character)")
    path = Path(source).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise JobRejected(f"source {source} does not exist") from None
    if not within(resolved, roots):
        raise JobRejected(f"source {source} is outside the allowed roots", 403)
    return resolved


# --- running a job (in a worker process or the in-process fallback) --------------------------------

_ENCODERS: dict[tuple[str, str | None, str], DualEncoder] = {}


def _encoder(spec: JobSpec) -> DualEncoder:
    from service.config import Settings

    device = spec.device or Settings().device  # "" = the worker's own IMSEARCH_DEVICE (a GPU worker: cuda)
    key = (spec.model, spec.pretrained, device)
    if key not in _ENCODERS:  # once per worker process, shared by its jobs
        _ENCODERS[key] = load_encoder(EncoderSpec(spec.model, spec.pretrained, device))
    return _ENCODERS[key]


def execute(spec: JobSpec, report: Callable[[dict[str, float]], None]) -> dict[str, Any]:
    """Run one indexing job; `report` gets throttled progress and may raise JobCancelled."""
    if not spec.roots:  # never unchecked: a job reads only under the roots its source was checked against
        raise JobRejected("the job names no allowed roots (IMSEARCH_JOB_ROOTS)", 403)
    opts = BuildOptions(batch_size=spec.options["batch_size"], shard_size=spec.options["shard_size"],
                        index_kind=spec.options["index_kind"],
                        memory_budget=(spec.options["memory_budget_mb"] or 0) * 2**20 or None,
                        replace=spec.mode == "build", roots=tuple(spec.roots))
    start, last = time.perf_counter(), 0.0

    def progress(done: int, total: int, indexed: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S or done == total:
            last = now
            report({"done": done, "total": total, "images_per_s": round(indexed / max(1e-9, now - start), 1)})

    if spec.mode == "remove":
        paths = [item.path for item in list_source(Path(spec.source))]
        result = remove(Path(spec.index_dir), paths=paths, opts=opts).to_json()
    else:
        result = build_or_add(Path(spec.source), Path(spec.index_dir), _encoder(spec), opts, spec.mode,
                              progress).to_json()
    return result


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


# --- queues: one interface, two back ends ------------------------------------------------------------


class JobQueue(Protocol):
    in_process: bool  # jobs run in the API process (its device) rather than on workers

    def submit(self, spec: JobSpec) -> tuple[JobInfo, bool]: ...  # (info, created)

    def get(self, job_id: str) -> JobInfo: ...

    def recent(self, limit: int = 50) -> list[JobInfo]: ...

    def cancel(self, job_id: str) -> JobInfo: ...

    def close(self) -> None: ...


def wait_settled(read: Callable[[], JobInfo], timeout_s: float = 5.0) -> JobInfo:
    """Poll a cancelled job until it is no longer running (or the timeout passes); its last state."""
    deadline = time.monotonic() + timeout_s
    info = read()
    while info.status == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        info = read()
    return info


def new_job_id() -> str:
    return uuid.uuid4().hex


def enqueue(queue: Any, payload: dict[str, Any], timeout_s: int) -> Any:
    """Put a job (a JobSpec's JSON) on the RQ queue under its id, with its retries and TTLs."""
    from rq import Retry

    job = queue.enqueue(rq_job, payload, job_id=payload["job_id"], job_timeout=timeout_s, retry=Retry(max=RETRIES),
                        result_ttl=7 * 86400, failure_ttl=7 * 86400, meta={"spec": payload},
                        description=f"{payload['mode']} {payload['source']}")
    queue.connection.zadd(f"{QUEUE}:recent", {payload["job_id"]: time.time()})
    return job


class RQJobs:
    """Jobs on an RQ queue; `imsearch worker` processes run them (as many as you like)."""

    in_process = False
    STATUS: dict[str, JobStatus] = {
        "queued": "queued", "deferred": "queued", "scheduled": "queued", "started": "running",
        "finished": "succeeded", "failed": "failed", "stopped": "cancelled", "canceled": "cancelled",
    }

    def __init__(self, url: str, timeout_s: int, queue: str = QUEUE):
        from rq import Queue

        # bounded waits: a hung Redis answers the jobs routes with a 503 (service.errors), never a hang
        self.connection = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.queue = Queue(queue, connection=self.connection, serializer=JSONSerializer)
        self.timeout_s = timeout_s

    def submit(self, spec: JobSpec) -> tuple[JobInfo, bool]:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:  # an enqueue is idempotent by job id
            return self._info(Job.fetch(spec.job_id, connection=self.connection, serializer=JSONSerializer)), False
        except NoSuchJobError:
            pass
        return self._info(enqueue(self.queue, spec.to_json(), self.timeout_s)), True

    def _fetch(self, job_id: str) -> Any:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            return Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            raise JobNotFound(job_id) from None

    def _info(self, job: Any) -> JobInfo:
        spec = job.meta.get("spec", {})
        status = self.STATUS.get(str(job.get_status(refresh=True).value), "queued")
        error = None
        if status == "failed":
            latest = job.latest_result()  # one Redis read
            text = latest.exc_string if latest else ""
            error = (text or "failed").strip().splitlines()[-1][:500]  # the exception line, never a traceback
        result = job.return_value() if status == "succeeded" else None
        return JobInfo(job.id, status, spec.get("mode", ""), spec.get("source", ""), spec.get("index_name", ""),
                       job.meta.get("progress", {}), result, error,
                       job.created_at.timestamp() if job.created_at else 0.0)

    def get(self, job_id: str) -> JobInfo:
        return self._info(self._fetch(job_id))

    def recent(self, limit: int = 50) -> list[JobInfo]:
        raw: list[bytes] = self.connection.zrevrange(f"{QUEUE}:recent", 0, limit - 1)  # type: ignore[assignment]
        ids = [i.decode() for i in raw]
        out = []
        for job_id in ids:
            try:
                out.append(self.get(job_id))
            except JobNotFound:
                self.connection.zrem(f"{QUEUE}:recent", job_id)
        return out

    def cancel(self, job_id: str) -> JobInfo:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation

        job = self._fetch(job_id)
        status = self._info(job).status
        if status == "queued":
            job.cancel()
        elif status == "running":
            try:
                send_stop_job_command(self.connection, job_id, serializer=JSONSerializer)  # kills the job's process
            except InvalidJobOperation:
                job.cancel()
        return wait_settled(lambda: self.get(job_id))

    def close(self) -> None:
        self.connection.close()


class LocalJobs:
    """Without Redis: one background thread in the API process runs jobs, with the same API."""

    in_process = True

    def __init__(self, on_published: Callable[[str, str], object]):
        self.jobs: dict[str, JobInfo] = {}
        self.cancelled: set[str] = set()
        self.on_published = on_published
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="imsearch-job")
        self.lock = threading.Lock()

    def submit(self, spec: JobSpec) -> tuple[JobInfo, bool]:
        with self.lock:
            if spec.job_id in self.jobs:
                return self.jobs[spec.job_id], False
            info = JobInfo(spec.job_id, "queued", spec.mode, spec.source, spec.index_name, created_at=time.time())
            self.jobs[spec.job_id] = info
        self.pool.submit(self._run, spec)
        return info, True

    def _run(self, spec: JobSpec) -> None:
        info = self.jobs[spec.job_id]
        if spec.job_id in self.cancelled:
            return
        info.status = "running"

        def report(progress: dict[str, float]) -> None:
            info.progress = progress
            if spec.job_id in self.cancelled:
                raise JobCancelled(spec.job_id)

        try:
            info.result = execute(spec, report)
            try:  # serve the new version before the job says so: a client that polls then searches sees it
                self.on_published(spec.index_dir, str(info.result["version"]))
            except Exception:  # noqa: BLE001 (published on disk all the same: the version watcher follows)
                log.exception("job %s: version %s published, but swapping it in failed", spec.job_id,
                              info.result["version"])
            info.status = "succeeded"
        except JobCancelled:
            info.status = "cancelled"
        except Exception as exc:  # noqa: BLE001 (a failed job is reported, never raised into the server)
            log.exception("job %s failed", spec.job_id)
            info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"[:500]

    def get(self, job_id: str) -> JobInfo:
        if job_id not in self.jobs:
            raise JobNotFound(job_id)
        return self.jobs[job_id]

    def recent(self, limit: int = 50) -> list[JobInfo]:
        return sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)[:limit]

    def cancel(self, job_id: str) -> JobInfo:
        info = self.get(job_id)
        if info.status in ("queued", "running"):
            self.cancelled.add(job_id)
            if info.status == "queued":
                info.status = "cancelled"
        return wait_settled(lambda: info)

    def close(self) -> None:
        self.cancelled.update(self.jobs)
        self.pool.shutdown(wait=True, cancel_futures=True)
