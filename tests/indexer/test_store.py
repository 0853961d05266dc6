"""Index versions under damage: one clear error naming the file and the versions that still open,
recorded sizes and checksums, read-only published files, and reads that never die of SIGBUS."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from indexer.build import _live_vectors, remove
from indexer.durable import file_digest
from indexer.integrity import IndexCorrupt, IndexNotFound
from indexer.layout import CURRENT, INDEX_FILE, MANIFEST, SHARDS, VERSIONS
from indexer.store import Index
from indexer.versions import openable_versions

OLDER = "the versions that open: v000001, v000002 — serve one with {root}@v000002"


def _manifest(root: Path, version: str) -> dict:
    return json.loads((root / VERSIONS / version / MANIFEST).read_text())


def _shard_file(root: Path, name: str, shard: int = -1, version: str = "v000003") -> Path:
    """A file of a shard of a version: shard 0 is in every version, shard -1 of v3 only in v3."""
    entry = _manifest(root, version)["shards"][shard]
    return root / VERSIONS / version / SHARDS / entry["name"] / name


def _writable(path: Path) -> Path:
    path.chmod(0o644)  # published files are read-only: damaging one takes intent
    return path


def _truncate(path: Path) -> Path:
    os.truncate(_writable(path), path.stat().st_size // 2)
    return path


def _rewrite_manifest(root: Path, version: str, change: Callable[[dict], object]) -> Path:
    manifest = _manifest(root, version)
    change(manifest)
    path = _writable(root / VERSIONS / version / MANIFEST)
    path.write_text(json.dumps(manifest))
    return path


def _refused(root: Path) -> str:
    with pytest.raises(IndexCorrupt) as info:
        Index.open(root)
    message = str(info.value)
    assert "\n" not in message and "imsearch index verify" in message
    return message


def test_publish_records_sizes_and_checksums_and_seals_every_file(root: Path) -> None:
    for version in ("v000001", "v000002", "v000003"):
        folder = root / VERSIONS / version
        manifest = _manifest(root, version)
        assert set(manifest["files"]) == {INDEX_FILE, "deleted.npy"}
        for name, record in manifest["files"].items():
            assert file_digest(folder / name) == record
        for entry in manifest["shards"]:
            assert set(entry["files"]) == {"ids.npy", "emb.npy", "tok.npy", "meta.parquet"}
            for name, record in entry["files"].items():
                assert file_digest(folder / SHARDS / entry["name"] / name) == record
        assert all(p.stat().st_mode & 0o222 == 0 for p in folder.rglob("*") if p.is_file())
    first, last = _manifest(root, "v000001")["shards"][0], _manifest(root, "v000003")["shards"][0]
    assert first == last  # carried unchanged, not recomputed
    assert _shard_file(root, "tok.npy", 0, "v000001").stat().st_ino == _shard_file(root, "tok.npy", 0).stat().st_ino


def _damage_current_bytes(root: Path) -> Path:
    (root / CURRENT).write_bytes(b"\x00\xff\x13\x9a garbage")
    return root / CURRENT


def _damage_current_text(root: Path) -> Path:
    (root / CURRENT).write_text("hello world\n")
    return root / CURRENT


def _delete(path: Path) -> Path:
    path.unlink()
    return path


CASES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    # name: (damage, what the message says about the file, which versions it lists)
    "truncated index.faiss": (lambda r: _truncate(r / VERSIONS / "v000003" / INDEX_FILE), "is truncated (", OLDER),
    "deleted index.faiss": (lambda r: _delete(r / VERSIONS / "v000003" / INDEX_FILE), "is missing", OLDER),
    "deleted tok.npy": (lambda r: _delete(_shard_file(r, "tok.npy")), "is missing", OLDER),
    # unlinking v3's name of a shared shard leaves the other versions' links whole
    "deleted shared tok.npy": (lambda r: _delete(_shard_file(r, "tok.npy", 0)), "is missing", OLDER),
    "truncated tok.npy": (lambda r: _truncate(_shard_file(r, "tok.npy")), "is truncated (", OLDER),
    "truncated emb.npy": (lambda r: _truncate(_shard_file(r, "emb.npy")), "is truncated (", OLDER),
    "truncated ids.npy": (lambda r: _truncate(_shard_file(r, "ids.npy")), "is truncated (", OLDER),
    "truncated meta.parquet": (lambda r: _truncate(_shard_file(r, "meta.parquet")), "is truncated (", OLDER),
    "deleted meta.parquet": (lambda r: _delete(_shard_file(r, "meta.parquet")), "is missing", OLDER),
    # one inode in every version: truncating it damages them all
    "truncated shared tok.npy": (lambda r: _truncate(_shard_file(r, "tok.npy", 0)), "is truncated (",
                                 "no version of {root} opens: rebuild it"),
    "binary garbage in CURRENT": (_damage_current_bytes, "holds b'\\x00\\xff\\x13\\x9a garbage', not a version name",
                                  "the versions that open: v000001, v000002, v000003 — serve one with {root}@v000003"),
    "text garbage in CURRENT": (_damage_current_text, "holds b'hello world\\n', not a version name",
                                "the versions that open: v000001, v000002, v000003"),
    "CURRENT deleted": (lambda r: _delete(r / CURRENT), "is missing or empty", "the versions that open: v000001, "
                        "v000002, v000003"),
    "invalid JSON manifest": (lambda r: _writable(r / VERSIONS / "v000003" / MANIFEST).write_text('{"version": ')
                              and r / VERSIONS / "v000003" / MANIFEST, "is not valid JSON (", OLDER),
    "manifest without count": (lambda r: _rewrite_manifest(r, "v000003", lambda m: m.pop("count")), "lacks count",
                               OLDER),
    "manifest with a path for a shard": (lambda r: _rewrite_manifest(
        r, "v000003", lambda m: m["shards"][0].update(name="../../elsewhere")), "has an invalid shard entry", OLDER),
    "manifest with a path for a feature set": (lambda r: _rewrite_manifest(
        r, "v000003", lambda m: m.update(features={"../x": {"model": "m", "format": "fp16"}})),
        "has an invalid features entry", OLDER),
    "manifest naming a feature set no shard holds": (lambda r: _rewrite_manifest(
        r, "v000003", lambda m: m.update(features={"blip": {"model": "m", "format": "fp16"}})) and _shard_file(
        r, "feat-blip.npy", 0), "is missing", OLDER),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_version_is_one_line_naming_the_file_and_the_versions_that_open(root: Path, case: str) -> None:
    damage, problem, listed = CASES[case]
    path = damage(root)
    message = _refused(root)
    assert message.startswith(f"{path} {problem}"), message
    assert listed.format(root=root) in message, message


def test_a_truncation_says_how_much_is_left(root: Path) -> None:
    path = root / VERSIONS / "v000003" / INDEX_FILE
    size = path.stat().st_size
    _truncate(path)
    assert f"{path} is truncated ({size // 2} of {size} bytes); " in _refused(root)


def test_a_named_older_version_opens_while_the_current_one_is_damaged(root: Path) -> None:
    _truncate(_shard_file(root, "tok.npy"))
    assert openable_versions(root) == ["v000001", "v000002"]
    with Index.open(root, "v000001") as old:
        assert old.version == "v000001" and len(old) == 12
        assert old.tokens(old.ids()).shape == (12, 65, 192) and old.tokens(old.ids()).dtype == np.float16
        assert old.vectors(old.ids()).shape == (12, old.dim) and old.vectors(old.ids()).dtype == np.float32
    assert len(Index.open(root, "v000002")) == 18
    for name in ("v000009", "../v000001", "CURRENT"):
        with pytest.raises(IndexNotFound, match=f"holds no version '{name}'; the versions that open: v000001"):
            Index.open(root, name)


def test_a_folder_without_an_index_is_not_found_not_corrupt(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFound, match="no published index") as info:
        Index.open(tmp_path)
    assert not isinstance(info.value, IndexCorrupt)


def test_old_manifests_without_sizes_and_checksums_still_open(root: Path) -> None:
    for version in ("v000001", "v000002", "v000003"):
        _rewrite_manifest(root, version, _strip_records)
    index = Index.open(root)
    assert len(index) == 24 and index.tokens(index.ids()[:3]).shape == (3, 65, 192)
    _truncate(_shard_file(root, "tok.npy"))  # found without a recorded size: by the .npy header
    assert "is truncated (" in _refused(root)


def _strip_records(manifest: dict) -> None:
    manifest.pop("files")
    for entry in manifest["shards"]:
        entry.pop("files")


READ_AFTER_TRUNCATION = """
import os, sys
from indexer.integrity import IndexCorrupt
from indexer.store import Index
index = Index.open(sys.argv[1])
ids = index.ids()[-6:]  # the rows of v3's own shard
index.{read}(ids)
os.chmod(sys.argv[2], 0o644)
os.truncate(sys.argv[2], os.path.getsize(sys.argv[2]) // 2)
try:
    index.{read}(ids)
except IndexCorrupt as exc:
    print("caught:", exc)
"""


@pytest.mark.parametrize(("read", "name"), [("tokens", "tok.npy"), ("vectors", "emb.npy")])
def test_a_file_cut_short_under_an_open_index_raises_instead_of_sigbus(root: Path, read: str, name: str) -> None:
    path = _shard_file(root, name)
    proc = subprocess.run([sys.executable, "-c", READ_AFTER_TRUNCATION.format(read=read), str(root), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode} (SIGBUS is -7): {proc.stderr[-2000:]}"
    assert f"caught: {path} is truncated (" in proc.stdout
    assert f"run `imsearch index verify --index {root}`" in proc.stdout


def test_reads_gather_runs_of_rows_as_the_rows_themselves(root: Path) -> None:
    index = Index.open(root)
    ids = index.ids()
    picks = np.array([ids[5], ids[6], ids[7], ids[0], ids[-1], ids[9], ids[8], ids[13], ids[14]])  # runs, reversals
    one_by_one = np.stack([index.tokens([i])[0] for i in picks])
    np.testing.assert_array_equal(index.tokens(picks), one_by_one)
    entry = _manifest(root, "v000003")["shards"][0]
    stored = np.load(root / VERSIONS / "v000003" / SHARDS / entry["name"] / "tok.npy")
    np.testing.assert_array_equal(index.tokens(ids[:len(stored)]), stored)
    assert index.tokens([]).shape == (0, 65, 192) and index.vectors([]).shape == (0, index.dim)


def _open_files_under(root: Path) -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # listdir's own descriptor, closed since
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(link for link in links if link.startswith(str(root)))


def test_close_releases_the_shard_files(root: Path) -> None:
    index = Index.open(root)
    held = _open_files_under(root)
    expected = {str(index.folder / SHARDS / s.name / f) for s in index.shards for f in ("emb.npy", "tok.npy")}
    assert set(held) == expected, held
    index.close()
    assert _open_files_under(root) == []
    with pytest.raises(ValueError, match="is closed"):
        index.tokens(index.ids()[:1])
    assert index.metadata(index.ids()[:1])  # metadata lives in memory
    index.close()  # twice is fine
    with Index.open(root):
        pass
    assert _open_files_under(root) == []
    Index.open(root)  # dropped at once: the garbage collector closes its files
    assert _open_files_under(root) == []


def test_mutations_refuse_a_damaged_parent_by_name(root: Path) -> None:
    emb = _truncate(_shard_file(root, "emb.npy"))
    with pytest.raises(IndexCorrupt, match=f"^{emb} is truncated"):
        remove(root, ids=[0])
    with pytest.raises(IndexCorrupt, match=f"^{emb} is truncated"):
        _live_vectors([emb.parent], set())
