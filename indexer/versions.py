"""Indexer, store: index versions — CURRENT, which version to open, atomic publish, old versions collected."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from indexer.durable import file_digest, fsync_path, fsync_tree, publish_lock, seal_tree, write_atomic
from indexer.integrity import IndexCorrupt, IndexNotFound, check_version
from indexer.layout import CURRENT, DELETED, FORMAT, INDEX_FILE, MANIFEST, SHARDS, VERSION_NAME, VERSIONS


def current_version(root: Path) -> str | None:
    """What CURRENT says (None when it is missing or empty); see version_dir for whether it names a version."""
    pointer = root / CURRENT
    if not pointer.is_file():
        return None
    return pointer.read_bytes()[:4096].decode("utf-8", "replace").strip() or None


def list_versions(root: Path) -> list[str]:
    """The names of the kept versions, oldest first."""
    folder = root / VERSIONS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("v"))


def current_problem(root: Path) -> str | None:
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
            raise IndexNotFound(f"{root} holds no version {version!r}; {advice(root)}")
        return root / VERSIONS / version
    problem = current_problem(root)
    if problem is None:
        return root / VERSIONS / str(current_version(root))
    if not (root / CURRENT).exists() and not list_versions(root):
        raise IndexNotFound(f"no published index at {root} (build one with `imsearch index build`)")
    raise IndexCorrupt(f"{problem}; {advice(root)}", root / CURRENT, problem)


def advice(root: Path, failed: str | None = None) -> str:
    """What to do instead: the other versions that open, which to serve, and the full check."""
    good = [v for v in openable_versions(root) if v != failed]
    check = f"`imsearch index verify --index {root}` checks every file"
    if not good:
        return f"no version of {root} opens: rebuild it (`imsearch index build SRC --index {root} --replace`); {check}"
    return f"the versions that open: {', '.join(good)} — serve one with {root}@{good[-1]}, or rebuild; {check}"


def openable_versions(root: Path) -> list[str]:
    """The kept versions that pass check_version, oldest first."""
    good = []
    for name in list_versions(root):
        with contextlib.suppress(IndexCorrupt):
            check_version(root / VERSIONS / name)
            good.append(name)
    return good


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
