"""Training floor, reranker evaluate: queries as people type them (partial descriptions, synonyms, counts) on a gallery
of random scenes and their twins, where a hit counts when the description is true of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer.encoder import DualEncoder
from reranker.model import RerankerConfig
from reranker.score import Reranker, TokenReranker
from training.descriptions import KINDS, Written, allowed, describe, holds
from training.scenes import EVAL_SEED, Sample, stream
from training.tradeoff import Gallery, embed_samples, run_query

CALIBRATION_BINS = 10
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 16.0, 61))
BIASES = tuple(float(b) for b in np.linspace(-6.0, 6.0, 121))


def freeform_gallery(n: int, seed: int) -> list[Sample]:
    """n images: the first n/2 scenes of the seed's stream and their twins, kept even when two images
    look alike (many images can answer a partial description)."""
    if n < 2 or n % 2:
        raise ValueError(f"a gallery of scenes and twins needs an even n >= 2, got {n}")
    out: list[Sample] = []
    for first, second in stream(seed):
        out += [first, second]
        if len(out) >= n:
            return out
    raise AssertionError("unreachable: the stream is endless")


def freeform_queries(samples: list[Sample], per_kind: int, seed: int) -> list[Written]:
    """`per_kind` descriptions of each kind, each of a gallery scene drawn at random that allows it (none
    of a kind that no scene of a small gallery allows)."""
    rng = np.random.default_rng([seed, 23])
    queries = []
    for kind in KINDS:
        eligible = [s for s in samples if allowed(s.scene, kind)]
        for _ in range(per_kind if eligible else 0):
            queries.append(describe(eligible[int(rng.integers(len(eligible)))].scene, rng, kind))
    return queries


def truth(queries: list[Written], samples: list[Sample]) -> np.ndarray:
    """(queries, images) bool: whether each description is true of each image's scene."""
    return np.array([[holds(q.claim, s.scene) for s in samples] for q in queries], dtype=bool)


@dataclass(frozen=True)
class Arm:
    """A tier of the table: its name, its reranker (None: late) and rerank "auto"'s margin (None: rerank all k)."""

    tier: str
    reranker: Reranker | None
    margin: float | None = None


def _rows(encoder: DualEncoder, gallery: Gallery, queries: list[Written], true: np.ndarray, arms: list[Arm], k: int
          ) -> tuple[list[dict[str, object]], dict[str, list[tuple[float, bool]]]]:
    """Per tier and kind: p@1, p@5, ms p50 and mean, rerank ms mean, and recall@k (the share of queries with a true
    image among the dual encoder's top k: what a reranker at k can find at best); plus, per tier, (log p(match),
    true) of every reranked candidate. The tiers take turns on every query, so that the machine's drifting speed
    falls on all."""
    hits: dict[str, dict[str, list[tuple[float, ...]]]] = {arm.tier: {kind: [] for kind in KINDS} for arm in arms}
    scored: dict[str, list[tuple[float, bool]]] = {arm.tier: [] for arm in arms}
    served = {arm.tier: gallery.for_tier(arm.reranker) for arm in arms}  # as a default index holds it
    for q, query in enumerate(queries):
        for arm in arms:
            depth = k if arm.reranker is not None else 0
            result = run_query(encoder, served[arm.tier], query.text, arm.reranker, depth, max(k, 5), arm.margin)
            top = result.ranking[:5]
            hits[arm.tier][query.kind].append((float(true[q, top[0]]), float(true[q, top].mean()), result.ms,
                                               result.rerank_ms, float(true[q, result.ranking[:k]].any())))
            if result.log_p is not None:
                head = result.ranking[: len(result.log_p)]
                scored[arm.tier] += [(float(p), bool(true[q, row])) for p, row in zip(result.log_p, head, strict=True)]
    rows = [{"tier": tier, "kind": kind, "p1": float(np.mean([h[0] for h in got])),
             "p5": float(np.mean([h[1] for h in got])), "ms_p50": float(np.percentile([h[2] for h in got], 50)),
             "ms_mean": float(np.mean([h[2] for h in got])), "rerank_ms_mean": float(np.mean([h[3] for h in got])),
             "recall_at_k": float(np.mean([h[4] for h in got])), "queries": len(got)}
            for tier, kinds in hits.items() for kind, got in kinds.items() if got]
    return rows, scored


def calibration_error(scored: list[tuple[float, bool]], bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of (log p(match), true) pairs: over equal-width bins of predicted
    p(match), the gap between the mean prediction and the share of true matches, weighted by the bin's count."""
    if not scored:
        return float("nan")
    p = np.exp(np.array([s[0] for s in scored], dtype=np.float64))
    y = np.array([s[1] for s in scored], dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[which == b].mean() - y[which == b].mean()) * (which == b).sum()
                     for b in range(bins) if (which == b).any()) / len(p))


