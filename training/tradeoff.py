"""Training floor, reranker evaluate: late, mid and early fusion on a twin gallery (speed/depth, auto, explain)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from indexer.encoder import DualEncoder
from indexer.tokens import TokenFormat, decode, encode
from reranker.gate import auto_depth
from reranker.score import ImageSide, Query, Reranker, fuse, rerank_order
from training.descriptions import caption_claim, grounding, mention_order
from training.encoder_eval import BATCH, difference_kind
from training.scenes import EVAL_SEED, SIZES, Sample, object_position, render, twin_gallery

KS = (8, 16, 32, 64)
ERROR_GROUPS = {
    "colour_swap": "binding", "shape_swap": "binding", "size_swap": "binding", "binding_or_order": "binding",
    "lr_swap": "relation", "tb_swap": "relation", "layout": "relation", "size_change": "size", "size": "size",
    "shape": "shape", "colour": "colour",
}


@dataclass
class Gallery:
    """A twin gallery embedded once: pooled vectors in a flat index, tokens as the store would hold them."""

    samples: list[Sample]
    index: faiss.IndexFlatIP
    tokens: np.ndarray  # (n, t, w) float16, or (n,) rows of `store`
    store: TokenFormat | None = None  # a quantized token store (indexer.tokens); None: fp16
    prepared: bool = False  # `tokens` hold a tier's image side (ImageSide), not the dual encoder's tokens
    sides: dict[str, Gallery] = field(default_factory=dict, repr=False)  # with_side's, by the side's model id

    def candidates(self, rows: np.ndarray) -> np.ndarray:
        """The tokens of gallery rows as a reranker gets them from an index (decoded from a quantized store)."""
        return self.tokens[rows] if self.store is None else decode(self.tokens[rows], self.store)

    def stored_as(self, fmt: TokenFormat) -> Gallery:
        """This (fp16) gallery with its tokens kept as an index built with `--tokens fmt` keeps them."""
        if self.store is not None:
            raise ValueError(f"this gallery is stored as {self.store.name} already: store the fp16 one")
        return Gallery(self.samples, self.index, encode(self.tokens, fmt), fmt, self.prepared)

    def for_tier(self, reranker: Reranker | None) -> Gallery:
        """What a default index holds for the tier: its image side where it has one (mid), else the tokens."""
        side = reranker.side if reranker is not None else None
        return self if side is None or self.prepared else self.with_side(side)

    def with_side(self, side: ImageSide) -> Gallery:
        """This (fp16) gallery holding the tier's image side instead of its tokens, as an index stores it (fp16);
        computed once per side (mid and auto score the same)."""
        if self.store is not None or self.prepared:
            raise ValueError("an image side is computed from the fp16 tokens, not from stored codes or another side")
        if side.feature_model not in self.sides:
            prepared = np.concatenate([side.encode_tokens(self.tokens[i : i + BATCH]).astype(np.float16)
                                       for i in range(0, len(self.tokens), BATCH)])
            self.sides[side.feature_model] = Gallery(self.samples, self.index, prepared, None, True)
        return self.sides[side.feature_model]


def embed(encoder: DualEncoder, n: int, seed: int) -> Gallery:
    """The deduplicated twin gallery of n images of a seed, embedded."""
    return embed_samples(encoder, twin_gallery(n, seed))


def embed_samples(encoder: DualEncoder, samples: list[Sample]) -> Gallery:
    """Samples rendered at the encoder's resolution and embedded in batches."""
    size = int(encoder.model.visual.image_size[0])
    pooled, tokens = [], []
    for i in range(0, len(samples), BATCH):
        emb, tok = encoder.encode_images_and_tokens([render(s.scene, size) for s in samples[i : i + BATCH]])
        pooled.append(emb)
        tokens.append(tok.astype(np.float16))
    index = faiss.IndexFlatIP(encoder.embed_dim)
    index.add(np.concatenate(pooled))
    return Gallery(samples, index, np.concatenate(tokens))


@dataclass
class QueryResult:
    ranking: np.ndarray  # gallery rows, best first (reranked head, then the dual encoder's order)
    ms: float
    log_p: np.ndarray | None = None  # the reranker's log p(match) of the head, in ranking order
    rerank_ms: float = 0.0  # of ms: reranking, the candidates' features read from the store included


def run_query(encoder: DualEncoder, gallery: Gallery, text: str, reranker: Reranker | None, k: int,
              depth: int, auto_margin: float | None = None) -> QueryResult:
    """Encode → search → (rerank top-k; with auto_margin, as rerank "auto" does), timed end to end, as the
    service runs one query."""
    start = time.perf_counter()
    pooled, tokens, mask = encoder.encode_texts_and_tokens([text])
    cosine, rows = gallery.index.search(pooled, max(depth, k))
    cosine, rows = cosine[0], rows[0]
    k = auto_depth(cosine[:k], auto_margin) if auto_margin is not None else k
    log_p, rerank_s = None, 0.0
    if reranker is not None and k > 0:
        begin = time.perf_counter()
        order, log_p, _ = rerank_order(reranker, Query(text, tokens[0], mask[0]), gallery.candidates(rows[:k]),
                                       cosine[:k], gallery.prepared)
        rerank_s = time.perf_counter() - begin
        rows, log_p = np.concatenate([rows[:k][order], rows[k:]]), log_p[order]
    return QueryResult(rows, (time.perf_counter() - start) * 1000, log_p, rerank_s * 1000)


