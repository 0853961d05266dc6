"""Faults: Redis killed and restarted under load, the disk filling up during a publish, SIGTERM with
requests in flight. Each against real processes and files; searches must keep answering."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.store import Index
from indexer.versions import current_version
from service.app import create_app
from service.config import Settings
from tests.service.procs import CLI, free_port, running, serve, terminate, wait_for
from training.scenes import write_scenes

KEY = {"X-API-Key": "k3y"}
TEXTS = ["a small red circle on the left", "a large blue square left of a small green cross",
         "a small yellow diamond above a large white triangle", "a large purple cross at the top"]


@pytest.fixture(scope="module")
def scenes(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a built index, a folder of new scenes to add)."""
    root = tmp_path_factory.mktemp("faults")
    write_scenes(root / "base", 20, seed=121, twins=True)
    write_scenes(root / "incoming" / "more", 40, seed=122, twins=True)
    build_or_add(root / "base" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0), "build")
    return root / "idx", root / "incoming"


def _redis_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    wait_for(lambda: _pings(redis.Redis(port=port)), timeout=20, every=0.05)
    return proc


def _pings(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except redis.RedisError:
        return False


class Load:
    """Threads sending text searches in a loop; records (start, end, status or exception name)."""

    def __init__(self, url: str, threads: int, body: dict[str, object] | None = None):
        self.url, self.body = url, body or {}
        self.results: list[tuple[float, float, object, bool]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = offset
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    response = client.post("/v1/search", json={"text": TEXTS[i % len(TEXTS)], "k": 5, **self.body})
                    outcome: object = response.status_code
                    cached = response.status_code == 200 and response.json()["cached"]
                except httpx.HTTPError as exc:
                    outcome, cached = type(exc).__name__, False
                self.results.append((start, time.monotonic(), outcome, cached))
                i += 1


def test_redis_killed_and_restarted_under_load(scenes: tuple[Path, Path]) -> None:
    index_dir, _ = scenes
    redis_port, port = free_port(), free_port()
    redis_proc = _redis_server(redis_port)
    server = serve(f"scenes={index_dir}", port, {"IMSEARCH_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                                                 "IMSEARCH_RERANKERS": "[]"})
    url = f"http://127.0.0.1:{port}"
    try:
        with Load(url, threads=4) as load:
            wait_for(lambda: sum(r[3] for r in load.results) >= 20, timeout=60)  # the cache answers
            redis_proc.kill()
            redis_proc.wait(timeout=10)
            killed_at = time.monotonic()
            time.sleep(2.0)
            assert httpx.get(f"{url}/readyz").json()["cache"] == "degraded"
            redis_proc = _redis_server(redis_port)  # empty: it keeps nothing on disk
            restarted_at = time.monotonic()
            wait_for(lambda: any(r[3] and r[0] > restarted_at for r in load.results), timeout=30)
        assert any(r[0] > killed_at and r[1] < restarted_at for r in load.results)  # served while Redis was gone
        assert {r[2] for r in load.results} == {200}, {r[2] for r in load.results}
        assert httpx.get(f"{url}/readyz").json()["cache"] == "ok"
    finally:
        terminate(server)
        redis_proc.kill()
        redis_proc.wait(timeout=10)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs (the machine's disk cannot be filled safely)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all but `leave` bytes of the disk's free space."""
    free = shutil.disk_usage(disk).free
    filler = disk / "filler"
    with filler.open("wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_during_publish_fails_the_job_and_keeps_the_old_version(scenes: tuple[Path, Path],
                                                                              small_disk: Path) -> None:
    index_dir, incoming = scenes
    served = small_disk / "idx"
    shutil.copytree(index_dir, served, symlinks=True)
    before = current_version(served)
    filler = _fill(small_disk, leave=256 * 1024)  # the new version needs about 1.5 MB
    settings = Settings(indexes=[f"scenes={served}"], rerankers=[], api_key="k3y", job_roots=[str(incoming)])
    with TestClient(create_app(settings)) as client:
        start = client.post("/v1/jobs/index", headers=KEY, json={"source": str(incoming / "more"), "mode": "add"})
        job_id = start.json()["job_id"]
        job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=KEY).json())["status"]
                       in ("succeeded", "failed") and j)
        assert job["status"] == "failed" and "No space left on device" in job["error"], job
        assert "Traceback" not in job["error"]
        assert current_version(served) == before
        search = client.post("/v1/search", json={"text": TEXTS[0], "k": 5})
        assert search.status_code == 200 and search.json()["index_version"] == before
        assert len(search.json()["hits"]) == 5
        filler.unlink()  # space again: the same job, retried, publishes (nothing half-written was left behind)
        retry = client.post("/v1/jobs/index", headers=KEY, json={"source": str(incoming / "more"), "mode": "add"})
        job_id = retry.json()["job_id"]
        job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=KEY).json())["status"]
                       in ("succeeded", "failed") and j)
        assert job["status"] == "succeeded", job
        assert client.get("/v1/index").json()["count"] == 40 + 80


def test_sigterm_lets_in_flight_requests_finish_then_exits(scenes: tuple[Path, Path]) -> None:
    index_dir, _ = scenes
    port = free_port()
    server = serve(f"scenes={index_dir}", port, {"IMSEARCH_RERANKERS": '["early"]'})
    with Load(f"http://127.0.0.1:{port}", threads=12, body={"rerank": "early", "rerank_k": 40}) as load:
        wait_for(lambda: len(load.results) >= 12, timeout=60)
        os.killpg(server.pid, signal.SIGTERM)
        sent = time.monotonic()
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why it ended
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    in_flight = [r for r in load.results if r[0] < sent - 0.2]  # sent well before the signal: being served
    finished_late = [r for r in in_flight if r[1] > sent]
    assert finished_late and all(r[2] == 200 for r in in_flight), in_flight[-12:]


def test_worker_processes_answer_are_restarted_and_refuse_to_start_without_redis(scenes: tuple[Path, Path]) -> None:
    index_dir, _ = scenes
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSEARCH_")}
    refused = subprocess.run([CLI, "serve", "--index", str(index_dir), "--workers", "2"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "needs Redis" in refused.stderr and "Traceback" not in refused.stderr
    env["IMSEARCH_REDIS_URL"] = "redis://127.0.0.1:6379/3"
    missing = subprocess.run([CLI, "serve", "--index", str(index_dir / "nowhere"), "--workers", "2"], env=env,
                             capture_output=True, text=True, timeout=120)  # checked once, before any worker
    assert missing.returncode != 0 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
    port = free_port()
    server = serve(f"scenes={index_dir}", port, {"IMSEARCH_WORKERS": "2", "IMSEARCH_RERANKERS": '["mid"]',
                                                 "IMSEARCH_REDIS_URL": "redis://127.0.0.1:6379/3",
                                                 "IMSEARCH_CACHE": "false"})  # every search runs: counted below
    url = f"http://127.0.0.1:{port}"
    try:
        seen: set[int] = set()  # a new connection per call: the kernel hands it to either worker

        def both() -> bool:
            seen.add(httpx.get(f"{url}/healthz").json()["pid"])
            return len(seen) == 2

        wait_for(both, timeout=120)
        assert server.pid not in seen  # the parent only supervises, without torch (its memory stays small)
        assert "libtorch" not in Path(f"/proc/{server.pid}/maps").read_text()
        for _ in range(6):
            response = httpx.post(f"{url}/v1/search", json={"text": TEXTS[0], "k": 3, "rerank": "mid"}, timeout=30)
            assert response.status_code == 200 and len(response.json()["hits"]) == 3
        series = 'imsearch_stage_seconds_count{rerank="mid",stage="rerank"}'
        for _ in range(8):  # whichever worker answers the scrape, it counts the searches of both
            lines = httpx.get(f"{url}/metrics").text.splitlines()
            assert [float(line.split()[-1]) for line in lines if line.startswith(series)] == [6.0]
        busy = subprocess.run([CLI, "serve", "--index", str(index_dir), "--port", str(port), "--workers", "2"],
                              env={**os.environ, "IMSEARCH_REDIS_URL": "redis://127.0.0.1:6379/3"},
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode != 0 and "in use" in busy.stderr and "Traceback" not in busy.stderr
        os.kill(min(seen), signal.SIGKILL)  # a worker dies: the parent starts another in its place
        replaced: set[int] = set()

        def restarted() -> bool:
            try:
                replaced.add(httpx.get(f"{url}/healthz").json()["pid"])
            except httpx.TransportError:  # connections queued on the dead worker's socket are reset
                return False
            return len(replaced - seen) == 1 and max(seen) in replaced

        wait_for(restarted, timeout=120)
        assert httpx.post(f"{url}/v1/search", json={"text": TEXTS[1], "k": 2}, timeout=30).status_code == 200
        live = replaced - {min(seen)}
        server.kill()  # the supervisor alone, by SIGKILL: its workers must not go on serving as orphans
        server.wait(timeout=30)
        wait_for(lambda: not any(running(pid) for pid in live), timeout=60)
    finally:
        terminate(server)



def test_jobs_routes_answer_503_while_redis_is_down_or_hung(scenes: tuple[Path, Path]) -> None:
    index_dir, incoming = scenes
    redis_port = free_port()
    redis_proc = _redis_server(redis_port)
    settings = Settings(indexes=[f"scenes={index_dir}"], rerankers=[], api_key="k3y", job_roots=[str(incoming)],
                        redis_url=f"redis://127.0.0.1:{redis_port}/0")
    job = {"source": str(incoming / "more"), "mode": "add", "job_id": "outage"}
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/v1/jobs", headers=KEY).status_code == 200
            os.killpg(redis_proc.pid, signal.SIGSTOP)  # hung: connections open, nothing answers
            try:
                start = time.monotonic()
                hung = client.post("/v1/jobs/index", headers=KEY, json=job)
                assert hung.status_code == 503 and "Redis" in hung.json()["detail"] and time.monotonic() - start < 30
                assert hung.headers["retry-after"]
            finally:
                os.killpg(redis_proc.pid, signal.SIGCONT)
            redis_proc.kill()
            redis_proc.wait(timeout=10)
            for response in (client.get("/v1/jobs", headers=KEY), client.get("/v1/jobs/outage", headers=KEY),
                             client.post("/v1/jobs/index", headers=KEY, json=job)):
                assert response.status_code == 503 and "retry" in response.json()["detail"]
            assert client.post("/v1/search", json={"text": TEXTS[0], "k": 3}).status_code == 200
    finally:
        if redis_proc.poll() is None:
            redis_proc.kill()
            redis_proc.wait(timeout=10)


def test_a_worker_outlives_a_redis_restart_and_its_job_is_run_again(scenes: tuple[Path, Path], tmp_path: Path) -> None:
    from service.jobs.api import JobInfo, JobNotFound, JobSpec
    from service.jobs.queues import RQJobs

    index_dir, incoming = scenes
    served = tmp_path / "idx"
    shutil.copytree(index_dir, served)
    redis_port = free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    redis_proc = _redis_server(redis_port)
    worker = subprocess.Popen([CLI, "worker", "--redis-url", url], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    spec = JobSpec("survivor", str(incoming / "more"), "add", "scenes", str(served),
                   {"shard_size": 8, "batch_size": 4, "index_kind": "auto", "memory_budget_mb": None},
                   "tiny", None, "cpu", [str(incoming)])
    try:
        RQJobs(url, 600).submit(spec)
        wait_for(lambda: RQJobs(url, 600).get("survivor").status == "running", timeout=120, every=0.05)
        redis_proc.kill()  # mid-job; it keeps nothing on disk: the job's record is gone with it
        redis_proc.wait(timeout=10)
        time.sleep(3)
        assert worker.poll() is None  # the worker waits for Redis instead of exiting
        redis_proc = _redis_server(redis_port)

        def ended() -> JobInfo | None:
            with contextlib.suppress(JobNotFound):  # until the worker gives the job back
                info = RQJobs(url, 600).get("survivor")
                return info if info.status in ("succeeded", "failed") else None
            return None

        done = wait_for(ended, timeout=180)
        assert done.status == "succeeded", done
        index = Index.open(served)
        assert len(index) == 40 + 80 and len({row["sha256"] for row in index.live_rows}) == 120  # each once
        assert worker.poll() is None
    finally:
        terminate(worker)
        if worker.stderr:
            worker.stderr.close()
        redis_proc.kill()
        redis_proc.wait(timeout=10)


def _damaged_copy(index_dir: Path, tmp_path: Path, encoder: DualEncoder) -> Path:
    """A copy of the index with a second version published, whose own files are writable again."""
    served = tmp_path / "idx"
    shutil.copytree(index_dir, served)
    for path in served.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    write_scenes(tmp_path / "more", 4, seed=123, twins=True)
    build_or_add(tmp_path / "more" / "captions.jsonl", served, encoder, BuildOptions(workers=0), "add")
    return served


def test_a_token_file_truncated_while_serving_fails_that_request_only(scenes: tuple[Path, Path], tmp_path: Path,
                                                                       encoder: DualEncoder) -> None:
    served = _damaged_copy(scenes[0], tmp_path, encoder)
    with TestClient(create_app(Settings(indexes=[f"scenes={served}"], rerankers=["mid"]))) as client:
        assert client.post("/v1/search", json={"text": TEXTS[0], "k": 5, "rerank": "mid"}).status_code == 200
        index = client.app.state.engine.index(None)  # type: ignore[attr-defined]
        for shard in index.manifest["shards"]:
            tokens = index.folder / "shards" / shard["name"] / "tok.npy"
            tokens.chmod(0o644)
            with tokens.open("r+b") as fh:
                fh.truncate(256)  # in place: every version linking the shard sees it
        broken = client.post("/v1/search", json={"text": TEXTS[1], "k": 5, "rerank": "mid"})
        assert broken.status_code == 503 and "imsearch index verify" in broken.json()["detail"]
        assert str(served) not in broken.text  # the server's paths stay in its log
        fast = client.post("/v1/search", json={"text": TEXTS[2], "k": 5})
        assert fast.status_code == 200 and len(fast.json()["hits"]) == 5  # the service goes on


def test_a_damaged_current_version_is_one_line_and_an_older_one_can_be_served(scenes: tuple[Path, Path],
                                                                               tmp_path: Path,
                                                                               encoder: DualEncoder) -> None:
    served = _damaged_copy(scenes[0], tmp_path, encoder)
    (served / "CURRENT").write_bytes(b"\x00\xffgarbage")
    refused = subprocess.run([CLI, "serve", "--index", str(served), "--port", str(free_port())],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and "CURRENT" in line and "v000001" in line and "@v000002" in line, line
    with TestClient(create_app(Settings(indexes=[f"scenes={served}@v000001"], rerankers=[]))) as client:
        info = client.get("/v1/index").json()
        assert info["version"] == "v000001" and info["count"] == 40
        assert client.app.state.engine.swapper.refresh() == []  # type: ignore[attr-defined]  # held, not followed
