"""The `imsearch` command line: scenes, eval and clear errors instead of tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from imsearch.cli import app

runner = CliRunner()


def test_scenes_command_writes_a_corpus(tmp_path: Path) -> None:
    result = runner.invoke(app, ["scenes", str(tmp_path / "out"), "--n", "4", "--seed", "3", "--twins"])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "out" / "captions.jsonl").read_text().splitlines()
    assert len(rows) == 8 and len(list((tmp_path / "out").glob("*.png"))) == 8


def test_scenes_refuses_a_file_as_output(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = runner.invoke(app, ["scenes", str(target), "--n", "2"])
    assert result.exit_code == 2 and "not a directory" in result.output


def test_eval_prints_one_json_object() -> None:
    result = runner.invoke(app, ["eval", "encoder", "--n", "200", "--seed", "7", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "binding_acc", "n", "seed"} <= metrics.keys()
    assert metrics["n"] == 200 and metrics["seed"] == 7
    assert 0.0 <= metrics["t2i_r1"] <= metrics["t2i_r5"] <= metrics["t2i_r10"] <= 1.0


def test_eval_refuses_the_training_seed() -> None:
    result = runner.invoke(app, ["eval", "encoder", "--seed", "0"])
    assert result.exit_code == 2 and "training seed" in result.output


def test_unavailable_model_is_a_clear_cli_error_without_traceback() -> None:
    cmd = [sys.executable, "-m", "imsearch.cli", "eval", "encoder", "--model", "ViT-B-32",
           "--pretrained", "laion2b_s34b_b79k", "--n", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "ViT-B-32" in proc.stderr and "not available offline" in proc.stderr
    assert "Traceback" not in proc.stderr
