"""Service jobs, queues: batch-indexing jobs on an RQ queue in Redis, or on an in-process thread without it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import redis
from rq.serializers import JSONSerializer  # job payloads and results are JSON: Redis is never unpickled

from service.jobs.api import JobCancelled, JobInfo, JobNotFound, JobSpec
from service.jobs.run import execute, rq_job
from service.names import JOB_KEEP_S, QUEUE, RECENT_JOBS, RECENT_JOBS_MAX, JobState

log = logging.getLogger(__name__)
RETRIES = 2  # a job whose worker died is run again (the indexer resumes from its last shard)
FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


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
    while info.status is JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
        info = read()
    return info


def enqueue(queue: Any, payload: dict[str, Any], timeout_s: int) -> Any:
    """Put a job (a JobSpec's JSON) on the RQ queue under its id, with its retries and TTLs."""
    from rq import Retry

    job = queue.enqueue(rq_job, payload, job_id=payload["job_id"], job_timeout=timeout_s, retry=Retry(max=RETRIES),
                        result_ttl=JOB_KEEP_S, failure_ttl=JOB_KEEP_S, meta={"spec": payload},
                        description=f"{payload['mode']} {payload['source']}")
    now = time.time()
    with queue.connection.pipeline(transaction=False) as pipe:  # the list of recent jobs stays bounded
        pipe.zadd(RECENT_JOBS, {payload["job_id"]: now})
        pipe.zremrangebyscore(RECENT_JOBS, "-inf", now - JOB_KEEP_S)
        pipe.zremrangebyrank(RECENT_JOBS, 0, -RECENT_JOBS_MAX - 1)
        pipe.execute()
    return job


class RQJobs:
    """Jobs on an RQ queue; `imsearch worker` processes run them (as many as you like)."""

    in_process = False
    STATUS: dict[str, JobState] = {
        "queued": JobState.QUEUED, "deferred": JobState.QUEUED, "scheduled": JobState.QUEUED,
        "started": JobState.RUNNING, "finished": JobState.SUCCEEDED, "failed": JobState.FAILED,
        "stopped": JobState.CANCELLED, "canceled": JobState.CANCELLED,
    }

    def __init__(self, url: str, timeout_s: int, queue: str = QUEUE):
        from rq import Queue

        # bounded waits: a hung Redis answers the jobs routes with a 503 (service.errors), never a hang
        self.connection = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.queue = Queue(queue, connection=self.connection, serializer=JSONSerializer)
        self.timeout_s = timeout_s

    def submit(self, spec: JobSpec) -> tuple[JobInfo, bool]:
        try:  # an enqueue is idempotent by job id
            return self._info(self._fetch(spec.job_id)), False
        except JobNotFound:
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
        status = self.STATUS.get(str(job.get_status(refresh=True).value), JobState.QUEUED)
        error = None
        if status is JobState.FAILED:
            latest = job.latest_result()  # one Redis read
            text = latest.exc_string if latest else ""
            error = (text or "failed").strip().splitlines()[-1][:500]  # the exception line, never a traceback
        result = job.return_value() if status is JobState.SUCCEEDED else None
        return JobInfo(job.id, status, spec.get("mode", ""), spec.get("source", ""), spec.get("index_name", ""),
                       job.meta.get("progress", {}), result, error,
                       job.created_at.timestamp() if job.created_at else 0.0)

    def get(self, job_id: str) -> JobInfo:
        return self._info(self._fetch(job_id))

    def recent(self, limit: int = 50) -> list[JobInfo]:
        raw: list[bytes] = self.connection.zrevrange(RECENT_JOBS, 0, limit - 1)  # type: ignore[assignment]
        ids = [i.decode() for i in raw]
        out = []
        for job_id in ids:
            try:
                out.append(self.get(job_id))
            except JobNotFound:
                self.connection.zrem(RECENT_JOBS, job_id)
        return out

    def cancel(self, job_id: str) -> JobInfo:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation

        job = self._fetch(job_id)
        status = self._info(job).status
        if status is JobState.QUEUED:
            job.cancel()
        elif status is JobState.RUNNING:
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
            self._forget_finished()
            info = JobInfo(spec.job_id, JobState.QUEUED, spec.mode, spec.source, spec.index_name,
                           created_at=time.time())
            self.jobs[spec.job_id] = info
        self.pool.submit(self._run, spec)
        return info, True

    def _forget_finished(self) -> None:
        """Finished jobs older than JOB_KEEP_S go, then the oldest finished ones past RECENT_JOBS_MAX: the
        bounds the Redis queue keeps (a queued or running job is always kept)."""
        now = time.time()
        finished = sorted((j for j in self.jobs.values() if j.status in FINISHED), key=lambda j: j.created_at)
        excess = len(self.jobs) + 1 - RECENT_JOBS_MAX  # room for the job being added
        for i, job in enumerate(finished):
            if i >= excess and now - job.created_at < JOB_KEEP_S:
                break
            del self.jobs[job.job_id]
            self.cancelled.discard(job.job_id)

    def _run(self, spec: JobSpec) -> None:
        info = self.jobs[spec.job_id]
        if spec.job_id in self.cancelled:
            return
        info.status = JobState.RUNNING

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
            info.status = JobState.SUCCEEDED
        except JobCancelled:
            info.status = JobState.CANCELLED
        except Exception as exc:  # noqa: BLE001 (a failed job is reported, never raised into the server)
            log.exception("job %s failed", spec.job_id)
            info.status, info.error = JobState.FAILED, f"{type(exc).__name__}: {exc}"[:500]

    def get(self, job_id: str) -> JobInfo:
        if job_id not in self.jobs:
            raise JobNotFound(job_id)
        return self.jobs[job_id]

    def recent(self, limit: int = 50) -> list[JobInfo]:
        return sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)[:limit]

    def cancel(self, job_id: str) -> JobInfo:
        info = self.get(job_id)
        if info.status in (JobState.QUEUED, JobState.RUNNING):
            self.cancelled.add(job_id)
            if info.status is JobState.QUEUED:
                info.status = JobState.CANCELLED
        return wait_settled(lambda: info)

    def close(self) -> None:
        self.cancelled.update(self.jobs)
        self.pool.shutdown(wait=True, cancel_futures=True)
