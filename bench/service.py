"""Benchmark: HTTP overhead of /v1/search and throughput under concurrency (micro-batching), as JSON.

    python bench/service.py [--n 100000] [--n-real 2000] [--duration 8] [--workers N] [--out FILE]

A real scene corpus (n-real images, with patch tokens for the reranker) is indexed by the real
builder; the ANN index is then rebuilt over n vectors, random unit fillers stored under real images'
ids, so that search runs over n vectors. The service runs as `imsearch serve --workers N` (default:
one per core; several need the Redis at 127.0.0.1:6379, caching and access log off); the load comes from separate
client processes (a bare asyncio HTTP/1.1 client), one per setting.

(1) overhead: HTTP p50 of /v1/search (rerank none, one client) / in-process p50 of encode + search,
    in interleaved blocks, free on every core and pinned to one (see `overhead`).
(2) throughput: QPS and p50/p95/p99 at 1, 16 and 64 concurrent clients, rerank none and mid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# --- client process --------------------------------------------------------------------------------


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def body_length(head: bytes) -> int:
    """Content-Length from a response's lower-cased status line and headers (0 when absent)."""
    at = head.find(b"\r\ncontent-length:")
    return int(head[at + 17 : head.index(b"\r\n", at + 2)]) if at >= 0 else 0


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one raw HTTP/1.1 request on a keep-alive connection; returns the status (the body is dropped)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()  # status line and headers in one read
    await reader.readexactly(body_length(head))
    return int(head[9:12])


