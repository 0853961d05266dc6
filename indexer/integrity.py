"""Indexer, store: what a version needs, checked cheaply at open — its manifest, files, sizes, headers, footers."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.ann import AnnPlan
from indexer.durable import FileDigest
from indexer.layout import DELETED, INDEX_FILE, MANIFEST, SHARD_FILES, SHARD_NAME, SHARDS, feature_file


class IndexNotFound(FileNotFoundError):
    """No published index version at the given directory (or none of the given name)."""


class IndexCorrupt(IndexNotFound, ValueError):
    """A file of an index version is missing, cut short or garbled; the message says which, what is
    wrong with it and what to do. An IndexNotFound too: who cannot serve a folder without an index
    cannot serve one whose index is damaged either."""

    def __init__(self, message: str, path: Path | None = None, problem: str = ""):
        super().__init__(message)
        self.path, self.problem = path, problem or message

    def advised(self, advice: str) -> IndexCorrupt:
        """The same problem, with what to do instead appended."""
        if self.path is None:
            return IndexCorrupt(f"{self}; {advice}", None, self.problem)
        return corrupt(self.path, self.problem, advice)


def corrupt(path: Path, problem: str, advice: str = "") -> IndexCorrupt:
    """IndexCorrupt for one file: '<path> <problem>[; <advice>]', one line."""
    return IndexCorrupt(f"{path} {problem}" + (f"; {advice}" if advice else ""), path, problem)


ANN_KINDS = ("flat", "hnsw", "ivf", "ivfpq")  # the FAISS index kinds a manifest may name
MANIFEST_KEYS: dict[str, type] = {"version": str, "model": dict, "dim": int, "count": int, "next_id": int,
                                  "index": dict, "shards": list}


def read_manifest(folder: Path) -> dict[str, Any]:
    """A version's manifest, with the keys and types a reader relies on; IndexCorrupt otherwise."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise corrupt(path, "is missing") from None
    except json.JSONDecodeError as exc:
        raise corrupt(path, f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise corrupt(path, f"cannot be read ({_first_line(exc)})") from None
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise corrupt(path, problem)
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, kind in MANIFEST_KEYS.items():
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"has a {key} of the wrong type ({type(value).__name__}, not {kind.__name__})"
    try:
        AnnPlan(**manifest["index"])
    except TypeError:
        return "has an index entry that names unknown FAISS settings"
    if manifest["index"].get("kind") not in ANN_KINDS:
        return f"names an unknown index kind {manifest['index'].get('kind')!r}"
    bad = next((s for s in manifest["shards"] if not _valid_shard_entry(s)), None)
    if bad is not None:
        return f"has an invalid shard entry {json.dumps(bad)[:80]}"
    return _features_problem(manifest.get("features"))


def _features_problem(features: Any) -> str | None:
    """The tiers' feature sets, when recorded: name → {model, format, shape, bytes_per_image}."""
    if features is None:
        return None
    valid = isinstance(features, dict) and all(
        isinstance(name, str) and SHARD_NAME.fullmatch(name) and isinstance(info, dict)
        and isinstance(info.get("model"), str) and isinstance(info.get("format"), str)
        for name, info in features.items())
    return None if valid else f"has an invalid features entry {json.dumps(features)[:80]}"


def _valid_shard_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("name"), str) and bool(SHARD_NAME.fullmatch(entry["name"]))
            and isinstance(entry.get("rows"), int) and not isinstance(entry.get("rows"), bool))


