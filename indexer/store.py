"""Stage 5, store: immutable index versions published atomically, checked, and the reader API over them."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, TypedDict

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
SHARD_FILES = ("ids.npy", "emb.npy", "tok.npy", "meta.parquet")
FORMAT = 1
SEALED = 0o444  # published files: writing one in place takes a chmod first
VERSION_NAME = re.compile(r"v\d{6,}")
SHARD_NAME = re.compile(r"[\w-][\w.-]*", re.ASCII)  # a folder name, never a path
ANN_KINDS = ("flat", "hnsw", "ivf", "ivfpq")


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


class UnknownImage(KeyError):
    """An id that the index version does not hold (never indexed, or removed)."""


class FileDigest(TypedDict):
    """A file's size and sha256, recorded in the manifest when the file was written."""

    bytes: int
    sha256: str


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


# --- versions -------------------------------------------------------------------------------------


def current_version(root: Path) -> str | None:
    """What CURRENT says (None when it is missing or empty); see version_dir for whether it names a version."""
    pointer = root / CURRENT
    if not pointer.is_file():
        return None
    return pointer.read_bytes()[:4096].decode("utf-8", "replace").strip() or None


def list_versions(root: Path) -> list[str]:
    folder = root / VERSIONS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("v"))


def _current_problem(root: Path) -> str | None:
    """What is wrong with CURRENT (None: it names a version folder that exists)."""
    pointer = root / CURRENT
    name = current_version(root)
    if name is None:
        return f"{pointer} is missing or empty"
    if not VERSION_NAME.fullmatch(name):
        return f"{pointer} holds {pointer.read_bytes()[:32]!r}, not a version name"
    if not (root / VERSIONS / name).is_dir():
        return f"{pointer} names {name}, which {root / VERSIONS} does not hold"
    return None


def version_dir(root: Path, version: str | None = None) -> Path:
    """The folder of the named version, or of the one CURRENT names.

    Raises IndexNotFound when the directory holds no index (or no version of that name), and
    IndexCorrupt, listing the versions that open, when CURRENT is missing or damaged.
    """
    if version is not None:
        if not VERSION_NAME.fullmatch(version) or not (root / VERSIONS / version).is_dir():
            raise IndexNotFound(f"{root} holds no version {version!r}; {_advice(root)}")
        return root / VERSIONS / version
    problem = _current_problem(root)
    if problem is None:
        return root / VERSIONS / str(current_version(root))
    if not (root / CURRENT).exists() and not list_versions(root):
        raise IndexNotFound(f"no published index at {root} (build one with `imsearch index build`)")
    raise IndexCorrupt(f"{problem}; {_advice(root)}", root / CURRENT, problem)


def _advice(root: Path, failed: str | None = None) -> str:
    """What to do instead: the other versions that open, which to serve, and the full check."""
    good = [v for v in openable_versions(root) if v != failed]
    check = f"`imsearch index verify --index {root}` checks every file"
    if not good:
        return f"no version of {root} opens: rebuild it (`imsearch index build SRC --index {root} --replace`); {check}"
    return f"the versions that open: {', '.join(good)} — serve one with {root}@{good[-1]}, or rebuild; {check}"


