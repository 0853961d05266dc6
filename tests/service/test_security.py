"""Security: CORS follows the settings, and no code path loads weights (or anything) with pickle."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.scenes import write_scenes
from service.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("sec")
    write_scenes(root / "src", 6, seed=131, twins=True)
    build_or_add(root / "src" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0), "build")
    settings = Settings(indexes=[str(root / "idx")], rerankers=[], cors_origins=["https://app.example"])
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_cors_allows_only_the_configured_origins(client: TestClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = client.options("/v1/search", headers={"Origin": "https://app.example", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    refused = client.options("/v1/search", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in refused.headers
    simple = client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_no_pickle_loading_anywhere_in_the_code() -> None:
    offenders = []
    for path in [*ROOT.glob("indexer/**/*.py"), *ROOT.glob("reranker/**/*.py"), *ROOT.glob("service/**/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            unsafe_torch = "torch.load(" in line and "weights_only=True" not in line
            if unsafe_torch or re.search(r"\bpickle\.loads?\(|allow_pickle=True", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
    weights = list((ROOT / "models").rglob("*"))
    assert weights and all(p.suffix in {".safetensors", ".json"} for p in weights if p.is_file())
