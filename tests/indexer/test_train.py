"""Encoder training: a short run lowers the loss, runs are deterministic, batches have no duplicates."""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

from indexer.encoder import EncoderSpec, create_embedded, load_encoder
from indexer.scenes import VAL_SEED
from indexer.train import TrainConfig, batch_samples, lr_at, make_batch, train_encoder


def _held_out_loss(encoder, seed: int = VAL_SEED) -> float:
    images, texts = make_batch(encoder, batch_samples(seed, 0, 32), 64)
    with torch.no_grad():
        encoder.model.eval()
        img, txt, scale = encoder.model(images, texts)
        return float(ClipLoss()(img, txt, scale))


def test_twenty_steps_lower_the_loss(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=20, batch_pairs=16, lr=1e-3, warmup=2, eval_every=0, out=tmp_path)
    before = _held_out_loss(create_embedded(cfg.seed))
    report = train_encoder(cfg)
    after = _held_out_loss(load_encoder(EncoderSpec("tiny", str(tmp_path / "open_clip_model.safetensors"))))
    assert after < before - 0.1, (before, after)
    assert len(report["losses"]) == 20
    assert (tmp_path / "training_log.json").is_file() and (tmp_path / "open_clip_config.json").is_file()


def test_training_is_deterministic(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        train_encoder(TrainConfig(steps=2, batch_pairs=4, eval_every=0, out=tmp_path / name))
        runs.append(load_file(str(tmp_path / name / "open_clip_model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_batches_hold_pairs_without_repeated_descriptions() -> None:
    samples = batch_samples(0, 3, 64)
    assert len(samples) == 128
    assert len({s.scene.key() for s in samples}) == 128
    assert all(samples[i].index == samples[i + 1].index for i in range(0, 128, 2))
    assert batch_samples(0, 3, 64) == samples and batch_samples(0, 4, 64) != samples


def test_learning_rate_warms_up_then_decays() -> None:
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert lr_at(50, cfg) < 1.0 and lr_at(99, cfg) < 0.01
