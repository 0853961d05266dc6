"""Service stage, encode: query text or image → vector (+ reranker tokens), via the text cache and micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from indexer.encoder import DualEncoder
from service.batching import MicroBatcher
from service.cache import QueryCache, pack_text, text_key, unpack_text
from service.metrics import Metrics


@dataclass
class TextEncoding:
    """One text: pooled (d,) L2-normalised, tokens (L, w) and mask (L,) for the rerankers."""

    pooled: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray


class QueryEncoder:
    """The dual encoder as the service uses it: concurrent queries share forwards; texts are cached."""

    def __init__(self, encoder: DualEncoder, cache: QueryCache | None = None, metrics: Metrics | None = None,
                 max_batch: int = 32, max_wait_ms: float = 2.0):
        self.encoder = encoder
        self.cache = cache or QueryCache(None, 1)
        self.metrics = metrics or Metrics()
        self.width = int(encoder.model.transformer.width)
        self._texts = MicroBatcher(self._encode_texts, max_batch, max_wait_ms, "text")
        self._images = MicroBatcher(self._encode_images, max_batch, max_wait_ms, "image")

    @property
    def model_id(self) -> str:
        return self.encoder.model_id

    def text(self, text: str) -> TextEncoding:
        if not self.cache.enabled:
            return self._texts(text)
        key = text_key(self.model_id, text)
        raw = self.cache.get_raw(key)
        self.metrics.cache_lookup("text", raw is not None)
        if raw is not None:
            return TextEncoding(*unpack_text(raw, self.encoder.embed_dim, self.width))
        encoded = self._texts(text)
        self.cache.put_raw(key, pack_text(encoded.pooled, encoded.tokens, encoded.mask))
        return encoded

    def image(self, image: Image.Image) -> np.ndarray:
        """(d,) L2-normalised."""
        return self._images(image)

    def close(self) -> None:
        self._texts.close()
        self._images.close()

    def _encode_texts(self, texts: list[str]) -> list[TextEncoding]:
        self.metrics.batch.labels("text").observe(len(texts))
        pooled, tokens, mask = self.encoder.encode_texts_and_tokens(texts)
        return [TextEncoding(pooled[i], tokens[i], mask[i]) for i in range(len(texts))]

    def _encode_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        self.metrics.batch.labels("image").observe(len(images))
        return list(self.encoder.encode_images(images))
