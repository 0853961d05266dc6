"""Indexer, read: list a source, then decode and preprocess images in DataLoader workers."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
LIST_EXTENSIONS = {".txt", ".jsonl", ".parquet"}
DEFAULT_MAX_PIXELS = 64_000_000  # above this an image is treated as a decompression bomb
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class SourceError(ValueError):
    """The source cannot be listed (missing, unreadable, or a list file without paths)."""


class BadImage(ValueError):
    """One file cannot be turned into an RGB image; the message is the reason reported."""


@dataclass(frozen=True)
class SourceItem:
    """One image to index, with an optional caption and extra metadata from a list file."""

    path: str
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- listing --------------------------------------------------------------------------------------


def list_source(src: Path) -> list[SourceItem]:
    """Items of a folder (recursive, image extensions), a .txt of paths, or a .jsonl/.parquet table.

    List files may give `path` (or `file`, as the scenes' captions.jsonl does) relative to themselves.
    """
    if not src.exists():
        raise SourceError(f"source {src} does not exist")
    if src.is_dir():
        return [SourceItem(str(p)) for p in _walk_images(src)]
    suffix = src.suffix.lower()
    if suffix == ".txt":
        return _list_txt(src)
    if suffix == ".jsonl":
        return _list_rows(src, _jsonl_rows(src))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _list_rows(src, iter(pq.read_table(src, use_threads=False).to_pylist()))  # threads: see read_meta
    raise SourceError(f"source {src} is not a folder or a .txt, .jsonl or .parquet list of images")


def _walk_images(root: Path) -> list[Path]:
    files = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return sorted(p.resolve() for p in files)


def _resolve(base: Path, raw: str) -> str:
    path = Path(raw).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def _list_txt(src: Path) -> list[SourceItem]:
    lines = (line.strip() for line in src.read_text(encoding="utf-8").splitlines())
    return [SourceItem(_resolve(src.parent, line)) for line in lines if line and not line.startswith("#")]


def _jsonl_rows(src: Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(src.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{src}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise SourceError(f"{src}:{number}: each line must be a JSON object")
        yield row


def _list_rows(src: Path, rows: Iterator[dict[str, Any]]) -> list[SourceItem]:
    items = []
    for number, row in enumerate(rows, start=1):
        raw = row.get("path") or row.get("file")
        if not isinstance(raw, str) or not raw:
            raise SourceError(f"{src}: row {number} has no 'path' (or 'file') column")
        caption = row.get("caption")
        extra = {k: v for k, v in row.items() if k not in ("path", "file", "caption")}
        items.append(SourceItem(_resolve(src.parent, raw), caption if isinstance(caption, str) else None, extra))
    return items


# --- decoding -------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit and float scaled, alpha composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes → upright RGB image (first frame of an animation); raises BadImage with the reason."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(f"decompression bomb: {width}x{height} pixels is over the limit of {max_pixels}")
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"truncated or corrupt image: {exc}") from None


EXIF_IFD, DATE_TIME_ORIGINAL, DATE_TIME = 0x8769, 36867, 306  # EXIF tags: when the photo was taken / last changed
TAKEN = "taken"  # the metadata column an image's EXIF date goes to (a source list's own column of that name wins)


def exif_taken(data: bytes) -> str | None:
    """When a photo was taken, from its EXIF (DateTimeOriginal, else DateTime) as ISO 8601 text, which filters
    and orders as a date ("2024-05-01T12:30:00"); None without one, or with one that is not a date."""
    try:
        exif = Image.open(io.BytesIO(data)).getexif()  # the header only: no pixels are decoded
        raw = exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL) or exif.get(DATE_TIME)
        taken = datetime.strptime(str(raw).strip("\x00 "), "%Y:%m:%d %H:%M:%S") if raw else None
    except (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError, Image.DecompressionBombError):
        return None
    return taken.isoformat() if taken else None


@dataclass
class Decoded:
    """One item after the worker: a tensor (or None and the error) plus what the metadata needs."""

    position: int
    tensor: torch.Tensor | None
    sha256: str = ""
    width: int = 0
    height: int = 0
    error: str | None = None
    size: int = 0  # bytes of the file as read (served images are checked against it)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # preprocessed for each tier's own vision tower
    taken: str | None = None  # exif_taken of the file


class UnreadableFile(OSError):
    """A path that is not a regular file of bounded size; the message is the reason reported."""


def read_regular_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, never through a symbolic link.

    Opened non-blocking (a FIFO cannot hang the reader) and refused unless fstat says regular file
    (a device such as /dev/zero would be read without end); the read stops one byte past the limit
    whatever the size claimed. Raises UnreadableFile or OSError with the reason.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile("not a regular file")
        if info.st_size > max_bytes:
            raise UnreadableFile(f"file too large: {info.st_size} bytes (limit {max_bytes})")
        chunks, left = [], max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    if left <= 0:
        raise UnreadableFile(f"file too large: over the limit of {max_bytes} bytes")
    return b"".join(chunks)


def within(path: str | Path, roots: Sequence[str | Path]) -> bool:
    """Whether the path, every link in it resolved, lies under one of the roots (each resolved too)."""
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return any(resolved.is_relative_to(Path(root).expanduser().resolve()) for root in roots)


Preprocess = Callable[[Image.Image], torch.Tensor]


def read_item(path: str, preprocess: Preprocess, max_pixels: int, max_bytes: int = DEFAULT_MAX_BYTES,
              position: int = 0, roots: Sequence[str] = (), extras: Mapping[str, Preprocess] | None = None) -> Decoded:
    """Read, hash, decode and preprocess one file (for the dual encoder, and for each of `extras`); never
    raises for a bad file.

    With `roots` (an indexing job), a file is read only when it resolves under one of them.
    """
    if roots and not (os.path.realpath(path) == path and within(path, roots)):
        return Decoded(position, None, error="outside the allowed roots (IMSEARCH_JOB_ROOTS), or a link")
    try:
        data = read_regular_file(path, max_bytes)
    except UnreadableFile as exc:
        return Decoded(position, None, error=str(exc))
    except OSError as exc:
        reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc
        return Decoded(position, None, error=f"cannot read file: {reason}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, max_pixels)
    except BadImage as exc:
        return Decoded(position, None, digest, error=str(exc))
    extra = {name: fn(image) for name, fn in (extras or {}).items()}
    return Decoded(position, preprocess(image), digest, image.width, image.height, size=len(data), extra=extra,
                   taken=exif_taken(data))


class ImageDataset(Dataset[Decoded]):
    """Map-style dataset over source items; decoding happens in the worker that fetches an item."""

    def __init__(self, items: Sequence[SourceItem], preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS,
                 roots: Sequence[str] = (), extras: Mapping[str, Preprocess] | None = None):
        self.items = items
        self.preprocess, self.extras = preprocess, extras
        self.max_pixels = max_pixels
        self.roots = roots

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> Decoded:
        return read_item(self.items[position].path, self.preprocess, self.max_pixels, position=position,
                         roots=self.roots, extras=self.extras)


def collate(batch: list[Decoded]) -> list[Decoded]:
    """Keep items as they are: failures travel beside good tensors, stacked later by the encoder."""
    return batch


def make_loader(dataset: ImageDataset, batch_size: int, workers: int) -> DataLoader[Decoded]:
    """A DataLoader that decodes in `workers` processes (0 = in this process), in source order."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
