"""The README's commands, every one of its `bash` blocks, run in order on small data as a user would
run them: the documentation cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from imsearch.cli import app
from tests.service.procs import CLI, free_port, terminate, wait_for

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REDIS_DB = 13  # the README's Redis database 0, moved to one of the tests' own (flushed)

# sizes made small: the README shows real ones (option → value; added when the command lacks it)
SMALL: dict[str, dict[str, str]] = {
    "imsearch scenes": {"--n": "6"},
    "imsearch train encoder": {"--steps": "2", "--eval-every": "0", "--batch-pairs": "4", "--out": "{work}/enc"},
    "imsearch eval encoder": {"--n": "40"},
    "imsearch train reranker": {"--steps": "2", "--batch": "4", "--val-n": "20",
                                "--out": "{work}/reranker.safetensors"},
    "imsearch train calibrate": {"--val-n": "20", "--per-kind": "2", "--out": "{work}/calibrated.safetensors"},
    "imsearch eval tradeoff": {"--n": "40", "--ks": "8"},
    "imsearch eval freeform": {"--n": "40", "--per-kind": "3"},
    "imsearch eval gate": {"--n": "40"},
    "imsearch eval explain": {"--n": "40"},
}
# what cannot succeed on this machine, and must fail as the README says (exit 2, this message)
EXPECTED_FAILURES = {
    # serving what the build before could not make (no ViT-B-32 weights here); the first key found wins
    "imsearch serve --index data/photos": "no published index",
    'imsearch search "a dog on a beach"': "no published index",
    "--pretrained laion2b_s34b_b79k": "not available offline",
    "--pretrained /models/vit-b-32.safetensors": "does not exist",
    "--model local-dir:/models/my-clip": "has no open_clip_config.json",
    "--model /models/my-arch.json": "does not exist",
    "--tiers mid,blip=/models/blip-itm-base-coco": "is not a BLIP checkpoint folder",
    "--ray auto": "Ray",
}
SKIPPED = {
    "make test": "the command that runs this test (CI's .ci/run calls it)",
    "pip install": "installs from the network; make test installed every extra already",
}
RAY = "--ray"  # runs in a process of its own: a Ray started in the test process would outlive the command


@dataclass
class Command:
    block: int
    line: str
    env: dict[str, str]
    argv: list[str]
    background: bool


def commands() -> Iterator[Command]:
    """Every command of the README's bash blocks: continuations joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    for number, block in enumerate(blocks):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            env = {}
            while re.fullmatch(r"[A-Z_]+=.*", words[0]):
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            background = words[-1] == "&"
            yield Command(number, line.strip(), env, words[:-1] if background else words, background)


def _small(argv: list[str], work: Path) -> list[str]:
    argv = list(argv)
    for prefix, options in SMALL.items():
        if " ".join(argv).startswith(prefix):
            for option, value in options.items():
                value = value.format(work=work)
                if option in argv:
                    argv[argv.index(option) + 1] = value
                else:
                    argv += [option, value]
    return argv


