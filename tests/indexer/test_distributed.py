"""Ray build: the same ids, vectors, tokens and failures as the single-process build (local Ray, 2 CPUs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.build import BuildOptions, build_or_add
from indexer.distributed import RayOptions
from indexer.encoder import DualEncoder
from indexer.store import Index
from training.scenes import write_scenes

ray = pytest.importorskip("ray", reason="the `distributed` extra (installed by make test)")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _failures(index_dir: Path) -> list[str]:
    index = Index.open(index_dir)
    path = index.folder / "failures.jsonl"
    return sorted(json.loads(line)["path"] for line in path.read_text().splitlines()) if path.is_file() else []


def test_ray_build_equals_the_single_process_build(encoder: DualEncoder, tmp_path: Path, local_ray: None) -> None:
    src = tmp_path / "src"
    write_scenes(src, 30, seed=111, twins=True)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # skipped and reported by both
    exif = Image.Exif()
    exif[306] = "2022:11:05 17:45:10"
    Image.new("RGB", (48, 48), "red").save(src / "photo.jpg", "JPEG", exif=exif.tobytes())  # its date travels too
    build_or_add(src, tmp_path / "local", encoder, BuildOptions(workers=0, batch_size=16, shard_size=24), "build")
    opts = BuildOptions(workers=0, batch_size=16, shard_size=24, ray=RayOptions())
    build_or_add(src, tmp_path / "ray", encoder, opts, "build")
    local, distributed = Index.open(tmp_path / "local"), Index.open(tmp_path / "ray")
    ids = local.ids()
    assert len(ids) == 61 and np.array_equal(ids, distributed.ids())
    assert [r["path"] for r in local.metadata(ids)] == [r["path"] for r in distributed.metadata(ids)]
    assert local.field(ids, "taken") == distributed.field(ids, "taken") and "2022-11-05T17:45:10" in local.field(
        ids, "taken")
    np.testing.assert_allclose(distributed.vectors(ids), local.vectors(ids), atol=1e-5)
    np.testing.assert_allclose(distributed.tokens(ids).astype(np.float32), local.tokens(ids).astype(np.float32),
                               atol=2e-2)
    assert _failures(tmp_path / "ray") == _failures(tmp_path / "local") == [str(src / "broken.png")]
