"""Indexer, store: the names in an index directory — CURRENT, versions/, and each version's files."""

from __future__ import annotations

import re

CURRENT = "CURRENT"
VERSIONS = "versions"
STAGING = "staging"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
DELETED = "deleted.npy"
FAILURES = "failures.jsonl"
SHARDS = "shards"
SHARD_FILES = ("ids.npy", "emb.npy", "tok.npy", "meta.parquet")


def feature_file(name: str) -> str:
    """The shard file of a rerank tier's own image features (e.g. BLIP's vision tower output)."""
    return f"feat-{name}.npy"
FORMAT = 1
VERSION_NAME = re.compile(r"v\d{6,}")
SHARD_NAME = re.compile(r"[\w-][\w.-]*", re.ASCII)  # a folder name, never a path
