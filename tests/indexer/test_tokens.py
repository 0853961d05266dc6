"""Token store: fp16, int8 and int4 patch tokens, whole or merged (+keepK), written, read back within their
quantization error, and scored by a reranker as the fp16 ones are; one format per index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imsearch.cli import app
from indexer.build import BuildError, BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.store import Index
from indexer.tokens import FORMATS, decode, encode, format_of, token_format
from reranker.score import Query, load_tier
from training.scenes import write_scenes

SHAPE = (65, 192)
MERGED = "int8+keep24"


def _tokens(n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = (rng.standard_normal((n, *SHAPE)) * rng.uniform(0.1, 4, (n, SHAPE[0], 1))).astype(np.float16)
    tokens[0, 3] = 0  # a token of zeros has no scale to divide by
    tokens[1, 5, 7] = 60.0  # one large channel: the others of its group lose precision, not the other groups
    return tokens


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_tokens_decode_within_half_a_step_of_their_group(name: str) -> None:
    fmt = token_format(name, SHAPE)
    tokens = _tokens()
    rows = encode(tokens, fmt)
    assert rows.dtype.itemsize == fmt.bytes_per_image == {"int8": 12_610, "int4": 7_020}[name]
    back = decode(rows, fmt)
    assert back.shape == tokens.shape and back.dtype == np.float32
    groups = tokens.astype(np.float32).reshape(len(tokens), SHAPE[0], -1, fmt.group)
    step = np.abs(groups).max(-1, keepdims=True) / (127 if name == "int8" else 7)
    error = np.abs(back.reshape(groups.shape) - groups)
    assert (error <= step * 0.5 + 1e-3 * step + 1e-6).all()
    assert (back[0, 3] == 0).all()
    assert format_of(rows.dtype, rows.shape[1:]) == fmt


def test_fp16_is_the_tokens_as_stored_and_formats_are_told_apart() -> None:
    fp16 = token_format("fp16", SHAPE)
    tokens = _tokens()
    stored = decode(encode(tokens, fp16), fp16)
    assert stored.dtype == np.float16 and (stored == tokens).all()
    assert fp16.bytes_per_image == 65 * 192 * 2
    assert format_of(np.dtype(np.float32), SHAPE) is None
    assert format_of(np.dtype([("codes", np.int16, SHAPE), ("scales", np.float16, (65, 1))]), ()) is None
    assert len({token_format(n, SHAPE).dtype for n in FORMATS}) == 3
    with pytest.raises(ValueError, match="unknown token format 'int2'"):
        token_format("int2", SHAPE)


@pytest.mark.parametrize("name", ["fp16+keep3", "int8+keep3", "int4+keep3"])
def test_merged_tokens_keep_the_outlying_patches_and_store_the_rest_as_their_mean(name: str) -> None:
    fmt = token_format(name, (10, 64))  # [CLS] and 9 patches
    rng = np.random.default_rng(1)
    tokens = np.repeat(rng.standard_normal((2, 1, 64)), 10, axis=1)  # a plain ground ...
    tokens[:, 1:] += rng.standard_normal((2, 9, 64)) * 0.01  # ... not quite uniform
    tokens[:, 0] = rng.standard_normal((2, 64))  # [CLS] is never merged
    tokens[0, [2, 5, 9]] = rng.standard_normal((3, 64)) * 3  # three objects: the patches to keep
    tokens[1, [1, 4, 8]] = rng.standard_normal((3, 64)) * 3
    tokens = tokens.astype(np.float16).astype(np.float32)  # as an encoder hands them over
    rows = encode(tokens, fmt)
    assert (rows["where"] == [[1, 4, 8], [0, 3, 7]]).all()  # patch order, counted after [CLS]
    assert fmt.stored == 5 and fmt.bytes_per_image == rows.dtype.itemsize
    assert format_of(rows.dtype, rows.shape[1:]) == fmt
    back = decode(rows, fmt)
    assert back.shape == tokens.shape and back.dtype == np.float32
    step = {"fp16": 1e-3, "int8": 0.5 / 127, "int4": 0.5 / 7}[fmt.base] * np.abs(tokens).max(-1, keepdims=True)
    for image, objects in ((0, [2, 5, 9]), (1, [1, 4, 8])):
        ground = [p for p in range(1, 10) if p not in objects]
        for keep in [0, *objects]:
            assert (np.abs(back[image, keep] - tokens[image, keep]) <= step[image, keep] * 1.01).all()
        mean = tokens[image, ground].mean(axis=0)
        assert (np.abs(back[image, ground] - mean) <= step[image, ground] * 1.01 + 1e-3).all()


def test_merged_formats_name_their_limits() -> None:
    assert token_format("int8+keep16", SHAPE).bytes_per_image == 18 * (192 + 2) + 16 * 2  # + which patches
    assert token_format("int4+keep16", SHAPE).bytes_per_image < token_format("int4", SHAPE).bytes_per_image / 3
    with pytest.raises(ValueError, match="keeps 64 patches; these tokens have 64 after"):
        token_format("int8+keep64", SHAPE)
    for wrong in ("int8+keep0", "int8+keep", "int8+16", "keep16"):
        with pytest.raises(ValueError, match="unknown token format"):
            token_format(wrong, SHAPE)
    merged = token_format("int8+keep16", SHAPE).dtype
    assert format_of(np.dtype([(n, merged[n]) for n in ("codes", "scales", "where")]), ()) is None  # no "full"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, encoder: DualEncoder) -> dict[str, Path]:
    """The same 24 images indexed with each token format."""
    base = tmp_path_factory.mktemp("token-stores")
    write_scenes(base / "src", 12, seed=31, twins=True)
    for name in (*FORMATS, MERGED):
        build_or_add(base / "src", base / name, encoder, BuildOptions(workers=0, shard_size=10, tokens=name), "build")
    return {name: base / name for name in (*FORMATS, MERGED)}


def test_every_format_reads_back_the_fp16_tokens_and_reranks_alike(stores: dict[str, Path],
                                                                    encoder: DualEncoder) -> None:
    mid = load_tier("mid", encoder)
    with Index.open(stores["fp16"]) as ref:
        ids = ref.ids()
        exact = ref.tokens(ids).astype(np.float32)
        caption = str(ref.metadata(ids[:1], ["caption"])[0]["caption"])
    _, text, mask = encoder.encode_texts_and_tokens([caption])
    query = Query(caption, text[0], mask[0])
    reference = mid.log_match(query, exact)
    for name, tolerance in (("int8", 0.5 / 127 + 1e-3), ("int4", 0.5 / 7 + 1e-3)):  # half a step of the largest
        with Index.open(stores[name]) as index:
            assert index.manifest["tokens"] == token_format(name, encoder.token_shape).describe()
            assert (index.ids() == ids).all()
            tokens = index.tokens(ids[[5, 0, 17]])  # out of order, across shards
            scale = np.abs(exact[[5, 0, 17]]).max(-1, keepdims=True)
            assert (np.abs(tokens - exact[[5, 0, 17]]) <= scale * tolerance).all()
            log_p = mid.log_match(query, index.tokens(ids))
        assert np.argmax(log_p) == np.argmax(reference)
        assert np.abs(np.exp(log_p) - np.exp(reference)).max() < {"int8": 0.02, "int4": 0.1}[name]


def test_a_merged_store_reads_back_its_merged_tokens_and_reranks_alike(stores: dict[str, Path],
                                                                        encoder: DualEncoder) -> None:
    mid = load_tier("mid", encoder)
    fmt = token_format(MERGED, encoder.token_shape)
    with Index.open(stores["fp16"]) as ref, Index.open(stores[MERGED]) as index:
        ids = ref.ids()
        exact = ref.tokens(ids).astype(np.float32)
        assert index.manifest["tokens"] == fmt.describe() and index.token_format == fmt
        for image, read in zip(exact[[5, 0, 17]], index.tokens(ids[[5, 0, 17]]), strict=True):  # across shards
            close = (np.abs(read - image) <= np.abs(image).max(-1, keepdims=True) * (0.5 / 127 + 1e-3)).all(-1)
            rows, counts = np.unique(read[1:], axis=0, return_counts=True)
            ground = (read[1:] == rows[np.argmax(counts)]).all(-1)  # the 40 other patches, each their mean
            assert close[0] and ground.sum() == 40 and close[1:][~ground].all()
        captions = [str(m["caption"]) for m in ref.metadata(ids, ["caption"])]
        merged = index.tokens(ids)
    for i in (0, 7, 13):
        _, text, mask = encoder.encode_texts_and_tokens([captions[i]])
        query = Query(captions[i], text[0], mask[0])
        assert np.argmax(mid.log_match(query, merged)) == np.argmax(mid.log_match(query, exact))


def test_an_add_keeps_the_index_format_and_refuses_another(stores: dict[str, Path], encoder: DualEncoder,
                                                            tmp_path: Path) -> None:
    write_scenes(tmp_path / "more", 3, seed=32, twins=True)
    folder = tmp_path / "int4"
    build_or_add(stores["int4"].parent / "src", folder, encoder, BuildOptions(workers=0, tokens="int4"), "build")
    with pytest.raises(BuildError, match="stores its tokens as int4, and one index holds one format"):
        build_or_add(tmp_path / "more", folder, encoder, BuildOptions(workers=0, tokens="fp16"), "add")
    report = build_or_add(tmp_path / "more", folder, encoder, BuildOptions(workers=0), "add")
    assert report.indexed == 6
    with Index.open(folder) as index:
        assert index.token_format is not None and index.token_format.name == "int4"
        assert index.tokens(index.ids()).shape == (30, *encoder.token_shape)


def test_cli_builds_a_compressed_store_and_info_reports_its_bytes(stores: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    src = stores["fp16"].parent / "src"
    built = runner.invoke(app, ["index", "build", str(src), "--index", str(tmp_path / "i"), "--tokens", "int8",
                                "--workers", "0"])
    assert built.exit_code == 0, built.output
    info = runner.invoke(app, ["index", "info", "--index", str(tmp_path / "i")])
    assert "tokens   int8, 12,610 bytes per image" in info.output
    as_json = json.loads(runner.invoke(app, ["index", "info", "--index", str(tmp_path / "i"), "--json"]).output)
    assert as_json["tokens"] == {"format": "int8", "shape": [65, 192], "bytes_per_image": 12_610}
    old = runner.invoke(app, ["index", "info", "--index", str(stores["fp16"]), "--json"])
    assert json.loads(old.output)["tokens"]["bytes_per_image"] == 24_960
    wrong = runner.invoke(app, ["index", "build", str(src), "--index", str(tmp_path / "j"), "--tokens", "int3"])
    assert wrong.exit_code == 2 and "int3" in wrong.output
    merged = runner.invoke(app, ["index", "build", str(src), "--index", str(tmp_path / "m"), "--tokens", "INT4+keep16",
                                 "--workers", "0"])
    assert merged.exit_code == 0, merged.output
    info = runner.invoke(app, ["index", "info", "--index", str(tmp_path / "m")])
    assert "tokens   int4+keep16, 1,976 bytes per image" in info.output
    too_many = runner.invoke(app, ["index", "build", str(src), "--index", str(tmp_path / "k"), "--tokens",
                                   "int8+keep64"])
    assert too_many.exit_code == 2 and "keeps 64 patches" in too_many.output
