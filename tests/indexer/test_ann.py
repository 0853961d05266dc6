"""ANN choice and search: each index type against exact search, per-call parameters, re-scoring."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.ann import FLAT_MAX, AnnPlan, ann_search, build_index, exact_search, plan_index, rescore, trainable


def clustered(n: int, dim: int, seed: int = 0, centres: int = 50) -> np.ndarray:
    """L2-normalised vectors around random centres (embeddings are clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    x = means[rng.integers(centres, size=n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def test_plan_follows_size_and_memory() -> None:
    assert plan_index(1000, 128).kind == "flat"
    assert plan_index(FLAT_MAX + 1, 128).kind == "ivf"
    assert plan_index(FLAT_MAX + 1, 128, "hnsw").kind == "hnsw"  # only when asked for
    assert set(plan_index(FLAT_MAX + 1, 128).settings()) == {"nlist", "nprobe"}  # no unused HNSW fields
    assert plan_index(5_000_000, 128).kind == "ivf"
    tight = plan_index(1_000_000, 128, memory_budget=100 * 2**20)  # raw vectors need 512 MB
    assert tight.kind == "ivfpq" and tight.refine_factor > 0 and 128 % tight.pq_m == 0
    ivf = plan_index(1_000_000, 128, "ivf")
    assert 4 * 1000 <= ivf.nlist <= 16 * 1000 and 1 <= ivf.nprobe <= ivf.nlist
    with pytest.raises(ValueError, match="unknown index type"):
        plan_index(10, 8, "lsh")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = clustered(20_000, 32)
    ids = np.arange(20_000, dtype=np.int64) * 3 + 7  # stable ids, not positions
    return base, ids, clustered(200, 32, seed=1)


@pytest.mark.parametrize(("kind", "floor"), [("flat", 1.0), ("hnsw", 0.95), ("ivf", 0.9)])
def test_index_types_agree_with_exact_search(data, kind: str, floor: float) -> None:
    base, ids, queries = data
    plan = plan_index(len(base), 32, kind)
    index = build_index(plan, base, ids)
    _, truth = exact_search(base, ids, queries, 10)
    _, found = ann_search(index, plan, queries, 10)
    assert recall_at_10(found, truth) >= floor
    assert set(np.unique(found)) <= set(ids)


def test_ivfpq_with_exact_rescoring_recovers_recall(data) -> None:
    base, ids, queries = data
    plan = plan_index(len(base), 32, "ivfpq")
    index = build_index(plan, base, ids)
    _, truth = exact_search(base, ids, queries, 10)
    _, coarse = ann_search(index, plan, queries, 10)
    _, candidates = ann_search(index, plan, queries, 10 * plan.refine_factor)
    position = {int(i): n for n, i in enumerate(ids)}
    scores, refined = rescore(queries, candidates, lambda got: base[[position[int(i)] for i in got]], 10)
    assert recall_at_10(refined, truth) > recall_at_10(coarse, truth)
    assert recall_at_10(refined, truth) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_search_parameters_are_per_call(data) -> None:
    base, ids, queries = data
    plan = plan_index(len(base), 32, "ivf")
    index = build_index(plan, base, ids)
    inner = faiss.extract_index_ivf(index)
    before = inner.nprobe
    _, wide = ann_search(index, plan, queries, 10, nprobe=plan.nlist)  # exhaustive probing
    assert inner.nprobe == before  # the shared index was not mutated
    _, truth = exact_search(base, ids, queries, 10)
    assert recall_at_10(wide, truth) == 1.0


def test_fewer_vectors_than_k_pad_with_minus_one() -> None:
    base = clustered(5, 8)
    index = build_index(AnnPlan("flat"), base, np.arange(5, dtype=np.int64))
    _, found = ann_search(index, AnnPlan("flat"), base[:1], 8)
    assert list(found[0][5:]) == [-1, -1, -1]


def test_gpu_placement_falls_back_to_cpu_with_a_reason(data, monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.ann as ann

    base, ids, _ = data
    flat = build_index(AnnPlan("flat"), base[:500], ids[:500])
    assert ann.place_for_search(flat, AnnPlan("flat"), "cpu") == (None, "cpu")
    if ann.gpu_count() == 0:  # faiss-cpu: cuda and auto both answer from the CPU, and say why
        for device in ("cuda", "auto"):
            copy, where = ann.place_for_search(flat, AnnPlan("flat"), device)
            assert copy is None and where.startswith("cpu (no GPU")
    monkeypatch.setattr(ann, "gpu_count", lambda: 1)  # even with a GPU, HNSW stays on the CPU
    copy, where = ann.place_for_search(flat, AnnPlan("hnsw"), "cuda")
    assert copy is None and "hnsw has no FAISS GPU" in where


@pytest.mark.skipif(not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0,
                    reason="needs faiss-gpu and a GPU")
def test_gpu_copy_answers_like_the_cpu_index(data) -> None:
    from indexer.ann import place_for_search

    base, ids, queries = data
    for plan in (AnnPlan("flat"), plan_index(len(base), base.shape[1], "ivf")):
        index = build_index(plan, base, ids)
        copy, where = place_for_search(index, plan, "cuda")
        assert where == "cuda" and copy is not None
        cpu_ids = ann_search(index, plan, queries, 10)[1]
        assert recall_at_10(ann_search(copy, plan, queries, 10)[1], cpu_ids) >= 0.99


def test_quantizers_need_enough_vectors_to_train() -> None:
    ivf = AnnPlan("ivf", nlist=100)
    assert not trainable(ivf, 3_899) and trainable(ivf, 3_900)  # 39 points per list
    assert not trainable(AnnPlan("ivfpq", nlist=10), 9_999) and trainable(AnnPlan("ivfpq", nlist=10), 10_000)
    assert trainable(AnnPlan("flat"), 0) and trainable(AnnPlan("hnsw"), 1)
