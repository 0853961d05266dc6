"""A real-size open_clip encoder (ViT-B-32, random weights: none can be downloaded here) end to end:
index its images, train a mid reranker on the index's captions a few steps, serve it as the mid tier."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from imsearch.cli import app
from indexer.build import BuildOptions, build_or_add
from indexer.encoder import MODELS_DIR, EncoderSpec, load_encoder, save_fp16
from service.app import create_app
from service.config import Settings
from training.scenes import write_scenes


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(weights file of a random ViT-B-32, an index of 24 captioned scenes built with it)."""
    root = tmp_path_factory.mktemp("vit-b-32")
    torch.manual_seed(0)
    weights = save_fp16(open_clip.create_model("ViT-B-32"), root / "vit-b-32.safetensors")
    write_scenes(root / "src", 12, seed=71, twins=True)
    encoder = load_encoder(EncoderSpec("ViT-B-32", str(weights)))
    assert encoder.token_shape == (50, 768)
    build_or_add(root / "src" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0, tokens="int8"),
                 "build")
    return weights, root / "idx"


def test_a_vit_b_32_index_serves_a_mid_tier_trained_on_its_own_captions(vit: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    weights, index = vit
    checkpoint = tmp_path / "mid-vit.safetensors"
    trained = CliRunner().invoke(app, [
        "train", "reranker", "--kind", "mid", "--data", str(index), "--model", "ViT-B-32", "--pretrained",
        str(weights), "--steps", "3", "--batch", "4", "--out", str(checkpoint)])
    assert trained.exit_code == 0, trained.output
    assert checkpoint.is_file() and checkpoint.with_suffix(".json").is_file()
    settings = Settings(indexes=[f"scenes={index}"], model="ViT-B-32", pretrained=str(weights), redis_url=None,
                        rerankers=[f"mid={checkpoint}", "early"])
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert ready["rerankers"] == ["none", "mid"]  # the committed early tier is for the embedded encoder
        assert "tiny@" in ready["failed_rerankers"]["early"]
        caption = client.post("/v1/search", json={"text": "a red circle", "k": 1}).json()["hits"][0]["caption"]
        answer = client.post("/v1/search", json={"text": caption, "k": 5, "rerank": "mid", "rerank_k": 8})
        assert answer.status_code == 200, answer.text
        hits = answer.json()["hits"]
        assert len(hits) == 5 and all(h["rerank_score"] is not None and h["rerank_score"] <= 0 for h in hits)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_a_reranker_for_another_encoder_or_kind_is_refused_with_a_message(vit: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    weights, index = vit
    wrong = CliRunner().invoke(app, ["train", "reranker", "--data", str(index), "--out", str(tmp_path / "m")])
    assert wrong.exit_code == 2 and "was built with ViT-B-32@" in wrong.output  # the default model is tiny
    settings = Settings(indexes=[str(index)], model="ViT-B-32", pretrained=str(weights), redis_url=None,
                        rerankers=[f"early={MODELS_DIR / 'reranker-mid.safetensors'}", f"mid={tmp_path / 'missing'}"])
    with TestClient(create_app(settings)) as client:
        failed = client.get("/readyz").json()["failed_rerankers"]
        assert "is a mid reranker, not early" in failed["early"] and "not found" in failed["mid"]
        refused = client.post("/v1/search", json={"text": "a red circle", "rerank": "mid"})
        assert refused.status_code == 422 and "not loaded" in refused.json()["detail"]
