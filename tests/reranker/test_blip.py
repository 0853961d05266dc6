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
