"""Deployment files: compose validates against the Compose Specification; Dockerfiles use what exists."""

from __future__ import annotations

import json
import re
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from imsearch.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_WHEELS = Path(sys.prefix) / "share" / "compose"  # downloaded by `make dev` (make test)
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def compose_schema() -> dict[str, Any]:
    wheels = sorted(COMPOSE_WHEELS.glob("docker_compose-*.whl"))
    if not wheels:
        pytest.fail(f"no docker-compose wheel in {COMPOSE_WHEELS}: run `make dev`")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return json.loads(wheel.read("compose/config/compose_spec.json"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    jsonschema.validate(compose, compose_schema())
    assert {"redis", "api", "worker", "worker-gpu"} <= set(compose["services"])
    assert compose["services"]["worker-gpu"]["profiles"] == ["gpu"]


def test_the_schema_check_catches_a_broken_file(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["ports"] = {"not": "a list"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema())


def _commands(compose: dict[str, Any]) -> list[list[str]]:
    out = []
    for service in compose["services"].values():
        command = service.get("command")
        if isinstance(command, list) and command[:2] == ["sh", "-c"]:
            out += [shlex.split(part) for part in re.split(r"\|\||&&|;", command[2])]
        elif isinstance(command, list):
            out.append(command)
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("CMD ["):
                out.append(json.loads(line[4:]))
    return out


def test_every_imsearch_command_in_compose_and_dockerfiles_exists(compose: dict[str, Any]) -> None:
    commands = [c for c in _commands(compose) if c and c[0] == "imsearch"]
    assert len(commands) >= 4
    runner = CliRunner()
    for command in commands:
        words = [w for w in command[1:] if not w.startswith("-") and not w.startswith("/")][:2]
        sub = words[:2] if words[:1] == ["index"] else words[:1]
        result = runner.invoke(app, [*sub, "--help"])
        assert result.exit_code == 0, f"`imsearch {' '.join(sub)}` does not exist: {result.output}"
        options = {w.split("=")[0] for w in command if w.startswith("--")}
        for option in options:
            assert option in result.output, f"`imsearch {' '.join(sub)}` has no option {option}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_paths_runs_as_non_root_and_checks_health(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            *sources, _dest = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    assert re.search(r"^USER (?!root)\w+", text, re.M), "runs as root"
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert text.count("FROM ") >= 2, "not multi-stage"
    assert "COPY models" in text, "models are not baked in"
