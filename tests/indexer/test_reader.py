"""Reader: source listing, and decoding of broken and awkward files without ever raising."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from indexer.reader import (
    BadImage,
    ImageDataset,
    SourceError,
    SourceItem,
    decode_image,
    list_source,
    make_loader,
    read_item,
)
from tests.indexer.badfiles import RED, awkward_files, bomb_png, broken_files


def _png(path: Path, colour: tuple[int, int, int] = RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_folder_listing_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    _png(tmp_path / "b.png")
    _png(tmp_path / "sub" / "a.PNG")
    (tmp_path / "notes.txt").write_text("x")
    items = list_source(tmp_path)
    assert [Path(i.path).name for i in items] == ["b.png", "a.PNG"]  # sorted by full path
    assert all(Path(i.path).is_absolute() for i in items)


def test_list_files_resolve_relative_paths_and_keep_captions(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "one.png")
    (tmp_path / "paths.txt").write_text("# comment\nimg/one.png\n\n")
    assert list_source(tmp_path / "paths.txt") == [SourceItem(str(tmp_path / "img" / "one.png"))]
    rows = [{"file": "img/one.png", "caption": "a red square", "tag": 3}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (item,) = list_source(tmp_path / "c.jsonl")
    assert item.caption == "a red square" and item.extra == {"tag": 3} and Path(item.path).is_file()
    pq.write_table(pa.table({"path": ["img/one.png"], "caption": ["x"]}), tmp_path / "t.parquet")
    assert list_source(tmp_path / "t.parquet")[0].caption == "x"


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [("missing", None, "does not exist"), ("bad.jsonl", "{not json\n", "not valid JSON"),
     ("nopath.jsonl", '{"caption": "x"}\n', "no 'path'"), ("file.csv", "a,b\n", "not a folder")],
)
def test_bad_sources_are_clear_errors(tmp_path: Path, name: str, content: str | None, needle: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(SourceError, match=needle):
        list_source(tmp_path / name)


def test_broken_files_are_reported_not_raised(tmp_path: Path) -> None:
    expected = broken_files(tmp_path)
    for name, needle in expected.items():
        decoded = read_item(str(tmp_path / name), _preprocess, max_pixels=64_000_000)
        assert decoded.tensor is None and decoded.error is not None
        assert needle in decoded.error, (name, decoded.error)
    missing = read_item(str(tmp_path / "gone.png"), _preprocess, 1000)
    assert missing.error is not None and "cannot read" in missing.error


def test_pixel_limit_is_configurable() -> None:
    data = _png(Path("/tmp") / "imsearch-limit.png").read_bytes()  # 8x8 = 64 pixels
    assert decode_image(data, max_pixels=64).size == (8, 8)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(data, max_pixels=63)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(bomb_png(20_000, 20_000))


def _preprocess(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def test_awkward_files_become_upright_rgb(tmp_path: Path) -> None:
    for name, size in awkward_files(tmp_path).items():
        image = decode_image((tmp_path / name).read_bytes())
        assert image.mode == "RGB" and image.size == size, name
    deep = np.asarray(decode_image((tmp_path / "deep16.png").read_bytes()))
    assert deep.min() == 0 and deep.max() == 255  # scaled from 16 bits, not clipped
    assert tuple(np.asarray(decode_image((tmp_path / "animated.gif").read_bytes()))[5, 5]) == RED  # first frame
    palette = np.asarray(decode_image((tmp_path / "palette_alpha.png").read_bytes()))
    assert tuple(palette[0, 0]) == RED


def test_loader_keeps_order_and_failures_in_place(tmp_path: Path) -> None:
    paths = [_png(tmp_path / f"{i}.png", (i * 20, 0, 0)) for i in range(5)]
    (tmp_path / "2.png").write_bytes(b"")
    items = [SourceItem(str(p)) for p in paths]
    loader = make_loader(ImageDataset(items, _preprocess), batch_size=2, workers=1)
    decoded = [d for batch in loader for d in batch]
    assert [d.position for d in decoded] == [0, 1, 2, 3, 4]
    assert decoded[2].tensor is None and decoded[2].error == "empty file"
    assert decoded[4].tensor is not None and float(decoded[4].tensor[0, 0, 0]) == 80.0
