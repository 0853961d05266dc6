"""Training floor, train: contrastive training of the embedded dual encoder on streamed scenes with hard twins."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from indexer.encoder import EMBEDDED_DIR, WEIGHTS_NAME, DualEncoder, create_embedded, save_checkpoint
from training.descriptions import Description, allowed, caption_claim, describe, holds
from training.scenes import TRAIN_SEED, VAL_SEED, Sample, render, scene_pair

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
    describe_share: float = 0.0  # share of texts written as people write them (training.descriptions)
    save_every: int = 100  # steps between resumable saves of weights and run.json into cfg.out
    rewarm: int = 50  # on a resume the optimizer restarts: its learning rate ramps up again over these steps
    command: str = ""  # the command line, recorded in the run's log


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


TWO_OF_THREE_SHARE = 0.4  # of described three-object scenes


def batch_texts(samples: list[Sample], seed: int, step: int, describe_share: float) -> tuple[list[str], np.ndarray]:
    """Each image's text (its grammar caption, or with probability `describe_share` a description as
    people write them) and the (texts, images) truth matrix: which images each text is true of."""
    rng = np.random.default_rng([seed, 91, step])
    texts: list[str] = []
    claims: list[Description] = []
    for sample in samples:
        if describe_share > 0 and rng.random() < describe_share:
            # a third of the scenes hold three objects and two of them is the hardest kind for a
            # pooled embedding: drawn as one kind among seven it was learnt last, so it is drawn more
            hard = allowed(sample.scene, "two_of_three") and rng.random() < TWO_OF_THREE_SHARE
            written = describe(sample.scene, rng, "two_of_three" if hard else None)
            texts.append(written.text)
            claims.append(written.claim)
        else:
            texts.append(sample.caption)
            claims.append(caption_claim(sample.scene))
    truth = np.array([[holds(c, s.scene) for s in samples] for c in claims], dtype=bool)
    return texts, truth


def make_batch(encoder: DualEncoder, samples: list[Sample], texts: list[str], image_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, 3, H, W) images and (2B, L) token ids, preprocessed exactly as at inference."""
    images = encoder.to_tensor([render(s.scene, image_size) for s in samples])
    return images, encoder.tokenize(texts)


def multi_positive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, truth: torch.Tensor
                        ) -> torch.Tensor:
    """CLIP's symmetric InfoNCE where a text may be true of several images in the batch: the target of
    each row is spread over every true pair, so a true match is never pushed away as a negative.
    With an identity truth matrix it is open_clip's ClipLoss."""
    logits = scale * text @ image.T  # (texts, images)
    target = truth.float()
    per_text = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1)
    per_image = -(target.T / target.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1)
    return (per_text.mean() + per_image.mean()) / 2


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    # as open_clip's trainer: no decay on gains, biases, embeddings or the temperature
    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


class Schedule(Protocol):
    """What a learning-rate schedule reads off a training config (the encoder's and the rerankers')."""

    lr: float
    warmup: int
    steps: int
    rewarm: int


def lr_at(step: int, cfg: Schedule, resumed: int = 0) -> float:
    """Linear warm-up then cosine decay to zero; a run resumed at step `resumed` ramps up again over
    cfg.rewarm steps, because its optimizer's moments restart from zero."""
    ramp = min(1.0, (step - resumed + 1) / cfg.rewarm) if resumed else 1.0
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup * ramp
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress)) * ramp


Callback = Callable[[int, float], None]


def train_encoder(cfg: TrainConfig, on_step: Callback | None = None) -> dict[str, object]:
    """Train `tiny` (from scratch, from cfg.init, or resuming the run saved in cfg.out); writes the
    checkpoint to cfg.out and returns the training log."""
    torch.manual_seed(cfg.seed)
    encoder = create_embedded(cfg.seed)
    log = resume_log(cfg.out / RUN_LOG, cfg.out / WEIGHTS_NAME, cfg.command)
    weights = cfg.out / WEIGHTS_NAME if log.step else cfg.init
    if weights is not None:
        encoder.model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    model = encoder.model.train()
    image_size = int(model.visual.image_size[0])
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    resumed, losses, evals = log.step, log.losses, log.evals
    start = time.perf_counter() - log.seconds
    for step in range(resumed, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, resumed)
        samples = batch_samples(cfg.seed, cfg.start_step + step, cfg.batch_pairs)
        texts, truth = batch_texts(samples, cfg.seed, cfg.start_step + step, cfg.describe_share)
        images, tokens = make_batch(encoder, samples, texts, image_size)
        img_f, txt_f, scale = model(images, tokens)
        loss = multi_positive_loss(img_f, txt_f, scale, torch.from_numpy(truth))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        losses.append(round(loss.item(), 4))
        if on_step:
            on_step(step, losses[-1])
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            evals.append(_evaluate(encoder, cfg, done, start))
            model.train()
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(model, cfg.out)
            log.step, log.seconds = done, round(time.perf_counter() - start, 1)
            save_log(cfg.out / RUN_LOG, log, cfg)
    report = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "seconds": round(time.perf_counter() - start, 1),
              "losses": losses, "evals": evals, "commands": log.commands}
    (cfg.out / "training_log.json").write_text(json.dumps(report) + "\n")
    return report


RUN_LOG = "run.json"  # a run's progress next to its weights: step, losses, evals, the commands that made it


@dataclass
class RunLog:
    """A training run's progress, saved with its weights so that the same command resumes it."""

    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, object]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def resume_log(path: Path, weights: Path, command: str) -> RunLog:
    """The progress saved at `path` (step 0 when there is none, or no weights to resume), with this
    command appended to the run's commands."""
    log = RunLog()
    if path.is_file() and weights.is_file():
        saved = json.loads(path.read_text())
        log = RunLog(**{k: saved[k] for k in ("step", "seconds", "losses", "evals", "commands")})
    log.commands.append(f"{command} (from step {log.step})")
    return log


def save_log(path: Path, log: RunLog, config: object) -> None:
    """Write the run's progress atomically, with its settings (a dataclass)."""
    tmp = path.with_name(path.name + ".tmp")
    settings = {k: str(v) for k, v in asdict(config).items()}  # type: ignore[call-overload]
    tmp.write_text(json.dumps({**asdict(log), "config": settings}) + "\n")
    tmp.replace(path)


def _evaluate(encoder: DualEncoder, cfg: TrainConfig, step: int, start: float) -> dict[str, object]:
    """Validation metrics of the weights in training (the periodic save, not this, writes them out)."""
    from training.encoder_eval import VAL_GALLERY, evaluate_encoder  # evaluation imports training data helpers

    encoder.model.eval()
    metrics = evaluate_encoder(encoder, n=VAL_GALLERY, seed=VAL_SEED)
    if cfg.describe_share > 0:
        from training.freeform import evaluate_freeform  # the late tier's p@1 per kind of description

        report = evaluate_freeform(encoder, {}, n=VAL_GALLERY, seed=VAL_SEED, per_kind=30, k=0)
        rows: list[dict[str, float]] = report["rows"]  # type: ignore[assignment]
        metrics["freeform_p1"] = {row["kind"]: round(row["p1"], 3) for row in rows}
    return {"step": step, "seconds": round(time.perf_counter() - start, 1), **metrics}
