"""Shared fixtures: the embedded encoder loaded once per session."""

from __future__ import annotations

import pytest

from indexer.encoder import DualEncoder, EncoderSpec, load_encoder


@pytest.fixture(scope="session")
def encoder() -> DualEncoder:
    """The committed `tiny` checkpoint on CPU."""
    return load_encoder(EncoderSpec())
