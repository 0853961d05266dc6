"""Indexing jobs: the in-process fallback, RQ workers on the real Redis, crash recovery and the live swap."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.store import Index
from service.app import create_app
from service.config import Settings
from tests.service.procs import CLI, free_port, serve, terminate, wait_for
from training.scenes import write_scenes

REDIS_URL = "redis://127.0.0.1:6379/2"  # a database of its own: the tests flush it
KEY = {"X-API-Key": "k3y"}


@pytest.fixture()
def corpus(encoder: DualEncoder, tmp_path: Path) -> tuple[Path, Path]:
    """(allowed root holding new scenes, an index of other scenes)."""
    root = tmp_path / "incoming"
    write_scenes(root / "batch", 20, seed=101, twins=True)
    write_scenes(tmp_path / "base", 10, seed=102, twins=True)
    build_or_add(tmp_path / "base" / "captions.jsonl", tmp_path / "idx", encoder, BuildOptions(workers=0), "build")
    return root, tmp_path / "idx"


@pytest.fixture()
def flushed() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


def _settings(index_dir: Path, root: Path, **extra: Any) -> Settings:
    return Settings(indexes=[f"scenes={index_dir}"], rerankers=[], api_key="k3y", job_roots=[str(root)], **extra)


def _job(client: TestClient | httpx.Client, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}", headers=KEY).json()


def test_in_process_jobs_add_images_and_the_service_switches(corpus: tuple[Path, Path]) -> None:
    root, index_dir = corpus
    with TestClient(create_app(_settings(index_dir, root))) as client:
        before = client.get("/v1/index").json()
        start = client.post("/v1/jobs/index", headers=KEY,
                            json={"source": str(root / "batch" / "captions.jsonl"), "mode": "add", "job_id": "j1"})
        assert start.status_code == 202 and start.json()["job_id"] == "j1"
        again = client.post("/v1/jobs/index", headers=KEY, json={"source": str(root / "batch"), "job_id": "j1"})
        assert again.status_code == 200 and again.json()["job_id"] == "j1"  # idempotent by id
        done = wait_for(lambda: (j := _job(client, "j1"))["status"] in ("succeeded", "failed") and j)
        assert done["status"] == "succeeded", done
        assert done["result"]["indexed"] == 40 and done["progress"]["done"] == done["progress"]["total"] == 40
        after = client.get("/v1/index").json()
        assert after["version"] != before["version"] and after["count"] == before["count"] + 40
        assert [j["job_id"] for j in client.get("/v1/jobs", headers=KEY).json()] == ["j1"]


def test_a_job_chooses_the_token_store_and_an_add_keeps_it(corpus: tuple[Path, Path]) -> None:
    root, index_dir = corpus
    source = str(root / "batch" / "captions.jsonl")
    with TestClient(create_app(_settings(index_dir, root))) as client:
        client.post("/v1/jobs/index", headers=KEY, json={"source": source, "mode": "build", "replace": True,
                                                         "job_id": "b4", "options": {"tokens": "int4+keep16"}})
        built = wait_for(lambda: (j := _job(client, "b4"))["status"] in ("succeeded", "failed") and j)
        assert built["status"] == "succeeded", built
        assert client.get("/v1/index").json()["manifest"]["tokens"]["format"] == "int4+keep16"
        client.post("/v1/jobs/index", headers=KEY, json={"source": str(root), "job_id": "a16",
                                                         "options": {"tokens": "fp16"}})
        refused = wait_for(lambda: (j := _job(client, "a16"))["status"] in ("succeeded", "failed") and j)
        assert refused["status"] == "failed" and "one index holds one format" in refused["error"]
        for name in ("int3", "int4+16"):
            wrong = client.post("/v1/jobs/index", headers=KEY, json={"source": source, "options": {"tokens": name}})
            assert wrong.status_code == 422 and "tokens" in wrong.json()["detail"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        ({"source": "/etc"}, KEY, 403, "outside the allowed roots"),
        ({"source": "ROOT/" + "../" * 16 + "etc/passwd"}, KEY, 403, "outside"),
        ({"source": "ROOT/missing"}, KEY, 422, "does not exist"),
        ({"source": "ROOT/\u0000"}, KEY, 422, "NUL"),
        ({"source": "~0"}, KEY, 422, "does not exist"),  # no user 0: expanding it raised (the fuzz test found it)
        ({"source": "ROOT", "index": "nope"}, KEY, 404, "nope"),
        ({"source": "ROOT", "mode": "destroy"}, KEY, 422, "mode"),
        ({"source": "ROOT"}, {}, 401, "API key"),
        ({"source": "ROOT"}, {"X-API-Key": "wrong"}, 403, "wrong API key"),
    ],
)
def test_bad_job_requests_are_refused(corpus: tuple[Path, Path], body: dict[str, str], headers: dict[str, str],
                                      status: int, needle: str) -> None:
    root, index_dir = corpus
    body = {k: v.replace("ROOT", str(root)) for k, v in body.items()}
    with TestClient(create_app(_settings(index_dir, root))) as client:
        response = client.post("/v1/jobs/index", headers=headers, json=body)
        assert response.status_code == status and needle in response.json()["detail"]
        assert client.get("/v1/jobs/unknown", headers=KEY).status_code == 404


def test_jobs_are_disabled_without_allowed_roots(corpus: tuple[Path, Path]) -> None:
    root, index_dir = corpus
    settings = Settings(indexes=[str(index_dir)], rerankers=[], api_key="k3y")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/jobs/index", headers=KEY, json={"source": str(root)})
    assert response.status_code == 403 and "IMSEARCH_JOB_ROOTS" in response.json()["detail"]


def test_cancel_an_in_process_job(corpus: tuple[Path, Path], encoder: DualEncoder) -> None:
    root, index_dir = corpus
    write_scenes(root / "big", 150, seed=103, twins=True)
    with TestClient(create_app(_settings(index_dir, root))) as client:
        version = client.get("/v1/index").json()["version"]
        client.post("/v1/jobs/index", headers=KEY, json={"source": str(root / "big"), "job_id": "long",
                                                         "options": {"shard_size": 16, "batch_size": 8}})
        wait_for(lambda: _job(client, "long").get("progress", {}).get("done", 0) > 0)
        cancelled = client.delete("/v1/jobs/long", headers=KEY).json()
        assert cancelled["status"] == "cancelled"
        assert client.get("/v1/index").json()["version"] == version  # nothing was published


def test_in_process_jobs_keep_the_same_bounds_as_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.jobs import queues
    from service.jobs.api import JobSpec
    from service.names import JOB_KEEP_S

    monkeypatch.setattr(queues, "RECENT_JOBS_MAX", 3)
    jobs = queues.LocalJobs(lambda *_: None)

    def run(job_id: str) -> None:  # no allowed roots: the job fails at once, and is finished
        jobs.submit(JobSpec(job_id, "/nowhere", "add", "scenes", "/nowhere", {}, "tiny", None, "cpu"))
        assert wait_for(lambda: jobs.get(job_id).status == "failed")

    run("ancient")
    jobs.get("ancient").created_at -= JOB_KEEP_S + 60
    run("j0")
    assert [j.job_id for j in jobs.recent()] == ["j0"]  # past JOB_KEEP_S: forgotten
    for i in range(1, 5):
        run(f"j{i}")
    assert [j.job_id for j in jobs.recent()] == ["j4", "j3", "j2"]
    with pytest.raises(queues.JobNotFound):
        jobs.get("j1")
    jobs.close()


# --- RQ workers on the real Redis ------------------------------------------------------------------


def _worker() -> subprocess.Popen[bytes]:
    return subprocess.Popen([CLI, "worker", "--redis-url", REDIS_URL], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _serve(index_dir: Path, root: Path, port: int) -> subprocess.Popen[bytes]:
    return serve(f"scenes={index_dir}", port, {
        "IMSEARCH_REDIS_URL": REDIS_URL, "IMSEARCH_API_KEY": "k3y", "IMSEARCH_JOB_ROOTS": f'["{root}"]',
        "IMSEARCH_RERANKERS": "[]", "IMSEARCH_VERSION_POLL_S": "600"})


def test_worker_job_swaps_both_api_processes_with_zero_failed_searches(corpus: tuple[Path, Path],
                                                                       flushed: redis.Redis) -> None:
    root, index_dir = corpus
    ports = [free_port(), free_port()]
    servers = [_serve(index_dir, root, port) for port in ports]
    worker = _worker()
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) for port in ports]
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:  # searches keep running across the swap
        i = 0
        while not stop.is_set():
            statuses.append(clients[i % 2].post("/v1/search", json={"text": "a red circle", "k": 5}).status_code)
            i += 1

    loader = threading.Thread(target=load)
    try:
        before = clients[0].get("/v1/index").json()
        loader.start()
        start = clients[0].post("/v1/jobs/index", headers=KEY, json={"source": str(root / "batch"), "job_id": "rq1"})
        assert start.status_code == 202
        done = wait_for(lambda: (j := _job(clients[1], "rq1"))["status"] in ("succeeded", "failed") and j)
        assert done["status"] == "succeeded" and done["result"]["indexed"] == 40, done
        # pub/sub, not polling (set to 10 minutes), brings both processes to the new version
        for client in clients:
            wait_for(lambda c=client: c.get("/v1/index").json()["version"] != before["version"], timeout=20)
            assert client.get("/v1/index").json()["count"] == before["count"] + 40
        time.sleep(0.5)
    finally:
        stop.set()
        if loader.is_alive():
            loader.join(timeout=30)
        for client in clients:
            client.close()
        terminate(worker)
        for server in servers:
            terminate(server)
    assert len(statuses) > 10 and set(statuses) == {200}


def test_a_killed_worker_s_job_completes_after_restart_exactly_once(corpus: tuple[Path, Path],
                                                                     flushed: redis.Redis) -> None:
    root, index_dir = corpus
    write_scenes(root / "big", 300, seed=104, twins=True)
    settings = _settings(index_dir, root, redis_url=REDIS_URL)
    worker = _worker()
    with TestClient(create_app(settings)) as client:
        client.post("/v1/jobs/index", headers=KEY, json={"source": str(root / "big"), "job_id": "crash",
                                                         "options": {"shard_size": 32, "batch_size": 16}})
        wait_for(lambda: _job(client, "crash").get("progress", {}).get("done", 0) >= 96)
        terminate(worker, signal.SIGKILL)  # the worker and the job's process, mid-job
        assert _job(client, "crash")["status"] == "running"  # what Redis still believes
        worker = _worker()
        try:
            done = wait_for(lambda: (j := _job(client, "crash"))["status"] in ("succeeded", "failed") and j, 180)
        finally:
            terminate(worker)
    assert done["status"] == "succeeded", done
    index = Index.open(index_dir)
    paths = [row["path"] for row in index.live_rows]
    assert len(paths) == len(set(paths)) == 20 + 600  # each image exactly once


def test_cancel_a_running_worker_job(corpus: tuple[Path, Path], flushed: redis.Redis) -> None:
    root, index_dir = corpus
    write_scenes(root / "big", 300, seed=105, twins=True)
    version = Index.open(index_dir).version
    worker = _worker()
    try:
        with TestClient(create_app(_settings(index_dir, root, redis_url=REDIS_URL))) as client:
            client.post("/v1/jobs/index", headers=KEY, json={"source": str(root / "big"), "job_id": "stopme",
                                                             "options": {"shard_size": 16, "batch_size": 8}})
            wait_for(lambda: _job(client, "stopme").get("progress", {}).get("done", 0) > 0)
            assert client.delete("/v1/jobs/stopme", headers=KEY).json()["status"] == "cancelled"
            time.sleep(1.0)
            assert _job(client, "stopme")["status"] == "cancelled"
    finally:
        terminate(worker)
    assert Index.open(index_dir).version == version


def test_the_recent_jobs_list_stays_bounded_and_a_cache_flush_leaves_it(flushed: redis.Redis,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from rq import Queue
    from rq.serializers import JSONSerializer

    from service.jobs import queues
    from service.names import JOB_KEEP_S, QUEUE, RECENT_JOBS, result_key
    from service.pipeline.cache import QueryCache

    monkeypatch.setattr(queues, "RECENT_JOBS_MAX", 3)
    flushed.zadd(RECENT_JOBS, {"ancient": time.time() - JOB_KEEP_S - 60})
    queue = Queue(QUEUE, connection=flushed, serializer=JSONSerializer)
    for i in range(5):
        queues.enqueue(queue, {"job_id": f"j{i}", "mode": "add", "source": "/nowhere"}, 60)
    assert [raw.decode() for raw in flushed.zrange(RECENT_JOBS, 0, -1)] == ["j2", "j3", "j4"]
    cache = QueryCache(REDIS_URL, 60)
    cache.put_many([(result_key("m", "v", {"text": "x"}), "{}")])
    assert cache.clear() == 1  # the cached result, and nothing of the jobs'
    assert flushed.zcard(RECENT_JOBS) == 3 and queue.count == 5
    cache.close()
