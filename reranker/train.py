"""Stage 6, train: ITM training of a reranker over the frozen dual encoder's tokens, with hard negatives."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from indexer.encoder import MODELS_DIR, DualEncoder
from indexer.scenes import TRAIN_SEED, Scene, caption, perturb, render, scene_pair, twin
from reranker.model import Matcher, RerankerConfig


@dataclass
class RerankTrainConfig:
    """Reranker training settings; defaults produced the committed checkpoints."""

    kind: str = "mid"
    steps: int = 1500
    batch: int = 32  # positives per step; each brings 4 negatives
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = TRAIN_SEED
    layers: int = 3
    width: int = 192
    out: Path | None = None  # default models/reranker-<kind>.safetensors
    mined_temperature: float = 0.05  # ITC-mined negatives are sampled by softmax(similarity / T)

    def path(self) -> Path:
        return self.out or MODELS_DIR / f"reranker-{self.kind}.safetensors"


@dataclass
class PairBatch:
    """Image tokens, text tokens and masks for a set of (image, text) pairs, with match labels."""

    image: torch.Tensor  # (p, t, w_img)
    text: torch.Tensor  # (p, L, w_txt)
    mask: torch.Tensor  # (p, L) bool
    labels: torch.Tensor  # (p,) 1 = match
    kinds: list[str] = field(default_factory=list)


@dataclass
class Negatives:
    """One step's scenes: positives, their hard twins (image side) and two text-side negatives each."""

    positives: list[Scene]
    twins: list[Scene]
    order_swaps: list[Scene]  # relation negatives: places swapped (or a single object mirrored)
    perturbed: list[Scene]  # any kind of mistake: substitutions, swaps, a dropped object
    kinds: list[str]  # twin kind, then perturbation kind, per positive


def _order_swap(scene: Scene, rng: np.random.Generator) -> Scene:
    if scene.layout == "single":
        return twin(scene, rng)[0]
    objs = list(scene.objects)
    i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
    a, b = objs[i], objs[j]
    objs[i] = replace(a, colour=b.colour, shape=b.shape, size=b.size)
    objs[j] = replace(b, colour=a.colour, shape=a.shape, size=a.size)
    return replace(scene, objects=tuple(objs))


def sample_negatives(seed: int, step: int, batch: int) -> tuple[Negatives, np.random.Generator]:
    """Relations are what the dual encoder misses most, so every positive gets an order swap."""
    rng = np.random.default_rng([seed, 77, step])  # a stream disjoint from the encoder's
    positives = [scene_pair(seed + 1000, step * batch + i)[0].scene for i in range(batch)]
    twins, kinds = zip(*(twin(s, rng) for s in positives), strict=True)
    perturbed, p_kinds = zip(*(perturb(s, rng) for s in positives), strict=True)
    swaps = [_order_swap(s, rng) for s in positives]
    return Negatives(positives, list(twins), swaps, list(perturbed), list(kinds) + list(p_kinds)), rng


def _mine(sim: np.ndarray, rng: np.random.Generator, temperature: float) -> np.ndarray:
    """For each text row, one other image sampled by similarity (ALBEF/BLIP hard-negative mining)."""
    logits = sim / temperature
    np.fill_diagonal(logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def make_pairs(encoder: DualEncoder, cfg: RerankTrainConfig, step: int) -> PairBatch:
    """Per positive: its twin image, an order-swapped and a perturbed caption, and an ITC-mined image."""
    neg, rng = sample_negatives(cfg.seed, step, cfg.batch)
    size = int(encoder.model.visual.image_size[0])
    texts = [caption(s, rng) for s in neg.positives + neg.order_swaps + neg.perturbed]
    img_emb, img_tok = encoder.encode_images_and_tokens([render(s, size) for s in neg.positives + neg.twins])
    txt_emb, txt_tok, txt_mask = encoder.encode_texts_and_tokens(texts)
    b = cfg.batch
    pos = np.arange(b)
    mined = _mine(txt_emb[:b] @ img_emb[:b].T, rng, cfg.mined_temperature)
    image_rows = np.concatenate([pos, pos + b, pos, pos, mined])
    text_rows = np.concatenate([pos, pos, pos + b, pos + 2 * b, pos])
    labels = np.concatenate([np.ones(b), np.zeros(4 * b)])
    kinds = ["positive"] * b + neg.kinds[:b] + ["order_swap"] * b + neg.kinds[b:] + ["mined"] * b
    return PairBatch(
        torch.from_numpy(img_tok[image_rows]), torch.from_numpy(txt_tok[text_rows]),
        torch.from_numpy(txt_mask[text_rows]), torch.from_numpy(labels).long(), kinds,
    )


def lr_at(step: int, cfg: RerankTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def new_matcher(encoder: DualEncoder, cfg: RerankTrainConfig) -> Matcher:
    torch.manual_seed(cfg.seed)
    text_width = int(encoder.model.transformer.width)
    return Matcher(RerankerConfig(kind=cfg.kind, width=cfg.width, layers=cfg.layers, text_width=text_width,
                                  image_width=encoder.token_shape[1], image_tokens=encoder.token_shape[0],
                                  encoder_id=encoder.model_id))


def train_reranker(encoder: DualEncoder, cfg: RerankTrainConfig,
                   on_step: Callable[[int, float], None] | None = None) -> tuple[Matcher, dict[str, object]]:
    """Train a mid or early fusion matcher; 4 negatives per positive, so positives weigh 4x in the loss."""
    model = new_matcher(encoder, cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    class_weight = torch.tensor([1.0, 4.0])
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = make_pairs(encoder, cfg, step)
        loss = F.cross_entropy(model(batch.image, batch.text, batch.mask), batch.labels, weight=class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return model, {"seconds": round(time.perf_counter() - start, 1), "losses": [round(x, 4) for x in losses]}

