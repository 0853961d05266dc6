"""The captions recipe: pairs drawn from an index's captions, negatives never true of their text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.store import Index
from training.captions_train import MINED, POOL, caption_pairs, draw_negatives, load_captions
from training.reranker_train import RerankTrainConfig
from training.scenes import write_scenes


@pytest.fixture(scope="module")
def index(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Index:
    """30 captioned scenes and their twins, plus two copies of one scene's caption on other images."""
    root = tmp_path_factory.mktemp("captions")
    write_scenes(root / "src", 15, seed=81, twins=True)
    rows = [json.loads(line) for line in (root / "src" / "captions.jsonl").read_text().splitlines()]
    for row in rows[1:3]:
        row["caption"] = rows[0]["caption"]  # one caption, three images: none is a negative of the others
    (root / "src" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_or_add(root / "src" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0), "build")
    return Index.open(root / "idx")


def test_pairs_label_only_same_caption_images_as_matches(index: Index, encoder: DualEncoder) -> None:
    data = load_captions(index)
    assert len(data.train) + len(data.val) == 30 and len(data.val) == 3
    assert not set(data.train.tolist()) & set(data.val.tolist())
    cfg = RerankTrainConfig(batch=8)
    for step in range(5):
        batch = caption_pairs(encoder, data, cfg, step)
        b = cfg.batch
        assert batch.labels[:b].all() and not batch.labels[b:].any()
        assert len(batch.labels) == b * (2 + MINED) and batch.image.shape[1:] == encoder.token_shape
    same = data.same_caption([data.captions[int(data.train[0])]], data.train)[0]
    assert same.sum() >= 1 and all(data.captions[int(i)] == data.captions[int(data.train[0])]
                                   for i in data.train[same])


def test_mined_negatives_are_near_the_caption_and_never_share_it(index: Index, encoder: DualEncoder) -> None:
    data = load_captions(index)
    rng = np.random.default_rng(0)
    text = data.captions[int(data.train[0])]
    emb = encoder.encode_texts([text])[0]
    sim = np.where(data.same_caption([text], data.train)[0], -np.inf, data.vectors @ emb)
    top = set(np.argsort(-sim)[:POOL].tolist())
    for _ in range(20):
        drawn = draw_negatives(sim, rng, 0.05)
        assert set(drawn.tolist()) <= top and np.isfinite(sim[drawn]).all()


def test_too_few_captions_are_refused(encoder: DualEncoder, tmp_path: Path) -> None:
    write_scenes(tmp_path / "src", 5, seed=82, twins=True)
    build_or_add(tmp_path / "src", tmp_path / "idx", encoder, BuildOptions(workers=0), "build")  # a folder: no captions
    with pytest.raises(ValueError, match="holds 0 captioned images"):
        load_captions(Index.open(tmp_path / "idx"))
