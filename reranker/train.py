"""Stage 6, train: ITM training of a reranker over the frozen dual encoder's tokens, with hard negatives."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from indexer.encoder import MODELS_DIR, DualEncoder
from indexer.scenes import TRAIN_SEED, Scene, caption, perturb, render, scene_pair
from reranker.model import Matcher, RerankerConfig, save_reranker


@dataclass
class RerankTrainConfig:
    """Reranker training settings; defaults produced the committed checkpoints."""

    kind: str = "mid"
    steps: int = 1200
    batch: int = 48  # positives per step; each brings 3 negatives
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


def _sample_scenes(seed: int, step: int, batch: int) -> tuple[list[Scene], list[Scene], list[str], np.random.Generator]:
    rng = np.random.default_rng([seed, 77, step])  # a stream disjoint from the encoder's
    positives = [scene_pair(seed + 1000, step * batch + i)[0].scene for i in range(batch)]
    negatives, kinds = [], []
    for scene in positives:
        neg, kind = perturb(scene, rng)
        negatives.append(neg)
        kinds.append(kind)
    return positives, negatives, kinds, rng


def _mine(sim: np.ndarray, rng: np.random.Generator, temperature: float) -> np.ndarray:
    """For each text row, one other image sampled by similarity (ALBEF/BLIP hard-negative mining)."""
    logits = sim / temperature
    np.fill_diagonal(logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def make_pairs(encoder: DualEncoder, cfg: RerankTrainConfig, step: int) -> PairBatch:
    """Positives, compositional negatives on both sides, and ITC-mined in-batch image negatives."""
    positives, negatives, kinds, rng = _sample_scenes(cfg.seed, step, cfg.batch)
    size = int(encoder.model.visual.image_size[0])
    texts = [caption(s, rng) for s in positives] + [caption(s, rng) for s in negatives]
    img_emb, img_tok = encoder.encode_images_and_tokens([render(s, size) for s in positives + negatives])
    txt_emb, txt_tok, txt_mask = encoder.encode_texts_and_tokens(texts)
    b = cfg.batch
    pos, neg = np.arange(b), np.arange(b, 2 * b)
    mined = _mine(txt_emb[:b] @ img_emb[:b].T, rng, cfg.mined_temperature)
    image_rows = np.concatenate([pos, neg, pos, mined])
    text_rows = np.concatenate([pos, pos, neg, pos])
    labels = np.concatenate([np.ones(b), np.zeros(3 * b)])
    return PairBatch(
        torch.from_numpy(img_tok[image_rows]), torch.from_numpy(txt_tok[text_rows]),
        torch.from_numpy(txt_mask[text_rows]), torch.from_numpy(labels).long(),
        ["positive"] * b + kinds + kinds + ["mined"] * b,
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
    """Train a mid or early fusion matcher; 3 negatives per positive, so positives weigh 3x in the loss."""
    model = new_matcher(encoder, cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    class_weight = torch.tensor([1.0, 3.0])
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


def save_trained(model: Matcher, cfg: RerankTrainConfig) -> Path:
    return save_reranker(model, cfg.path())