@dataclass(frozen=True)
class NpyLayout:
    """Where a .npy file's data lies: C-ordered rows of `shape[1:]` and `dtype` from byte `offset`."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def size(self) -> int:
        """The file's size when whole."""
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def npy_layout(path: Path) -> NpyLayout:
    """The header of a .npy file; ValueError when it has none that rows can be read by."""
    with path.open("rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        if major not in (1, 2):
            raise ValueError(f".npy format {major} is not supported")
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    if fortran or dtype.hasobject:
        raise ValueError("not a C-ordered array of numbers")
    return NpyLayout(offset, tuple(shape), dtype)


def read_npy(path: Path) -> np.ndarray:
    """A whole .npy file read into memory, its header checked against its size: never mapped, so a
    file cut short is an IndexCorrupt naming it, not a SIGBUS."""
    with reading(path):
        layout = npy_layout(path)
        out = np.empty(layout.shape, layout.dtype)
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(layout.offset)
            got = fh.readinto(out.reshape(-1).view(np.uint8).data)
    if got != out.nbytes or size != layout.size:
        raise corrupt(path, _size_problem(size, layout.size))
    return out


@dataclass(frozen=True)
class Needed:
    """A file a version needs, with what the manifest recorded of it (None: written before records)."""

    path: Path
    recorded: FileDigest | None
    rows: int | None = None  # a shard array: the rows its manifest entry says it holds


def needed_files(folder: Path, manifest: dict[str, Any]) -> list[Needed]:
    """Every file a version's manifest needs: its own, then each shard's."""
    records = manifest.get("files")
    needed = [Needed(folder / INDEX_FILE, _record(records, INDEX_FILE))]
    if (folder / DELETED).exists() or _record(records, DELETED):
        needed.append(Needed(folder / DELETED, _record(records, DELETED)))
    for entry in manifest["shards"]:
        needed += _shard_needs(folder / SHARDS / entry["name"], entry, tuple(manifest.get("features") or ()))
    return needed


def _shard_needs(folder: Path, entry: dict[str, Any], features: tuple[str, ...] = ()) -> list[Needed]:
    """A shard's files: the four of every shard, and a shard with rows one per feature set of its version."""
    records, rows = entry.get("files"), entry.get("rows")
    recorded = {name for name in records if name.startswith("feat-")} if isinstance(records, dict) else set()
    extra = recorded | ({feature_file(name) for name in features} if rows else set())
    return [Needed(folder / name, _record(records, name), rows if name.endswith(".npy") else None)
            for name in (*SHARD_FILES, *sorted(extra))]


def _record(records: Any, name: str) -> FileDigest | None:
    record = records.get(name) if isinstance(records, dict) else None
    if isinstance(record, dict) and isinstance(record.get("bytes"), int) and isinstance(record.get("sha256"), str):
        return FileDigest(bytes=record["bytes"], sha256=record["sha256"])
    return None


def file_problem(need: Needed) -> str | None:
    """What is wrong with a needed file, found cheaply: its size, .npy header, Parquet footer (no hashing)."""
    try:
        size = need.path.stat().st_size
        if need.recorded is not None and size != need.recorded["bytes"]:
            return _size_problem(size, need.recorded["bytes"])
        if need.path.suffix == ".npy":
            return _npy_problem(need.path, size, need.rows)
        if need.path.suffix == ".parquet":
            return _parquet_problem(need.path, size)
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return "is empty" if size == 0 else None


def _size_problem(size: int, expected: int) -> str:
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return f"is longer than it was written ({size} bytes, not {expected})"


def _npy_problem(path: Path, size: int, rows: int | None) -> str | None:
    try:
        layout = npy_layout(path)
    except ValueError:
        return "is not a readable .npy file (its header is damaged)"
    if size != layout.size:
        return _size_problem(size, layout.size)
    if rows is not None and layout.shape[:1] != (rows,):
        return f"holds an array of shape {layout.shape} where the manifest counts {rows} rows"
    return None


def _parquet_problem(path: Path, size: int) -> str | None:
    with path.open("rb") as fh:
        head = fh.read(4)
        fh.seek(max(0, size - 4))
        tail = fh.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        return "is not a whole Parquet file (its header or footer is missing: truncated?)"
    return None


def check_version(folder: Path) -> dict[str, Any]:
    """The manifest of a version whose files are all there, at their recorded sizes, with whole .npy
    headers and Parquet footers; IndexCorrupt names the first problem. Cheap: nothing is hashed."""
    manifest = read_manifest(folder)
    for need in needed_files(folder, manifest):
        problem = file_problem(need)
        if problem is not None:
            raise corrupt(need.path, problem)
    return manifest


def check_shard(folder: Path, entry: dict[str, Any]) -> None:
    """check_version for one shard folder and its manifest entry (name, rows, files)."""
    root = folder.parents[3] if len(folder.parents) > 3 else folder  # ROOT/versions/vN/shards/NAME
    for need in _shard_needs(folder, entry):
        problem = file_problem(need)
        if problem is not None:
            raise corrupt(need.path, problem, f"`imsearch index verify --index {root}` checks every file")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Errors while reading a stored file as one IndexCorrupt naming it (numpy, Arrow and FAISS raise
    their own kinds)."""
    try:
        yield
    except IndexCorrupt:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise corrupt(path, f"cannot be read ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__
