"""Test helper: an index of scenes whose source list carries extra metadata columns (for filters)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from training.scenes import write_scenes


def index_with_columns(encoder: DualEncoder, root: Path, pairs: int, seed: int,
                       columns: Callable[[int, dict[str, Any]], None] = lambda i, row: None) -> Path:
    """Build root/idx from `pairs` scenes and their twins (in root/src), each listing row changed by
    columns(i, row)."""
    listing = write_scenes(root / "src", pairs, seed=seed, twins=True)
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    for i, row in enumerate(rows):
        columns(i, row)
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_or_add(listing, root / "idx", encoder, BuildOptions(workers=0), "build")
    return root / "idx"