def _rank_of(ranking: np.ndarray, row: int) -> int:
    hits = np.flatnonzero(ranking == row)
    return int(hits[0]) if len(hits) else len(ranking)


def evaluate_tier(encoder: DualEncoder, gallery: Gallery, tier: str, reranker: Reranker | None, k: int,
                  errors: bool = False) -> dict[str, object]:
    """One row of the table: r1, r5, binding_acc and per-query latency percentiles."""
    n = len(gallery.samples)
    depth = max(KS) + 1  # the twin's position is known whenever it is in the candidate list
    ranks, wins, times, rerank_times = [], [], [], []
    kinds: Counter[str] = Counter()
    for q, sample in enumerate(gallery.samples):
        result = run_query(encoder, gallery, sample.caption, reranker, k, depth)
        rank, twin_rank = _rank_of(result.ranking, q), _rank_of(result.ranking, q ^ 1)
        ranks.append(rank)
        wins.append(rank < twin_rank)
        times.append(result.ms)
        rerank_times.append(result.rerank_ms)
        if errors and rank != 0:
            kinds[ERROR_GROUPS.get(difference_kind(sample, gallery.samples[int(result.ranking[0])]), "other")] += 1
    ranks_a = np.array(ranks)
    row: dict[str, object] = {
        "tier": tier, "k": k, "r1": float((ranks_a < 1).mean()), "r5": float((ranks_a < 5).mean()),
        "binding_acc": float(np.mean(wins)), "ms_p50": float(np.percentile(times, 50)),
        "ms_p95": float(np.percentile(times, 95)), "rerank_ms_p50": float(np.percentile(rerank_times, 50)), "n": n,
    }
    if errors:
        row["errors"] = dict(kinds)
    return row


def evaluate_tradeoff(encoder: DualEncoder, rerankers: dict[str, Reranker], n: int = 1000, seed: int = EVAL_SEED,
                      ks: tuple[int, ...] = KS, errors: bool = False) -> list[dict[str, object]]:
    """The course's fusion table, measured: late (k = 0), then each reranker tier at each k."""
    gallery = embed(encoder, n, seed)
    run_query(encoder, gallery, gallery.samples[0].caption, None, 0, 10)  # warm-up
    rows = [evaluate_tier(encoder, gallery, "late", None, 0, errors)]
    for tier, reranker in rerankers.items():
        served = gallery.for_tier(reranker)
        for k in ks:
            rows.append(evaluate_tier(encoder, served, tier, reranker, k, errors))
    return rows


def fit_fusion_weight(encoder: DualEncoder, reranker: Reranker, n: int, seed: int, k: int = 16,
                      grid: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0, 20.0, 50.0)
                      ) -> tuple[float, float]:
    """The cosine weight maximising R@1 at k on a validation gallery; returns (weight, r1)."""
    gallery = embed(encoder, n, seed)
    cached = []
    for q, sample in enumerate(gallery.samples):
        pooled, tokens, mask = encoder.encode_texts_and_tokens([sample.caption])
        cosine, rows = gallery.index.search(pooled, k)
        log_p = reranker.log_match(Query(sample.caption, tokens[0], mask[0]), gallery.candidates(rows[0]))
        cached.append((q, cosine[0], rows[0], log_p))
    best = (grid[0], -1.0)
    for weight in grid:
        r1 = float(np.mean([rows[np.argmax(fuse(lp, cos, weight))] == q for q, cos, rows, lp in cached]))
        if r1 > best[1]:
            best = (weight, r1)
    return best


GATE_GRID = tuple(round(0.0025 * i, 4) for i in range(1, 41))  # margins tried by fit_gate: 0.0025 .. 0.1


