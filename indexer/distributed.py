"""Indexer, at scale: Ray Data decodes on CPU tasks and encodes on an actor pool (GPU actors if any).

The driver receives encoded batches in source order and feeds them to the same shard writer, FAISS
build and publish as the single-process build, so both produce the same ids, vectors and tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from indexer.encoder import EncoderSpec, load_encoder
from indexer.reader import Decoded, SourceItem, read_item


@dataclass
class RayOptions:
    """Where and how wide: `address` None starts a local Ray; actors default to one per GPU (or 1)."""

    address: str | None = None
    actors: int | None = None
    num_cpus: int | None = None  # for a local Ray only


@dataclass
class EncodedBatch:
    """Decoded items of one batch and, for those that decoded, their vectors and tokens by position."""

    decoded: list[Decoded]
    positions: np.ndarray
    embeddings: np.ndarray
    tokens: np.ndarray

    def take(self, good: Sequence[Decoded]) -> tuple[np.ndarray, np.ndarray]:
        """Rows for the items the writer keeps (duplicates were encoded too, and are dropped here)."""
        row_of = {int(p): i for i, p in enumerate(self.positions)}
        rows = [row_of[d.position] for d in good]
        return self.embeddings[rows], self.tokens[rows]


def _decode(batch: dict[str, np.ndarray], preprocess: Callable[[Image.Image], torch.Tensor], max_pixels: int,
            shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A Ray Data task: (position, path) rows → the same fields as the local reader's Decoded."""
    out = [read_item(str(path), preprocess, max_pixels, position=int(p))
           for p, path in zip(batch["position"], batch["path"], strict=True)]
    pixels = np.zeros((len(out), *shape), np.float32)  # failures travel as zeros with ok = False
    for i, d in enumerate(out):
        if d.tensor is not None:
            pixels[i] = d.tensor.numpy()
    return {"position": batch["position"], "pixels": pixels, "ok": np.array([d.tensor is not None for d in out]),
            "sha256": np.array([d.sha256 for d in out], dtype=object),
            "width": np.array([d.width for d in out]), "height": np.array([d.height for d in out]),
            "bytes": np.array([d.size for d in out]), "taken": np.array([d.taken or "" for d in out], dtype=object),
            "error": np.array([d.error or "" for d in out], dtype=object)}


class _Encode:
    """A Ray actor: one model per actor, loaded once; encodes the items that decoded."""

    def __init__(self, spec: EncoderSpec):
        self.encoder = load_encoder(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        emb, tok = self.encoder.encode_images_and_tokens(torch.from_numpy(batch["pixels"][ok]))
        d, (t, w) = self.encoder.embed_dim, self.encoder.token_shape
        embeddings = np.zeros((len(ok), d), np.float32)
        tokens = np.zeros((len(ok), t, w), np.float16)
        embeddings[ok], tokens[ok] = emb, tok.astype(np.float16)
        rest = {k: v for k, v in batch.items() if k != "pixels"}
        return {**rest, "embedding": embeddings, "tokens": tokens}


def _batches_from(frame: dict[str, Any]) -> EncodedBatch:
    ok = np.asarray(frame["ok"], bool)
    decoded = [Decoded(int(p), torch.empty(0) if good else None, str(s), int(w), int(h), str(e) or None, int(n),
                       taken=str(t) or None)
               for p, good, s, w, h, e, n, t in zip(frame["position"], ok, frame["sha256"], frame["width"],
                                                     frame["height"], frame["error"], frame["bytes"], frame["taken"],
                                                     strict=True)]
    return EncodedBatch(decoded, np.asarray(frame["position"])[ok], np.asarray(frame["embedding"])[ok],
                        np.asarray(frame["tokens"])[ok])


def ray_batches(items: list[SourceItem], spec: EncoderSpec, preprocess: Callable[[Image.Image], torch.Tensor],
                image_shape: tuple[int, ...], batch_size: int, max_pixels: int,
                options: RayOptions) -> Iterator[EncodedBatch]:
    """Encoded batches of `items`, in source order, computed on a Ray cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=options.address, num_cpus=options.num_cpus if options.address is None else None,
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # ids are assigned in source order, as locally
    context.enable_progress_bars = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = options.actors or max(1, gpus)
    spec = EncoderSpec(spec.model, spec.pretrained, "cuda" if gpus else "cpu")
    dataset = ray.data.from_items([{"position": i, "path": it.path} for i, it in enumerate(items)])
    decode = partial(_decode, preprocess=preprocess, max_pixels=max_pixels, shape=image_shape)
    decoded = dataset.map_batches(decode, batch_size=batch_size, num_cpus=1)
    encoded = decoded.map_batches(_Encode, fn_constructor_args=(spec,), batch_size=batch_size,
                                  concurrency=actors, num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    for frame in encoded.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield _batches_from(frame)
