"""Benchmark: small queries while large reranks run (admission control and step scheduling), as JSON.

    python bench/admission.py [--scenes 1000] [--rounds 60] [--heavy 4] [--out FILE]

A real `imsearch serve` process (one API process, rerank tiers mid and early, caching off) over
2 x scenes images. First the idle p50 of a small reranked query (mid, k=10, rerank_k=16) and of a
query without rerank, interleaved one at a time; then the same while `--heavy` clients each send
{"k": 1000, "rerank": "early", "rerank_k": 256} back to back. Targets: mid p50 under load at most
3x its idle p50, no-rerank at most 2x; the heavy queries' answers and 503s are counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.service import BlockingClient, free_port, start_server, stop_server, write_result  # noqa: E402

HEAVY = {"k": 1000, "rerank": "early", "rerank_k": 256}


def request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = b"POST /v1/search HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(data) + data


def timed(client: BlockingClient, payload: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    status = client.exchange(payload)
    return (time.perf_counter() - start) * 1000, status


def small_p50s(url: str, texts: list[str], rounds: int) -> dict[str, float]:
    """p50 ms of the small queries, mid and none interleaved one at a time (each a new text)."""
    client = BlockingClient(url)
    ms: dict[str, list[float]] = {"mid": [], "none": []}
    try:
        for i in range(rounds):
            for tier in ("mid", "none"):
                elapsed, status = timed(client, request({"text": texts[i % len(texts)], "k": 10, "rerank": tier,
                                                         "rerank_k": 16}))
                if status != 200:
                    raise SystemExit(f"a small {tier} query answered {status}")
                ms[tier].append(elapsed)
    finally:
        client.close()
    return {tier: round(statistics.median(values), 2) for tier, values in ms.items()}


class Heavy:
    """Clients sending large early-fusion reranks back to back, counting answers by status."""

    def __init__(self, url: str, clients: int, texts: list[str]):
        self.url, self.texts = url, texts
        self.stop = threading.Event()
        self.ms: list[float] = []
        self.statuses: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, offset: int) -> None:
        client = BlockingClient(self.url)
        i = offset
        while not self.stop.is_set():
            elapsed, status = timed(client, request({"text": self.texts[i % len(self.texts)], **HEAVY}))
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.ms.append(elapsed)
            i += 7
        client.close()

    def __enter__(self) -> Heavy:
        for thread in self.threads:
            thread.start()
        time.sleep(3.0)  # all of them in flight
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--heavy", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()

    from indexer.build import BuildOptions, build_or_add
    from indexer.encoder import load_encoder
    from indexer.store import Index
    from training.scenes import write_scenes

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-admission-"))
    if not (work / "idx" / "CURRENT").exists():
        manifest = write_scenes(work / "src", args.scenes, seed=5, twins=True)
        build_or_add(manifest, work / "idx", load_encoder(), BuildOptions(workers=0), "build")
    texts = [row["caption"] for row in Index.open(work / "idx").live_rows]
    port = free_port()
    env = {"IMSEARCH_RERANKERS": '["mid", "early"]', "IMSEARCH_CACHE": "false", "IMSEARCH_ACCESS_LOG": "false"}
    server = start_server(f"bench={work / 'idx'}", port, 1, work / "serve.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        small_p50s(url, texts, 10)  # warm-up
        idle = small_p50s(url, texts, args.rounds)
        with Heavy(url, args.heavy, texts) as heavy:
            loaded = small_p50s(url, texts, args.rounds)
        after = small_p50s(url, texts, args.rounds)  # idle again: the machine's drift, bounded
    finally:
        stop_server(server)
    write_result({
        "images": len(texts), "heavy_clients": args.heavy, "heavy_query": HEAVY,
        "idle_p50_ms": idle, "loaded_p50_ms": loaded, "idle_after_p50_ms": after,
        "ratio": {tier: round(loaded[tier] / idle[tier], 2) for tier in idle},
        "targets": {"mid": 3.0, "none": 2.0},
        "met": loaded["mid"] <= 3 * idle["mid"] and loaded["none"] <= 2 * idle["none"],
        "heavy_answers": heavy.statuses,
        "heavy_p50_ms": round(statistics.median(heavy.ms), 1) if heavy.ms else None,
    }, args.out)


if __name__ == "__main__":
    main()
