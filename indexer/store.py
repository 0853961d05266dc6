"""Stage 5, store: immutable index versions published atomically, and the reader API over them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.ann import GPU_MAX_K, AnnPlan, ann_search, place_for_search, rescore

CURRENT = "CURRENT"
VERSIONS = "versions"
STAGING = "staging"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
DELETED = "deleted.npy"
FAILURES = "failures.jsonl"
SHARDS = "shards"
FORMAT = 1


class IndexNotFound(FileNotFoundError):
    """No published index version at the given directory."""


class UnknownImage(KeyError):
    """An id that the index version does not hold (never indexed, or removed)."""


# --- durable file operations ----------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, skip: str | None = None) -> None:
    """fsync every file and directory below root; files under a `skip` folder only get their
    directory entries synced (hard links to shard files that were synced when the shard completed)."""
    for dirpath, _, files in os.walk(root):
        linked = skip is not None and skip in Path(dirpath).relative_to(root).parts
        for name in [] if linked else files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_npy(path: Path, array: np.ndarray | Sequence[np.ndarray]) -> None:
    """Write an array, or the concatenation of chunks (same dtype and trailing shape), as .npy.

    Chunks go to the file one after another, never joined in memory: a shard's tokens are its
    largest object. Through Python's write, not numpy's fwrite: a full disk raises ENOSPC.
    """
    chunks = [np.require(c, requirements="C") for c in ([array] if isinstance(array, np.ndarray) else array)]
    if not chunks or any(c.dtype != chunks[0].dtype or c.shape[1:] != chunks[0].shape[1:] for c in chunks):
        raise ValueError(f"{path}: chunks must share a dtype and trailing shape")
    shape = (sum(len(c) for c in chunks), *chunks[0].shape[1:]) if chunks[0].ndim else ()
    header = {"descr": np.lib.format.dtype_to_descr(chunks[0].dtype), "fortran_order": False, "shape": shape}
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for chunk in chunks:
            fh.write(chunk.reshape(-1).view(np.uint8).data)  # the contiguous bytes themselves: no copy


def save_faiss(path: Path, index: faiss.Index) -> None:
    """faiss.write_index through Python's write: a full disk raises OSError(ENOSPC), where faiss's own
    writer raises a RuntimeError that only its message tells apart; no serialised copy in memory."""
    with path.open("wb") as fh:
        writer = faiss.PyCallbackIOWriter(fh.write)  # type: ignore[attr-defined]  # not in faiss's stubs
        faiss.write_index(index, writer)
        del writer  # flushes faiss's buffer into fh before it closes


@contextlib.contextmanager
def _flock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock on root/name, across processes; the kernel drops it when its holder dies."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / name).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish_lock(root: Path) -> contextlib.AbstractContextManager[None]:
    """One publisher at a time per index directory (held only while a version is being published)."""
    return _flock(root, ".lock")


def mutation_lock(root: Path) -> contextlib.AbstractContextManager[None]:
    """One build, add or remove at a time per index directory, held from reading the current version
    to publishing the next: two runs of the same job (a retried job whose first worker still lives)
    then run one after the other, and the second finds the first's images already indexed."""
    return _flock(root, ".mutation.lock")


# --- versions -------------------------------------------------------------------------------------


def current_version(root: Path) -> str | None:
    pointer = root / CURRENT
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def list_versions(root: Path) -> list[str]:
    folder = root / VERSIONS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("v"))


def version_dir(root: Path, version: str | None = None) -> Path:
    name = version or current_version(root)
    if name is None or not (root / VERSIONS / name / MANIFEST).is_file():
        raise IndexNotFound(f"no published index at {root} (build one with `imsearch index build`)")
    return root / VERSIONS / name


def publish(root: Path, fill: Callable[[Path, str], dict[str, Any]], keep: int = 3) -> str:
    """Publish a new version: fill(tmp_dir, name) writes its files and returns the manifest.

    The folder is fsynced, renamed into versions/, then CURRENT switches to it atomically; versions
    beyond the newest `keep` are removed (never the current one).
    """
    with publish_lock(root):
        existing = list_versions(root)
        number = int(existing[-1][1:]) + 1 if existing else 1
        name = f"v{number:06d}"
        (root / VERSIONS).mkdir(parents=True, exist_ok=True)
        tmp = root / VERSIONS / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            manifest = fill(tmp, name)
            manifest.update({"format": FORMAT, "version": name})
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            fsync_tree(tmp, skip=SHARDS)
            os.rename(tmp, root / VERSIONS / name)
            fsync_path(root / VERSIONS)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_atomic(root / CURRENT, f"{name}\n".encode())
        _collect(root, keep)
    return name


def _collect(root: Path, keep: int) -> None:
    versions = list_versions(root)
    current = current_version(root)
    for old in versions[: max(0, len(versions) - max(1, keep))]:
        if old != current:
            shutil.rmtree(root / VERSIONS / old, ignore_errors=True)
    for stray in (root / VERSIONS).glob(".tmp-*"):  # left by a publisher killed mid-way
        shutil.rmtree(stray, ignore_errors=True)


def link_shard(src: Path, dst_shards: Path) -> None:
    """Share an immutable shard with a new version by hard links (no copy)."""
    target = dst_shards / src.name
    target.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        os.link(file, target / file.name)


# --- reader ---------------------------------------------------------------------------------------


