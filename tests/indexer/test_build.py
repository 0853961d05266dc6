"""Batch indexer: build, add, remove, versions, failures report, resume after kill -9, atomic publish."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from imsearch.cli import app
from indexer.build import BuildError, BuildOptions, build_or_add, remove
from indexer.durable import save_faiss, save_npy
from indexer.encoder import DualEncoder, create_embedded
from indexer.layout import STAGING
from indexer.rows import Column
from indexer.store import Index, UnknownImage
from indexer.versions import current_version, list_versions
from tests.indexer.badfiles import awkward_files, broken_files
from training.scenes import write_scenes

OPTS = BuildOptions(batch_size=16, workers=0, shard_size=24)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    write_scenes(folder, 30, seed=21, twins=True)  # 60 images
    return folder


def _check_consistent(index: Index) -> None:
    live = index.ids()
    assert len(live) == len(index) == index.faiss.ntotal
    paths = [m["path"] for m in index.metadata(live)]
    assert len(set(paths)) == len(paths), "each image exactly once"


def test_build_indexes_a_scenes_manifest_with_captions(corpus: Path, tmp_path: Path, encoder: DualEncoder) -> None:
    report = build_or_add(corpus / "captions.jsonl", tmp_path / "idx", encoder, OPTS, "build")
    assert (report.indexed, report.skipped, report.index_type, report.version) == (60, 0, "flat", "v000001")
    index = Index.open(tmp_path / "idx")
    _check_consistent(index)
    manifest = index.manifest
    assert manifest["model"]["id"] == encoder.model_id and manifest["dim"] == encoder.embed_dim
    assert manifest["count"] == 60 and manifest["counts"]["indexed"] == 60 and manifest["created"]
    rows = index.metadata(index.ids()[:3])
    assert all(r["caption"] and len(r["sha256"]) == 64 and r["width"] == 64 for r in rows)
    assert index.metadata(index.ids()[2::-1], ["path", "caption"]) == [
        {"path": r["path"], "caption": r["caption"]} for r in rows[::-1]]
    assert index.tokens(index.ids()[:2]).shape == (2, *encoder.token_shape)
    assert index.tokens(index.ids()[:2]).dtype == np.float16
    assert not any((tmp_path / "idx" / STAGING).iterdir())  # staging cleaned after publish


def test_search_agrees_with_exact_search_and_stored_vectors(corpus: Path, tmp_path: Path,
                                                            encoder: DualEncoder) -> None:
    build_or_add(corpus, tmp_path / "idx", encoder, OPTS, "build")
    index = Index.open(tmp_path / "idx")
    rows = index.metadata(index.ids())
    query = encoder.encode_texts([rows[0]["caption"] or "a red circle"])
    scores, ids = index.search(query, 10)
    live = index.ids()
    exact = index.vectors(live) @ query[0]
    assert list(ids[0]) == list(live[np.argsort(-exact, kind="stable")[:10]])
    np.testing.assert_allclose(scores[0], np.sort(exact)[::-1][:10], atol=1e-5)
    image = encoder.encode_images([__import__("PIL.Image").Image.open(rows[5]["path"])])
    assert index.search(image, 1)[1][0, 0] == rows[5]["id"]  # an indexed image finds itself


def test_search_device_routes_deep_searches_to_the_cpu_copy(corpus: Path, tmp_path: Path,
                                                           encoder: DualEncoder) -> None:
    import faiss

    from indexer.ann import GPU_MAX_K

    build_or_add(corpus, tmp_path / "idx", encoder, OPTS, "build")
    index = Index.open(tmp_path / "idx")
    assert index.use_device("cpu") == "cpu" and index.search_device == "cpu"
    query = encoder.encode_texts(["a red circle"])
    expected = index.search(query, 5)[1]
    # stand-in for a GPU copy (a real one needs faiss-gpu): an index that knows one image only
    only = index.ids()[-1:]
    index._on_gpu = faiss.IndexIDMap2(faiss.IndexFlatIP(index.dim))
    index._on_gpu.add_with_ids(index.vectors(only), only)
    assert list(index.search(query, 5)[1][0]) == [only[0], -1, -1, -1, -1]  # shallow: the copy answers
    deep = index.search(query, GPU_MAX_K + 1)[1][0]  # beyond faiss-gpu's k limit: the CPU index answers
    assert list(deep[:5]) == list(expected[0])
    if not index.use_device("auto").startswith("cuda"):
        assert index._on_gpu is None and list(index.search(query, 5)[1][0]) == list(expected[0])


def test_broken_and_awkward_files_never_stop_a_build(tmp_path: Path, encoder: DualEncoder) -> None:
    broken = broken_files(tmp_path / "src")
    awkward = awkward_files(tmp_path / "src")
    report = build_or_add(tmp_path / "src", tmp_path / "idx", encoder, OPTS, "build")
    assert report.indexed == len(awkward) and report.skipped == len(broken)
    index = Index.open(tmp_path / "idx")
    failures = [json.loads(x) for x in (index.folder / "failures.jsonl").read_text().splitlines()]
    reasons = {Path(f["path"]).name: f["reason"] for f in failures}
    assert set(reasons) == set(broken)
    for name, needle in broken.items():
        assert needle in reasons[name]
    sizes = {Path(r["path"]).name: (r["width"], r["height"]) for r in index.metadata(index.ids())}
    assert sizes == awkward  # EXIF rotation applied before measuring


def test_add_dedupes_by_content_and_remove_round_trips(corpus: Path, tmp_path: Path, encoder: DualEncoder) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    first.mkdir(), second.mkdir()
    pngs = sorted(corpus.glob("*.png"))
    for p in pngs[:40]:
        os.link(p, first / p.name)
    for p in pngs[30:]:  # 10 overlap with the first batch, under other names
        (second / f"copy_{p.name}").write_bytes(p.read_bytes())
    root = tmp_path / "idx"
    build_or_add(first, root, encoder, OPTS, "build")
    before = Index.open(root)
    report = build_or_add(second, root, encoder, OPTS, "add")
    assert (report.indexed, report.duplicates, report.count) == (20, 10, 60)
    after = Index.open(root)
    _check_consistent(after)
    assert set(before.ids()) < set(after.ids())  # old ids are stable
    again = build_or_add(second, root, encoder, OPTS, "add")
    assert (again.indexed, again.duplicates, again.count, again.version) == (0, 30, 60, after.version)
    victims = [str(first / pngs[0].name)]
    gone = remove(root, paths=victims, ids=[int(after.ids()[-1])])
    assert (gone.removed, gone.count) == (2, 58)
    final = Index.open(root)
    _check_consistent(final)
    assert victims[0] not in {m["path"] for m in final.metadata(final.ids())}
    removed = int(after.ids()[-1])
    with pytest.raises(UnknownImage):  # a removed id names no image, though its rows stay in the shards
        final.metadata([int(final.ids()[0]), removed])
    with pytest.raises(BuildError, match="nothing to remove"):
        remove(root, ids=[10_000])
    assert list_versions(root) == ["v000001", "v000002", "v000003"]
    remove(root, ids=[int(final.ids()[0])])
    assert list_versions(root) == ["v000002", "v000003", "v000004"]  # only the newest 3 are kept


def test_add_with_another_model_is_refused(corpus: Path, tmp_path: Path, encoder: DualEncoder) -> None:
    build_or_add(corpus, tmp_path / "idx", encoder, OPTS, "build")
    other = create_embedded(seed=9)
    with pytest.raises(BuildError, match="was built with model"):
        build_or_add(corpus, tmp_path / "idx", other, OPTS, "add")


def test_cli_build_json_and_clear_errors(corpus: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["index", "build", str(corpus), "--index", str(tmp_path / "idx"), "--workers", "0",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["indexed"] == 60 and summary["skipped"] == 0 and summary["index_type"] == "flat"
    assert summary["version"] == "v000001" and summary["images_per_s"] > 0
    missing = runner.invoke(app, ["index", "build", str(tmp_path / "nope"), "--index", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = runner.invoke(app, ["index", "build", str(corpus), "--index", str(blocker / "idx")])
    assert unwritable.exit_code == 2 and "cannot write the index" in unwritable.output


def test_a_build_never_replaces_an_index_unless_told_and_ids_are_never_reused(corpus: Path, tmp_path: Path,
                                                                              encoder: DualEncoder) -> None:
    out = tmp_path / "idx"
    first = build_or_add(corpus, out, encoder, OPTS, "build")
    few = tmp_path / "few"
    few.mkdir()
    for png in sorted(corpus.glob("*.png"))[:5]:
        (few / png.name).write_bytes(png.read_bytes())
    with pytest.raises(BuildError, match="already holds an index.*--replace"):
        build_or_add(few, out, encoder, OPTS, "build")
    assert len(Index.open(out)) == 60 and current_version(out) == first.version
    replaced = build_or_add(few, out, encoder, BuildOptions(batch_size=16, workers=0, replace=True), "build")
    index = Index.open(out)
    assert len(index) == 5 and replaced.version == "v000002"
    assert int(index.ids().min()) >= int(Index.open(out, first.version).ids().max()) + 1  # a new collection, new ids
    result = CliRunner().invoke(app, ["index", "build", str(few), "--index", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and "--replace" in result.output and "Traceback" not in result.output


def test_an_empty_source_is_refused_and_skipped_files_are_named(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing here\n")
    runner = CliRunner()
    for source in (tmp_path / "empty", tmp_path / "empty.txt"):
        result = runner.invoke(app, ["index", "build", str(source), "--index", str(tmp_path / "idx")])
        assert result.exit_code == 2 and "no images" in result.output, result.output
    assert not (tmp_path / "idx" / "CURRENT").exists()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for png in sorted(corpus.glob("*.png"))[:3]:
        (mixed / png.name).write_bytes(png.read_bytes())
    (mixed / "broken.png").write_bytes(b"\x89PNG not really")
    (mixed / "empty.jpg").write_bytes(b"")
    result = runner.invoke(app, ["index", "build", str(mixed), "--index", str(tmp_path / "idx"), "--workers", "0",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    listed = tmp_path / "idx" / "versions" / "v000001" / "failures.jsonl"
    flat = " ".join(result.output.split())  # the console may wrap long lines
    assert f"all listed in {listed}" in flat and "broken.png" in flat and "empty.jpg" in flat
    assert len(listed.read_text().splitlines()) == 2
    report = json.loads(runner.invoke(app, ["index", "add", str(mixed), "--index", str(tmp_path / "idx"),
                                            "--device", "cpu", "--json"]).stdout.strip().splitlines()[-1])
    assert report["first_failures"] and all({"path", "reason"} <= set(f) for f in report["first_failures"])


def test_a_typo_in_the_index_type_or_device_is_refused_before_encoding(corpus: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    typo = runner.invoke(app, ["index", "build", str(corpus), "--index", str(tmp_path / "idx"), "--index-type", "ivfp"])
    assert typo.exit_code == 2 and "ivfp" in typo.output and not (tmp_path / "idx").exists()
    cmd = [sys.executable, "-m", "imsearch.cli", "index", "build", str(corpus), "--index", str(tmp_path / "idx"),
           "--device", "gpu"]
    device = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert device.returncode == 2 and "Traceback" not in device.stderr
    assert device.stderr.strip().count("\n") == 0 and "unknown device 'gpu'" in device.stderr


def _build_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "imsearch.cli", "index", "build", str(src), "--index", str(out), "--workers", "0",
            "--batch-size", "8", "--shard-size", "16", "--device", "cpu", "--json"]


@pytest.mark.slow
def test_kill_minus_nine_then_resume_indexes_each_image_once(tmp_path: Path) -> None:
    write_scenes(tmp_path / "src", 150, seed=33, twins=True)  # 300 images, 19 shards
    out = tmp_path / "idx"
    proc = subprocess.Popen(_build_cmd(tmp_path / "src", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    shards: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        shards = [p for p in out.glob(f"{STAGING}/*/shards/*") if not p.name.startswith(".")]
        if len(shards) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = {p.name for p in out.glob(f"{STAGING}/*/shards/*") if not p.name.startswith(".")}
    assert len(survivors) >= 3
    done = subprocess.run(_build_cmd(tmp_path / "src", out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["indexed"] == 300
    index = Index.open(out)
    _check_consistent(index)
    assert len(index) == 300
    assert survivors <= {s["name"] for s in index.manifest["shards"]}  # resumed, not redone


def test_readers_see_whole_versions_while_publishing(corpus: Path, tmp_path: Path, encoder: DualEncoder) -> None:
    root = tmp_path / "idx"
    build_or_add(corpus, root, encoder, OPTS, "build")
    ids = [int(i) for i in Index.open(root).ids()]
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            index = Index.open(root)
            rows = sum(s["rows"] for s in index.manifest["shards"]) - len(index.deleted)
            if not (rows == len(index) == index.faiss.ntotal == len(index.ids())):
                errors.append(f"{index.version}: mixed state")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(4):
            remove(root, ids=[ids[i]], opts=BuildOptions(keep_versions=2))
    finally:
        stop.set()
        reader.join()
    assert not errors
    assert len(Index.open(root)) == 56


def test_unknown_ids_are_refused(corpus: Path, tmp_path: Path, encoder: DualEncoder) -> None:
    build_or_add(corpus, tmp_path / "idx", encoder, OPTS, "build")
    index = Index.open(tmp_path / "idx")
    with pytest.raises(UnknownImage):
        index.tokens([12345])
    with pytest.raises(UnknownImage) as refused:
        index.metadata([int(index.ids()[0]), -1])
    assert refused.value.args == (-1,)  # the unknown one is named
    with pytest.raises(UnknownImage):  # beyond int64: no such id, not an OverflowError
        index.vectors([int(index.ids()[0]), 2**70])


@pytest.mark.parametrize("array", [
    pa.array(["a/b.png", None, "", "café ☕", "z" * 300]),
    pa.array(["skipped", "x", None, "ü"]).slice(1),  # an array that starts inside its buffers
    pa.array([3, 64, -1], pa.int32()),
    pa.array([3, None, 7], pa.int32()),
    pa.array([0.5, 2.0]),
])
def test_metadata_columns_read_by_row_as_arrow_would(array: pa.Array) -> None:
    rows = np.array([len(array) - 1, 0, *range(len(array))])
    assert Column(array).take(rows) == array.take(pa.array(rows)).to_pylist()
    many = np.arange(Column.FEW + 1) % len(array)  # read by Arrow itself
    assert Column(array).take(many) == array.take(pa.array(many)).to_pylist()


def test_save_npy_writes_chunks_as_numpy_would_write_their_concatenation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((n, 5, 3)).astype(np.float16) for n in (2, 0, 4)]
    chunks.append(rng.standard_normal((3, 3, 5)).astype(np.float16).transpose(0, 2, 1))  # not contiguous
    for name, value, whole in [("chunks", chunks, np.concatenate(chunks)),
                               ("array", chunks[0], chunks[0]), ("empty", np.zeros((0, 0), np.float32), None)]:
        save_npy(tmp_path / f"{name}.npy", value)
        expected = io.BytesIO()
        np.save(expected, value if whole is None else whole)
        assert (tmp_path / f"{name}.npy").read_bytes() == expected.getvalue(), name
    with pytest.raises(ValueError, match="trailing shape"):
        save_npy(tmp_path / "bad.npy", [np.zeros((1, 2)), np.zeros((1, 3))])


def test_index_files_are_written_through_python_so_a_full_disk_is_an_enospc(tmp_path: Path) -> None:
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    index.add_with_ids(np.eye(4, dtype=np.float32), np.array([7, 8, 9, 10], np.int64))
    save_faiss(tmp_path / "index.faiss", index)
    back = faiss.read_index(str(tmp_path / "index.faiss"))
    assert back.search(np.eye(4, dtype=np.float32)[2:3], 1)[1][0, 0] == 9
    for write in (lambda path: save_faiss(path, index), lambda path: save_npy(path, np.ones(100_000))):
        with pytest.raises(OSError) as info:  # /dev/full: every write fails as on a full disk
            write(Path("/dev/full"))
        assert info.value.errno == errno.ENOSPC


def test_a_resumed_run_ignores_a_marked_shard_folder_killed_before_its_rename(tmp_path: Path) -> None:
    from indexer.writer import DONE, read_staged

    unfinished = tmp_path / "shards" / ".a420f68b4a4c-00005.tmp"  # the marker is written before the rename
    unfinished.mkdir(parents=True)
    (unfinished / DONE).write_text('{"rows": 32, "processed": [], "sha256": [], "failures": [], "files": {}}')
    assert read_staged(tmp_path) == []
