"""The `imsearch` command line as a user runs it: search from a terminal, --version, serve's refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from unittest.mock import patch

import pytest
from click.testing import Result
from typer.testing import CliRunner

from imsearch.cli import app
from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from tests.service.procs import CLI, free_port
from training.scenes import write_scenes


@pytest.fixture(scope="module")
def index_dir(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_scenes(root / "src", 10, seed=141, twins=True)
    build_or_add(root / "src" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0), "build")
    return root / "idx"


def _run(*args: str) -> Result:
    """The command in this process (the real CLI, without a new interpreter's torch import each time)."""
    return CliRunner().invoke(app, list(args))


def test_search_prints_rank_score_and_path(index_dir: Path) -> None:
    fast = _run("search", "a small red circle", "--index", str(index_dir), "-k", "4")
    assert fast.exit_code == 0, fast.output
    rows = [line.split("\t") for line in fast.stdout.splitlines()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(Path(r[2]).is_file() for r in rows)
    deep = _run("search", "a small red circle", "--index", str(index_dir), "-k", "3", "--rerank", "mid", "--json")
    answer = json.loads(deep.stdout)
    assert deep.exit_code == 0 and len(answer["hits"]) == 3
    assert all(h["rerank_score"] is not None for h in answer["hits"]) and answer["timings_ms"]["rerank"] > 0
    assert answer["reranked"] is True and "reranked" not in fast.stderr
    assert "reranked)" in _run("search", "a small red circle", "--index", str(index_dir), "--rerank", "mid").stderr
    by_image = _run("search", "--image", rows[0][2], "--index", str(index_dir), "-k", "1")
    assert by_image.exit_code == 0 and by_image.stdout.split("\t")[2].strip() == rows[0][2]


def test_search_explain_prints_where_each_named_object_is(index_dir: Path) -> None:
    text = "a small red circle left of a large blue square"
    shown = _run("search", text, "--index", str(index_dir), "-k", "2", "--rerank", "mid", "--explain")
    assert shown.exit_code == 0, shown.output
    for line in shown.stdout.splitlines():  # rank, score, path, then one column per located object
        places = line.split("\t")[3:]
        assert [p.split(" at ")[0] for p in places] == ["small red circle", "large blue square"], line
        assert all(0 <= float(v) <= 1 for p in places for v in p.split(" at ")[1].strip("()").split(", "))
    answer = json.loads(_run("search", text, "--index", str(index_dir), "-k", "2", "--rerank", "mid", "--explain",
                             "--json").stdout)
    assert [p["phrase"] for p in answer["hits"][0]["explain"]] == ["small red circle", "large blue square"]


def test_a_tier_that_cannot_load_is_one_line_in_a_terminal(index_dir: Path) -> None:
    done = subprocess.run([CLI, "search", "x", "--index", str(index_dir), "--rerank", "deepest"],
                          capture_output=True, text=True, timeout=120)  # a process of its own: logging as a user's
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "unknown rerank tier" in done.stderr, done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("search", "--index", "IDX"), "give a text"),
    (("search", "   ", "--index", "IDX"), "empty"),
    (("search", "x", "--index", "IDX", "--rerank", "deepest"), "unknown rerank tier"),
    (("search", "x", "--index", "IDX", "--rerank", "blip"), "--rerank blip needs --checkpoint MODEL_DIR"),
    (("search", "--index", "IDX", "--image", "/dev/zero"), "not a regular file"),
    (("search", "x", "--index", "/nowhere"), "no published index"),
    (("search", "a red circle", "--index", "IDX", "--explain"), "pick a rerank tier"),
])
def test_search_errors_are_one_clear_line(index_dir: Path, args: tuple[str, ...], message: str) -> None:
    done = _run(*(str(index_dir) if a == "IDX" else a for a in args))
    assert done.exit_code == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)


def test_version() -> None:
    done = subprocess.run([CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().startswith("imsearch 0.")


def test_serve_refuses_a_busy_port_before_loading_anything(index_dir: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        env_model = "IMSEARCH_MODEL=no-such-model"  # loading models first would fail on this instead
        done = subprocess.run(["env", env_model, CLI, "serve", "--index", str(index_dir), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"127.0.0.1:{port}" in done.stderr and "in use" in done.stderr
    assert "no-such-model" not in done.stderr and "Traceback" not in done.stderr


def test_serve_with_worker_processes_is_refused_off_linux(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.platform", "darwin")  # the workers' SO_REUSEPORT balance is Linux's
    monkeypatch.setenv("IMSEARCH_REDIS_URL", "redis://127.0.0.1:6379/3")  # what else --workers needs
    with patch.dict(os.environ):  # serve hands its options to the workers in IMSEARCH_*: none may outlive the test
        done = _run("serve", "--index", str(index_dir), "--workers", "2", "--port", str(free_port()))
    assert done.exit_code == 2 and "--workers above 1 needs Linux" in done.stderr, done.output
    assert "IMSEARCH_WORKERS" not in os.environ
