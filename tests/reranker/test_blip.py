"""The HF BLIP ITM backend, offline, with a tiny random BlipConfig saved to and loaded from a local dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.scenes import render, scene_pair

transformers = pytest.importorskip("transformers")

WORDS = "a small large red green blue circle square triangle left right of to the above below".split()


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = BlipConfig(
        text_config={"vocab_size": len(vocab), "bos_token_id": 5, "sep_token_id": 3, "pad_token_id": 0,
                     "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "intermediate_size": 64, "encoder_hidden_size": 48},
        vision_config={"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 96, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(0)
    BlipForImageTextRetrieval(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_blip_backend_scores_cached_vision_features(blip_dir: Path) -> None:
    from reranker.blip import BlipReranker

    reranker = BlipReranker(blip_dir)
    assert reranker.enc_token_id == 6  # [ENC] replaces [CLS], as the original BLIP does for ITM
    images = [render(scene_pair(3, i)[0].scene) for i in range(4)]
    tokens = reranker.image_tokens(images)
    assert tokens.shape == (4, 1 + (32 // 8) ** 2, 48)
    query = reranker.prepare("a small red circle left of a large blue square")
    assert query.tokens[0] == 6 and query.mask.all()
    scores = reranker.log_match(query, tokens)
    assert scores.shape == (4,) and np.all(scores <= 0)
    single = np.concatenate([reranker.log_match(query, tokens[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(scores, single, atol=1e-5)
    # the same as HF's own forward, given the same [ENC]-prefixed ids
    pixels = reranker.processor(images=images[:1], return_tensors="pt")["pixel_values"]
    ids = torch.from_numpy(query.tokens)[None].long()
    with torch.no_grad():
        logits = reranker.model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).itm_score
    np.testing.assert_allclose(scores[0], torch.log_softmax(logits, -1)[0, 1].item(), atol=1e-5)


def test_missing_blip_folder_is_a_clear_error(tmp_path: Path) -> None:
    from reranker.blip import BlipReranker

    with pytest.raises(FileNotFoundError, match="not a BLIP checkpoint"):
        BlipReranker(tmp_path)


@pytest.fixture(scope="module")
def blip_index(blip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an index of 12 scenes built with --tiers blip, its source folder)."""
    from typer.testing import CliRunner

    from imsearch.cli import app
    from training.scenes import write_scenes

    root = tmp_path_factory.mktemp("blip-index")
    write_scenes(root / "src", 6, seed=41, twins=True)
    built = CliRunner().invoke(app, ["index", "build", str(root / "src" / "captions.jsonl"), "--index",
                                     str(root / "idx"), "--workers", "0", "--tiers", f"mid,blip={blip_dir}"])
    assert built.exit_code == 0, built.output
    return root / "idx", root / "src"


def test_an_index_built_for_the_blip_tier_stores_its_vision_features(blip_dir: Path,
                                                                     blip_index: tuple[Path, Path]) -> None:
    from PIL import Image

    from indexer.store import Index
    from reranker.blip import BlipReranker

    reranker = BlipReranker(blip_dir)
    with Index.open(blip_index[0]) as index:
        held = index.feature_sets["blip"]
        assert held["model"] == reranker.feature_model and held["shape"] == [17, 48]
        assert held["bytes_per_image"] == 17 * 48 * 2  # stored as the tokens are (fp16 by default)
        ids = index.ids()[:3]
        paths = [row["path"] for row in index.metadata(ids)]
        stored = index.features("blip", ids).astype(np.float32)
    fresh = reranker.image_tokens([Image.open(p).convert("RGB") for p in paths])
    np.testing.assert_allclose(stored, fresh, atol=2e-2, rtol=1e-2)  # fp16 of the same forward
    # the same weights in a folder of another name have the same id: an index is never orphaned by a rename
    copy = blip_dir.parent / "renamed-blip"
    if not copy.exists():
        import shutil

        shutil.copytree(blip_dir, copy)
    assert BlipReranker(copy).feature_model == reranker.feature_model


