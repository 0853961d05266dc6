"""Benchmark: HTTP overhead of /v1/search and throughput under concurrency (micro-batching), as JSON.

    python bench/service.py [--n 100000] [--n-real 2000] [--duration 8] [--out FILE]

A real scene corpus (n-real images, with patch tokens for the reranker) is indexed by the real
builder; the ANN index is then padded with random unit vectors up to n, the padded rows mapping
back onto real images, so that search runs over n vectors. The service runs in this process under
uvicorn; the load comes from separate client processes (a bare asyncio HTTP/1.1 client), one per setting.

(1) overhead: HTTP p50 of /v1/search (rerank none, one client) / in-process p50 of encode + search.
(2) throughput: QPS and p50/p95/p99 at 1, 16 and 64 concurrent clients, rerank none and mid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# --- client process --------------------------------------------------------------------------------


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one raw HTTP/1.1 request on a keep-alive connection; returns the status (the body is dropped)."""
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        length = int(value) if name.lower() == b"content-length" else length
    await reader.readexactly(length)
    return status


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes) -> int:
    head = b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return await exchange(reader, writer, head % (path.encode(), len(body)) + body)


def write_result(result: dict, out: Path | None) -> None:
    """Print the JSON result, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


async def _client_loop(url: str, texts: list[str], concurrency: int, duration: float, rerank: str) -> dict:
    """Closed-loop load: `concurrency` connections, each sending its next request when the last returns.

    A bare asyncio HTTP/1.1 client (like wrk, it costs the shared cores almost nothing per request;
    httpx added 2.5 ms to every request's latency here).
    """
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def worker(offset: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        i = offset
        while time.perf_counter() < stop:
            body = json.dumps({"text": texts[i % len(texts)], "k": 10, "rerank": rerank, "rerank_k": 16}).encode()
            start = time.perf_counter()
            try:
                ok = await _post(reader, writer, "/v1/search", body) == 200
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                ok = False
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
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
    texts = json.loads(Path(args.texts).read_text())
    result = asyncio.run(_client_loop(args.client, texts, args.concurrency, args.duration, args.rerank))
    print(json.dumps(result))


def run_client(url: str, texts_file: Path, concurrency: int, duration: float, rerank: str) -> dict:
    cmd = [sys.executable, __file__, "--client", url, "--texts", str(texts_file), "--concurrency", str(concurrency),
           "--duration", str(duration), "--rerank", rerank]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- server side -----------------------------------------------------------------------------------


def padded_index(index_dir: Path, n: int, seed: int = 0):  # noqa: ANN201 (an Index subclass)
    """The real index with its ANN structure rebuilt over n vectors: real ones plus random fillers."""
    from indexer.ann import build_index, plan_index
    from indexer.store import Index

    class PaddedIndex(Index):
        def search(self, queries, k, nprobe=None, ef_search=None):  # noqa: ANN001, ANN202
            scores, ids = super().search(queries, k, nprobe, ef_search)
            mapped = np.where(ids >= 0, self.real_ids[np.maximum(ids, 0) % len(self.real_ids)], -1)
            return scores, mapped

    index = PaddedIndex.open(index_dir)
    real = index.ids()
    vectors = index.vectors(real)
    rng = np.random.default_rng(seed)
    filler = rng.standard_normal((n - len(real), index.dim)).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    index.real_ids = real
    index.plan = plan_index(n, index.dim)
    index.faiss = build_index(index.plan, np.concatenate([vectors, filler]), np.arange(n, dtype=np.int64), seed)
    return index


def in_process_p50(encoder, index, texts: list[str], repeats: int = 300) -> float:  # noqa: ANN001
    """encode + ANN search of one text at a time, without the service around it."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        vector = encoder.encode_texts([texts[i % len(texts)]])
        index.search(vector, 10)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[20:])


def loaded(url: str, texts_file: Path, concurrency: int, duration: float, rerank: str) -> dict:
    """One client run, plus the cores this (server) process kept busy meanwhile: one process's Python
    work holds one GIL, so a server bound by it stays near one core however many are free."""
    cpu = time.process_time()
    row = run_client(url, texts_file, concurrency, duration, rerank)
    busy = (time.process_time() - cpu) / (row["requests"] / row["qps"])  # idle outside the load window
    return {**row, "server_cores": round(busy, 2)}


def start_server(app, port: int):  # noqa: ANN001, ANN201
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def mean_batch(engine, name: str) -> float:  # noqa: ANN001
    """Mean items per micro-batch of one batcher, from the engine's Prometheus histogram."""
    get = engine.metrics.registry.get_sample_value
    count = get("imsearch_batch_size_count", {"batcher": name}) or 0.0
    return round((get("imsearch_batch_size_sum", {"batcher": name}) or 0.0) / max(1.0, count), 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench(args: argparse.Namespace) -> dict:
    import torch

    from indexer.build import BuildOptions, build_or_add
    from indexer.encoder import load_encoder
    from indexer.scenes import write_scenes
    from reranker.score import load_tier
    from service.app import create_app
    from service.config import Settings
    from service.state import assemble, configure_process

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    encoder = load_encoder()
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    manifest = write_scenes(work / "src", args.n_real // 2, seed=5, twins=True)
    build_or_add(manifest, work / "idx", encoder, BuildOptions(workers=0), "build")
    index = padded_index(work / "idx", args.n)
    texts = [row["caption"] for row in index.live_rows]
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))

    settings = Settings(indexes=[f"bench={work / 'idx'}"], rerankers=["mid"])
    in_process = {"all_cores": in_process_p50(encoder, index, texts)}
    configure_process(settings)  # as `imsearch serve` does
    in_process["serve_threads"] = in_process_p50(encoder, index, texts)
    baseline = min(in_process.values())  # the ratio is against the faster of the two
    engine = assemble(settings, encoder, {"bench": index}, {"mid": load_tier("mid", encoder)})
    port = free_port()
    server, thread = start_server(create_app(settings, engine), port)
    url = f"http://127.0.0.1:{port}"
    run_client(url, texts_file, 4, 2.0, "mid")  # warm-up
    rows = [loaded(url, texts_file, c, args.duration, rerank) for rerank in ("none", "mid") for c in (1, 16, 64)]
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()

    single = next(r for r in rows if r["concurrency"] == 1 and r["rerank"] == "none")
    qps = {(r["rerank"], r["concurrency"]): r["qps"] for r in rows}
    return {
        "machine": f"{os.cpu_count()} cores", "n": args.n, "n_real": len(index.real_ids), "ann": index.plan.kind,
        "in_process_p50_ms": round(baseline, 3),
        "in_process_by_threads": {k: round(v, 3) for k, v in in_process.items()},
        "http_p50_ms": single["p50_ms"],
        "overhead_ratio": round(single["p50_ms"] / baseline, 3),
        "qps_64_over_1": {r: round(qps[(r, 64)] / qps[(r, 1)], 2) for r in ("none", "mid")},
        "errors": sum(r["errors"] for r in rows),
        "batches": {name: mean_batch(engine, name) for name in ("text", "search")},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--n-real", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--out", type=Path)
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
