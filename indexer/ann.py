"""Indexer, ANN: choose a FAISS index type by collection size and memory, build it, search per call."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from indexer.filters import Selection

FLAT_MAX = 50_000  # exact search is fast enough below this (a few ms per query on 2 cores)
TRAIN_POINTS_PER_LIST = 39  # k-means sample size per list: FAISS's lower bound (39..256), to bound training
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
PQ_MIN_TRAIN = 10_000  # 256 centroids per sub-quantizer need ~39 points each


@dataclass(frozen=True)
class AnnPlan:
    """What to build and the default search parameters (each call may override them)."""

    kind: str  # flat | hnsw | ivf | ivfpq
    nlist: int = 0
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nprobe: int = 0
    pq_m: int = 0
    refine_factor: int = 0  # ivfpq: candidates re-scored exactly = k * refine_factor

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def settings(self) -> dict[str, int]:
        """The parameters this kind of index uses (the others keep their defaults, unused)."""
        names = {"flat": (), "hnsw": ("hnsw_m", "ef_construction", "ef_search"), "ivf": ("nlist", "nprobe"),
                 "ivfpq": ("nlist", "nprobe", "pq_m", "refine_factor")}[self.kind]
        return {name: getattr(self, name) for name in names}


def _nlist(n: int) -> int:
    # FAISS guidance: between 4*sqrt(n) and 16*sqrt(n) inverted lists, each trained on enough points
    return int(max(1, min(4 * math.sqrt(n), n // TRAIN_POINTS_PER_LIST)))


def trainable(plan: AnnPlan, n: int) -> bool:
    """Whether n vectors are enough to train the plan's quantizers (a flat or HNSW index needs none)."""
    if plan.kind == "ivf":
        return n >= TRAIN_POINTS_PER_LIST * plan.nlist
    return plan.kind != "ivfpq" or n >= PQ_MIN_TRAIN


