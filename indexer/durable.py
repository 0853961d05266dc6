"""Indexer, store: durable writes — fsync, atomic replace, sealed files, hashed .npy and FAISS writes, locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypedDict

import faiss
import numpy as np

SEALED = 0o444  # published files: writing one in place takes a chmod first


class FileDigest(TypedDict):
    """A file's size and sha256, recorded in the manifest when the file was written."""

    bytes: int
    sha256: str


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


def seal_tree(root: Path) -> None:
    """Make every file below root read-only: published files never change, and a stray write to
    one (a truncation, an editor's save) should fail rather than damage every version linking it."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(dirpath) / name, SEALED)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class _HashingFile:
    """Writes through to a binary file, counting and hashing the bytes on the way (no second read)."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.fh.write(view)

    def digest(self) -> FileDigest:
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def file_digest(path: Path) -> FileDigest:
    """Size and sha256 of a file as it is now (right after it was written: from the page cache)."""
    with path.open("rb") as fh:
        sha = hashlib.file_digest(fh, "sha256")
        return {"bytes": fh.tell(), "sha256": sha.hexdigest()}


def save_npy(path: Path, array: np.ndarray | Sequence[np.ndarray]) -> FileDigest:
    """Write an array, or the concatenation of chunks (same dtype and trailing shape), as .npy;
    returns the file's size and sha256, hashed as it is written.

    Chunks go to the file one after another, never joined in memory: a shard's tokens are its
    largest object. Through Python's write, not numpy's fwrite: a full disk raises ENOSPC.
    """
    chunks = [np.require(c, requirements="C") for c in ([array] if isinstance(array, np.ndarray) else array)]
    if not chunks or any(c.dtype != chunks[0].dtype or c.shape[1:] != chunks[0].shape[1:] for c in chunks):
        raise ValueError(f"{path}: chunks must share a dtype and trailing shape")
    shape = (sum(len(c) for c in chunks), *chunks[0].shape[1:]) if chunks[0].ndim else ()
    header = {"descr": np.lib.format.dtype_to_descr(chunks[0].dtype), "fortran_order": False, "shape": shape}
    with path.open("wb") as raw:
        fh = _HashingFile(raw)
        np.lib.format.write_array_header_1_0(fh, header)
        for chunk in chunks:
            fh.write(chunk.reshape(-1).view(np.uint8).data)  # the contiguous bytes themselves: no copy
    return fh.digest()


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
