"""`imsearch index verify`: every recorded file against its size and sha256, one line per damaged file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from imsearch.cli import app
from indexer.layout import CURRENT, MANIFEST, VERSIONS
from indexer.store import Index
from tests.indexer.test_store import (
    _delete,
    _rewrite_manifest,
    _shard_file,
    _strip_records,
    _truncate,
    _writable,
)
from training.scenes import write_scenes

runner = CliRunner()


def _verify(root: Path, *args: str) -> tuple[int, list[str]]:
    result = runner.invoke(app, ["index", "verify", "--index", str(root), *args])
    return result.exit_code, result.stdout.splitlines()


def test_a_good_index_verifies_clean(root: Path) -> None:
    code, lines = _verify(root)
    assert code == 0, lines
    assert len(lines) == 1 and re.fullmatch(rf"3 versions of {root} verified clean \(\d+ files, [\d.]+ MB hashed\)",
                                            lines[0]), lines
    code, lines = _verify(root, "--json")
    report = json.loads(lines[-1])
    assert code == 0 and report["clean"] and report["problems"] == [] and report["unrecorded"] == []
    assert report["versions"] == ["v000001", "v000002", "v000003"] and report["files"] == 3 * 2 + 4 * (2 + 3 + 4)


def test_a_flipped_byte_in_a_shared_shard_shows_in_every_version_that_links_it(root: Path) -> None:
    path = _writable(_shard_file(root, "tok.npy", 0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert len(Index.open(root)) == 24  # the same size: only the checksum tells
    code, lines = _verify(root)
    assert code == 1
    assert lines[0] == (f"{path} does not match its recorded sha256 (the same size, other bytes: changed in place)"
                        " — one file, hard-linked into v000001, v000002, v000003: each of them is damaged")
    assert lines[-1] == f"3 versions of {root}: 1 problem, in v000001, v000002, v000003; verified clean: none"


def test_truncated_and_missing_files_are_each_named(root: Path) -> None:
    truncated = _truncate(_shard_file(root, "emb.npy"))  # v3's own shard
    missing = _delete(root / VERSIONS / "v000002" / "deleted.npy")
    code, lines = _verify(root)
    assert code == 1
    assert sum(line.startswith(f"{truncated} is truncated (") for line in lines) == 1, lines
    assert f"{missing} is missing" in lines, lines
    assert lines[-1] == f"3 versions of {root}: 2 problems, in v000002, v000003; verified clean: v000001"
    code, lines = _verify(root, "--json")
    problems = {p["file"]: p["versions"] for p in json.loads(lines[-1])["problems"]}
    assert code == 1 and problems == {str(truncated): ["v000003"], str(missing): ["v000002"]}
    code, lines = _verify(root, "--version", "v000001")
    assert code == 0 and lines[-1].startswith(f"1 version of {root} verified clean"), lines


def test_damaged_current_and_manifests_are_problems(root: Path) -> None:
    (root / CURRENT).write_text("junk")
    manifest = _writable(root / VERSIONS / "v000002" / MANIFEST)
    manifest.write_text("{")
    code, lines = _verify(root)
    assert code == 1
    assert f"{root / CURRENT} holds b'junk', not a version name" in lines
    assert any(line.startswith(f"{manifest} is not valid JSON (") for line in lines), lines


def test_old_manifests_verify_without_checksums_and_say_so(root: Path) -> None:
    for version in ("v000001", "v000002", "v000003"):
        _rewrite_manifest(root, version, _strip_records)
    code, lines = _verify(root)
    assert code == 0, lines
    assert lines[0].startswith("v000001, v000002, v000003: sizes and checksums not recorded")
    assert lines[-1].startswith(f"3 versions of {root}: no problem found (")
    tok = _truncate(_shard_file(root, "tok.npy"))  # still found: the .npy header says how long it should be
    code, lines = _verify(root)
    assert code == 1 and any(line.startswith(f"{tok} is truncated (") for line in lines), lines


def test_usage_errors_exit_2(root: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["index", "verify", "--index", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no published index" in missing.output
    unknown = runner.invoke(app, ["index", "verify", "--index", str(root), "--version", "v000042"])
    assert unknown.exit_code == 2 and "holds no version 'v000042'" in unknown.output


def test_index_add_onto_a_damaged_index_is_one_line_naming_the_file(root: Path, tmp_path: Path) -> None:
    (root / CURRENT).write_bytes(b"\x00\xff not a version")
    write_scenes(tmp_path / "new", 1, seed=54)
    result = runner.invoke(app, ["index", "add", str(tmp_path / "new"), "--index", str(root), "--device", "cpu"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    said = " ".join(result.output.split())  # the console may wrap the one line
    assert str(root / CURRENT) in said and "@v000003" in said and "Traceback" not in said, result.output
