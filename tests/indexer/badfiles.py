"""Broken and awkward image files, made on the fly for the reader and build tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (220, 30, 30)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a huge canvas, with almost no data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + data + chunk(b"IEND", b"")


def broken_files(folder: Path) -> dict[str, str]:
    """Write files that must be skipped; returns name -> a word the failure reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _png_bytes(Image.new("RGB", (32, 32), RED))
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "garbage.webp").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "bomb.png").write_bytes(bomb_png())
    return {"empty.png": "empty", "truncated.png": "truncated", "text.jpg": "not an image",
            "garbage.webp": "not an image", "bomb.png": "decompression bomb"}


def awkward_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Valid but awkward images that must be converted; returns name -> expected upright (w, h)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    deep = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(folder / "palette_alpha.png", transparency=0)
    rotated = Image.new("RGB", (40, 30), RED)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("LA", (40, 30), (128, 255)).save(folder / "grey_alpha.png")
    return {"cmyk.jpg": (40, 30), "deep16.png": (40, 30), "palette_alpha.png": (40, 30),
            "exif_rotated.jpg": (30, 40), "animated.gif": (40, 30), "grey_alpha.png": (40, 30)}