def plan_index(n: int, dim: int, kind: str = "auto", memory_budget: int | None = None) -> AnnPlan:
    """Pick the index for n vectors of dimension dim.

    Flat inner product while exact search is cheap; IVF above; IVF-PQ with exact re-scoring from
    the stored vectors when the raw vectors do not fit the memory budget (bytes). HNSW is built only
    when asked for: on clustered 128-d vectors (bench/ann.py) IVF had the better recall, speed and
    build time at every size measured: at 60k recall@10 0.956 at 18x exact vs HNSW's 0.94 at 8x, at
    200k 0.996 at 38x (built in 3 s) vs 0.81 at 23x (60 s), and no ef_search gave HNSW both.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index type {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "auto":
        raw = n * dim * 4
        if n <= FLAT_MAX:
            kind = "flat"
        elif memory_budget is not None and raw * 1.3 > memory_budget:
            kind = "ivfpq"
        else:
            kind = "ivf"
    if kind == "flat":
        return AnnPlan("flat")
    if kind == "hnsw":
        return AnnPlan("hnsw")
    nlist = _nlist(n)
    nprobe = max(1, min(nlist, int(round(nlist / 32)) + 16))  # +16: recall@10 0.956 at 60k vectors (+8 gave 0.948)
    if kind == "ivf":
        return AnnPlan("ivf", nlist=nlist, nprobe=nprobe)
    pq_m = next(m for m in (dim // 4, dim // 8, dim // 16, 1) if m >= 1 and dim % m == 0)
    return AnnPlan("ivfpq", nlist=nlist, nprobe=nprobe, pq_m=pq_m, refine_factor=8)


def build_index(plan: AnnPlan, vectors: np.ndarray, ids: np.ndarray, seed: int = 0) -> faiss.Index:
    """Build an inner-product index over (n, d) float32 L2-normalised vectors with stable int64 ids."""
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise TypeError("vectors must be a (n, d) float32 array")
    n, dim = vectors.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if plan.kind == "flat":
        inner: faiss.Index = faiss.IndexFlatIP(dim)
    elif plan.kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, plan.hnsw_m, ip)
        inner.hnsw.efConstruction = plan.ef_construction
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if plan.kind == "ivf":
            inner = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, ip)
        else:
            inner = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.pq_m, 8, ip)
        inner = _train(inner, _training_sample(vectors, plan.nlist, seed))
    index = faiss.IndexIDMap2(inner)
    if n:
        index.add_with_ids(np.ascontiguousarray(vectors), ids.astype(np.int64))
    return index


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu, which lacks the GPU API)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


GPU_MAX_K = 2048  # faiss-gpu's k-selection limit: deeper searches stay on the CPU copy
GPU_KINDS = ("flat", "ivf", "ivfpq")  # HNSW has no faiss-gpu implementation
_gpu_resources: list[faiss.StandardGpuResources] = []  # one per process, alive as long as its indexes


def place_for_search(index: faiss.Index, plan: AnnPlan, device: str) -> tuple[faiss.Index | None, str]:
    """A GPU copy of the index for serving, or None with the reason it stays on the CPU.

    device: cpu | cuda | auto. `cuda` without a usable GPU is not an error at serve time: the CPU
    index answers the same queries (more slowly), and the returned reason says why.
    """
    if device == "cpu":
        return None, "cpu"
    if gpu_count() == 0:
        return None, "cpu (no GPU visible to FAISS: install the gpu extra on a CUDA machine)"
    if plan.kind not in GPU_KINDS:
        return None, f"cpu ({plan.kind} has no FAISS GPU implementation)"
    if not _gpu_resources:
        _gpu_resources.append(faiss.StandardGpuResources())
    options = faiss.GpuClonerOptions()
    options.useFloat16 = plan.kind == "ivfpq"  # PQ codes above 48 bytes need fp16 lookup tables on the GPU
    return faiss.index_cpu_to_gpu(_gpu_resources[0], 0, index, options), "cuda"


def _train(index: faiss.Index, sample: np.ndarray) -> faiss.Index:
    """Train IVF quantizers on the GPU when faiss-gpu sees one (k-means is the slow part), else on CPU."""
    if gpu_count() == 0:
        index.train(sample)
        return index
    on_gpu = faiss.index_cpu_to_all_gpus(index)
    on_gpu.train(sample)
    return faiss.index_gpu_to_cpu(on_gpu)


def _training_sample(vectors: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    size = min(len(vectors), max(nlist * TRAIN_POINTS_PER_LIST, 10_000))
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    return np.ascontiguousarray(vectors[rows])


# a selection this small is searched exactly over its own vectors (a few ms even at its largest: 64k x 512
# floats), where the ANN index with a selector would scan mostly vectors the filter rules out
EXACT_SELECTION = 65_536


# from this share up, a selection is searched by fetching 2k/share unfiltered and keeping the selected: the
# selector's per-id check cost 2x an unfiltered scan at 50 % (1M vectors, IVF), the wider k next to nothing
OVERFETCH_SHARE = 0.25


def widening(only: Selection | None) -> float:
    """How much wider an ANN search looks inside a selection of a share s: 1/sqrt(s). At 1M clustered
    vectors (bench/ann.py --filter) IVF's own nprobe kept recall@10 at 0.998 inside 10 %; 1/s probed
    three times the lists of 1/sqrt(s) for no recall, so this is the margin for less friendly data."""
    return 1.0 / math.sqrt(max(only.share, 1e-6)) if only is not None else 1.0


def exact_within(plan: AnnPlan, only: Selection, total: int) -> bool:
    """Whether a selection is searched faster exactly over its own vectors than in the ANN index: when it
    is small, or when IVF would check as many ids against the selector (about a distance's cost each)."""
    if len(only.ids) <= EXACT_SELECTION or plan.kind == "flat":
        return True
    if plan.kind in ("ivf", "ivfpq"):
        return len(only.ids) <= min(plan.nlist, math.ceil(plan.nprobe * widening(only))) / plan.nlist * total
    return False


def search_params(plan: AnnPlan, nprobe: int | None = None, ef_search: int | None = None,
                  k: int = 10, only: Selection | None = None) -> faiss.SearchParameters | None:
    """Per-call parameters: never mutate a shared index (concurrent searches would race). Inside a
    selection IVF probes more lists and HNSW keeps more candidates (widening)."""
    widen = widening(only)
    sel = {"sel": only.selector} if only is not None else {}
    if plan.kind == "hnsw":
        ef = int(min(4096, max(ef_search or plan.ef_search, k) * widen))
        return faiss.SearchParametersHNSW(efSearch=ef, **sel)  # type: ignore[attr-defined]
    if plan.kind in ("ivf", "ivfpq"):
        probes = int(min(plan.nlist, math.ceil((nprobe or plan.nprobe) * widen)))
        return faiss.SearchParametersIVF(nprobe=probes, **sel)  # type: ignore[call-arg]
    return faiss.SearchParameters(**sel) if sel else None


def ann_search(index: faiss.Index, plan: AnnPlan, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None, only: Selection | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(q, k) scores and ids; ids are -1 where fewer than k results exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    params = search_params(plan, nprobe, ef_search, k, only)
    if params is None:
        return index.search(queries, k)
    return index.search(queries, k, params=params)


Exact = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) → exact top-k inside a selection


def search_within(index: faiss.Index, plan: AnnPlan, queries: np.ndarray, k: int, only: Selection, exact: Exact,
                  nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(q, k) scores and ids inside a selection, from the ANN index. A broad selection takes its hits from an
    unfiltered search 2/share times as deep; a query that finds fewer than k of them there (and any query
    inside a narrower selection) is searched inside FAISS with the selector; one whose probed lists still
    hold fewer than k selected (a selection far from it) is searched exactly: k hits whenever k match."""
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    redo = np.arange(len(queries))
    if only.share >= OVERFETCH_SHARE:
        wide_s, wide_i = ann_search(index, plan, queries, math.ceil(2 * k / only.share), nprobe, ef_search)
        held = only.holds(wide_i)
        for q in range(len(queries)):
            got = np.flatnonzero(held[q])[:k]
            scores[q, : len(got)], ids[q, : len(got)] = wide_s[q, got], wide_i[q, got]
        redo = np.flatnonzero(held.sum(axis=1) < k)
    if len(redo):
        scores[redo], ids[redo] = ann_search(index, plan, queries[redo], k, nprobe, ef_search, only)
    short = np.flatnonzero((ids < 0).any(axis=1)) if len(only.ids) >= k else np.zeros(0, np.int64)
    if len(short):
        scores[short], ids[short] = exact(queries[short], k)
    return scores, ids


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (the reference ANN results are compared with)."""
    scores, rows = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                             np.ascontiguousarray(vectors, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores, np.where(rows >= 0, ids[np.clip(rows, 0, None)], -1)


def rescore(queries: np.ndarray, candidates: np.ndarray, lookup: Callable[[np.ndarray], np.ndarray],
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among ANN candidates (q, c), using lookup(ids) -> (n, d) stored vectors."""
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for q, row in enumerate(candidates):
        row = row[row >= 0]
        exact = lookup(row) @ queries[q] if len(row) else np.zeros(0, np.float32)
        best = np.argsort(-exact, kind="stable")[:k]
        out_s[q, : len(best)], out_i[q, : len(best)] = exact[best], row[best]
    return out_s, out_i