def write_result(result: dict, out: Path | None) -> None:
    """Print the JSON result, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


async def _client_loop(url: str, texts: list[str], concurrency: int, duration: float, rerank: str) -> dict:
    """Closed-loop load: `concurrency` connections, each sending its next request when the last returns.

    A bare asyncio HTTP/1.1 client on uvloop, requests prebuilt, each response read in two calls (like
    wrk, it costs the shared cores little per request; httpx added 2.5 ms to every request's latency).
    """
    host, port = host_port(url)
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    requests = [search_request(text, rerank) for text in texts]  # built before the clock starts

    async def worker(offset: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                ok = await exchange(reader, writer, requests[i % len(requests)]) == 200
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                ok = False
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            latencies.append((time.perf_counter() - start) * 1000)
            errors += 0 if ok else 1
            i += concurrency
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker(j) for j in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {"concurrency": concurrency, "rerank": rerank, "requests": len(latencies), "errors": errors,
            "qps": round(len(latencies) / elapsed, 1), "p50_ms": round(percentile(latencies, 50), 2),
            "p95_ms": round(percentile(latencies, 95), 2), "p99_ms": round(percentile(latencies, 99), 2)}


def client_main(args: argparse.Namespace) -> None:
    import uvloop  # the event loop uvicorn uses too: a lighter client leaves more of the shared cores to the server

    texts = json.loads(Path(args.texts).read_text())
    result = uvloop.run(_client_loop(args.client, texts, args.concurrency, args.duration, args.rerank))
    print(json.dumps(result))


def run_client(url: str, texts_file: Path, concurrency: int, duration: float, rerank: str) -> dict:
    cmd = [sys.executable, __file__, "--client", url, "--texts", str(texts_file), "--concurrency", str(concurrency),
           "--duration", str(duration), "--rerank", rerank]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- server side -----------------------------------------------------------------------------------

CLI = str(Path(sys.executable).parent / "imsearch")
REDIS_URL = "redis://127.0.0.1:6379/5"  # what several worker processes share (jobs, versions); caching off


def pad_index(index_dir: Path, n: int, seed: int = 0) -> None:
    """Publish a new version whose ANN index holds n vectors: the real ones plus random unit fillers,
    each filler under a real image's id (FAISS allows repeated ids), so that search runs over n
    vectors and every hit still has tokens and metadata, here and in `imsearch serve` alike. The
    shards are the current version's (linked); its manifest counts the n vectors and says how many
    are padding."""
    from indexer.ann import build_index, plan_index
    from indexer.durable import save_faiss
    from indexer.layout import DELETED, INDEX_FILE, SHARDS
    from indexer.store import Index
    from indexer.versions import link_shard, publish

    index = Index.open(index_dir)
    real = index.ids()
    rng = np.random.default_rng(seed)
    filler = rng.standard_normal((n - len(real), index.dim)).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    plan = plan_index(n, index.dim)
    ids = np.concatenate([real, real[np.arange(n - len(real)) % len(real)]])
    padded = build_index(plan, np.concatenate([index.vectors(real), filler]), ids, seed)

    def fill(tmp: Path, name: str) -> dict:
        for shard in index.manifest["shards"]:
            link_shard(index.folder / SHARDS / shard["name"], tmp / SHARDS)
        save_faiss(tmp / INDEX_FILE, padded)
        (tmp / DELETED).write_bytes((index.folder / DELETED).read_bytes())
        manifest = {k: v for k, v in index.manifest.items() if k not in ("version", "files")}
        return {**manifest, "index": plan.to_dict(), "count": n, "parent": index.version, "bench_padding": len(filler)}

    publish(index_dir, fill)
    index.close()


class BlockingClient:
    """One keep-alive HTTP/1.1 connection, prebuilt requests, the body dropped: little more than
    the two system calls a request needs (like wrk), so its p50 is the server's and the wire's."""

    def __init__(self, url: str):
        self.sock = socket.create_connection(host_port(url))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def exchange(self, request: bytes) -> int:
        self.sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, rest = data.partition(b"\r\n\r\n")
        missing = body_length(head.lower() + b"\r\n") - len(rest)
        while missing > 0:
            missing -= len(self._recv())
        return int(head[9:12])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-response")
        return chunk

    def close(self) -> None:
        self.sock.close()


def search_request(text: str, rerank: str) -> bytes:
    body = json.dumps({"text": text, "k": 10, "rerank": rerank, "rerank_k": 16}).encode()
    head = b"POST /v1/search HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


def overhead(url: str, encoder, index, texts: list[str], pgid: int, rounds: int = 90,  # noqa: ANN001
             block: int = 40) -> dict:
    """HTTP p50 of /v1/search (rerank none, one client) against the in-process p50 of encode + ANN
    search of one text at a time, in interleaved blocks (a baseline measured once, before the server
    starts, would count the machine's drift as overhead), twice: free to run on any core (the figure a
    user sees), then with the server's processes and this one pinned to one shared core (there the
    hand-offs are context switches, and the client's own work is charged to the HTTP side).
    """
    requests = [search_request(text, "none") for text in texts]
    cores = max(1, os.cpu_count() or 1)
    free = _interleaved(url, requests, encoder, index, texts, {"all_cores": cores, "serve_threads": 1}, rounds, block)
    with pinned(group_pids(pgid) + [os.getpid()], max(os.sched_getaffinity(0))):
        one = _interleaved(url, requests, encoder, index, texts, {"one_core": 1}, rounds, block)
    baseline = min(free["all_cores"], free["serve_threads"])  # the ratio is against the faster of the two
    return {"in_process_p50_ms": round(one["one_core"], 3), "http_p50_ms": round(one["http"], 3),
            "overhead_ratio": round(one["http"] / one["one_core"], 3),
            "unpinned": {"in_process_by_threads": {k: round(free[k], 3) for k in ("all_cores", "serve_threads")},
                         "http_p50_ms": round(free["http"], 3), "overhead_ratio": round(free["http"] / baseline, 3)},
            "overhead_rounds": rounds, "overhead_block": block}


def _interleaved(url: str, requests: list[bytes], encoder, index, texts: list[str],  # noqa: ANN001
                 threads: dict[str, int], rounds: int, block: int) -> dict[str, float]:
    """p50 ms of each in-process setting (name → torch/BLAS threads) and of HTTP, in interleaved
    blocks; the first round is warm-up."""
    import torch
    from threadpoolctl import threadpool_limits

    client = BlockingClient(url)
    times: dict[str, list[float]] = {name: [] for name in [*threads, "http"]}
    i = 0
    for _ in range(rounds):
        for name in times:
            n = threads.get(name, 1)
            torch.set_num_threads(n)
            with threadpool_limits(n):
                for _ in range(block):
                    start = time.perf_counter()
                    if name == "http":
                        if client.exchange(requests[i % len(requests)]) != 200:
                            raise SystemExit("the server answered a search with an error")
                    else:
                        index.search(encoder.encode_texts([texts[i % len(texts)]]), 10)
                    times[name].append((time.perf_counter() - start) * 1000)
                    i += 1
    client.close()
    return {name: statistics.median(values[block:]) for name, values in times.items()}


@contextlib.contextmanager
def pinned(pids: list[int], cpu: int) -> Iterator[None]:
    """Every thread of these processes on one CPU, then back on all of this process's CPUs."""
    everywhere = os.sched_getaffinity(0)
    _set_affinity(pids, {cpu})
    try:
        yield
    finally:
        _set_affinity(pids, everywhere)


def _set_affinity(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):  # a thread or process that ended meanwhile
                os.sched_setaffinity(int(task.name), cpus)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own server on 127.0.0.1)
        return bytes(response.read())