@dataclass
class Shard:
    name: str
    ids: np.ndarray  # (n,) int64
    embeddings: np.ndarray  # (n, d) float32, memory-mapped
    tokens: np.ndarray  # (n, t, w) float16, memory-mapped


class Index:
    """A published index version: ANN search, stored vectors, patch tokens and metadata by id."""

    def __init__(self, root: Path, folder: Path):
        self.root = root
        self.folder = folder
        self.manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
        self.version: str = self.manifest["version"]
        self.plan = AnnPlan(**self.manifest["index"])
        self.dim: int = int(self.manifest["dim"])
        self.deleted = set(np.load(folder / DELETED).tolist()) if (folder / DELETED).is_file() else set()
        self.shards = [_open_shard(folder / SHARDS / s["name"]) for s in self.manifest["shards"]]
        self._build_lookup()
        self.faiss = faiss.read_index(str(folder / INDEX_FILE))
        self._on_gpu: faiss.Index | None = None
        self.search_device = "cpu"

    def use_device(self, device: str) -> str:
        """Serve searches from a GPU copy when `device` (cpu | cuda | auto) and FAISS allow; says where."""
        self._on_gpu, self.search_device = place_for_search(self.faiss, self.plan, device)
        return self.search_device

    @classmethod
    def open(cls, root: Path | str, version: str | None = None) -> Index:
        """Open the CURRENT version (or a named one); the files are immutable, vectors are mmapped."""
        root = Path(root)
        for _ in range(5):
            folder = version_dir(root, version)
            try:
                return cls(root, folder)
            except FileNotFoundError:
                if version is not None or folder.exists():
                    raise
                # garbage-collected between reading CURRENT and opening its files: read CURRENT again
        return cls(root, version_dir(root, version))

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
        self._meta = pa.concat_tables([pq.read_table(self.folder / SHARDS / s.name / "meta.parquet")
                                       for s in self.shards]).combine_chunks() if self.shards else None
        self._meta_pos = np.argsort(order, kind="stable")  # position in meta of the i-th sorted id
        self._columns: dict[str, _Column] = {}

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
        out = np.empty((len(pos), self.dim), np.float32)
        for j, p in enumerate(pos):
            out[j] = self.shards[self._shard[p]].embeddings[self._row[p]]
        return out

    def tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, t, w) float16 patch tokens cached at indexing time, for the reranker."""
        pos = self._locate(ids)
        shape = self.shards[0].tokens.shape[1:] if self.shards else (0, 0)
        out = np.empty((len(pos), *shape), np.float16)
        for j, p in enumerate(pos):
            out[j] = self.shards[self._shard[p]].tokens[self._row[p]]
        return out

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

    def _column(self, name: str) -> _Column:
        column = self._columns.get(name)
        if column is None:
            assert self._meta is not None
            column = self._columns[name] = _Column(self._meta.column(name).chunk(0))
        return column

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(q, k) inner-product scores and ids, best first; -1 ids pad when fewer than k exist.

        IVF-PQ results are re-scored exactly from the stored vectors (k * refine_factor candidates).
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self.dim}")
        fetch = k * self.plan.refine_factor if self.plan.refine_factor else k
        index = self._on_gpu if self._on_gpu is not None and fetch <= GPU_MAX_K else self.faiss
        scores, ids = ann_search(index, self.plan, queries, fetch, nprobe, ef_search)
        if self.plan.refine_factor:
            scores, ids = rescore(queries, ids, self.vectors, k)
        return scores, ids


def _open_shard(folder: Path) -> Shard:
    return Shard(
        folder.name,
        np.load(folder / "ids.npy"),
        np.load(folder / "emb.npy", mmap_mode="r"),
        np.load(folder / "tok.npy", mmap_mode="r"),
    )


class _Column:
    """One metadata column, read by row numbers through numpy views of its Arrow buffers.

    A page of hits reads a few values of two columns on every search. Arrow's `take` dispatches
    through its compute registry, whose code is cold by the time a search has run its forward pass:
    0.2 ms for ten hits in the service, against 0.05 ms in a hot loop (profiled). Slicing the
    strings out of the buffers runs a few lines of numpy instead. Past a few dozen rows Arrow's
    per-row work is the cheaper (4x for 1,000 rows), so larger reads go to it.
    """

    FEW = 32  # rows up to which slicing beats Arrow's take (measured: 8 vs 16 us at 10, 49 vs 22 at 100)

    def __init__(self, array: pa.Array):
        self.array = array
        self.valid = np.asarray(array.is_valid()) if array.null_count else None
        self.offsets: np.ndarray | None = None
        self.values: np.ndarray | None = None
        if pa.types.is_string(array.type):
            _, offsets, data = array.buffers()
            self.offsets = np.frombuffer(offsets, np.int32, len(array) + 1, array.offset * 4)
            self.data = memoryview(data) if data is not None else memoryview(b"")
        elif (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)) and not array.null_count:
            self.values = array.to_numpy()

    def take(self, rows: np.ndarray) -> list[Any]:
        """The values at `rows`, as Python objects (None where null)."""
        if len(rows) > self.FEW or (self.offsets is None and self.values is None):
            return list(self.array.take(pa.array(rows)).to_pylist())
        if self.values is not None:
            return list(self.values[rows].tolist())
        assert self.offsets is not None
        starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        out: list[Any] = [str(self.data[a:b], "utf-8") for a, b in zip(starts, ends, strict=True)]
        if self.valid is not None:
            out = [value if ok else None for value, ok in zip(out, self.valid[rows].tolist(), strict=True)]
        return out
