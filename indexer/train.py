"""Stage 1, train: contrastive training of the embedded dual encoder on streamed scenes with hard twins."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

from indexer.encoder import EMBEDDED_DIR, DualEncoder, create_embedded, save_checkpoint
from indexer.scenes import TRAIN_SEED, VAL_SEED, Sample, render, scene_pair

LOGIT_SCALE_MAX = math.log(100.0)  # open_clip's trainer clamps the temperature the same way


@dataclass
class TrainConfig:
    """Encoder training settings; defaults produced the committed checkpoint."""

    steps: int = 2500
    batch_pairs: int = 64  # each pair is a scene and its hard twin, so the batch holds 2x this
    lr: float = 5e-4
    warmup: int = 150
    weight_decay: float = 0.1
    seed: int = TRAIN_SEED
    eval_every: int = 250  # 0 = never; evaluates on the validation seed, never an evaluation seed
    out: Path = field(default_factory=lambda: EMBEDDED_DIR)
    init: Path | None = None  # continue from these weights (a second schedule) instead of a fresh model
    start_step: int = 0  # offset into the data stream, so a continued run sees new scenes


def batch_samples(seed: int, step: int, pairs: int) -> list[Sample]:
    """The step's (scene, twin) pairs, with no description repeated inside the batch.

    A repeated description would be a false negative for the contrastive loss.
    """
    seen: set[str] = set()
    out: list[Sample] = []
    index = step * 4 * pairs  # each step owns a disjoint slice of the seeded stream
    while len(out) < 2 * pairs:
        first, second = scene_pair(seed, index)
        index += 1
        keys = {first.scene.key(), second.scene.key()}
        if keys & seen:
            continue
        seen |= keys
        out += [first, second]
    return out


def make_batch(encoder: DualEncoder, samples: list[Sample], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, 3, H, W) images and (2B, L) token ids, preprocessed exactly as at inference."""
    images = encoder.to_tensor([render(s.scene, image_size) for s in samples])
    return images, encoder.tokenize([s.caption for s in samples])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    # as open_clip's trainer: no decay on gains, biases, embeddings or the temperature
    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


Callback = Callable[[int, float], None]


def train_encoder(cfg: TrainConfig, on_step: Callback | None = None) -> dict[str, object]:
    """Train `tiny` from scratch; writes the checkpoint to cfg.out and returns the training log."""
    torch.manual_seed(cfg.seed)
    encoder = create_embedded(cfg.seed)
    if cfg.init is not None:
        encoder.model.load_state_dict({k: v.float() for k, v in load_file(str(cfg.init)).items()})
    model = encoder.model.train()
    image_size = int(model.visual.image_size[0])
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    losses: list[float] = []
    evals: list[dict[str, object]] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        images, texts = make_batch(encoder, batch_samples(cfg.seed, cfg.start_step + step, cfg.batch_pairs), image_size)
        img_f, txt_f, scale = model(images, texts)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            evals.append(_checkpoint_and_eval(encoder, cfg, step + 1, start))
            model.train()
    seconds = time.perf_counter() - start
    save_checkpoint(model, cfg.out)
    report = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "seconds": round(seconds, 1),
              "losses": [round(x, 4) for x in losses], "evals": evals}
    (cfg.out / "training_log.json").write_text(json.dumps(report) + "\n")
    return report


def _checkpoint_and_eval(encoder: DualEncoder, cfg: TrainConfig, step: int, start: float) -> dict[str, object]:
    from indexer.evaluate import VAL_GALLERY, evaluate_encoder  # evaluation imports training data helpers

    save_checkpoint(encoder.model, cfg.out)
    encoder.model.eval()
    metrics = evaluate_encoder(encoder, n=VAL_GALLERY, seed=VAL_SEED)
    return {"step": step, "seconds": round(time.perf_counter() - start, 1), **metrics}
