"""Indexer, encode: a rerank tier's own image features (BLIP's vision tower from pixels, mid's image side from the
dual encoder's tokens), computed at index time and stored beside those tokens, one feature set per tier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from indexer.tokens import TokenFormat, token_format

ENCODER_TOKENS = "tokens"  # the dual encoder's patch tokens (tok.npy), the features of the mid and early tiers


class ImageFeatures(Protocol):
    """A vision tower whose output a reranker scores: run once per image while indexing, never per query."""

    features: str  # the feature set's name in the index (the tier's name: "blip")
    feature_model: str  # the id of the weights that computed them: an index's features are scored by no other
    feature_shape: tuple[int, int]  # (tokens, width) per image

    def preprocess_image(self, image: Image.Image) -> torch.Tensor: ...

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray: ...


@runtime_checkable
class TokenFeatures(Protocol):
    """Features computed from the dual encoder's tokens (a tier's image side), once per image while indexing."""

    features: str
    feature_model: str
    feature_shape: tuple[int, int]
    encoder_id: str  # the dual encoder whose tokens they read: a build with another keeps none of them

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray: ...


Source = ImageFeatures | TokenFeatures


def pixel_sources(sources: Sequence[Source]) -> list[ImageFeatures]:
    """The sources that read pixels (each preprocesses the images its own way while they are decoded)."""
    return [s for s in sources if not isinstance(s, TokenFeatures)]


def describe(source: Source, fmt: TokenFormat) -> dict[str, Any]:
    """The manifest's record of one feature set."""
    return {"model": source.feature_model, **fmt.describe()}


def formats(sources: Sequence[Source], tokens: TokenFormat) -> dict[str, TokenFormat]:
    """Each feature set stored as the index stores its tokens (fp16, int8 or int4), at its own shape; merged
    (+keepK) only where it holds the same patches (an image side): K of a tier's own tower's many more patches
    would keep too few."""
    return {s.features: token_format(tokens.name if isinstance(s, TokenFeatures) else tokens.base, s.feature_shape)
            for s in sources}


def mismatch(held: dict[str, dict[str, Any]], sources: Sequence[Source], where: str) -> str | None:
    """Why an add cannot extend its index with these feature sources (None: it can). An add extends every
    feature set its index holds, from the same weights, and adds none: an index scored by a tier holds that
    tier's features for every image."""
    brought = {s.features: s.feature_model for s in sources}
    kept = {name: str(info.get("model")) for name, info in held.items()}
    if brought == kept:
        return None
    need = ", ".join(f"{name} (model {model})" for name, model in kept.items()) or "none"
    got = ", ".join(f"{name} (model {model})" for name, model in brought.items()) or "none"
    return (f"index {where} stores image features for the rerank tiers {need}, and this add brings {got}: "
            "pass the same --tiers as its build, or rebuild it with --replace")


def encode(sources: Sequence[Source], pixels: dict[str, list[torch.Tensor]],
           tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Each tier's features of one batch's good images: from their pixels preprocessed for that tier, or from
    their dual-encoder tokens (n, t, w)."""
    out = {}
    for source in sources:
        if isinstance(source, TokenFeatures):
            out[source.features] = source.encode_tokens(tokens)
            continue
        batch = pixels[source.features]
        out[source.features] = (source.encode_pixels(torch.stack(batch)) if batch
                                else np.zeros((0, *source.feature_shape), np.float32))
    return out
