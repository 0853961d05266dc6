"""Reranker models: shapes, masks, batching, checkpoints with their fusion weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reranker.model import Matcher, RerankerConfig, load_reranker, save_reranker


def _inputs(n: int = 3, length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 65, 192, generator=g)
    text = torch.randn(n, length, 128, generator=g)
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[:, :6] = True  # six real tokens, four of padding
    return image, text, mask


@pytest.fixture(params=["mid", "early"])
def matcher(request: pytest.FixtureRequest) -> Matcher:
    torch.manual_seed(0)
    return Matcher(RerankerConfig(kind=request.param, layers=2)).eval()


def test_output_shape_and_log_probabilities(matcher: Matcher) -> None:
    logits = matcher(*_inputs())
    assert logits.shape == (3, 2)
    log_p = Matcher.log_match(logits)
    assert log_p.shape == (3,) and torch.all(log_p <= 0)


def test_padding_tokens_are_never_attended(matcher: Matcher) -> None:
    image, text, mask = _inputs()
    noisy = text.clone()
    noisy[:, 6:] = 1000.0 * torch.randn_like(noisy[:, 6:])  # garbage where the mask is False
    with torch.no_grad():
        torch.testing.assert_close(matcher(image, text, mask), matcher(image, noisy, mask), rtol=1e-4, atol=1e-5)
        changed = text.clone()
        changed[:, 2] += 1.0  # a real token does matter
        assert not torch.allclose(matcher(image, text, mask), matcher(image, changed, mask))


def test_a_batch_scores_like_single_calls(matcher: Matcher) -> None:
    image, text, mask = _inputs(n=5)
    with torch.no_grad():
        batched = matcher(image, text, mask)
        single = torch.cat([matcher(image[i : i + 1], text[i : i + 1], mask[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("layers", "ground_layer"), [(1, 0), (3, 0), (3, 1)])
def test_one_text_against_k_images_scores_like_the_full_batch(matcher: Matcher, layers: int,
                                                              ground_layer: int) -> None:
    """The fast path (first block's self-attention once, last block at [ENC] only, with the image
    projections folded into the text rows of every block) changes nothing, nor do the grounding
    states it computes up to the grounding layer."""
    torch.manual_seed(1)
    model = Matcher(RerankerConfig(kind=matcher.cfg.kind, layers=layers, image_mix=64,
                                   ground_layer=ground_layer)).eval()
    nn_init = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.image_mix.parameters() if model.image_mix else []:
            p.copy_(0.1 * torch.randn(p.shape, generator=nn_init))  # a trained block, not the zero start
        for block in model.blocks if matcher.cfg.kind == "mid" else []:  # biases start at zero: make them count
            bias = block.cross_attn.in_proj_bias
            bias.copy_(0.5 * torch.randn(bias.shape, generator=nn_init))
        image, text, mask = _inputs(n=6)
        one_text, one_mask = text[:1], mask[:1]
        full = model(image, one_text.expand(6, -1, -1), one_mask.expand(6, -1))
        torch.testing.assert_close(model.score_one_text(image, one_text, one_mask), full, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(full[0], full[1])  # the images do differ
        hidden = model.encode(image, one_text.expand(6, -1, -1), one_mask.expand(6, -1))[1]
        torch.testing.assert_close(model.ground_states(image, one_text, one_mask), hidden, rtol=1e-4, atol=1e-5)


def test_an_added_image_block_starts_as_identity_then_learns_neighbourhoods() -> None:
    from training.reranker_train import with_image_mix

    torch.manual_seed(0)
    base = Matcher(RerankerConfig(kind="mid", layers=2)).eval()
    grown = with_image_mix(base, 32).eval()
    image, text, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(grown(image, text, mask), base(image, text, mask))
        assert grown.image_mix is not None
        torch.nn.init.normal_(grown.image_mix.down.weight)
        moved = image.clone()
        moved[:, 1 + 9] += 5.0  # patch (1, 1): its 3x3 neighbourhood includes patch (0, 0)
        before = grown.embed_image(image)
        after = grown.embed_image(moved)
    changed = (after - before).abs().sum(-1)[0]
    assert changed[1] > 0 and changed[1 + 63] == 0  # a neighbour moves, a far patch does not
    with pytest.raises(ValueError, match="already has an image block"):
        with_image_mix(grown, 64)


def test_a_mid_reranker_cut_to_its_first_blocks_scores_as_those_blocks_alone(tmp_path: Path) -> None:
    """A cheaper warm start: the cut model is the deep one's first blocks and head, and saves as a shallow one."""
    from training.reranker_train import shallower

    torch.manual_seed(0)
    deep = Matcher(RerankerConfig(kind="mid", layers=3, ground=True)).eval()
    state = {k: v.clone() for k, v in deep.state_dict().items()}
    cut = shallower(deep, 2)
    alone = Matcher(RerankerConfig(kind="mid", layers=2, ground=True)).eval()
    alone.load_state_dict({k: v for k, v in state.items() if not k.startswith("blocks.2.")})
    image, text, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(cut(image, text, mask), alone(image, text, mask))
        torch.testing.assert_close(cut.score_one_text(image, text[:1], mask[:1]),
                                   alone(image, text[:1].expand(3, -1, -1), mask[:1].expand(3, -1)),
                                   rtol=1e-4, atol=1e-5)
    assert load_reranker(save_reranker(cut, tmp_path / "cut.safetensors")).cfg.layers == 2
    assert shallower(cut, 2) is cut  # as deep: unchanged
    refused = [(RerankerConfig(kind="mid", layers=2), 3), (RerankerConfig(kind="mid", layers=2), 0),
               (RerankerConfig(kind="mid", layers=2, ground_layer=1), 1), (RerankerConfig(kind="early", layers=3), 2)]
    for cfg, layers in refused:  # deeper, no blocks, cut before its grounding layer, not mid
        with pytest.raises(ValueError, match="cannot cut"):
            shallower(Matcher(cfg), layers)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reranker kind"):
        Matcher(RerankerConfig(kind="late"))


def test_checkpoint_round_trip_keeps_weights_and_fusion_weight(matcher: Matcher, tmp_path: Path) -> None:
    matcher.cfg.fusion_weight = 7.5
    path = save_reranker(matcher, tmp_path / "r.safetensors")
    loaded = load_reranker(path)
    assert loaded.cfg.fusion_weight == 7.5 and loaded.cfg.kind == matcher.cfg.kind
    again = load_reranker(save_reranker(loaded, tmp_path / "again.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs()), again(*_inputs()))
    assert path.stat().st_size < 25 * 2**20


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="imsearch train reranker"):
        load_reranker(tmp_path / "none.safetensors")


def test_committed_checkpoints_are_small_fp16_safetensors() -> None:
    from safetensors import safe_open

    from indexer.encoder import MODELS_DIR

    paths = sorted(MODELS_DIR.glob("reranker-*.safetensors"))
    assert paths, "no committed reranker checkpoint"
    for path in paths:
        assert path.stat().st_size < 25 * 2**20
        with safe_open(str(path), framework="pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}
        assert np.isfinite(load_reranker(path).cfg.fusion_weight)
