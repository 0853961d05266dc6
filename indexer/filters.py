"""Indexer, search: metadata filters, evaluated once per index version into the set of ids a search may
return, which FAISS then searches inside (never a post-filter that returns fewer than k)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STORED = ("path", "caption", "width", "height", "bytes", "sha256")  # columns of every index's metadata
RANGE_OPS = {"gte": pc.greater_equal, "gt": pc.greater, "lte": pc.less_equal, "lt": pc.less}


class BadFilter(ValueError):
    """A filter that names an unknown field or compares a field with a value of another kind."""


@dataclass(frozen=True)
class Filter:
    """Conditions on the stored metadata, all of which a hit meets."""

    path_glob: str | None = None  # shell-style: * and ? match any characters (/ included), [abc] a class
    caption_contains: str | None = None  # case-insensitive substring
    where: Mapping[str, Any] = field(default_factory=dict)  # FIELD: VALUE, or FIELD: {gte, gt, lte, lt: VALUE}

    def key(self) -> str:
        return json.dumps([self.path_glob, self.caption_contains, dict(self.where)], sort_keys=True)

    @property
    def empty(self) -> bool:
        return self.path_glob is None and self.caption_contains is None and not self.where


@dataclass
class Selection:
    """The live ids a filtered search may return (sorted), and the FAISS selector over them."""

    ids: np.ndarray
    bitmap: np.ndarray  # one bit per id up to the largest, little-endian bit order (IDSelectorBitmap's)
    share: float  # the selected fraction of the live images: how much wider the ANN must look
    vectors: np.ndarray | None = None  # the selected ids' vectors, once read for an exact search

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id (any shape; -1 for none) is in the selection."""
        inside = (ids >= 0) & (ids < len(self.bitmap) * 8)
        safe = np.where(inside, ids, 0)
        return inside & ((self.bitmap[safe >> 3] >> (safe & 7)) & 1).astype(bool)

    @property
    def selector(self) -> faiss.IDSelector:
        # built per call: the selector keeps a pointer into `bitmap`, which this object keeps alive
        return faiss.IDSelectorBitmap(len(self.bitmap) * 8, faiss.swig_ptr(self.bitmap))


SPECIAL = set("\\.^$*+?{}[]|()")  # what RE2 reads as syntax outside a class


def glob_regex(glob: str) -> str:
    """A shell glob as an anchored RE2 pattern (Arrow's regex dialect)."""
    out, i = ["^"], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := glob.find("]", i + 2)) > 0:
            body = glob[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body[0] == "!" else body) + "]")
            i = end
        else:
            out.append("\\" + c if c in SPECIAL else c)
        i += 1
    return "".join(out) + "$"


def select(meta: pa.Table, extra: Mapping[str, pa.Array], flt: Filter, live: np.ndarray) -> Selection:
    """The live ids (`live`: sorted) whose metadata rows meet every condition of `flt`."""
    mask = pa.array(np.ones(len(meta), bool))
    if flt.path_glob is not None:
        mask = pc.and_kleene(mask, pc.match_substring_regex(meta["path"], glob_regex(flt.path_glob)))
    if flt.caption_contains is not None:
        mask = pc.and_kleene(mask, pc.match_substring(meta["caption"], flt.caption_contains, ignore_case=True))
    for name, condition in flt.where.items():
        column = meta[name] if name in STORED else extra.get(name)
        if column is None:
            known = ", ".join([*STORED, *sorted(extra)])
            raise BadFilter(f"unknown metadata field {name!r} in where; this index has: {known}")
        mask = pc.and_kleene(mask, _condition(name, column, condition))
    chosen = np.asarray(meta["id"].filter(pc.fill_null(mask, False)), np.int64)
    ids = np.intersect1d(chosen, live, assume_unique=True)
    bits = np.zeros(int(ids.max()) + 1 if len(ids) else 1, bool)
    bits[ids] = True
    return Selection(ids, np.packbits(bits, bitorder="little"), len(ids) / max(1, len(live)))


def _condition(name: str, column: Any, condition: Any) -> pa.Array:
    if isinstance(condition, Mapping):
        if not condition or set(condition) - set(RANGE_OPS):
            raise BadFilter(f"where.{name}: a range takes gte, gt, lte and lt, not {sorted(condition)}")
        ops = list(condition.items())
    else:
        ops = [("eq", condition)]
    mask = pa.array(np.ones(len(column), bool))
    for op, value in ops:
        scalar = _scalar(name, column.type, value)
        mask = pc.and_kleene(mask, (pc.equal if op == "eq" else RANGE_OPS[op])(column, scalar))
    return mask


def _scalar(name: str, kind: pa.DataType, value: Any) -> pa.Scalar:
    """The value as a scalar of the column's kind: numbers for numbers, text for text (never coerced)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        if not number or not math.isfinite(value):
            raise BadFilter(f"where.{name} holds numbers; {json.dumps(value)} is not a finite number")
        return pa.scalar(float(value))
    if pa.types.is_string(kind) and isinstance(value, str):
        return pa.scalar(value)
    if pa.types.is_boolean(kind) and isinstance(value, bool):
        return pa.scalar(value)
    raise BadFilter(f"where.{name} holds {'text' if pa.types.is_string(kind) else str(kind)}; "
                    f"{json.dumps(value)} cannot be compared with it")


def extra_columns(extra: pa.Array) -> dict[str, pa.Array]:
    """The `extra` JSON column (a source list's other columns) as one typed array per field: numbers
    where every value given is a number, booleans where every one is a boolean, else text (others null)."""
    rows = [json.loads(v) if v else {} for v in extra.to_pylist()]
    names = sorted({k for row in rows if isinstance(row, dict) for k in row})
    out = {}
    for name in names:
        values = [row.get(name) if isinstance(row, dict) else None for row in rows]
        given = [v for v in values if v is not None]
        if given and all(isinstance(v, bool) for v in given):
            out[name] = pa.array(values, pa.bool_())
        elif given and all(isinstance(v, int | float) and not isinstance(v, bool) for v in given):
            out[name] = pa.array([None if v is None else float(v) for v in values], pa.float64())
        else:
            out[name] = pa.array([v if isinstance(v, str) else None for v in values], pa.string())
    return out
