"""Benchmark: soak a real `imsearch serve` process with mixed traffic; QPS, latency, errors and RSS growth.

    python bench/soak.py [--scenes 1000] [--clients 16] [--duration 60] [--warmup 10] [--out FILE]

An index of scenes (and their twins) is built, then `imsearch serve` runs as its own process with
the embedded models. N concurrent clients (asyncio, one keep-alive connection each) send a mix:
text search without rerank, text with mid and with early rerank, base64 image search, and image
uploads. The server's RSS is read from /proc after the warm-up and at the end.

Target: 0 errors and RSS growth under 5% after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.service import exchange, free_port, percentile, start_server, stop_server, write_result  # noqa: E402

KINDS = ("text", "text_mid", "text_early", "image_b64", "image_upload")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def request_bytes(kind: str, text: str, image: bytes) -> bytes:
    """One HTTP/1.1 request of the given kind."""
    if kind == "image_upload":
        boundary = b"soakboundary"
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--" + boundary + b"--\r\n")
        head = (b"POST /v1/search/image HTTP/1.1\r\nHost: soak\r\n"
                b"Content-Type: multipart/form-data; boundary=%s\r\n" % boundary)
    else:
        query: dict[str, object] = {"k": 10}
        if kind.startswith("text"):
            query["text"] = text
            query["rerank"] = {"text": "none", "text_mid": "mid", "text_early": "early"}[kind]
        else:
            query["image"] = base64.b64encode(image).decode()
        body = json.dumps(query).encode()
        head = b"POST /v1/search HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def load(port: int, texts: list[str], images: list[bytes], clients: int, duration: float,
               seed: int) -> dict[str, list]:
    """Closed-loop clients; per kind: latencies (ms) and error statuses."""
    rng = np.random.default_rng(seed)
    plan = [(KINDS[int(k)], int(t), int(i)) for k, t, i in zip(rng.integers(len(KINDS), size=100_000),
                                                              rng.integers(len(texts), size=100_000),
                                                              rng.integers(len(images), size=100_000), strict=True)]
    out: dict[str, list] = {kind: [] for kind in KINDS} | {"errors": []}
    stop = time.perf_counter() + duration

    async def client(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        while time.perf_counter() < stop:
            kind, t, m = plan[i % len(plan)]
            start = time.perf_counter()
            try:
                status = await exchange(reader, writer, request_bytes(kind, texts[t], images[m]))
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                status = type(exc).__name__  # type: ignore[assignment]
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if status == 200:
                out[kind].append((time.perf_counter() - start) * 1000)
            else:
                out["errors"].append(f"{kind}: {status}")
            i += clients
        writer.close()

    await asyncio.gather(*(client(j) for j in range(clients)))
    return out


def summary(results: dict[str, list], seconds: float) -> dict[str, object]:
    every = [ms for kind in KINDS for ms in results[kind]]
    per_kind = {kind: {"requests": len(results[kind]), "p50_ms": round(percentile(results[kind], 50), 2),
                       "p95_ms": round(percentile(results[kind], 95), 2)} for kind in KINDS}
    return {"requests": len(every) + len(results["errors"]), "errors": len(results["errors"]),
            "error_samples": results["errors"][:5], "qps": round(len(every) / seconds, 1),
            "p50_ms": round(percentile(every, 50), 2), "p95_ms": round(percentile(every, 95), 2),
            "p99_ms": round(percentile(every, 99), 2), "by_kind": per_kind}


def prepare(work: Path, scenes: int) -> tuple[Path, list[str], list[bytes]]:
    from indexer.build import BuildOptions, build_or_add
    from indexer.encoder import load_encoder
    from training.scenes import write_scenes

    manifest = write_scenes(work / "src", scenes, seed=17, twins=True)
    build_or_add(manifest, work / "idx", load_encoder(), BuildOptions(workers=0), "build")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    texts = [row["caption"] for row in rows]
    images = [(manifest.parent / row["file"]).read_bytes() for row in rows[:50]]
    return work / "idx", texts, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000, help="scenes indexed (each with its twin)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the first RSS reading")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    index_dir, texts, images = prepare(work, args.scenes)
    port = free_port()
    server = start_server(f"soak={index_dir}", port, 1, work / "serve.log", {"IMSEARCH_RERANKERS": '["mid","early"]'})
    try:
        asyncio.run(load(port, texts, images, args.clients, args.warmup, seed=1))
        rss_start = rss_mib(server.pid)
        began = time.perf_counter()
        results = asyncio.run(load(port, texts, images, args.clients, args.duration, seed=2))
        seconds = time.perf_counter() - began
        rss_end = rss_mib(server.pid)
    finally:
        stop_server(server)
    report = {"machine": f"{os.cpu_count()} cores", "images": 2 * args.scenes, "clients": args.clients,
              "duration_s": args.duration, "warmup_s": args.warmup, **summary(results, seconds),
              "rss_mib_after_warmup": round(rss_start, 1), "rss_mib_end": round(rss_end, 1),
              "rss_growth": round(rss_end / rss_start - 1, 4)}
    write_result(report, args.out)


if __name__ == "__main__":
    main()
