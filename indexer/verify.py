"""Indexer, store: `imsearch index verify` — every recorded file of every kept version against its size and sha256."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.durable import file_digest
from indexer.integrity import IndexCorrupt, IndexNotFound, Needed, file_problem, needed_files, read_manifest
from indexer.layout import CURRENT, MANIFEST, VERSIONS
from indexer.versions import current_problem, list_versions, version_dir


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
        problem = current_problem(self.report.root) if check_current else None
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
        needed = needed_files(folder, manifest)
        if any(n.recorded is None for n in needed):
            self.report.unrecorded.append(name)
        for need in needed:
            self.report.files += 1
            problem = file_problem(need) or self.checksum(need)
            if problem is not None:
                self.note(need.path, problem, name)

    def checksum(self, need: Needed) -> str | None:
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
