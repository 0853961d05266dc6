"""Service stage, encode: query text or image → vector (+ reranker tokens), via the text cache and micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from indexer.encoder import DualEncoder
from service.batching import MicroBatcher
from service.cache import QueryCache, pack_text, unpack_text
from service.metrics import Metrics
from service.names import text_key


@dataclass
class TextEncoding:
    """One text: pooled (d,) L2-normalised, tokens (L, w) and mask (L,) for the rerankers (L = 0 where
    nobody asked for them: see QueryEncoder.pooled)."""

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
        self._texts = MicroBatcher(self._encode_texts, max_batch, max_wait_ms, "text")  # (text, tokens wanted)
        self._images = MicroBatcher(self._encode_images, max_batch, max_wait_ms, "image")

    @property
    def model_id(self) -> str:
        return self.encoder.model_id

    def text(self, text: str) -> TextEncoding:
        """The pooled vector and the tokens a reranker reads."""
        return self._texts((text, True))

    def texts(self, texts: list[str]) -> list[TextEncoding]:
        """`text` of several, in one forward in the calling thread (for a caller that batched them)."""
        return self._encode_texts([(text, True) for text in texts])

    def pooled(self, text: str) -> np.ndarray:
        """(d,) L2-normalised: the vector alone (a query without rerank)."""
        return self._texts((text, False)).pooled

    async def apooled(self, text: str, inline: bool = False) -> np.ndarray:
        """`pooled` for a coroutine: awaited in a micro-batch, or run here when `inline` and idle."""
        return (await self._texts.acall((text, False), inline)).pooled

    def image(self, image: Image.Image) -> np.ndarray:
        """(d,) L2-normalised."""
        return self._images(image)

    def close(self) -> None:
        self._texts.close()
        self._images.close()

    def _encode_texts(self, items: list[tuple[str, bool]]) -> list[TextEncoding]:
        """Cached encodings in one Redis round trip, the rest in one forward (then cached)."""
        texts = [text for text, _ in items]
        if not self.cache.enabled and not any(wanted for _, wanted in items):
            # a batch without rerank skips the tokens (about 5% of a one-text forward's CPU, measured);
            # with a cache they are always computed, so that one entry serves reranked queries too
            self.metrics.batch.labels("text").observe(len(texts))
            empty = (np.zeros((0, self.width), np.float32), np.zeros(0, bool))
            return [TextEncoding(row, *empty) for row in self.encoder.encode_texts(texts)]
        keys = [text_key(self.model_id, text) for text in texts] if self.cache.enabled else []
        raws = self.cache.get_many(keys) if keys else [None] * len(texts)
        out: list[TextEncoding | None] = []
        for raw in raws:
            if keys:
                self.metrics.cache_lookup("text", raw is not None)
            out.append(None if raw is None else TextEncoding(*unpack_text(raw, self.encoder.embed_dim, self.width)))
        missing = [i for i, enc in enumerate(out) if enc is None]
        if missing:
            self.metrics.batch.labels("text").observe(len(missing))
            pooled, tokens, mask = self.encoder.encode_texts_and_tokens([texts[i] for i in missing])
            for row, i in enumerate(missing):
                out[i] = TextEncoding(pooled[row], tokens[row], mask[row])
            if keys:
                self.cache.put_many([(keys[i], pack_text(pooled[row], tokens[row], mask[row]))
                                     for row, i in enumerate(missing)])
        return [enc for enc in out if enc is not None]

    def _encode_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        self.metrics.batch.labels("image").observe(len(images))
        return list(self.encoder.encode_images(images))
