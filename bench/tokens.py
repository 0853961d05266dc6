"""Benchmark, token store: bytes per image, the mid reranker's twin-gallery R@1 and its rerank ms over fp16, int8
and int4 tokens, whole and merged (a quarter of the patches kept), and over its image side stored instead (what
`index build --tiers mid` adds), side by side on one embedding of each seed's gallery; with --baseline, first an
earlier mid checkpoint over fp16 tokens, the cost a user had before (timed in the same turns); bytes for the
ViT-B-32 and BLIP shapes.

Usage: python bench/tokens.py [--n 1000] [--seeds 2026,7] [--k 16] [--mid CHECKPOINT] [--baseline CHECKPOINT]
                              [--out bench/results/tokens.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexer.encoder import DualEncoder, load_encoder
from indexer.tokens import FORMATS, token_format
from reranker.score import Query, TokenReranker, load_tier, rerank_order
from training.tradeoff import Gallery, embed, evaluate_tier, run_query


def stores(shape: tuple[int, int]) -> list[str]:
    """The formats measured: each of FORMATS whole, then int8 and int4 keeping a quarter of the patches."""
    keep = (shape[0] - 1) // 4
    return [*FORMATS, f"int8+keep{keep}", f"int4+keep{keep}"]


SHAPES = {"ViT-B-32 (50 × 768)": (50, 768), "BLIP ViT-B/16 at 384 px (577 × 768)": (577, 768)}


def gallery_rows(n: int, seed: int, k: int, baseline: Path | None = None,
                 checkpoint: Path | None = None) -> list[dict[str, Any]]:
    """One row per stored feature set and format (the dual encoder's tokens, then mid's image side; first, with
    `baseline`, that checkpoint over fp16 tokens): bytes per image, mid R@1 and binding at k, ms per query and of
    its rerank, loss and rerank cost against the first row, and the cost against this mid's own fp16 tokens."""
    encoder = load_encoder()
    mid = load_tier("mid", encoder, checkpoint)
    assert mid.side is not None
    tokens = embed(encoder, n, seed)
    side = tokens.with_side(mid.side)
    run_query(encoder, tokens, tokens.samples[0].caption, mid, k, k)  # warm-up
    fp16 = token_format("fp16", encoder.token_shape)
    arms = [("baseline tokens", fp16, load_tier("mid", encoder, baseline), tokens)] if baseline else []
    for stored, gallery in (("tokens", tokens), ("mid side", side)):
        shape = encoder.token_shape if stored == "tokens" else mid.side.feature_shape
        formats = [token_format(name, shape) for name in stores(shape)]
        arms += [(stored, fmt, mid, gallery if fmt.name == "fp16" else gallery.stored_as(fmt)) for fmt in formats]
    rows: list[dict[str, Any]] = []
    for stored, fmt, reranker, gallery in arms:
        row: dict[str, Any] = evaluate_tier(encoder, gallery, "mid", reranker, k)
        rows.append({"seed": seed, "stored": stored, "format": fmt.name, "layers": reranker.matcher.cfg.layers,
                     "bytes_per_image": fmt.bytes_per_image, "r1": row["r1"], "binding_acc": row["binding_acc"],
                     "ms_p50": round(float(row["ms_p50"]), 2), "n": n})
    timed = interleaved_rerank_ms(encoder, [(reranker, gallery) for _, _, reranker, gallery in arms], k)
    own = 1 if baseline else 0  # this mid over fp16 tokens
    for row, ms in zip(rows, timed, strict=True):
        row["r1_loss_pt"] = round(100 * (rows[0]["r1"] - row["r1"]), 2)
        row["r1_loss_own_pt"] = round(100 * (rows[own]["r1"] - row["r1"]), 2)
        row["rerank_ms_p50"] = round(ms, 2)
        row["rerank_cost"] = round(ms / timed[0], 3)
        row["rerank_cost_own_tokens"] = round(ms / timed[own], 3)
    return rows


def interleaved_rerank_ms(encoder: DualEncoder, arms: list[tuple[TokenReranker, Gallery]], k: int,
                          queries: int = 300) -> list[float]:
    """p50 ms of each arm's rerank at k over its gallery's stored features (read and decoded included), the
    arms taking turns on every query so that the machine's drifting speed falls on all of them alike."""
    ms: list[list[float]] = [[] for _ in arms]
    first = arms[0][1]
    for sample in first.samples[:queries]:
        pooled, tokens, mask = encoder.encode_texts_and_tokens([sample.caption])
        cosine, rows = (a[0] for a in first.index.search(pooled, k))
        query = Query(sample.caption, tokens[0], mask[0])
        for i, (reranker, gallery) in enumerate(arms):
            start = time.perf_counter()
            rerank_order(reranker, query, gallery.candidates(rows), cosine, gallery.prepared)
            ms[i].append((time.perf_counter() - start) * 1000)
    return [float(np.percentile(m, 50)) for m in ms]


def shape_rows() -> list[dict[str, Any]]:
    """Bytes per image of each format for the real models' token shapes, and GB per million images."""
    out = []
    for model, shape in SHAPES.items():
        for name in stores(shape):
            size = token_format(name, shape).bytes_per_image
            out.append({"model": model, "format": name, "bytes_per_image": size, "gb_per_million": round(size / 1e3, 1),
                        "vs_fp16": round(size / token_format("fp16", shape).bytes_per_image, 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seeds", default="2026,7")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--mid", type=Path, default=None, help="the mid checkpoint measured (default: the committed)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier mid checkpoint: its rerank over fp16 tokens is the cost baseline")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tokens.json"))
    args = parser.parse_args()
    rows = [row for seed in args.seeds.split(",")
            for row in gallery_rows(args.n, int(seed), args.k, args.baseline, args.mid)]
    result = {"k": args.k, "mid": str(args.mid) if args.mid else None,
              "baseline": str(args.baseline) if args.baseline else None, "gallery": rows,
              "shapes": shape_rows()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
