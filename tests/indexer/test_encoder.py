"""Dual encoder interface: shapes, dtypes, normalisation, checkpoint round trip, clear failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.encoder import (
    EMBEDDED_DIR,
    WEIGHTS_NAME,
    DualEncoder,
    EncoderSpec,
    EncoderUnavailable,
    create_embedded,
    load_encoder,
    save_checkpoint,
)
from training.scenes import render, scene_pair


@pytest.fixture(scope="module")
def images() -> list:
    return [render(scene_pair(3, i)[0].scene) for i in range(5)]


def test_committed_checkpoint_is_small_fp16_safetensors() -> None:
    weights = EMBEDDED_DIR / WEIGHTS_NAME
    assert weights.stat().st_size < 25 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}


def test_shapes_dtypes_and_norms(encoder: DualEncoder, images: list) -> None:
    img = encoder.encode_images(images)
    txt = encoder.encode_texts(["a small red circle on the left", "a large blue square above a small red cross"])
    tokens = encoder.image_tokens(images)
    assert img.shape == (5, encoder.embed_dim) and img.dtype == np.float32
    assert txt.shape == (2, encoder.embed_dim) and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert tokens.shape == (5, *encoder.token_shape) and tokens.dtype == np.float32
    assert encoder.token_shape == (65, 192)  # [CLS] + 8x8 patches of the 64 px tiny ViT


def test_pooled_and_tokens_from_one_forward_match_separate_calls(encoder: DualEncoder, images: list) -> None:
    pooled, tokens = encoder.encode_images_and_tokens(images)
    np.testing.assert_allclose(pooled, encoder.encode_images(images), atol=1e-5)
    # the pooled embedding is the projected [CLS] token, so tokens carry the same information
    cls = torch.from_numpy(tokens[:, 0]) @ encoder.model.visual.proj.detach()
    np.testing.assert_allclose(torch.nn.functional.normalize(cls, dim=-1).numpy(), pooled, atol=1e-4)


def test_tensor_batches_and_empty_texts(encoder: DualEncoder, images: list) -> None:
    batch = encoder.to_tensor(images)
    np.testing.assert_allclose(encoder.encode_images(batch), encoder.encode_images(images), atol=1e-6)
    assert encoder.encode_texts([]).shape == (0, encoder.embed_dim)
    with pytest.raises(TypeError):
        encoder.encode_texts("a single string")  # type: ignore[arg-type]


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path: Path, images: list) -> None:
    fresh = create_embedded(seed=3)
    first = save_checkpoint(fresh.model, tmp_path / "a")
    loaded = load_encoder(EncoderSpec("tiny", str(first)))
    second = save_checkpoint(loaded.model, tmp_path / "b")
    again = load_encoder(EncoderSpec("tiny", str(second)))
    assert np.array_equal(loaded.encode_images(images), again.encode_images(images))
    assert np.array_equal(loaded.encode_texts(["a red circle"]), again.encode_texts(["a red circle"]))
    via_dir = load_encoder(EncoderSpec(f"local-dir:{tmp_path / 'b'}"))  # open_clip's own layout
    assert np.array_equal(via_dir.encode_images(images), again.encode_images(images))
    assert loaded.model_id == again.model_id  # same bytes, same id
    (tmp_path / "b").rename(tmp_path / "renamed")
    renamed = load_encoder(EncoderSpec(f"local-dir:{tmp_path / 'renamed'}"))
    assert via_dir.model_id == renamed.model_id == again.model_id == f"tiny@{again.model_id.split('@')[1]}"
    assert renamed.is_model(f"renamed@{again.model_id.split('@')[1]}")  # the id an earlier release gave it
    assert not renamed.is_model(f"tiny@{'0' * 16}") and not loaded.is_model(f"b@{again.model_id.split('@')[1]}")


def test_a_local_dir_of_an_unknown_architecture_is_named_by_its_config(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    save_checkpoint(create_embedded(seed=4).model, folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["layers"] = 2  # no registered architecture has this config
    del config["model_name"]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    (folder / "open_clip_model.safetensors").unlink()  # random weights at that size
    encoder = load_encoder(EncoderSpec(f"local-dir:{folder}"))
    assert encoder.model_id.startswith("custom-") and encoder.model_id.endswith("@random")


def test_unavailable_pretrained_fails_fast_and_names_the_model() -> None:
    start = time.perf_counter()
    with pytest.raises(EncoderUnavailable) as info:
        load_encoder(EncoderSpec("ViT-B-32", "laion2b_s34b_b79k"))
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message and "--pretrained" in message


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (EncoderSpec("no-such-model"), "unknown model"),
        (EncoderSpec("ViT-B-32", "no-such-tag"), "unknown pretrained tag"),
        (EncoderSpec("local-dir:/nonexistent/dir"), "not an open_clip local-dir"),
        (EncoderSpec("/nonexistent/config.json"), "does not exist"),
    ],
)
def test_bad_specs_raise_clear_errors(spec: EncoderSpec, needle: str) -> None:
    with pytest.raises(EncoderUnavailable, match=needle):
        load_encoder(spec)


def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EncoderUnavailable, match="CUDA is not available"):
        load_encoder(EncoderSpec(device="cuda"))


def test_json_config_plus_safetensors(tmp_path: Path, images: list) -> None:
    from indexer.encoder import CONFIG_DIR

    weights = save_checkpoint(create_embedded(seed=4).model, tmp_path)
    config = tmp_path / "my-tiny.json"
    config.write_text((CONFIG_DIR / "tiny.json").read_text())
    custom = load_encoder(EncoderSpec(str(config), str(weights)))
    reference = load_encoder(EncoderSpec("tiny", str(weights)))
    assert np.array_equal(custom.encode_images(images), reference.encode_images(images))