@dataclass
class GateRun:
    """A twin gallery's queries with their k candidates: cosines, ids, the reranker's log p(match) of each (it
    does not depend on which others are scored with it) and its ms for all k, and what reranking again takes."""

    reranker: Reranker
    gallery: Gallery
    queries: list[Query]
    cosine: np.ndarray  # (n, k)
    ids: np.ndarray  # (n, k)
    log_p: np.ndarray  # (n, k)
    ms: np.ndarray  # (n,)

    def right(self, q: int, depth: int) -> bool:
        """Whether the query's image is first once its first `depth` candidates are reranked (0: late fusion)."""
        if depth == 0:
            return bool(self.ids[q, 0] == q)
        fused = fuse(self.log_p[q, :depth], self.cosine[q, :depth], self.reranker.fusion_weight)
        return bool(self.ids[q, int(np.argmax(fused))] == q)

    def r1(self, depth: int) -> float:
        """R@1 when every query's first `depth` candidates are reranked (0: late fusion)."""
        return float(np.mean([self.right(q, depth) for q in range(len(self.ids))]))

    def auto(self, margin: float) -> tuple[np.ndarray, float]:
        """rerank "auto" at this margin: each query's depth, and R@1."""
        depths = np.array([auto_depth(c, margin) for c in self.cosine])
        return depths, float(np.mean([self.right(q, int(d)) for q, d in enumerate(depths)]))

    def timed(self, q: int, depth: int) -> float:
        """ms to rerank the query's first `depth` candidates, as the service does."""
        start = time.perf_counter()
        rerank_order(self.reranker, self.queries[q], self.gallery.candidates(self.ids[q, :depth]),
                     self.cosine[q, :depth], self.gallery.prepared)
        return (time.perf_counter() - start) * 1000


def gate_run(encoder: DualEncoder, reranker: Reranker, n: int, seed: int, k: int = 16) -> GateRun:
    gallery = embed(encoder, n, seed).for_tier(reranker)
    queries, rows = [], []
    for sample in gallery.samples:
        pooled, tokens, mask = encoder.encode_texts_and_tokens([sample.caption])
        cosine, ids = (a[0] for a in gallery.index.search(pooled, k))
        queries.append(Query(sample.caption, tokens[0], mask[0]))
        start = time.perf_counter()
        log_p = reranker.log_match(queries[-1], gallery.candidates(ids), gallery.prepared)
        rows.append((cosine, ids, log_p, (time.perf_counter() - start) * 1000))
    cosine, ids, log_p, ms = (np.array(column) for column in zip(*rows, strict=True))
    return GateRun(reranker, gallery, queries, cosine, ids, log_p, ms)


def gate_figures(run: GateRun, margin: float) -> dict[str, float]:
    """R@1 of rerank "auto" at this margin beside late and the reranker at k, the share of its gain kept, and
    of its mean rerank cost paid (auto's reranks timed here, beside the reranker's at k in gate_run)."""
    depths, auto = run.auto(margin)
    late, deep = run.r1(0), run.r1(run.ids.shape[1])
    auto_ms = np.array([run.timed(q, int(d)) if d else 0.0 for q, d in enumerate(depths)])
    gain = deep - late
    return {"margin": margin, "late_r1": late, "mid_r1": deep, "auto_r1": auto, "reranked": float((depths > 0).mean()),
            "auto_depth": float(depths[depths > 0].mean()) if (depths > 0).any() else 0.0,
            "gain_share": (auto - late) / gain if gain > 0 else 1.0, "mid_rerank_ms": float(run.ms.mean()),
            "auto_rerank_ms": float(auto_ms.mean()), "cost_share": float(auto_ms.mean() / run.ms.mean())}


def fit_gate(run: GateRun, keep: float = 0.9) -> float:
    """The smallest margin of GATE_GRID whose "auto" keeps `keep` of the reranker's R@1 gain."""
    late, deep = run.r1(0), run.r1(run.ids.shape[1])
    return next((m for m in GATE_GRID if run.auto(m)[1] - late >= keep * (deep - late)), GATE_GRID[-1])


def explain_figures(encoder: DualEncoder, reranker: Reranker, n: int, seed: int) -> dict[str, Any]:
    """Where the tier's explain puts each object a twin-gallery caption names, scored on the caption's own
    image (a true match): the share of objects located inside their box, overall and by size, and the
    median distance from the centre in half-sides (0: the centre, 1: the box's edge)."""
    gallery = embed(encoder, n, seed)
    inside: dict[str, list[bool]] = {"small": [], "large": []}
    distance, skipped = [], 0
    for row, sample in enumerate(gallery.samples):
        claim = caption_claim(sample.scene)
        objects, order = grounding(claim, sample.scene), mention_order(sample.caption, claim)
        _, tokens, mask = encoder.encode_texts_and_tokens([sample.caption])
        located = reranker.explain(Query(sample.caption, tokens[0], mask[0]), gallery.candidates(np.array([row])))[0]
        if objects is None or order is None or len(located) != len(order):
            skipped += 1  # no single reading of the caption, or a noun the head does not know
            continue
        for place, i in zip(located, order, strict=True):
            (cx, cy), half = object_position(objects[i]), SIZES[objects[i].size]
            off = max(abs(place.x - cx), abs(place.y - cy)) / half
            inside[objects[i].size].append(off <= 1.0)
            distance.append(off)
    every = inside["small"] + inside["large"]
    return {"tier": reranker.name, "seed": seed, "captions": n - skipped, "objects": len(every),
            "inside": float(np.mean(every)) if every else 0.0,
            **{f"inside_{size}": float(np.mean(v)) if v else 0.0 for size, v in inside.items()},
            "median_offset": float(np.median(distance)) if distance else 0.0}
