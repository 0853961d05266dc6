"""Indexer, store: a shard's files read by row — arrays by pread, metadata columns through numpy views."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.integrity import corrupt, npy_layout, read_npy, reading
from indexer.layout import feature_file
from indexer.tokens import TokenFormat, format_of


class Rows:
    """One shard array (emb.npy or tok.npy) read by rows with pread on a descriptor held open.

    Not a memory map: a mapped page past the end of a file that shrank kills the process with
    SIGBUS, where a read there comes back short and raises IndexCorrupt naming the file. The open
    descriptor keeps the file as it was even after its version is collected, as a mapping did.
    """

    def __init__(self, path: Path, dtype: type | None, root: Path):
        with reading(path):
            self.layout = npy_layout(path)
        if dtype is not None and self.layout.dtype != np.dtype(dtype):
            raise corrupt(path, f"holds {self.layout.dtype}, not {np.dtype(dtype)}")
        self.path, self.root = path, root
        self.row_shape = self.layout.shape[1:]
        self.row_bytes = math.prod(self.row_shape) * self.layout.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.layout.shape[0]

    def read(self, row: int, out: memoryview) -> None:
        """Consecutive rows from `row` into `out` (bytes of whole rows)."""
        start = self.layout.offset + row * self.row_bytes
        done = 0
        while done < len(out):
            got = os.preadv(self.fd, [out[done:]], start + done)
            if got == 0:
                size = os.fstat(self.fd).st_size
                raise corrupt(self.path, f"is truncated ({size} of {self.layout.size} bytes: it shrank while "
                                         f"served); run `imsearch index verify --index {self.root}`")
            done += got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Shard:
    """One shard of a version: its ids, and its arrays read by row."""

    name: str
    ids: np.ndarray  # (n,) int64
    embeddings: Rows  # (n, d) float32
    tokens: Rows  # (n, t, w) float16, or (n,) quantized records (indexer.tokens)
    token_format: TokenFormat | None  # None for a shard of failures only
    features: dict[str, tuple[Rows, TokenFormat]] = field(default_factory=dict)  # rerank tiers' own (feat-NAME.npy)

    def files(self) -> list[Rows]:
        return [self.embeddings, self.tokens, *(rows for rows, _ in self.features.values())]

    def close(self) -> None:
        for rows in self.files():
            rows.close()


def _stored(path: Path, root: Path, n: int) -> tuple[Rows, TokenFormat | None]:
    """Token rows (of the dual encoder or a tier) held open with their format: None only when `n` is 0."""
    rows = Rows(path, None, root)
    fmt = format_of(rows.layout.dtype, rows.row_shape)
    if fmt is None and n:
        rows.close()
        raise corrupt(path, f"holds {rows.layout.dtype} rows of shape {rows.row_shape}, which are "
                            "tokens in none of the stored formats")
    return rows, fmt


def open_shard(folder: Path, root: Path, features: tuple[str, ...] = ()) -> Shard:
    """A shard folder opened: ids read whole, arrays held open (the dual encoder's tokens, and each named
    feature set of a shard with rows), their row counts checked against the ids."""
    ids = read_npy(folder / "ids.npy")
    tokens, fmt = _stored(folder / "tok.npy", root, len(ids))
    shard = Shard(folder.name, ids, Rows(folder / "emb.npy", np.float32, root), tokens, fmt if len(ids) else None)
    try:
        for name in features if len(ids) else ():  # a shard of failures only writes none
            rows, feat = _stored(folder / feature_file(name), root, len(ids))
            assert feat is not None
            shard.features[name] = (rows, feat)
        for rows in shard.files():
            if len(rows) != len(ids):
                raise corrupt(rows.path, f"holds {len(rows)} rows where ids.npy holds {len(ids)}")
    except BaseException:
        shard.close()
        raise
    return shard


def read_meta(path: Path) -> pa.Table:
    """A shard's meta.parquet, read whole."""
    # through a file object closed here (given a path, Arrow's reader closes the file on a thread of
    # its own, some time later) and on this thread: a process that read with Arrow's pool aborted at
    # exit, up to one time in four ("terminate called without an active exception", pyarrow 26)
    with reading(path), path.open("rb") as fh:
        return pq.read_table(fh, use_threads=False)


class Column:
    """One metadata column, read by row numbers through numpy views of its Arrow buffers.

    A page of hits reads a few values of two columns on every search. Arrow's `take` dispatches
    through its compute registry, whose code is cold by the time a search has run its forward pass:
    0.2 ms for ten hits in the service, against 0.05 ms in a hot loop (profiled). Slicing the
    strings out of the buffers runs a few lines of numpy instead. Past a few dozen rows Arrow's
    per-row work is the cheaper (4x for 1,000 rows), so larger reads go to it.
    """

    FEW = 32  # rows up to which slicing beats Arrow's take (measured: 8 vs 16 us at 10, 49 vs 22 at 100)

    def __init__(self, array: pa.Array):
        self.array = array
        self.valid = np.asarray(array.is_valid()) if array.null_count else None
        self.offsets: np.ndarray | None = None
        self.values: np.ndarray | None = None
        if pa.types.is_string(array.type):
            _, offsets, data = array.buffers()
            self.offsets = np.frombuffer(offsets, np.int32, len(array) + 1, array.offset * 4)
            self.data = memoryview(data) if data is not None else memoryview(b"")
        elif (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)) and not array.null_count:
            self.values = array.to_numpy()

    def take(self, rows: np.ndarray) -> list[Any]:
        """The values at `rows`, as Python objects (None where null)."""
        if len(rows) > self.FEW or (self.offsets is None and self.values is None):
            return list(self.array.take(pa.array(rows)).to_pylist())
        if self.values is not None:
            return list(self.values[rows].tolist())
        assert self.offsets is not None
        starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        out: list[Any] = [str(self.data[a:b], "utf-8") for a, b in zip(starts, ends, strict=True)]
        if self.valid is not None:
            out = [value if ok else None for value, ok in zip(out, self.valid[rows].tolist(), strict=True)]
        return out
