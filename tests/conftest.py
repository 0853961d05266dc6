"""Shared fixtures: the embedded encoder loaded once per session; the committed models kept unchanged."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from indexer.encoder import MODELS_DIR, DualEncoder, EncoderSpec, load_encoder

# CI replays a fixed sample of every property and fuzz test (a red build must be reproducible);
# elsewhere each run explores new inputs
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def encoder() -> DualEncoder:
    """The committed `tiny` checkpoint on CPU."""
    return load_encoder(EncoderSpec())


def _models() -> dict[Path, str]:
    """The served checkpoints' hashes (not models/runs/, where a training run in progress saves)."""
    served = (p for p in MODELS_DIR.rglob("*") if p.is_file() and "runs" not in p.relative_to(MODELS_DIR).parts)
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(served)}


@pytest.fixture(scope="session", autouse=True)
def committed_models_unchanged() -> Iterator[None]:
    """A test that trains must write where it is told: a run saved over models/ would be served, and
    resumed, by every later test and command."""
    before = _models()
    yield
    assert _models() == before, "a test wrote into models/"