def publish(root: Path, fill: Callable[[Path, str], dict[str, Any]], keep: int = 3) -> str:
    """Publish a new version: fill(tmp_dir, name) writes its files and returns the manifest.

    The sizes and sha256 of the version's own files join the manifest (its shards' are in their
    entries), every file is made read-only, the folder is fsynced, renamed into versions/, then
    CURRENT switches to it atomically; versions beyond the newest `keep` are removed (never the
    current one).
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
            own = [f for f in (INDEX_FILE, DELETED) if (tmp / f).is_file()]
            manifest.setdefault("files", {f: file_digest(tmp / f) for f in own})
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            seal_tree(tmp)
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


# --- integrity: what a version needs, checked cheaply at open and fully by verify -------------------


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
    return None if bad is None else f"has an invalid shard entry {json.dumps(bad)[:80]}"


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
    with _reading(path):
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
class _Needed:
    """A file a version needs, with what the manifest recorded of it (None: written before records)."""

    path: Path
    recorded: FileDigest | None
    rows: int | None = None  # a shard array: the rows its manifest entry says it holds


def _needed_files(folder: Path, manifest: dict[str, Any]) -> list[_Needed]:
    records = manifest.get("files")
    needed = [_Needed(folder / INDEX_FILE, _record(records, INDEX_FILE))]
    if (folder / DELETED).exists() or _record(records, DELETED):
        needed.append(_Needed(folder / DELETED, _record(records, DELETED)))
    for entry in manifest["shards"]:
        needed += _shard_needs(folder / SHARDS / entry["name"], entry)
    return needed


def _shard_needs(folder: Path, entry: dict[str, Any]) -> list[_Needed]:
    records, rows = entry.get("files"), entry.get("rows")
    return [_Needed(folder / name, _record(records, name), rows if name.endswith(".npy") else None)
            for name in SHARD_FILES]


def _record(records: Any, name: str) -> FileDigest | None:
    record = records.get(name) if isinstance(records, dict) else None
    if isinstance(record, dict) and isinstance(record.get("bytes"), int) and isinstance(record.get("sha256"), str):
        return FileDigest(bytes=record["bytes"], sha256=record["sha256"])
    return None


def _problem(need: _Needed) -> str | None:
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
    for need in _needed_files(folder, manifest):
        problem = _problem(need)
        if problem is not None:
            raise corrupt(need.path, problem)
    return manifest


def check_shard(folder: Path, entry: dict[str, Any]) -> None:
    """check_version for one shard folder and its manifest entry (name, rows, files)."""
    root = folder.parents[3] if len(folder.parents) > 3 else folder  # ROOT/versions/vN/shards/NAME
    for need in _shard_needs(folder, entry):
        problem = _problem(need)
        if problem is not None:
            raise corrupt(need.path, problem, f"`imsearch index verify --index {root}` checks every file")


def openable_versions(root: Path) -> list[str]:
    """The kept versions that pass check_version, oldest first."""
    good = []
    for name in list_versions(root):
        with contextlib.suppress(IndexCorrupt):
            check_version(root / VERSIONS / name)
            good.append(name)
    return good


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
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


# --- verify: every recorded file against its size and sha256 ---------------------------------------


@dataclass
class Damage:
    """One damaged file; hard links share one inode, so a damaged shard file is one Damage listing
    every version that holds it."""

    path: Path
    problem: str
    versions: list[str] = field(default_factory=list)

    def line(self) -> str:
        if len(self.versions) > 1:
            shared = f" — one file, hard-linked into {', '.join(self.versions)}: each of them is damaged"
            return f"{self.path} {self.problem}{shared}"
        return f"{self.path} {self.problem}"


@dataclass
class Verification:
    """What `verify` found."""

    root: Path
    versions: list[str]
    damage: list[Damage] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)  # versions whose manifests predate sizes and checksums
    files: int = 0
    hashed: int = 0  # bytes read and hashed (each inode once)

    @property
    def clean(self) -> bool:
        return not self.damage

    def damaged_versions(self) -> list[str]:
        return sorted({v for d in self.damage for v in d.versions})

    def lines(self) -> list[str]:
        """One line per problem, then the summary."""
        out = [d.line() for d in self.damage]
        if self.unrecorded:
            out.append(f"{', '.join(self.unrecorded)}: sizes and checksums not recorded (written before they were): "
                       "only presence, .npy sizes against their headers and Parquet footers were checked")
        checked = f"{len(self.versions)} version{'s' if len(self.versions) != 1 else ''} of {self.root}"
        counted = f"{self.files} files, {self.hashed / 1e6:.1f} MB hashed"
        if self.clean:
            out.append(f"{checked}: no problem found ({counted})" if self.unrecorded
                       else f"{checked} verified clean ({counted})")
            return out
        bad = self.damaged_versions()
        good = [v for v in self.versions if v not in bad]
        out.append(f"{checked}: {len(self.damage)} problem{'s' if len(self.damage) != 1 else ''}"
                   + (f", in {', '.join(bad)}" if bad else "") + f"; verified clean: {', '.join(good) or 'none'}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"root": str(self.root), "clean": self.clean, "versions": self.versions,
                "damaged_versions": self.damaged_versions(), "unrecorded": self.unrecorded,
                "problems": [{"file": str(d.path), "problem": d.problem, "versions": d.versions} for d in self.damage],
                "files": self.files, "hashed_bytes": self.hashed}


def verify(root: Path, version: str | None = None) -> Verification:
    """Check every kept version (or the named one), and CURRENT: each file its manifest needs exists,
    at its recorded size, with its recorded sha256. IndexNotFound when there is nothing to check."""
    names = [version_dir(root, version).name] if version is not None else list_versions(root)
    if not names:
        raise IndexNotFound(f"no published index at {root} (build one with `imsearch index build`)")
    return _Verifier(root, names).run(check_current=version is None)


class _Verifier:
    """Hashes each inode once (versions share their shards by hard links) and groups damage by inode."""

    def __init__(self, root: Path, names: list[str]):
        self.report = Verification(root, names)
        self.found: dict[tuple[Any, ...], Damage] = {}
        self.sha: dict[tuple[int, int], str] = {}

    def run(self, check_current: bool) -> Verification:
        problem = _current_problem(self.report.root) if check_current else None
        if problem is not None:
            self.report.damage.append(Damage(self.report.root / CURRENT, problem.split(" ", 1)[1]))
        for name in self.report.versions:
            self.version(name)
        self.report.damage += self.found.values()
        return self.report

    def version(self, name: str) -> None:
        folder = self.report.root / VERSIONS / name
        try:
            manifest = read_manifest(folder)
        except IndexCorrupt as exc:
            self.note(folder / MANIFEST, exc.problem, name)
            return
        needed = _needed_files(folder, manifest)
        if any(n.recorded is None for n in needed):
            self.report.unrecorded.append(name)
        for need in needed:
            self.report.files += 1
            problem = _problem(need) or self.checksum(need)
            if problem is not None:
                self.note(need.path, problem, name)

    def checksum(self, need: _Needed) -> str | None:
        if need.recorded is None:
            return None
        stat = need.path.stat()
        key = (stat.st_dev, stat.st_ino)
        if key not in self.sha:
            self.sha[key] = file_digest(need.path)["sha256"]
            self.report.hashed += stat.st_size
        if self.sha[key] != need.recorded["sha256"]:
            return "does not match its recorded sha256 (the same size, other bytes: changed in place)"
        return None

    def note(self, path: Path, problem: str, version: str) -> None:
        try:
            stat = path.stat()
            key: tuple[Any, ...] = (stat.st_dev, stat.st_ino, problem)
        except OSError:
            key = (path, problem)
        damage = self.found.setdefault(key, Damage(path, problem))
        damage.path = path  # named as the newest version holding it has it
        damage.versions.append(version)


# --- reader ---------------------------------------------------------------------------------------


class _Rows:
    """One shard array (emb.npy or tok.npy) read by rows with pread on a descriptor held open.

    Not a memory map: a mapped page past the end of a file that shrank kills the process with
    SIGBUS, where a read there comes back short and raises IndexCorrupt naming the file. The open
    descriptor keeps the file as it was even after its version is collected, as a mapping did.
    """

    def __init__(self, path: Path, dtype: type, root: Path):
        with _reading(path):
            self.layout = npy_layout(path)
        if self.layout.dtype != np.dtype(dtype):
            raise corrupt(path, f"holds {self.layout.dtype}, not {np.dtype(dtype)}")
        self.path, self.root = path, root
        self.row_shape = self.layout.shape[1:]
        self.row_bytes = math.prod(self.row_shape) * self.layout.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.layout.shape[0]

    def read(self, row: int, out: memoryview) -> None:
        """Consecutive rows from `row` into `out` (bytes of whole rows)."""
        start = self.layout.offset + row * self.row_bytes
        done = 0
        while done < len(out):
            got = os.preadv(self.fd, [out[done:]], start + done)
            if got == 0:
                size = os.fstat(self.fd).st_size
                raise corrupt(self.path, f"is truncated ({size} of {self.layout.size} bytes: it shrank while "
                                         f"served); run `imsearch index verify --index {self.root}`")
            done += got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Shard:
    name: str
    ids: np.ndarray  # (n,) int64
    embeddings: _Rows  # (n, d) float32
    tokens: _Rows  # (n, t, w) float16


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
        _reserve_descriptors(2 * len(self.manifest["shards"]))
        for entry in self.manifest["shards"]:
            self.shards.append(_open_shard(folder / SHARDS / entry["name"], self.root))
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
            if shard.tokens.row_shape != full[0].tokens.row_shape:
                raise corrupt(shard.tokens.path, f"holds tokens of shape {shard.tokens.row_shape}, where "
                                                 f"{full[0].tokens.path} holds {full[0].tokens.row_shape}")
        self._token_shape = full[0].tokens.row_shape if full else (0, 0)
        self._emb = [s.embeddings for s in self.shards]
        self._tok = [s.tokens for s in self.shards]

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
                    raise exc.advised(_advice(root, folder.name)) from None
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
                shard.embeddings.close()
                shard.tokens.close()

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
        self._meta = pa.concat_tables([_read_meta(self.folder / SHARDS / s.name / "meta.parquet")
                                       for s in self.shards], promote_options="default").combine_chunks() \
            if self.shards else None
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
        return self._gather(pos, np.empty((len(pos), self.dim), np.float32), self._emb)

    def tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, t, w) float16 patch tokens cached at indexing time, for the reranker."""
        pos = self._locate(ids)
        return self._gather(pos, np.empty((len(pos), *self._token_shape), np.float16), self._tok)

    def _gather(self, pos: np.ndarray, out: np.ndarray, files: list[_Rows]) -> np.ndarray:
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


def _open_shard(folder: Path, root: Path) -> Shard:
    ids = read_npy(folder / "ids.npy")
    shard = Shard(folder.name, ids, _Rows(folder / "emb.npy", np.float32, root),
                  _Rows(folder / "tok.npy", np.float16, root))
    for rows in (shard.embeddings, shard.tokens):
        if len(rows) != len(ids):
            raise corrupt(rows.path, f"holds {len(rows)} rows where ids.npy holds {len(ids)}")
    return shard


def _read_meta(path: Path) -> pa.Table:
    # through a file object closed here: given a path, Arrow's reader closes the file on a thread of
    # its own, some time later
    with _reading(path), path.open("rb") as fh:
        return pq.read_table(fh)


def _read_faiss(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError:  # faiss's message is a multi-line assertion from its C++ reader
        raise corrupt(path, "is not a readable FAISS index (damaged or truncated)") from None


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
