"""The mid tier's image side stored at index time: the same scores as the raw tokens, an id that follows its
weights, built by default, extended by adds, and never scored when other weights stored it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imsearch.cli import app
from indexer.encoder import DualEncoder
from indexer.store import Index
from reranker.model import load_reranker, save_reranker
from reranker.score import MODELS_DIR, ImageSide, TokenReranker, load_tier
from training.scenes import write_scenes

TEXT = "a small red circle left of a large blue square"


@pytest.fixture(scope="module")
def mid(encoder: DualEncoder) -> TokenReranker:
    return load_tier("mid", encoder)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a source of 8 scenes (src) and its index built with the default tiers (idx)."""
    root = tmp_path_factory.mktemp("side")
    write_scenes(root / "src", 4, seed=51, twins=True)
    result = CliRunner().invoke(app, ["index", "build", str(root / "src" / "captions.jsonl"), "--index",
                                      str(root / "idx"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return root


def test_the_stored_side_scores_and_explains_as_the_raw_tokens(mid: TokenReranker, built: Path) -> None:
    assert mid.side is not None
    with Index.open(built / "idx") as index:
        ids = index.ids()
        held = index.feature_sets["mid"]
        assert held["model"] == mid.side.feature_model and held["shape"] == [65, 192]
        raw, side = index.tokens(ids), index.features("mid", ids)
    np.testing.assert_allclose(side.astype(np.float32), mid.side.encode_tokens(raw), atol=2e-2, rtol=1e-2)
    query = mid.prepare(TEXT)
    np.testing.assert_allclose(mid.log_match(query, side, prepared=True), mid.log_match(query, raw), atol=5e-3)
    assert not np.allclose(mid.log_match(query, side), mid.log_match(query, raw), atol=5e-3)  # side ≠ tokens
    for got, want in zip(mid.explain(query, side, prepared=True), mid.explain(query, raw), strict=True):
        assert [p.phrase for p in got] == [p.phrase for p in want] == ["small red circle", "large blue square"]
        assert all(abs(a.x - b.x) < 0.01 and abs(a.y - b.y) < 0.01 for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("kind", ["mid", "early"])
def test_one_rescore_pass_scores_and_explains_as_the_two_calls(kind: str, encoder: DualEncoder, built: Path) -> None:
    tier = load_tier(kind, encoder)
    with Index.open(built / "idx") as index:
        name, prepared = ("mid", True) if kind == "mid" else ("tokens", False)
        features = index.features(name, index.ids())
    query = tier.prepare(TEXT)
    log_p, located = tier.rescore(query, features, prepared, explain=True)
    np.testing.assert_allclose(log_p, tier.log_match(query, features, prepared), atol=1e-5)
    assert located == tier.explain(query, features, prepared) and len(located) == len(features)
    assert [p.phrase for p in located[0]] == ["small red circle", "large blue square"]
    assert tier.rescore(query, features, prepared)[1] is None
    assert tier.rescore(query, features[:0], prepared, explain=True) == (pytest.approx(np.zeros(0)), [])


def test_the_side_s_id_follows_the_weights_that_compute_it(tmp_path: Path) -> None:
    matcher = load_reranker(MODELS_DIR / "reranker-mid.safetensors")
    same = ImageSide(load_reranker(MODELS_DIR / "reranker-mid.safetensors")).feature_model
    assert ImageSide(matcher).feature_model == same
    with torch.no_grad():
        matcher.head.weight.add_(1.0)  # the match head reads no image side
    assert ImageSide(matcher).feature_model == same
    with torch.no_grad():
        matcher.image_in.weight.add_(0.01)
    assert ImageSide(matcher).feature_model != same


def test_a_side_from_other_weights_is_not_scored(mid: TokenReranker, built: Path, tmp_path: Path) -> None:
    """An index whose side another checkpoint stored is reranked from its raw tokens, with the same scores as
    an index without a side, and the served tier says which indexes it reranks from their stored side."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    other = load_reranker(MODELS_DIR / "reranker-mid.safetensors")
    with torch.no_grad():
        other.image_mix.down.weight.mul_(0.5)
    checkpoint = save_reranker(other, tmp_path / "other-mid.safetensors")
    runner = CliRunner()
    src = str(built / "src" / "captions.jsonl")
    for name, tiers in (("stale", f"mid={checkpoint}"), ("plain", "early")):
        result = runner.invoke(app, ["index", "build", src, "--index", str(tmp_path / name), "--workers", "0",
                                     "--tiers", tiers])
        assert result.exit_code == 0, result.output
    with Index.open(tmp_path / "stale") as stale, Index.open(tmp_path / "plain") as plain:
        assert stale.feature_sets["mid"]["model"] != mid.side.feature_model and "mid" not in plain.feature_sets
    settings = Settings(indexes=[f"side={built / 'idx'}", f"stale={tmp_path / 'stale'}",
                                 f"plain={tmp_path / 'plain'}"], redis_url=None, rerankers=["mid"])
    with TestClient(create_app(settings)) as client:
        side = client.get("/readyz").json()["tiers"]["mid"]["side"]
        assert side == {"features": "mid", "model": mid.side.feature_model, "indexes": ["side"]}
        scores = {}
        for name in ("side", "stale", "plain"):
            answer = client.post("/v1/search", json={"text": TEXT, "k": 6, "rerank": "mid", "index": name})
            assert answer.status_code == 200, answer.text
            scores[name] = {h["id"]: h["rerank_score"] for h in answer.json()["hits"]}
    assert scores["stale"] == scores["plain"]  # both from the raw tokens
    with Index.open(built / "idx") as index:
        ids = list(scores["side"])
        from_side = mid.log_match(mid.prepare(TEXT), index.features("mid", ids), prepared=True)
    np.testing.assert_allclose(list(scores["side"].values()), from_side, atol=1e-5)  # the side was read
    np.testing.assert_allclose([scores["plain"][i] for i in ids], from_side, atol=5e-3)


def test_an_add_extends_the_side_its_index_holds_and_adds_none_it_lacks(built: Path, tmp_path: Path) -> None:
    import shutil

    write_scenes(tmp_path / "more", 2, seed=53)
    runner = CliRunner()
    plain = tmp_path / "plain"
    built_plain = runner.invoke(app, ["index", "build", str(built / "src" / "captions.jsonl"), "--index", str(plain),
                                      "--workers", "0", "--tiers", "early"])
    assert built_plain.exit_code == 0, built_plain.output
    with_side = shutil.copytree(built / "idx", tmp_path / "idx")
    for folder in (plain, with_side):  # the default tiers (mid, early) each time
        added = runner.invoke(app, ["index", "add", str(tmp_path / "more"), "--index", str(folder), "--workers", "0",
                                    "--json"])
        assert added.exit_code == 0, added.output
        left_out = json.loads(added.stdout)["left_out"]
        assert left_out == (["mid (the index holds none; a build with --replace and the tier stores one)"]
                            if folder == plain else [])
        verified = runner.invoke(app, ["index", "verify", "--index", str(folder)])
        assert verified.exit_code == 0, verified.output
    with Index.open(plain) as index:
        assert "mid" not in index.feature_sets and len(index.ids()) == 10
    with Index.open(with_side) as index:
        assert len(index.features("mid", index.ids())) == 10
    refused = runner.invoke(app, ["index", "add", str(tmp_path / "more"), "--index", str(with_side), "--workers", "0",
                                  "--tiers", "early"])
    assert refused.exit_code == 2 and "mid (model mid-side@" in refused.output and "Traceback" not in refused.output


def test_an_eval_gallery_holds_the_side_once_and_only_from_fp16_tokens(mid: TokenReranker,
                                                                       encoder: DualEncoder) -> None:
    from indexer.tokens import token_format
    from training.tradeoff import embed

    gallery = embed(encoder, 8, seed=7)
    assert mid.side is not None
    side = gallery.with_side(mid.side)
    assert side.prepared and gallery.for_tier(mid) is side and side.for_tier(mid) is side  # computed once
    np.testing.assert_allclose(side.candidates(np.arange(8)).astype(np.float32),
                               mid.side.encode_tokens(gallery.tokens), atol=2e-2)  # fp16, as an index stores it
    int8 = gallery.stored_as(token_format("int8", encoder.token_shape))
    with pytest.raises(ValueError, match="from the fp16 tokens"):
        int8.with_side(mid.side)  # its tokens are codes: a side from them would be noise
    with pytest.raises(ValueError, match="stored as int8 already"):
        int8.stored_as(token_format("int4", encoder.token_shape))
