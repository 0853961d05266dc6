"""Training floor, evaluate: retrieval recall and binding accuracy of a dual encoder on a held-out twin gallery."""

from __future__ import annotations

from collections import Counter

import numpy as np

from indexer.encoder import DualEncoder
from training.scenes import EVAL_SEED, Sample, render, twin_gallery

VAL_GALLERY = 500
BATCH = 256


def recall_at_k(sim: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows whose target column ranks in the top k (ties count against the target).

    Args:
        sim: (queries, items) similarity matrix.
        targets: (queries,) index of each query's correct item.
    """
    target_scores = sim[np.arange(len(sim)), targets]
    rank = (sim > target_scores[:, None]).sum(axis=1) + (sim == target_scores[:, None]).sum(axis=1) - 1
    return float((rank < k).mean())


def pair_accuracy(sim: np.ndarray, targets: np.ndarray, rivals: np.ndarray) -> float:
    """Fraction of queries whose target strictly outscores its rival (the hard twin)."""
    rows = np.arange(len(sim))
    return float((sim[rows, targets] > sim[rows, rivals]).mean())


def embed_gallery(encoder: DualEncoder, gallery: list[Sample], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) image and (n, d) caption embeddings of a gallery, in batches."""
    images, texts = [], []
    for i in range(0, len(gallery), BATCH):
        chunk = gallery[i : i + BATCH]
        images.append(encoder.encode_images([render(s.scene, image_size) for s in chunk]))
        texts.append(encoder.encode_texts([s.caption for s in chunk]))
    return np.concatenate(images), np.concatenate(texts)


def errors_by_kind(sim: np.ndarray, gallery: list[Sample]) -> dict[str, int]:
    """Count top-1 text→image errors by what distinguishes the wrong image from the right one."""
    top = sim.argmax(axis=1)
    counts: Counter[str] = Counter()
    for q, hit in enumerate(top):
        if hit != q:
            counts[difference_kind(gallery[q], gallery[int(hit)])] += 1
    return dict(counts)


def difference_kind(want: Sample, got: Sample) -> str:
    """What tells a wrongly retrieved sample from the wanted one (a twin kind, or the first differing field)."""
    if got.index == want.index:  # the twin: its kind names the difference
        return got.twin_kind or want.twin_kind or "twin"
    a, b = want.scene, got.scene
    if len(a.objects) != len(b.objects):
        return "object_count"
    if a.layout != b.layout:
        return "layout"
    for field in ("shape", "colour", "size"):
        if sorted(getattr(o, field) for o in a.objects) != sorted(getattr(o, field) for o in b.objects):
            return field
    return "binding_or_order"


def evaluate_encoder(encoder: DualEncoder, n: int = 1000, seed: int = EVAL_SEED) -> dict[str, object]:
    """Text→image R@1/5/10, image→text R@1 and twin binding accuracy on a deduplicated twin gallery."""
    gallery = twin_gallery(n, seed)
    image_size = int(encoder.model.visual.image_size[0])
    img, txt = embed_gallery(encoder, gallery, image_size)
    sim = txt @ img.T  # (queries, images); query i's image is i, its twin i ^ 1
    targets = np.arange(n)
    return {
        "t2i_r1": recall_at_k(sim, targets, 1),
        "t2i_r5": recall_at_k(sim, targets, 5),
        "t2i_r10": recall_at_k(sim, targets, 10),
        "i2t_r1": recall_at_k(sim.T.copy(), targets, 1),
        "binding_acc": pair_accuracy(sim, targets, targets ^ 1),
        "n": n,
        "seed": seed,
        "errors": errors_by_kind(sim, gallery),
    }
