"""Service process, indexing worker: an RQ worker that outlives Redis outages; after one, it waits for
Redis, then has the job it was running when Redis went away run again."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any

import redis
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from service.jobs.queues import enqueue
from service.names import QUEUE

log = logging.getLogger(__name__)
RECONNECT_EVERY_S = 1.0


def worker_name() -> str:
    """host.pid, so a restarted worker can tell which abandoned jobs were its host's."""
    return f"{socket.gethostname()}.{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobWorker(Worker):
    """RQ's forking worker, remembering the job it runs: if Redis goes away meanwhile, RQ loses track
    of it (its heartbeats fail and the work loop ends), and run_worker must give it back."""

    running: tuple[str, dict[str, Any], int] | None = None  # (job id, payload, timeout) of the job in hand
    stopping = False  # SIGINT or SIGTERM: the work loop ends by request, not by a lost connection

    def request_stop(self, signum: Any, frame: Any) -> None:
        self.stopping = True
        super().request_stop(signum, frame)

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.running = (job.id, job.args[0], int(job.timeout or 0))
        super().execute_job(job, queue)
        self.running = None


def _requeue(connection: redis.Redis, queue: Queue, job: Job, execution_id: str | None) -> None:
    """Put a job that a dead or disconnected worker had started back on the queue."""
    registry = StartedJobRegistry(queue=queue)
    with connection.pipeline() as pipe:
        if execution_id is not None:
            pipe.zrem(registry.key, f"{job.id}:{execution_id}")  # RQ's registry entry is job:execution
        if job.retries_left:
            job.retry(queue, pipe)
        else:
            job.requeue()
        pipe.execute()


def recover_abandoned(connection: redis.Redis, queue_name: str = QUEUE) -> list[str]:
    """Requeue jobs left 'started' by dead workers of this host (RQ itself does so for any host, but
    only once the dead worker's heartbeat expires, a minute and a half later)."""
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    host = socket.gethostname()
    recovered = []
    for job_id, execution_id in StartedJobRegistry(queue=queue).get_job_and_execution_ids(cleanup=False):
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        owner, _, pid = (job.worker_name or "").rpartition(".")
        if owner != host or not pid.isdigit() or _alive(int(pid)):
            continue
        _requeue(connection, queue, job, execution_id)
        recovered.append(job_id)
    return recovered


def give_back(connection: redis.Redis, queue_name: str, running: tuple[str, dict[str, Any], int]) -> str:
    """After an outage, the job this worker was running: requeued if Redis still knows it as started,
    enqueued again from its payload if Redis lost it (restarted without persistence), left alone if it
    ended meanwhile. The indexer resumes from its last completed shard, so nothing is indexed twice."""
    job_id, payload, timeout = running
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    try:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        enqueue(queue, payload, timeout)
        return "enqueued again"
    if job.get_status() in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
        return f"already {job.get_status()}"
    started = dict(StartedJobRegistry(queue=queue).get_job_and_execution_ids(cleanup=False))
    if job_id in started or job.get_status() == JobStatus.STARTED:
        _requeue(connection, queue, job, started.get(job_id))
        return "requeued"
    return f"left {job.get_status()}"


def _wait_for_redis(connection: redis.Redis) -> None:
    while True:
        try:
            connection.ping()
            return
        except redis.RedisError:
            time.sleep(RECONNECT_EVERY_S)


def _wait_for_horse(worker: JobWorker) -> None:
    """Let the job process of the lost job finish (it goes on without Redis) before it is run again."""
    if worker.horse_pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(worker.horse_pid, 0)


def run_worker(url: str, burst: bool = False, queue_name: str = QUEUE) -> None:
    """An RQ worker for indexing jobs; forks a process per job, so a cancel can kill it. When Redis goes
    away it waits for Redis to come back, then gives back the job it was running and works on."""
    connection = redis.Redis.from_url(url)
    while True:
        _wait_for_redis(connection)
        for job_id in recover_abandoned(connection, queue_name):
            log.warning("requeued job %s, abandoned by a dead worker", job_id)
        queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
        worker = JobWorker([queue], connection=connection, name=worker_name(), serializer=JSONSerializer)
        try:
            worker.work(burst=burst, with_scheduler=True)
        except redis.RedisError as exc:  # RQ's clean-up after a lost connection needs Redis too
            log.warning("lost Redis: %s", exc)
        if worker.running is None and (burst or worker.stopping):
            return
        log.warning("worker stopped working: Redis is unreachable or failed; reconnecting")
        _wait_for_horse(worker)
        _wait_for_redis(connection)
        if worker.running is not None:
            log.warning("job %s, running when Redis went away: %s", worker.running[0],
                        give_back(connection, queue_name, worker.running))
