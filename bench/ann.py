"""Benchmark: recall@10 against exact search and query latency for each FAISS index type.

Usage: python bench/ann.py [--n 1000000] [--dim 128] [--kinds auto,ivf,ivfpq] [--out bench/results/ann.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from indexer.ann import ann_search, build_index, exact_search, plan_index, rescore


def clustered(n: int, dim: int, seed: int, centres: int = 1000, chunk: int = 200_000) -> np.ndarray:
    """L2-normalised vectors around random centres, generated in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        x = means[rng.integers(centres, size=size)] + 0.5 * rng.standard_normal((size, dim)).astype(np.float32)
        out[start : start + size] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def timed_search(fn, queries: np.ndarray) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    """Run one query at a time (the service's latency), returning ids and ms per query."""
    ids = []
    start = time.perf_counter()
    for q in queries:
        ids.append(fn(q[None])[0])
    return np.stack(ids), (time.perf_counter() - start) * 1000 / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", default="auto,ivf,ivfpq")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ann.json"))
    args = parser.parse_args()
    base = clustered(args.n, args.dim, seed=0)
    ids = np.arange(args.n, dtype=np.int64)
    queries = clustered(args.queries, args.dim, seed=1)
    truth, exact_ms = timed_search(lambda q: exact_search(base, ids, q, 10)[1], queries)
    rows = []
    for kind in args.kinds.split(","):
        plan = plan_index(args.n, args.dim, kind)
        start = time.perf_counter()
        index = build_index(plan, base, ids)
        build_s = time.perf_counter() - start
        if plan.refine_factor:
            def fn(q, plan=plan, index=index):  # type: ignore[no-untyped-def]
                cand = ann_search(index, plan, q, 10 * plan.refine_factor)[1]
                return rescore(q, cand, lambda got: base[got], 10)[1]
        else:
            def fn(q, plan=plan, index=index):  # type: ignore[no-untyped-def]
                return ann_search(index, plan, q, 10)[1]
        found, ms = timed_search(fn, queries)
        rows.append({"kind": kind, "chosen": plan.kind, "params": plan.settings(), "build_s": round(build_s, 1),
                     "recall_at_10": round(recall(found, truth), 4), "ms_per_query": round(ms, 3),
                     "speedup_vs_exact": round(exact_ms / ms, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del index
    result = {"n": args.n, "dim": args.dim, "exact_ms_per_query": round(exact_ms, 3), "indexes": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
