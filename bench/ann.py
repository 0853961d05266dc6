"""Benchmark: recall@10 against exact search and query latency for each FAISS index type.

Usage: python bench/ann.py [--n 1000000] [--dim 128] [--kinds auto,ivf,ivfpq] [--out bench/results/ann.json]
       python bench/ann.py --filter [--n 1000000]   # inside metadata filters of 1 %, 10 % and 50 % of the images
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.ann import ann_search, build_index, exact_search, exact_within, plan_index, rescore, search_within
from indexer.filters import Selection


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
    parser.add_argument("--filter", action="store_true", help="search inside selections (filters) instead")
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (0: its default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    base = clustered(args.n, args.dim, seed=0)
    ids = np.arange(args.n, dtype=np.int64)
    queries = clustered(args.queries, args.dim, seed=1)
    if args.filter:
        write(filtered(base, ids, queries, args.kinds if args.kinds != "auto,ivf,ivfpq" else "auto"),
              args.out or Path("bench/results/ann_filter.json"))
        return
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
    write({"n": args.n, "dim": args.dim, "exact_ms_per_query": round(exact_ms, 3), "indexes": rows},
          args.out or Path("bench/results/ann.json"))


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def selection(ids: np.ndarray, share: float, seed: int) -> Selection:
    """A random share of the ids, as a filter's selection (uncorrelated with the clusters, as a date is)."""
    chosen = np.sort(np.random.default_rng(seed).choice(len(ids), int(share * len(ids)), replace=False))
    bits = np.zeros(int(ids.max()) + 1, bool)
    bits[ids[chosen]] = True
    return Selection(ids[chosen], np.packbits(bits, bitorder="little"), share)


def filtered(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, kinds: str) -> dict[str, Any]:
    """Index.search's policy inside selections of 1, 10 and 50 %: recall@10 and ms (one query at a time,
    p50) against exact search over the selected vectors."""
    rows = []
    for kind in kinds.split(","):
        plan = plan_index(len(ids), base.shape[1], kind)
        index = build_index(plan, base, ids)
        for share in (0.01, 0.1, 0.5):
            only = selection(ids, share, seed=int(share * 1000))
            subset = base[only.ids]  # the vectors of the selection, as an Index keeps them for a repeated filter
            truth, exact_ms = timed_search(lambda q, s=subset, o=only: exact_search(s, o.ids, q, 10)[1], queries)

            def fn(q, plan=plan, index=index, only=only, subset=subset):  # type: ignore[no-untyped-def]
                if exact_within(plan, only, len(ids)):
                    return exact_search(subset, only.ids, q, 10)[1]
                fetch = 10 * plan.refine_factor if plan.refine_factor else 10
                cand = search_within(index, plan, q, fetch, only, lambda r, t: exact_search(subset, only.ids, r, t))[1]
                return rescore(q, cand, lambda got: base[got], 10)[1] if plan.refine_factor else cand

            found, _ = timed_search(fn, queries)
            p50 = float(np.median([_ms(fn, q[None]) for q in queries]))
            exact = exact_within(plan, only, len(ids))
            rows.append({"kind": kind, "chosen": plan.kind, "share": share, "exact_path": exact,
                         "recall_at_10": round(recall(found, truth), 4), "ms_p50": round(p50, 3),
                         "exact_filtered_ms": round(exact_ms, 3), "speedup_vs_exact": round(exact_ms / p50, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return {"n": len(ids), "dim": base.shape[1], "threads": faiss.omp_get_max_threads(), "rows": rows}


def _ms(fn, q: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn(q)
    return (time.perf_counter() - start) * 1000


if __name__ == "__main__":
    main()