def start_server(index: str, port: int, workers: int, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`imsearch serve --index INDEX` (IMSEARCH_* from env) as its own process group, once each of its
    worker processes answers; stop it with stop_server."""
    proc = subprocess.Popen([CLI, "serve", "--index", index, "--port", str(port), "--workers", str(workers)],
                            env={**os.environ, **env}, start_new_session=True, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    seen: set[int] = set()
    deadline = time.monotonic() + 300
    while len(seen) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"imsearch serve did not start: see {log}")
        try:
            seen.add(json.loads(get(f"http://127.0.0.1:{port}/healthz"))["pid"])
        except OSError:
            time.sleep(0.2)
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def _group_stats(pgid: int) -> dict[int, list[str]]:
    """pid → its /proc stat fields after "(comm)" (which may hold spaces), for every live process
    of a process group: state, ppid, pgrp, ..., utime (11), stime (12)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            out[int(stat.parent.name)] = fields
    return out


def group_pids(pgid: int) -> list[int]:
    return list(_group_stats(pgid))


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (from /proc)."""
    total = sum(int(f[11]) + int(f[12]) for f in _group_stats(pgid).values())
    return total / os.sysconf("SC_CLK_TCK")


def loaded(url: str, texts_file: Path, concurrency: int, duration: float, rerank: str, pgid: int) -> dict:
    """One client run, plus the cores the server's processes kept busy meanwhile: one process's Python
    work holds one GIL, so a single process bound by it stays near one core however many are free."""
    cpu = group_cpu_seconds(pgid)
    row = run_client(url, texts_file, concurrency, duration, rerank)
    busy = (group_cpu_seconds(pgid) - cpu) / (row["requests"] / row["qps"])  # idle outside the load window
    return {**row, "server_cores": round(busy, 2)}


def mean_batches(url: str) -> dict[str, float]:
    """Mean items per micro-batch of the text encoder and FAISS, from /metrics (summed over workers)."""
    values: dict[str, float] = {}
    for line in get(f"{url}/metrics").decode().splitlines():
        for name in ("text", "search"):
            for part in ("sum", "count"):
                if line.startswith(f'imsearch_batch_size_{part}{{batcher="{name}"}}'):
                    values[f"{name}_{part}"] = float(line.split()[-1])
    return {name: round(values.get(f"{name}_sum", 0.0) / max(1.0, values.get(f"{name}_count", 0.0)), 2)
            for name in ("text", "search")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench(args: argparse.Namespace) -> dict:
    import torch

    from indexer.build import BuildOptions, build_or_add
    from indexer.encoder import load_encoder
    from indexer.store import Index
    from training.scenes import write_scenes

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    encoder = load_encoder()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-service-"))
    if not (work / "idx").is_dir():  # --work of an earlier run: its padded index is reused
        manifest = write_scenes(work / "src", args.n_real // 2, seed=5, twins=True)
        build_or_add(manifest, work / "idx", encoder, BuildOptions(workers=0), "build")
        pad_index(work / "idx", args.n)
    index = Index.open(work / "idx")
    texts = [row["caption"] for row in index.live_rows]
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))

    port = free_port()
    # caching off: every request computes; no access log: a line per request is the operator's choice
    # (a proxy in front usually logs), not the service's overhead
    env = {"IMSEARCH_RERANKERS": '["mid"]', "IMSEARCH_CACHE": "false", "IMSEARCH_ACCESS_LOG": "false"}
    server = start_server(f"bench={work / 'idx'}", port, args.workers, work / "serve.log",
                          {**env, "IMSEARCH_REDIS_URL": REDIS_URL} if args.workers > 1 else env)
    url = f"http://127.0.0.1:{port}"
    try:
        run_client(url, texts_file, 4 * args.workers, 2.0, "mid")  # warm-up, every worker
        measured = overhead(url, encoder, index, texts, server.pid)
        rows = [loaded(url, texts_file, c, args.duration, rerank, server.pid)
                for rerank in ("none", "mid") for c in (1, 16, 64)]
        batches = mean_batches(url)
    finally:
        stop_server(server)

    qps = {(r["rerank"], r["concurrency"]): r["qps"] for r in rows}
    return {
        "machine": f"{os.cpu_count()} cores", "n": args.n, "n_real": len(index.ids()), "ann": index.plan.kind,
        "workers": args.workers,
        **measured,
        "qps_64_over_1": {r: round(qps[(r, 64)] / qps[(r, 1)], 2) for r in ("none", "mid")},
        "errors": sum(r["errors"] for r in rows),
        "batches": batches,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--n-real", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="API processes (imsearch serve --workers; default: one per core)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="a folder for the corpus and index (kept; reused when it holds one)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rerank", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    write_result(bench(args), args.out)


if __name__ == "__main__":
    main()
