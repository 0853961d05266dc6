"""Encoder training: a short run lowers the loss, runs are deterministic, batches have no duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

from indexer.encoder import EncoderSpec, create_embedded, load_encoder
from training.descriptions import KINDS, caption_claim, holds
from training.encoder_train import (
    RUN_LOG,
    TrainConfig,
    batch_samples,
    batch_texts,
    lr_at,
    make_batch,
    multi_positive_loss,
    train_encoder,
)
from training.scenes import VAL_SEED


def _held_out_loss(encoder, seed: int = VAL_SEED, describe_share: float = 0.0) -> float:
    samples = batch_samples(seed, 0, 32)
    texts, truth = batch_texts(samples, seed, 0, describe_share)
    images, tokens = make_batch(encoder, samples, texts, 64)
    with torch.no_grad():
        encoder.model.eval()
        img, txt, scale = encoder.model(images, tokens)
        return float(multi_positive_loss(img, txt, scale, torch.from_numpy(truth)))


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
    resumed = lr_at(40, cfg, resumed=40)  # a resumed run's fresh optimizer ramps up over cfg.rewarm steps
    assert resumed == pytest.approx(lr_at(40, cfg) / cfg.rewarm) and lr_at(40 + cfg.rewarm, cfg, 40) == lr_at(90, cfg)
    from training.reranker_train import RerankTrainConfig  # the rerankers' runs follow the same schedule

    assert lr_at(5, RerankTrainConfig(steps=100, warmup=10, lr=1.0)) == lr_at(5, cfg)


def test_multi_positive_loss_is_clip_loss_when_each_text_has_one_image() -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    scale = torch.tensor(20.0)
    torch.testing.assert_close(multi_positive_loss(img, txt, scale, torch.eye(8, dtype=torch.bool)),
                               ClipLoss()(img, txt, scale))
    # a second true image for text 0 moves its target off image 0 alone: the loss changes
    truth = torch.eye(8, dtype=torch.bool)
    truth[0, 1] = True
    assert not torch.isclose(multi_positive_loss(img, txt, scale, truth), ClipLoss()(img, txt, scale))


def test_batch_texts_mark_every_image_a_text_is_true_of() -> None:
    samples = batch_samples(0, 3, 32)
    texts, truth = batch_texts(samples, 0, 3, describe_share=1.0)
    assert truth.shape == (64, 64) and truth.diagonal().all()
    assert truth.sum() > 64  # partial descriptions are true of more than their own scene
    assert batch_texts(samples, 0, 3, 1.0)[0] == texts  # deterministic per (seed, step)
    captions, plain = batch_texts(samples, 0, 3, describe_share=0.0)
    assert captions == [s.caption for s in samples]
    expected = np.array([[holds(caption_claim(a.scene), b.scene) for b in samples] for a in samples])
    assert np.array_equal(plain, expected)


def test_a_short_run_on_descriptions_lowers_their_loss(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=20, batch_pairs=16, lr=1e-3, warmup=2, eval_every=0, out=tmp_path,
                      describe_share=1.0)
    before = _held_out_loss(create_embedded(cfg.seed), describe_share=1.0)
    train_encoder(cfg)
    after = _held_out_loss(load_encoder(EncoderSpec("tiny", str(tmp_path / "open_clip_model.safetensors"))),
                           describe_share=1.0)
    assert after < before - 0.1, (before, after)


def test_a_run_resumes_from_its_last_save(tmp_path: Path) -> None:
    train_encoder(TrainConfig(steps=4, batch_pairs=4, eval_every=0, save_every=2, out=tmp_path, command="first"))
    saved = json.loads((tmp_path / RUN_LOG).read_text())
    assert saved["step"] == 4 and len(saved["losses"]) == 4
    report = train_encoder(TrainConfig(steps=6, batch_pairs=4, eval_every=0, save_every=2, out=tmp_path,
                                       command="second"))
    assert len(report["losses"]) == 6 and report["losses"][:4] == saved["losses"]
    assert report["commands"] == ["first (from step 0)", "second (from step 4)"]
    assert json.loads((tmp_path / RUN_LOG).read_text())["step"] == 6


def test_a_run_evaluates_on_validation_scenes_and_descriptions(tmp_path: Path) -> None:
    report = train_encoder(TrainConfig(steps=3, batch_pairs=4, eval_every=2, save_every=100, describe_share=0.5,
                                       out=tmp_path))
    [evaluated] = report["evals"]  # at step 2 (the last step is left to the caller's evaluation)
    assert evaluated["step"] == 2 and 0.0 <= evaluated["t2i_r1"] <= 1.0
    assert set(evaluated["freeform_p1"]) == set(KINDS)
    assert json.loads((tmp_path / RUN_LOG).read_text())["evals"] == [evaluated]
