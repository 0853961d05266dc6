"""Security: CORS follows the settings, writes are closed by default, files are served and read only
where allowed (never through a link), every read and every client is bounded, and no code path loads
anything with pickle."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.store import Index
from service.app import create_app
from service.config import Settings
from tests.service.procs import free_port, serve, terminate, wait_for
from training.scenes import write_scenes

ROOT = Path(__file__).resolve().parents[2]
KEY = {"X-API-Key": "k3y"}
DEEP = "[" * 5000 + "]" * 5000  # nested past the JSON decoders' recursion limit


@pytest.fixture(scope="module")
def built(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 scenes indexed as a folder (no captions), the files copied so tests may swap them."""
    root = tmp_path_factory.mktemp("sec")
    write_scenes(root / "src", 6, seed=131, twins=True)
    (root / "src" / "captions.jsonl").unlink()
    build_or_add(root / "src", root / "idx", encoder, BuildOptions(workers=0), "build")
    (root / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return root


@pytest.fixture(scope="module")
def client(built: Path) -> Iterator[TestClient]:
    settings = Settings(indexes=[str(built / "idx")], rerankers=[], cors_origins=["https://app.example"])
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


def _swap(path: Path, replacement: Path | None = None, content: bytes | None = None) -> bytes:
    """Replace an indexed file by a link to `replacement` or by other bytes; returns the original bytes."""
    original = path.read_bytes()
    path.unlink()
    if replacement is not None:
        path.symlink_to(replacement)
    else:
        path.write_bytes(content or b"")
    return original


def test_an_indexed_file_replaced_by_a_link_or_edited_is_not_served(client: TestClient, built: Path) -> None:
    index = Index.open(built / "idx")
    rows = index.metadata(index.ids()[:3])
    good, linked, edited = (f"/v1/images/{row['id']}" for row in rows)
    assert client.get(good).status_code == 200
    originals = [_swap(Path(rows[1]["path"]), replacement=built / "secret.txt"),
                 _swap(Path(rows[2]["path"]), content=Path(rows[0]["path"]).read_bytes())]
    try:
        for url in (linked, edited, linked + "?thumb=64", edited + "?thumb=64"):
            response = client.get(url)
            assert response.status_code == 404 and b"root:x" not in response.content, url
    finally:
        for row, data in zip(rows[1:], originals, strict=True):
            Path(row["path"]).unlink()
            Path(row["path"]).write_bytes(data)
    assert client.get(linked).status_code == 200 and client.get(edited).status_code == 200


def test_a_folder_of_the_path_replaced_by_a_link_is_not_served(client: TestClient, built: Path) -> None:
    row = Index.open(built / "idx").metadata(Index.open(built / "idx").ids()[:1])[0]
    folder = Path(row["path"]).parent
    moved = folder.with_name("moved")
    folder.rename(moved)
    folder.symlink_to(moved)  # the same files, through a link
    try:
        assert client.get(f"/v1/images/{row['id']}").status_code == 404
    finally:
        folder.unlink()
        moved.rename(folder)


def test_hits_show_paths_relative_to_the_indexed_folder(client: TestClient, built: Path) -> None:
    hits = client.post("/v1/search", json={"text": "a red circle", "k": 3}).json()["hits"]
    assert hits and all(not h["path"].startswith("/") and (built / "src" / h["path"]).is_file() for h in hits)
    knn = client.post("/knn-service", content=json.dumps({"text": "a red circle", "num_images": 2})).json()
    assert all(not item["image_path"].startswith("/") for item in knn)
    settings = Settings(indexes=[str(built / "idx")], rerankers=[], hit_paths="absolute")
    with TestClient(create_app(settings)) as absolute:
        shown = absolute.post("/v1/search", json={"text": "a red circle", "k": 3}).json()["hits"]
    assert [h["path"] for h in shown] == [str(built / "src" / h["path"]) for h in hits]


def test_hit_paths_stay_relative_after_an_add_from_another_folder(tmp_path: Path, encoder: DualEncoder) -> None:
    write_scenes(tmp_path / "first" / "2025" / "june", 4, seed=134)
    write_scenes(tmp_path / "second" / "july", 4, seed=135)
    folder = tmp_path / "idx"
    for source, mode in ((tmp_path / "first", "build"), (tmp_path / "second", "add")):
        build_or_add(source, folder, encoder, BuildOptions(workers=0), mode)
    assert Index.open(folder).manifest["roots"] == [str(tmp_path / "first"), str(tmp_path / "second")]
    with TestClient(create_app(Settings(indexes=[str(folder)], rerankers=[]))) as client:
        paths = {h["path"] for h in client.post("/v1/search", json={"text": "a shape", "k": 8}).json()["hits"]}
    assert paths == {f"2025/june/scene_000000{i}.png" for i in range(4)} | {f"july/scene_000000{i}.png"
                                                                           for i in range(4)}


def test_writes_are_closed_by_default_and_say_how_to_open_them(built: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = {"source": str(built / "src"), "mode": "add"}
    with caplog.at_level(logging.INFO), TestClient(create_app(Settings(indexes=[str(built / "idx")],
                                                                       rerankers=[]))) as closed:
        for response in (closed.delete("/v1/cache"), closed.post("/v1/jobs/index", json=job),
                         closed.get("/v1/jobs")):
            assert response.status_code == 403 and "IMSEARCH_API_KEY" in response.json()["detail"]
    assert any("closed" in r.getMessage() and "IMSEARCH_API_KEY" in r.getMessage() for r in caplog.records)
    caplog.clear()
    opened = Settings(indexes=[str(built / "idx")], rerankers=[], open_writes=True)
    with caplog.at_level(logging.INFO), TestClient(create_app(opened)) as demo:
        assert demo.delete("/v1/cache").status_code == 200
    assert any(r.levelno == logging.WARNING and "ANYONE" in r.getMessage() for r in caplog.records)
    keyed = Settings(indexes=[str(built / "idx")], rerankers=[], api_key="k3y", open_writes=True)
    with TestClient(create_app(keyed)) as guarded:
        assert guarded.delete("/v1/cache").status_code == 401  # a key, once set, is always required
        assert guarded.delete("/v1/cache", headers=KEY).status_code == 200


@pytest.mark.parametrize("route", ["/knn-service", "/metadata", "/v1/search", "/v1/jobs/index"])
def test_json_nested_thousands_deep_is_a_client_error(client: TestClient, route: str) -> None:
    for body in (DEEP, '{"text": ' + DEEP + "}", '{"ids": ' + DEEP + "}"):
        response = client.post(route, content=body, headers={"Content-Type": "application/json", **KEY})
        assert 400 <= response.status_code < 500, (route, response.status_code, response.text[:200])


def test_metadata_takes_a_bounded_number_of_ids(client: TestClient) -> None:
    response = client.post("/metadata", content=json.dumps({"ids": list(range(10_000))}))
    assert response.status_code == 422 and "256" in response.json()["detail"]
    assert client.post("/metadata", content=json.dumps({"ids": list(range(256))})).status_code == 200


def _jobs_client(built: Path, root: Path) -> TestClient:
    settings = Settings(indexes=[str(built / "idx")], rerankers=[], api_key="k3y", job_roots=[str(root)])
    return TestClient(create_app(settings))


def _finished(client: TestClient, job_id: str) -> dict[str, object]:
    return wait_for(lambda: (info := client.get(f"/v1/jobs/{job_id}", headers=KEY).json())["status"]
                    not in ("queued", "running") and info, timeout=60)


def test_a_job_reads_only_regular_files_under_its_roots(built: Path, tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_scenes(root / "batch", 2, seed=132, twins=True)
    write_scenes(outside, 2, seed=133, twins=True)
    (root / "batch" / "link.png").symlink_to(outside / "scene_0000000.png")  # a link out of the root
    fifo = root / "batch" / "pipe.png"
    os.mkfifo(fifo)  # reading it would block for ever
    listing = root / "list.txt"
    listing.write_text(f"batch/scene_0000001.png\n../outside/scene_0000001.png\n{outside / 'scene_0000000_twin.png'}\n"
                       f"/dev/zero\n{fifo}\n{root / 'batch' / 'link.png'}\n")
    jsonl = root / "rows.jsonl"
    rows = [{"path": "/dev/zero"}, {"path": "../outside/scene_0000001_twin.png"}]
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with _jobs_client(built, root) as client:
        before = len(Index.open(built / "idx"))
        for source, job_id in ((root / "batch", "folder"), (listing, "list"), (jsonl, "rows")):
            start = client.post("/v1/jobs/index", headers=KEY, json={"source": str(source), "mode": "add",
                                                                     "job_id": job_id})
            assert start.status_code == 202, start.text
            assert _finished(client, job_id)["status"] in ("succeeded", "failed")
        index = Index.open(built / "idx")
        paths = {row["path"] for row in index.live_rows}
        assert not any(p.startswith(str(outside)) or p.startswith("/dev") for p in paths)
        assert len(index) - before == 4  # the four scenes under the root, once each
        failures = (index.folder / "failures.jsonl").read_text()
        assert "outside the allowed roots" in failures or "link" in failures
        hit_ids = index.ids()
        served = [client.get(f"/v1/images/{i}").content for i in hit_ids]
        assert all(data != (outside / "scene_0000000.png").read_bytes() for data in served)


def _raw(port: int, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send `data` and keep the connection open; (what the server sent, seconds until it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        start, got = time.monotonic(), b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except TimeoutError:
            pass
        return got, time.monotonic() - start


def test_slow_clients_are_cut_off(built: Path) -> None:
    port = free_port()
    server = serve(str(built / "idx"), port, {"IMSEARCH_RERANKERS": "[]", "IMSEARCH_HEADER_TIMEOUT_S": "1",
                                              "IMSEARCH_BODY_TIMEOUT_S": "1"})
    try:
        silent, waited = _raw(port, b"", wait_s=15)
        assert waited < 10 and b"408" in silent  # connected, then nothing
        partial, waited = _raw(port, b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-", wait_s=15)
        assert waited < 10 and b"408" in partial  # headers never completed
        body = b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        dribbled, waited = _raw(port, body, wait_s=15)
        assert waited < 10 and dribbled.startswith(b"HTTP/1.1 408") and b"did not arrive" in dribbled
        whole = b'{"text": "a red circle"}'
        ok = (b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
              + f"Content-Length: {len(whole)}\r\n\r\n".encode() + whole)
        assert _raw(port, ok, wait_s=15)[0].startswith(b"HTTP/1.1 200")
    finally:
        terminate(server)


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
