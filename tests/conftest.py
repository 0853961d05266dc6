"""Shared fixtures: the embedded encoder loaded once per session."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from indexer.encoder import DualEncoder, EncoderSpec, load_encoder

# CI replays a fixed sample of every property and fuzz test (a red build must be reproducible);
# elsewhere each run explores new inputs
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def encoder() -> DualEncoder:
    """The committed `tiny` checkpoint on CPU."""
    return load_encoder(EncoderSpec())
