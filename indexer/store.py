"""Indexer, store: the Index reader over a published version — ANN search, stored vectors, tokens, metadata."""

from __future__ import annotations

import contextlib
import resource
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from indexer.ann import (
    GPU_MAX_K,
    AnnPlan,
    ann_search,
    exact_search,
    exact_within,
    place_for_search,
    rescore,
    search_within,
)
from indexer.features import ENCODER_TOKENS
from indexer.filters import STORED, BadFilter, Filter, Selection, extra_columns, select
from indexer.integrity import IndexCorrupt, IndexNotFound, check_version, corrupt, read_npy
from indexer.layout import DELETED, INDEX_FILE, SHARDS
from indexer.rows import Column, Rows, Shard, open_shard, read_meta
from indexer.tokens import TokenFormat, decode
from indexer.versions import advice, current_version, version_dir

KEPT_SELECTIONS = 8  # filters whose selections an open version keeps


class UnknownImage(KeyError):
    """An id that the index version does not hold (never indexed, or removed)."""


def _reserve_descriptors(count: int) -> None:
    """Raise this process's soft limit on open files to its hard limit when an index needs a good part
    of it: each open version holds two descriptors per shard (Go's runtime raises it at start likewise)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or count <= soft // 4 or soft == hard:
        return
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 4 * count + 1024)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Index:
    """A published index version: ANN search, stored vectors, patch tokens and metadata by id."""

    def __init__(self, root: Path, folder: Path):
        self.root = root
        self.folder = folder
        self.shards: list[Shard] = []
        self._lock = threading.Lock()  # guards the count of reads in flight, so close() never races one
        self._readers, self._closing, self._released = 0, False, False
        self.manifest: dict[str, Any] = check_version(folder)
        self.version: str = self.manifest["version"]
        self.plan = AnnPlan(**self.manifest["index"])
        self.dim: int = int(self.manifest["dim"])
        # rerank tiers' own image features: name → {model, format, shape, bytes_per_image}
        self.feature_sets: dict[str, dict[str, Any]] = dict(self.manifest.get("features") or {})
        try:
            self._open_files()
        except BaseException:
            self.close()
            raise
        self._on_gpu: faiss.Index | None = None
        self.search_device = "cpu"

    def _open_files(self) -> None:
        folder = self.folder
        self.deleted = set(read_npy(folder / DELETED).tolist()) if (folder / DELETED).is_file() else set()
        _reserve_descriptors((2 + len(self.feature_sets)) * len(self.manifest["shards"]))
        for entry in self.manifest["shards"]:
            self.shards.append(open_shard(folder / SHARDS / entry["name"], self.root, tuple(self.feature_sets)))
        self._check_shapes()
        self._build_lookup()
        self.faiss = _read_faiss(folder / INDEX_FILE)
        if self.faiss.ntotal != len(self):
            raise corrupt(folder / INDEX_FILE, f"holds {self.faiss.ntotal} vectors, the manifest counts {len(self)}")

    def _check_shapes(self) -> None:
        full = [s for s in self.shards if len(s.ids)]
        for shard in full:
            if shard.embeddings.row_shape != (self.dim,):
                raise corrupt(shard.embeddings.path, f"holds vectors of shape {shard.embeddings.row_shape}, "
                                                     f"not ({self.dim},)")
            if shard.token_format != full[0].token_format:
                raise corrupt(shard.tokens.path, f"holds tokens as {shard.token_format}, where "
                                                 f"{full[0].tokens.path} holds {full[0].token_format}")
        self.token_format = full[0].token_format if full else None  # one format for every shard of an index
        for shard in full:
            for name, (rows, fmt) in shard.features.items():
                if any(self.feature_sets[name].get(k) != v for k, v in fmt.describe().items()):
                    raise corrupt(rows.path, f"holds {name} features as {fmt.name} {list(fmt.shape)}, where the "
                                             f"manifest records {self.feature_sets[name]}")
        self._emb = [s.embeddings for s in self.shards]
        # each feature set's format and its file per shard (a shard without rows holds none, and no id is in it)
        self._stored: dict[str, tuple[TokenFormat | None, list[Rows]]] = {
            ENCODER_TOKENS: (self.token_format, [s.tokens for s in self.shards])}
        for name in self.feature_sets:
            files = [s.features[name][0] if len(s.ids) else s.tokens for s in self.shards]
            self._stored[name] = (full[0].features[name][1] if full else None, files)

    def use_device(self, device: str) -> str:
        """Serve searches from a GPU copy when `device` (cpu | cuda | auto) and FAISS allow; says where."""
        self._on_gpu, self.search_device = place_for_search(self.faiss, self.plan, device)
        return self.search_device

    @classmethod
    def open(cls, root: Path | str, version: str | None = None) -> Index:
        """Open the CURRENT version (or a named one), its files checked cheaply first.

        Raises IndexNotFound when there is none, and IndexCorrupt (an IndexNotFound) naming the file
        that is missing or damaged and listing the versions that open instead.
        """
        root = Path(root)
        for _ in range(5):
            folder = version_dir(root, version)
            try:
                return cls(root, folder)
            except IndexCorrupt as exc:
                if version is not None or current_version(root) == folder.name:
                    raise exc.advised(advice(root, folder.name)) from None
                # collected between reading CURRENT and opening its files: read CURRENT again
        raise IndexNotFound(f"CURRENT of {root} kept moving on while its version was opened; try again")

    def close(self) -> None:
        """Release the shard files (at once, or when the reads in flight end); reads after it raise ValueError."""
        with self._lock:
            self._closing = True
            release = self._readers == 0 and not self._released
            self._released |= release
        if release:
            for shard in self.shards:
                shard.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _build_lookup(self) -> None:
        all_ids = np.concatenate([s.ids for s in self.shards]) if self.shards else np.zeros(0, np.int64)
        shard_of = (np.concatenate([np.full(len(s.ids), i) for i, s in enumerate(self.shards)])
                    if self.shards else all_ids)
        row_of = np.concatenate([np.arange(len(s.ids)) for s in self.shards]) if self.shards else all_ids
        order = np.argsort(all_ids, kind="stable")
        self._ids, self._shard, self._row = all_ids[order], shard_of[order], row_of[order]
        # deleted, per sorted id: a lookup checks its ids in O(k), whatever the number of deletions
        self._dead = np.isin(self._ids, np.fromiter(self.deleted, np.int64, len(self.deleted)))
        # one chunk per column: a hit's fields are then a take on one array each (see metadata)
        # promote: shards written before a column existed (the file size) read as nulls in it
        self._meta = pa.concat_tables([read_meta(self.folder / SHARDS / s.name / "meta.parquet")
                                       for s in self.shards], promote_options="default").combine_chunks() \
            if self.shards else None
        self._meta_pos = np.argsort(order, kind="stable")  # position in meta of the i-th sorted id
        self._columns: dict[str, Column] = {}
        self._selections: dict[str, Selection] = {}  # filter key → its selection, oldest first (select)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def ids(self) -> np.ndarray:
        """All live ids, sorted."""
        return self._ids[~self._dead]

    @cached_property
    def live_rows(self) -> list[dict[str, Any]]:
        """Metadata of every live image (read once per opened version; used by add and remove)."""
        return self.metadata(self.ids())

    def _locate(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        try:
            ids = np.asarray(ids, dtype=np.int64)
        except OverflowError:  # ids are int64: a larger number names no image
            raise UnknownImage(next(i for i in ids if not -(2**63) <= int(i) < 2**63)) from None
        if len(self._ids) == 0:
            if len(ids):
                raise UnknownImage(int(ids[0]))
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        unknown = (self._ids[pos] != ids) | self._dead[pos]
        if unknown.any():
            raise UnknownImage(int(ids[unknown.argmax()]))
        return pos

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, d) float32 stored embeddings."""
        pos = self._locate(ids)
        return self._gather(pos, np.empty((len(pos), self.dim), np.float32), self._emb)

    def tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, t, w) patch tokens cached at indexing time, for the reranker: float16 as stored, or float32
        decoded from a quantized store (indexer.tokens)."""
        return self.features(ENCODER_TOKENS, ids)

    def features(self, name: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, t, w) image features stored for a rerank tier (its own vision tower's, or its image side;
        ENCODER_TOKENS: the dual encoder's patch tokens); KeyError for a feature set this version does not hold."""
        fmt, files = self._stored[name]
        pos = self._locate(ids)
        if fmt is None:  # no image indexed
            return np.zeros((len(pos), 0, 0), np.float16)
        return decode(self._gather(pos, np.empty(len(pos), fmt.dtype), files), fmt)

    def _gather(self, pos: np.ndarray, out: np.ndarray, files: list[Rows]) -> np.ndarray:
        """The rows at sorted positions `pos` into `out`: one pread per run of consecutive rows of a shard."""
        n = len(pos)
        if not n:
            return out
        shards, rows = self._shard[pos].tolist(), self._row[pos].tolist()
        step = out.nbytes // n
        raw = out.reshape(-1).view(np.uint8).data
        self._enter_read()
        try:
            start = 0  # a plain loop: for tens of ids, numpy's fixed cost per call is the larger
            for end in range(1, n + 1):
                if end == n or shards[end] != shards[start] or rows[end] != rows[start] + end - start:
                    files[shards[start]].read(rows[start], raw[start * step:end * step])
                    start = end
        finally:
            self._leave_read()
        return out

    def _enter_read(self) -> None:
        with self._lock:
            if self._closing:
                raise ValueError(f"index version {self.version} of {self.root} is closed")
            self._readers += 1

    def _leave_read(self) -> None:
        with self._lock:
            self._readers -= 1
        if self._closing:
            self.close()  # the last read in flight when close() was called releases the files

    def metadata(self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows of (id, path, sha256, width, height, caption, extra) for the ids, or of only `columns`
        (a third of the time for two columns: converting every field to Python dominates).

        Column by column, not Table.take(...).to_pylist(): half the time for a page of hits, which
        is on every search's path.
        """
        pos = self._locate(ids)
        if self._meta is None:
            return []
        names = self._meta.column_names if columns is None else list(columns)
        if not names:
            return [{} for _ in pos]
        rows = self._meta_pos[pos]
        values = [self._column(name).take(rows) for name in names]
        return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]

    def field(self, ids: Sequence[int] | np.ndarray, name: str) -> list[Any]:
        """One metadata field's values for the ids: a stored column or a column of the source list (None where
        a row lacks it); BadFilter for a field this index does not have."""
        if name in STORED:
            return [row[name] for row in self.metadata(ids, [name])]
        if name not in self._extra_columns:
            raise BadFilter(f"unknown metadata field {name!r}; this index has: "
                            f"{', '.join([*STORED, *sorted(self._extra_columns)])}")
        rows = self._meta_pos[self._locate(ids)]
        return list(self._extra_columns[name].take(pa.array(rows)).to_pylist())

    def _column(self, name: str) -> Column:
        column = self._columns.get(name)
        if column is None:
            assert self._meta is not None
            column = self._columns[name] = Column(self._meta.column(name).chunk(0))
        return column

    def select(self, flt: Filter) -> Selection:
        """The live ids that meet a metadata filter (BadFilter for an unknown field or a value of another
        kind); the last few filters' selections are kept, as a user refines a query under one filter."""
        key = flt.key()
        with self._lock:
            hit = self._selections.pop(key, None)
        if hit is None and self._meta is None:  # no shard: nothing to select
            hit = Selection(np.zeros(0, np.int64), np.zeros(1, np.uint8), 0.0)
        elif hit is None:
            hit = select(self._meta, self._extra_columns, flt, self.ids())
        with self._lock:
            self._selections[key] = hit
            while len(self._selections) > KEPT_SELECTIONS:
                self._selections.pop(next(iter(self._selections)))
        return hit

    @cached_property
    def _extra_columns(self) -> dict[str, pa.Array]:
        return extra_columns(self._meta["extra"]) if self._meta is not None else {}

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None, only: Selection | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(q, k) inner-product scores and ids, best first; -1 ids pad when fewer than k exist.

        IVF-PQ results are re-scored exactly from the stored vectors (k * refine_factor candidates).
        With `only`, the search runs inside the selection: exactly over its vectors when that is cheaper
        (ann.exact_within), else in the ANN index (ann.search_within).
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self.dim}")
        if only is not None and not len(only.ids):
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if only is not None and exact_within(self.plan, only, len(self)):
            return exact_search(self._selected_vectors(only), only.ids, queries, k)
        fetch = k * self.plan.refine_factor if self.plan.refine_factor else k
        if only is not None:  # selectors run on the CPU index
            def exact(rows: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
                return exact_search(self._selected_vectors(only), only.ids, rows, top)

            scores, ids = search_within(self.faiss, self.plan, queries, fetch, only, exact, nprobe, ef_search)
        else:
            gpu = self._on_gpu if fetch <= GPU_MAX_K else None
            scores, ids = ann_search(self.faiss if gpu is None else gpu, self.plan, queries, fetch, nprobe, ef_search)
        if self.plan.refine_factor:
            scores, ids = rescore(queries, ids, self.vectors, k)
        return scores, ids

    def _selected_vectors(self, only: Selection) -> np.ndarray:
        if only.vectors is None:  # read once per selection; a flat index's large one as well (it is in memory)
            only.vectors = self.vectors(only.ids)
        return only.vectors


def _read_faiss(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError:  # faiss's message is a multi-line assertion from its C++ reader
        raise corrupt(path, "is not a readable FAISS index (damaged or truncated)") from None