def test_a_merged_token_store_merges_the_image_side_and_not_blip_s_own_features(
        blip_dir: Path, blip_index: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imsearch.cli import app
    from indexer.store import Index

    built = CliRunner().invoke(app, ["index", "build", str(blip_index[1] / "captions.jsonl"), "--index",
                                     str(tmp_path / "idx"), "--workers", "0", "--tokens", "int8+keep8",
                                     "--tiers", f"mid,blip={blip_dir}"])
    assert built.exit_code == 0, built.output
    with Index.open(tmp_path / "idx") as index:
        assert index.manifest["tokens"]["format"] == index.feature_sets["mid"]["format"] == "int8+keep8"
        assert index.feature_sets["blip"]["format"] == "int8"  # its own 16 patches, not the encoder's 64
        assert index.features("blip", index.ids()[:2]).shape == (2, 17, 48)


def test_an_add_must_bring_the_features_its_index_holds(blip_dir: Path, blip_index: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imsearch.cli import app
    from training.scenes import write_scenes

    write_scenes(tmp_path / "more", 2, seed=43)
    runner = CliRunner()
    add = ["index", "add", str(tmp_path / "more"), "--index", str(blip_index[0]), "--workers", "0"]
    refused = runner.invoke(app, add + ["--tiers", "mid"])
    assert refused.exit_code == 2 and "blip (model blip-itm@" in refused.output and "Traceback" not in refused.output
    bad = runner.invoke(app, add + ["--tiers", "blip"])
    assert bad.exit_code == 2 and "needs its model folder" in bad.output
    added = runner.invoke(app, add + ["--tiers", f"mid,blip={blip_dir}", "--json"])
    assert added.exit_code == 0, added.output
    info = runner.invoke(app, ["index", "info", "--index", str(blip_index[0])])
    assert "features blip: fp16 [17, 48]" in info.output
    verified = runner.invoke(app, ["index", "verify", "--index", str(blip_index[0]), "--json"])
    assert verified.exit_code == 0, verified.output
    import shutil

    copy = shutil.copytree(blip_index[0], tmp_path / "copy")
    feature_files = sorted(copy.glob("versions/*/shards/*/feat-blip.npy"))
    assert feature_files
    with feature_files[-1].open("r+b") as fh:  # a damaged feature file is found like any other
        fh.seek(200)
        fh.write(b"\xff" * 8)
    damaged = runner.invoke(app, ["index", "verify", "--index", str(copy)])
    assert damaged.exit_code == 1 and "feat-blip.npy" in damaged.output


def test_the_blip_tier_reranks_a_served_index_end_to_end(blip_dir: Path, blip_index: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from indexer.build import BuildOptions, build_or_add
    from indexer.encoder import EncoderSpec, load_encoder
    from indexer.store import Index
    from reranker.blip import BlipReranker
    from service.app import create_app
    from service.config import Settings

    plain = tmp_path / "plain"
    build_or_add(blip_index[1], plain, load_encoder(EncoderSpec()), BuildOptions(workers=0), "build")
    settings = Settings(indexes=[f"scenes={blip_index[0]}", f"plain={plain}"], redis_url=None,
                        rerankers=["mid", f"blip={blip_dir}", f"blip2={blip_dir}"])
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert ready["rerankers"] == ["none", "mid", "blip"] and "blip2" in ready["failed_rerankers"]
        assert ready["tiers"]["blip"]["features"] == "blip" and ready["tiers"]["blip"]["shape"] == [17, 48]
        tiers = ready["tiers"]
        assert tiers["blip"]["indexes"] == ["scenes"] and tiers["mid"]["indexes"] == ["scenes", "plain"]
        enum = client.get("/openapi.json").json()["components"]["schemas"]["SearchRequest"]["properties"]["rerank"]
        assert ["none", "mid", "blip", "auto"] in [option.get("enum") for option in enum["anyOf"]]
        text = "a small red circle left of a large blue square"
        answer = client.post("/v1/search", json={"text": text, "k": 4, "rerank": "blip", "rerank_k": 6})
        assert answer.status_code == 200, answer.text
        hits = answer.json()["hits"]
        assert len(hits) == 4 and all(h["rerank_score"] is not None for h in hits)
        with Index.open(blip_index[0]) as index:
            reranker = BlipReranker(blip_dir)
            expected = reranker.log_match(reranker.prepare(text), index.features("blip", [h["id"] for h in hits]))
        np.testing.assert_allclose([h["rerank_score"] for h in hits], expected, atol=1e-4)
        mid = client.post("/v1/search", json={"text": text, "k": 4, "rerank": "mid", "index": "plain"})
        assert mid.status_code == 200 and mid.json()["hits"][0]["rerank_score"] is not None
        refused = client.post("/v1/search", json={"text": text, "rerank": "blip", "index": "plain"})
        assert refused.status_code == 422 and "holds no blip image features" in refused.json()["detail"]
        unknown = client.post("/v1/search", json={"text": text, "rerank": "blip2"})
        assert unknown.status_code == 422 and "not loaded" in unknown.json()["detail"]


def test_an_indexing_job_adds_the_served_blip_tier_s_features(blip_dir: Path, blip_index: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from indexer.store import Index
    from service.app import create_app
    from service.config import Settings
    from tests.service.procs import wait_for
    from training.scenes import write_scenes

    index = shutil.copytree(blip_index[0], tmp_path / "idx")
    write_scenes(tmp_path / "incoming" / "new", 3, seed=47)
    settings = Settings(indexes=[f"scenes={index}"], rerankers=["mid", f"blip={blip_dir}"], api_key="k",
                        job_roots=[str(tmp_path / "incoming")], redis_url=None)
    key = {"X-API-Key": "k"}
    with TestClient(create_app(settings)) as client:
        before = client.get("/v1/index").json()["count"]
        start = client.post("/v1/jobs/index", headers=key, json={"source": str(tmp_path / "incoming"), "job_id": "b1"})
        assert start.status_code == 202, start.text
        done = wait_for(lambda: (j := client.get("/v1/jobs/b1", headers=key).json())["status"]
                        in ("succeeded", "failed") and j)
        assert done["status"] == "succeeded", done
        assert client.get("/v1/index").json()["count"] == before + 3
        with Index.open(index) as new:
            added = new.ids()[-3:]
            assert new.features("blip", added).shape == (3, 17, 48)
        answer = client.post("/v1/search", json={"text": "a red circle", "k": 50, "rerank": "blip", "rerank_k": 50})
        hits = answer.json()["hits"]
        assert answer.status_code == 200 and set(added.tolist()) <= {h["id"] for h in hits}
        assert all(h["rerank_score"] is not None for h in hits)  # the new images' features were stored
