"""Indexer, token store: the patch tokens kept for the rerankers, as fp16 or quantized (int8, int4) with
fp16 scales per group of channels, optionally merged: the K patches least like the image's median patch
kept as they are and the others stored as their mean (`+keepK`).

A quantized or merged shard stores one record per image ({codes, scales, where} as a structured .npy
dtype), so the file says what it holds and one read of a row brings its scales with it. Measured on the
twin gallery (mid, k = 16, 1,000 queries, seed 2026): fp16 24,960 B per image, R@1 0.989; int8 (a scale
per token) 12,610 B, 0.988; int4 (a scale per 32 channels) 7,020 B, 0.988; int4 with one scale per token
lost 0.3 pt. Merging keeps the objects of a scene on its plain ground: 16 of 64 patches kept, R@1 0.987
(the tokens) and 0.989 (mid's image side), where 2 x 2 average pooling fell to 0.63 and 0.70 in a trial.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS = ("fp16", "int8", "int4")
PATTERN = r"^(fp16|int8|int4)(?:\+keep([1-9][0-9]*))?$"  # BASE or BASE+keepK
NAME = re.compile(PATTERN)


@dataclass(frozen=True)
class TokenFormat:
    """How a shard stores (t, w) tokens per image."""

    name: str  # BASE or BASE+keepK, BASE one of FORMATS
    shape: tuple[int, int]  # (tokens, width) of the model's patch tokens
    group: int  # channels that share one scale (quantized formats)
    keep: int = 0  # merged: patches kept as they are, the others stored as one mean token; 0: all kept

    @property
    def base(self) -> str:
        """How the stored token values are encoded: one of FORMATS."""
        return self.name.partition("+")[0]

    @property
    def stored(self) -> int:
        """Tokens stored per image: all, or merged [CLS], the kept patches and the others' mean."""
        return self.keep + 2 if self.keep else self.shape[0]

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype of one image's row in tok.npy."""
        (t, w), n = self.shape, self.stored
        if self.name == "fp16":
            return np.dtype((np.float16, (t, w)))
        codes = {"fp16": (np.float16, (n, w)), "int8": (np.int8, (n, w)), "int4": (np.uint8, (n, w // 2))}[self.base]
        fields: list[Any] = [("codes", *codes)]
        if self.base != "fp16":
            fields.append(("scales", np.float16, (n, w // self.group)))
        if self.keep:  # which patch each kept token is, and (in a field of no bytes) how many tokens a row stands for
            fields += [("where", np.uint16, (self.keep,)), ("full", np.uint8, (t, 0))]
        return np.dtype(fields)

    @property
    def bytes_per_image(self) -> int:
        return int(self.dtype.itemsize)

    def describe(self) -> dict[str, Any]:
        """What the manifest and `index info` say of it."""
        return {"format": self.name, "shape": list(self.shape), "bytes_per_image": self.bytes_per_image}


def parse_name(name: str) -> tuple[str, int]:
    """A format's name as (base, patches kept: 0 for all); ValueError naming the formats for any other name."""
    match = NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown token format {name!r}: use one of {', '.join(FORMATS)}, optionally "
                         "merged as FORMAT+keepK (e.g. int8+keep16: K patches kept, the rest stored as their mean)")
    return match.group(1), int(match.group(2) or 0)


def token_format(name: str, shape: tuple[int, int]) -> TokenFormat:
    """The format `name` for tokens of `shape`; ValueError for an unknown name or a shape it cannot store."""
    base, keep = parse_name(name)
    t, w = shape
    if keep and not keep < t - 1 <= 65_535:
        raise ValueError(f"{name} keeps {keep} patches; these tokens have {t - 1} after [CLS]: keep fewer")
    group = {"fp16": 1, "int8": w, "int4": 32 if w % 32 == 0 else w}[base]
    if base == "int4" and w % 2:
        raise ValueError(f"int4 tokens need an even width; these are {w} wide")
    return TokenFormat(name, (int(t), int(w)), group, keep)


def format_of(dtype: np.dtype[Any], row_shape: tuple[int, ...]) -> TokenFormat | None:
    """The format a tok.npy's dtype and row shape were written in; None when they are none of the formats."""
    if dtype == np.float16 and len(row_shape) == 2:
        return token_format("fp16", (row_shape[0], row_shape[1]))
    if dtype.names is None or row_shape or "codes" not in dtype.names:
        return None
    codes = dtype["codes"]
    base = {np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8", np.dtype(np.uint8): "int4"}.get(codes.base)
    if base is None or codes.ndim != 2:
        return None
    width = codes.shape[1] * (2 if base == "int4" else 1)
    merged = "where" in dtype.names and "full" in dtype.names
    keep, t = (dtype["where"].shape[0], dtype["full"].shape[0]) if merged else (0, codes.shape[0])
    try:
        fmt = token_format(f"{base}+keep{keep}" if merged else base, (t, width))
    except ValueError:
        return None
    return fmt if fmt.dtype == dtype else None


def encode(tokens: np.ndarray, fmt: TokenFormat) -> np.ndarray:
    """(n, t, w) float tokens as (n,) rows of fmt.dtype (for fp16: the (n, t, w) float16 array)."""
    if fmt.name == "fp16":
        return tokens.astype(np.float16)
    out = np.empty(len(tokens), fmt.dtype)
    values = tokens.astype(np.float32)
    if fmt.keep:
        values, out["where"] = merge(values, fmt.keep)
    if fmt.base == "fp16":
        out["codes"] = values.astype(np.float16)
    else:
        out["codes"], out["scales"] = quantize(values, fmt)
    return out


def merge(tokens: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, keep + 2, w) [CLS], the `keep` patches farthest from the image's median patch (in patch order) and
    the mean of the others; and (n, keep) which patches were kept. A scene's objects on its plain ground are
    its outlying patches: they keep their own tokens, the ground becomes one."""
    patches = tokens[:, 1:]
    distance = np.linalg.norm(patches - np.median(patches, axis=1, keepdims=True), axis=2)
    order = np.argsort(-distance, axis=1, kind="stable")
    where, rest = np.sort(order[:, :keep], axis=1), order[:, keep:]
    kept = np.take_along_axis(patches, where[..., None], axis=1)
    mean = np.take_along_axis(patches, rest[..., None], axis=1).mean(axis=1, keepdims=True)
    return np.concatenate([tokens[:, :1], kept, mean], axis=1), where.astype(np.uint16)


def quantize(values: np.ndarray, fmt: TokenFormat) -> tuple[np.ndarray, np.ndarray]:
    """(n, s, w) float32 values as fmt's codes (int8, or int4 two to a byte) and fp16 scales per group."""
    n, s, w = values.shape
    groups = values.reshape(n, s, w // fmt.group, fmt.group)
    top = 127 if fmt.base == "int8" else 7
    # the scale as stored (fp16), so that codes and scale decode to the nearest representable value
    scales = (np.abs(groups).max(axis=-1) / top).astype(np.float16)
    divisor = np.where(scales > 0, scales, 1).astype(np.float32)[..., None]
    codes = np.clip(np.rint(groups / divisor), -top, top).reshape(n, s, w)
    if fmt.base == "int8":
        return codes.astype(np.int8), scales
    biased = (codes + 8).astype(np.uint8)  # offset by 8 into 1..15; channel 2i in the low nibble, 2i + 1 in the high
    return biased[..., 0::2] | (biased[..., 1::2] << 4), scales


def decode(rows: np.ndarray, fmt: TokenFormat) -> np.ndarray:
    """encode's rows back as (n, t, w) tokens: float16 as stored for fp16, float32 for the others (a merged
    row's other patches each get their mean)."""
    if fmt.name == "fp16":
        return rows
    values = _values(rows, fmt)
    if not fmt.keep:
        return values
    n, (t, w) = len(rows), fmt.shape
    out = np.empty((n, t, w), np.float32)
    out[:, 0], out[:, 1:] = values[:, 0], values[:, -1:]
    np.put_along_axis(out[:, 1:], rows["where"].astype(np.int64)[..., None], values[:, 1:-1], axis=1)
    return out


def _values(rows: np.ndarray, fmt: TokenFormat) -> np.ndarray:
    """(n, stored, w) float32 token values of encoded rows, before any merged patches are put back."""
    n, s, w = len(rows), fmt.stored, fmt.shape[1]
    if fmt.base == "fp16":
        return rows["codes"].astype(np.float32)
    if fmt.base == "int8":
        codes = rows["codes"].astype(np.float32)
    else:
        packed = rows["codes"]
        codes = np.empty((n, s, w), np.float32)
        codes[..., 0::2] = packed & 15
        codes[..., 1::2] = packed >> 4
        codes -= 8
    scales = rows["scales"].astype(np.float32)[..., None]
    return (codes.reshape(n, s, w // fmt.group, fmt.group) * scales).reshape(n, s, w)