def evaluate_freeform(encoder: DualEncoder, rerankers: dict[str, Reranker], n: int = 1000, seed: int = EVAL_SEED,
                      per_kind: int = 150, k: int = 16, auto_margin: float | None = None) -> dict[str, object]:
    """Rows per tier (late, then each reranker at k, then with auto_margin and mid: rerank "auto") and kind;
    the rerankers' calibration error; auto's share of mid's p@1 gain over late and of its rerank cost."""
    samples = freeform_gallery(n, seed)
    gallery = embed_samples(encoder, samples)
    queries = freeform_queries(samples, per_kind, seed)
    true = truth(queries, samples)
    run_query(encoder, gallery, queries[0].text, None, 0, 10)  # warm-up
    auto_margin = auto_margin if "mid" in rerankers else None  # rerank "auto" is mid's
    arms = [Arm("late", None), *(Arm(tier, reranker) for tier, reranker in rerankers.items())]
    arms += [Arm("auto", rerankers["mid"], auto_margin)] if auto_margin is not None else []
    rows, scored = _rows(encoder, gallery, queries, true, arms, k)
    calibration = {tier: calibration_error(scored[tier]) for tier in rerankers}
    auto = auto_shares(rows, auto_margin) if auto_margin is not None else None
    return {"n": n, "seed": seed, "k": k, "queries": len(queries), "rows": rows, "calibration_error": calibration,
            "auto": auto,
            "examples": {kind: next(q.text for q in queries if q.kind == kind) for kind in KINDS}}


def auto_shares(rows: list[dict[str, Any]], margin: float) -> dict[str, float]:
    """Over all queries: p@1 of late, mid and auto; auto's share of mid's gain over late, and of mid's rerank cost
    (each tier's mean rerank ms, 0 for a query auto does not rerank, the two timed in turns on every query)."""
    def overall(tier: str, key: str) -> float:
        mine = [r for r in rows if r["tier"] == tier]
        return sum(r[key] * r["queries"] for r in mine) / sum(r["queries"] for r in mine)

    late, mid, auto = (overall(t, "p1") for t in ("late", "mid", "auto"))
    mid_ms, auto_ms = (overall(t, "rerank_ms_mean") for t in ("mid", "auto"))
    return {"margin": margin, "late_p1": late, "mid_p1": mid, "auto_p1": auto,
            "gain_share": (auto - late) / (mid - late) if mid > late else 1.0,
            "mid_rerank_ms": mid_ms, "auto_rerank_ms": auto_ms, "cost_share": auto_ms / mid_ms}


def raw_margins(scored: list[tuple[float, bool]], cfg: RerankerConfig) -> tuple[np.ndarray, np.ndarray]:
    """The heads' raw logit margins and the truth of each scored candidate: log p = logsigmoid(z) with
    z = margin / T + bias, so z = log p - log(1 - p), computed from log p itself (exact where p rounds
    to 1), and the calibration `cfg` holds undone."""
    log_p = np.array([s[0] for s in scored], dtype=np.float64)
    z = log_p - np.log(-np.expm1(log_p))
    return cfg.temperature * (z - cfg.bias), np.array([s[1] for s in scored], dtype=bool)


def best_calibration(margins: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(temperature, bias) minimising the log loss of sigmoid(margin / T + bias) against the truth, on a
    grid (two parameters: a search is simpler than a solver that must be kept from diverging)."""
    signed = np.where(true, 1.0, -1.0)

    def log_loss(t: float, b: float) -> float:
        return float(np.logaddexp(0.0, -signed * (margins / t + b)).mean())

    return min(((t, b) for t in TEMPERATURES for b in BIASES), key=lambda tb: log_loss(*tb))


def fit_calibration(encoder: DualEncoder, reranker: TokenReranker, n: int, seed: int, per_kind: int = 40,
                    k: int = 16) -> tuple[float, float, float]:
    """Fit the reranker's p(match) calibration on the candidates it rescores for descriptions of a
    validation gallery; sets it and returns (temperature, bias, calibration error there after the fit)."""
    samples = freeform_gallery(n, seed)
    gallery = embed_samples(encoder, samples)
    queries = freeform_queries(samples, per_kind, seed)
    arm = Arm(reranker.name, reranker)
    scored = _rows(encoder, gallery, queries, truth(queries, samples), [arm], k)[1][arm.tier]
    cfg = reranker.matcher.cfg
    margins, labels = raw_margins(scored, cfg)
    cfg.temperature, cfg.bias = best_calibration(margins, labels)
    calibrated = -np.logaddexp(0.0, -(margins / cfg.temperature + cfg.bias))  # log sigmoid
    return cfg.temperature, cfg.bias, calibration_error(list(zip(calibrated.tolist(), labels.tolist(), strict=True)))