@dataclass
class Scenario:
    """The README's commands in one folder, with its own port and Redis database."""

    work: Path
    port: int = field(default_factory=free_port)
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def private(self, text: str) -> str:
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
        return text.replace("redis://127.0.0.1:6379/0", f"redis://127.0.0.1:6379/{REDIS_DB}")

    def run(self, cmd: Command) -> None:
        argv = [self.private(a) for a in _small(cmd.argv, self.work)]
        argv = [str(self.port) if a == "8000" else a for a in argv]
        env = {k: self.private(v) for k, v in cmd.env.items()}
        if argv[0] == "kill":
            for job in argv[1:]:
                terminate(self.background[int(job.removeprefix("%")) - 1])
        elif argv[0] == "curl":
            self._curl(argv)
        elif cmd.background:
            self._start(argv, env)
        else:
            self._imsearch(cmd.line, argv, env)
        self.ran.append(cmd.line)

    def _imsearch(self, line: str, argv: list[str], env: dict[str, str]) -> None:
        assert argv[0] == "imsearch", line
        expected = next((message for key, message in EXPECTED_FAILURES.items() if key in line), None)
        if RAY in argv:
            done = subprocess.run([CLI, *argv[1:]], cwd=self.work, env={**os.environ, **env}, capture_output=True,
                                  text=True, timeout=600)
            code, output = done.returncode, done.stdout + done.stderr
        else:
            cwd = Path.cwd()
            os.chdir(self.work)  # the README's relative paths are the user's working folder
            try:
                result = CliRunner().invoke(app, argv[1:], env=env)
            finally:
                os.chdir(cwd)
            code, output = result.exit_code, result.output
        if expected is None:
            assert code == 0, f"{line}\n{output}"
        else:
            assert code == 2 and expected in output and "Traceback" not in output, f"{line}\n{output}"

    def _curl(self, argv: list[str]) -> None:
        done = subprocess.run([argv[0], "--fail-with-body", *argv[1:]], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout}{done.stderr}"
        json.loads(done.stdout)  # every answer the README shows is JSON

    def _start(self, argv: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen([CLI, *argv[1:]], cwd=self.work, env={**os.environ, **env}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.background.append(proc)
        if argv[1] == "serve":
            def up() -> bool:
                assert proc.poll() is None, f"{shlex.join(argv)} exited with {proc.returncode}"
                try:
                    return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, timeout=120)
        else:
            time.sleep(2.0)  # a worker registers with Redis
            assert proc.poll() is None, f"{shlex.join(argv)} exited with {proc.returncode}"

    def end_block(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                terminate(proc)
        self.background.clear()


@pytest.fixture()
def flushed() -> Iterator[None]:
    client = redis.Redis(db=REDIS_DB)
    client.flushdb()
    yield
    client.flushdb()


def test_the_readme_shows_commands_that_all_run(tmp_path: Path, flushed: None) -> None:
    scenario = Scenario(tmp_path)
    block, skipped = 0, []
    try:
        for cmd in commands():
            if cmd.block != block:
                scenario.end_block()
                block = cmd.block
            reason = next((why for key, why in SKIPPED.items() if " ".join(cmd.argv).startswith(key)), None)
            if reason is not None:
                skipped.append(cmd.line)
            elif cmd.argv[:2] != ["make", "demo"]:  # make demo: its own test below
                scenario.run(cmd)
    finally:
        scenario.end_block()
    assert len(scenario.ran) >= 25 and len(skipped) == len(SKIPPED), (scenario.ran, skipped)
    assert (tmp_path / "data" / "index" / "CURRENT").is_file()


def _demo(port: int, folder: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`make demo` (small) in the repository, until its page answers; (the process, what it printed)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(["make", "demo", f"DEMO_DIR={folder}", "DEMO_N=6", f"PORT={port}"], cwd=ROOT,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)

    def page() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return 'id="search-form"' in httpx.get(f"http://127.0.0.1:{port}/", timeout=1).text
        except httpx.HTTPError:
            return False

    wait_for(page, timeout=180)
    return proc, log.read_text()


def test_make_demo_serves_the_page_and_a_rerun_reuses_its_index(tmp_path: Path) -> None:
    if not (ROOT / ".venv" / ".runtime").is_file() or Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("make demo runs in the repository's .venv (make test creates it)")
    port = free_port()
    first, text = _demo(port, tmp_path / "demo", tmp_path / "first.log")
    os.killpg(first.pid, signal.SIGTERM)
    first.wait(timeout=60)
    assert "[scenes] drawing 6" in text and "[index] encoding" in text and f"127.0.0.1:{port}" in text
    assert "PORT=" in text  # how to serve on another port
    again, text = _demo(port, tmp_path / "demo", tmp_path / "again.log")
    os.killpg(again.pid, signal.SIGTERM)
    again.wait(timeout=60)
    assert "[scenes] reusing" in text and "[index] reusing" in text and "encoding" not in text
