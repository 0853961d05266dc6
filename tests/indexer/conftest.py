"""Indexer fixtures: one index folder with three versions, shared by the store and verify tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from training.scenes import write_scenes


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, encoder: DualEncoder) -> Path:
    """Three versions: v1 builds 12 images (shards of 8 and 4), v2 and v3 add 6 each (one shard each),
    each linking the shards of the one before. Never damaged: tests damage a private copy."""
    base = tmp_path_factory.mktemp("three-versions")
    opts = BuildOptions(batch_size=4, workers=0, shard_size=8)
    for i, (n, seed) in enumerate([(6, 51), (3, 52), (3, 53)]):
        write_scenes(base / f"src{i}", n, seed=seed, twins=True)
        build_or_add(base / f"src{i}", base / "idx", encoder, opts, "add" if i else "build")
    return base / "idx"


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    """A copy of `built`, its hard links kept (cp -a), for a test to damage."""
    subprocess.run(["cp", "-a", str(built), str(tmp_path / "idx")], check=True)
    return tmp_path / "idx"
