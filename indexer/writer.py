"""Indexer, write: buffer encoded rows and flush them as immutable, atomically completed shards."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.durable import FileDigest, file_digest, fsync_tree, save_npy
from indexer.integrity import corrupt
from indexer.layout import feature_file
from indexer.tokens import TokenFormat, encode, token_format

META_SCHEMA = pa.schema([
    ("id", pa.int64()), ("path", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("caption", pa.string()), ("extra", pa.string()), ("bytes", pa.int64()),
])
DONE = "shard.json"


@dataclass
class Row:
    """One indexed image's metadata (its vectors travel in the writer's arrays)."""

    path: str
    sha256: str
    width: int
    height: int
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    size: int | None = None  # the file's bytes (None: not known, as in shards written before it was recorded)


@dataclass
class Failure:
    path: str
    reason: str

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "reason": self.reason})


@dataclass
class StagedShard:
    """A completed shard in a staging folder."""

    folder: Path
    ids: np.ndarray
    processed: list[str]
    failures: list[Failure]
    sha256: list[str]


TMP_SUFFIX = ".tmp"  # a shard is written as .NAME.tmp, then renamed to NAME


def _temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def read_staged(staging: Path) -> list[StagedShard]:
    """Completed shards of an interrupted run (a shard without its marker is ignored and redone)."""
    shards = []
    folder = staging / "shards"
    if not folder.is_dir():
        return []
    for path in sorted(folder.iterdir()):
        marker = path / DONE
        # a temporary folder holds its marker before the rename that completes it: a kill in between
        # leaves a marked folder that is not a shard
        if _temporary(path) or not marker.is_file():
            continue
        info = json.loads(marker.read_text())
        failures = [Failure(f["path"], f["reason"]) for f in info["failures"]]
        shards.append(StagedShard(path, np.load(path / "ids.npy"), info["processed"], failures, info["sha256"]))
    return shards


class ShardWriter:
    """Accumulates up to `shard_size` rows, then writes ids, embeddings, tokens and metadata.

    A shard is written into a temporary folder and renamed when complete, so a kill at any moment
    leaves only whole shards behind; `processed` records every source path the shard accounts for
    (indexed, failed or duplicate), which is what a resumed run skips.
    """

    def __init__(self, staging: Path, prefix: str, next_id: int, shard_size: int, first_seq: int = 0,
                 tokens: TokenFormat | None = None, features: dict[str, TokenFormat] | None = None):
        self.tokens = tokens  # how tok.npy stores them (None: fp16)
        self.features = features or {}  # rerank tiers' own image features (feat-NAME.npy) and how they are stored
        self.folder = staging / "shards"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix, self.next_id, self.shard_size, self.seq = prefix, next_id, shard_size, first_seq
        self.written: list[StagedShard] = []
        self._reset()

    def _reset(self) -> None:
        self.rows: list[Row] = []
        self.emb: list[np.ndarray] = []
        self.tok: list[np.ndarray] = []
        self.feat: dict[str, list[np.ndarray]] = {name: [] for name in self.features}
        self.processed: list[str] = []
        self.failures: list[Failure] = []

    def add(self, rows: list[Row], emb: np.ndarray, tok: np.ndarray, processed: list[str],
            failures: list[Failure], features: dict[str, np.ndarray] | None = None) -> None:
        """Add one encoded batch (with each of the writer's feature sets for its rows); flushes when the
        shard is full."""
        self.rows += rows
        if rows:
            self.emb.append(emb.astype(np.float32))
            self.tok.append(encode(tok, self.tokens or token_format("fp16", tok.shape[1:])))
            for name, fmt in self.features.items():
                self.feat[name].append(encode((features or {})[name], fmt))
        self.processed += processed
        self.failures += failures
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.processed:
            return
        name = f"{self.prefix}-{self.seq:05d}"
        tmp = self.folder / f".{name}{TMP_SUFFIX}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ids = np.arange(self.next_id, self.next_id + len(self.rows), dtype=np.int64)
        files = self._write_arrays(tmp, ids)
        pq.write_table(_meta_table(ids, self.rows), tmp / "meta.parquet")
        files["meta.parquet"] = file_digest(tmp / "meta.parquet")
        # the files' sizes and sha256, hashed once here: every version that links the shard copies them
        marker = {"rows": len(ids), "processed": self.processed, "sha256": [r.sha256 for r in self.rows],
                  "failures": [{"path": f.path, "reason": f.reason} for f in self.failures], "files": files}
        (tmp / DONE).write_text(json.dumps(marker))
        fsync_tree(tmp)
        os.rename(tmp, self.folder / name)
        self.written.append(StagedShard(self.folder / name, ids, self.processed, self.failures,
                                        [r.sha256 for r in self.rows]))
        self.next_id += len(ids)
        self.seq += 1
        self._reset()

    def _write_arrays(self, folder: Path, ids: np.ndarray) -> dict[str, FileDigest]:
        """Write ids, embeddings and tokens; returns each file's size and sha256."""
        files = {"ids.npy": save_npy(folder / "ids.npy", ids)}
        if self.emb:
            files["emb.npy"] = save_npy(folder / "emb.npy", self.emb)  # written chunk by chunk, not concatenated
            files["tok.npy"] = save_npy(folder / "tok.npy", self.tok)
            for name, chunks in self.feat.items():
                files[feature_file(name)] = save_npy(folder / feature_file(name), chunks)
        else:  # a shard of failures only still records what it processed
            files["emb.npy"] = save_npy(folder / "emb.npy", np.zeros((0, 0), np.float32))
            files["tok.npy"] = save_npy(folder / "tok.npy", np.zeros((0, 0, 0), np.float16))
        return files


def recorded_files(folder: Path) -> dict[str, FileDigest]:
    """Sizes and sha256 of a completed shard's files as its writer recorded them in its marker
    ({} for a shard written before they were recorded)."""
    marker = folder / DONE
    try:
        files = json.loads(marker.read_bytes()).get("files", {})
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: JSON that is not an object
        raise corrupt(marker, f"cannot be read ({exc})") from None
    return files if isinstance(files, dict) else {}


def _meta_table(ids: np.ndarray, rows: list[Row]) -> pa.Table:
    return pa.table({
        "id": ids,
        "path": [r.path for r in rows],
        "sha256": [r.sha256 for r in rows],
        "width": pa.array([r.width for r in rows], pa.int32()),
        "height": pa.array([r.height for r in rows], pa.int32()),
        "caption": [r.caption for r in rows],
        "extra": [json.dumps(r.extra) if r.extra else None for r in rows],
        "bytes": pa.array([r.size for r in rows], pa.int64()),
    }, schema=META_SCHEMA)
