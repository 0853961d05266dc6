"""Metadata filters inside the search: every kind of condition against exact filtered search on real FAISS."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from indexer.ann import ann_search, build_index, exact_search, plan_index, search_within
from indexer.build import BuildOptions, build_or_add, remove
from indexer.encoder import DualEncoder
from indexer.filters import BadFilter, Filter, Selection, glob_regex
from indexer.store import Index
from tests.listing import index_with_columns

ALBUMS = ("holiday", "work", "family")


@pytest.fixture(scope="module")
def index(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Index:
    """60 scenes with extra columns (album, rating, taken), two of them removed."""
    def columns(i: int, row: dict[str, Any]) -> None:
        row.update(album=ALBUMS[i % 3], rating=i % 5, taken=f"2024-{1 + i % 12:02d}-15")
        if i % 10 == 0:
            row.pop("rating")  # a column some rows lack

    root = index_with_columns(encoder, tmp_path_factory.mktemp("filters"), 30, 61, columns).parent
    remove(root / "idx", ids=[0, 7])
    return Index.open(root / "idx")


def _matches(index: Index, keep: Callable[[dict[str, Any]], bool]) -> np.ndarray:
    rows = index.metadata(index.ids())
    return np.array([r["id"] for r in rows if keep({**r, **json.loads(r["extra"] or "{}")})], np.int64)


def _exact(index: Index, query: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return exact_search(index.vectors(ids), ids, query[None], min(k, len(ids)))[1][0]


CASES: dict[str, tuple[Filter, Callable[[dict[str, Any]], bool]]] = {
    "path glob": (Filter(path_glob="*/scene_00000[1-3]*.png"),
                  lambda r: fnmatch.fnmatchcase(r["path"], "*/scene_00000[1-3]*.png")),
    "caption contains, any case": (Filter(caption_contains="RED"), lambda r: "red" in (r["caption"] or "")),
    "text equal": (Filter(where={"album": "work"}), lambda r: r["album"] == "work"),
    "number range": (Filter(where={"rating": {"gte": 1, "lt": 3}}), lambda r: r.get("rating") in (1, 2)),
    "date range as text": (Filter(where={"taken": {"gt": "2024-03-01", "lte": "2024-06-30"}}),
                           lambda r: "2024-03-01" < r["taken"] <= "2024-06-30"),
    "stored column": (Filter(where={"sha256": {"lt": "8"}}), lambda r: r["sha256"] < "8"),
    "stored number": (Filter(where={"width": 64, "bytes": {"gt": 0}, "rating": 4}),
                      lambda r: r["width"] == 64 and r.get("rating") == 4),
    "all together": (Filter(path_glob="*.png", caption_contains="circle", where={"album": "family", "rating": {
        "lte": 4}}), lambda r: "circle" in r["caption"] and r["album"] == "family" and r.get("rating") is not None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_filtered_search_equals_exact_search_over_the_matching_images(index: Index, case: str) -> None:
    flt, keep = CASES[case]
    wanted = _matches(index, keep)
    assert 0 < len(wanted) < len(index.ids()), "the case must select some images, not all"
    selection = index.select(flt)
    assert np.array_equal(selection.ids, np.sort(wanted))
    query = index.vectors(index.ids()[5:6])[0]
    scores, ids = index.search(query[None], 10, only=selection)
    found = ids[0][ids[0] >= 0]
    assert len(found) == min(10, len(wanted))  # k hits whenever k images match
    assert np.array_equal(found, _exact(index, query, wanted, 10))
    assert np.all(np.diff(scores[0][: len(found)]) <= 1e-6)


def test_no_match_gives_no_hits_and_all_matching_gives_the_unfiltered_answer(index: Index) -> None:
    query = index.vectors(index.ids()[:1])
    _, none = index.search(query, 5, only=index.select(Filter(caption_contains="no such words")))
    assert (none == -1).all()
    everything = index.select(Filter(path_glob="*"))
    assert np.array_equal(everything.ids, index.ids()) and everything.share == 1.0
    assert np.array_equal(index.search(query, 8, only=everything)[1], index.search(query, 8)[1])


def test_removed_images_are_never_selected(index: Index) -> None:
    assert not {0, 7} & set(index.select(Filter(path_glob="*")).ids.tolist())


def test_the_last_filters_are_kept_per_version(index: Index) -> None:
    first = index.select(Filter(where={"album": "holiday"}))
    assert index.select(Filter(where={"album": "holiday"})) is first


@pytest.mark.parametrize(("flt", "message"), [
    (Filter(where={"colour": "red"}), "unknown metadata field 'colour' in where; this index has: path, .*, rating"),
    (Filter(where={"rating": "high"}), "where.rating holds numbers"),
    (Filter(where={"album": 3}), "where.album holds text"),
    (Filter(where={"rating": {"above": 2}}), "a range takes gte, gt, lte and lt"),
    (Filter(where={"width": float("nan")}), "not a finite number"),
])
def test_a_filter_that_cannot_apply_says_why(index: Index, flt: Filter, message: str) -> None:
    with pytest.raises(BadFilter, match=message):
        index.select(flt)


def test_glob_patterns_are_anchored_and_escape_regex_syntax() -> None:
    import re

    pattern = re.compile(glob_regex("/a/b.c(1)/*.jp?g"))
    assert pattern.match("/a/b.c(1)/x/y.jpeg") and not pattern.match("/a/bxc(1)/y.jpeg")
    assert not pattern.match("/z/a/b.c(1)/y.jpeg") and not re.match(glob_regex("*[!a]"), "xa")


def _clustered(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, their cluster, ids that are not positions)."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    cluster = rng.integers(0, 40, n)
    vectors = centres[cluster] + 0.4 * rng.standard_normal((n, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, cluster, np.arange(n, dtype=np.int64) * 3


def _selection(ids: np.ndarray, rows: np.ndarray) -> Selection:
    bits = np.zeros(int(ids[rows].max()) + 1, bool)
    bits[ids[rows]] = True
    return Selection(ids[rows], np.packbits(bits, bitorder="little"), len(rows) / len(ids))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("share", [0.1, 0.5])
def test_an_ann_index_searches_inside_a_selection_with_the_recall_of_exact_filtered_search(kind: str,
                                                                                           share: float) -> None:
    vectors, _, ids = _clustered(20_000)
    rng = np.random.default_rng(4)
    plan = plan_index(len(ids), 32, kind)
    faiss_index = build_index(plan, vectors, ids)
    rows = np.sort(rng.choice(len(ids), int(share * len(ids)), replace=False))
    selection = _selection(ids, rows)
    queries = vectors[rng.choice(len(ids), 40)] + 0.1 * rng.standard_normal((40, 32)).astype(np.float32)
    _, want = exact_search(vectors[rows], ids[rows], queries, 10)
    def exact(rows: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_search(vectors[rows_], ids[rows_], rows, top)

    rows_ = rows
    searches = {"selector": lambda: ann_search(faiss_index, plan, queries, 10, only=selection),
                "search_within": lambda: search_within(faiss_index, plan, queries, 10, selection, exact)}
    for name, search in searches.items():  # FAISS's selector alone, and the policy around it
        _, got = search()
        assert np.isin(got, ids[rows]).all()  # ten hits, none outside the filter
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
        assert recall >= 0.9, (name, recall)


@pytest.mark.parametrize(("clusters", "exactly"), [(range(12, 40), False), (range(39, 40), True)])
def test_a_selection_far_from_the_query_still_gives_k_hits_from_inside_it(clusters: range, exactly: bool) -> None:
    vectors, cluster, ids = _clustered(20_000)
    plan = plan_index(len(ids), 32, "ivf")
    faiss_index = build_index(plan, vectors, ids)
    rows = np.flatnonzero(np.isin(cluster, list(clusters)))  # none in the queries' cluster
    near = vectors[np.flatnonzero(cluster == 0)[:5]]
    calls = []

    def exact(queries: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(queries))
        return exact_search(vectors[rows], ids[rows], queries, top)

    # nprobe 1 for the narrow one: the few lists probed near the queries then hold none of it
    _, got = search_within(faiss_index, plan, near, 10, _selection(ids, rows), exact, nprobe=1 if exactly else None)
    assert np.isin(got, ids[rows]).all()  # ten hits each, all inside the selection
    if exactly:  # the probed lists hold none of a far, narrow selection: those queries were searched exactly
        assert calls == [5] and np.array_equal(got, exact_search(vectors[rows], ids[rows], near, 10)[1])


def _photo(path: Path, colour: str, exif: dict[int, str], original: str | None = None) -> None:
    tags = Image.Exif()
    for tag, value in exif.items():
        tags[tag] = value
    if original:
        tags.get_ifd(0x8769)[36867] = original  # DateTimeOriginal, in the EXIF sub-IFD
    Image.new("RGB", (48, 48), colour).save(path, "JPEG", exif=tags.tobytes())


def test_exif_dates_are_a_filterable_column_and_a_source_lists_own_column_wins(encoder: DualEncoder,
                                                                                tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.jpg", "red", {306: "2023:01:02 10:00:00"}, original="2019:06:30 08:15:00")  # original wins
    _photo(folder / "b.jpg", "green", {306: "2022:11:05 17:45:10"})
    _photo(folder / "c.jpg", "blue", {306: "not a date"})  # unreadable: no date, the image still indexed
    _photo(folder / "d.jpg", "white", {})
    build_or_add(folder, tmp_path / "idx", encoder, BuildOptions(workers=0), "build")
    index = Index.open(tmp_path / "idx")
    ids = index.ids()
    names = {r["id"]: r["path"].rsplit("/", 1)[-1] for r in index.metadata(ids)}
    assert dict(zip([names[i] for i in ids], index.field(ids, "taken"), strict=True)) == {
        "a.jpg": "2019-06-30T08:15:00", "b.jpg": "2022-11-05T17:45:10", "c.jpg": None, "d.jpg": None}
    since = index.select(Filter(where={"taken": {"gte": "2020-01-01"}}))
    assert [names[int(i)] for i in since.ids] == ["b.jpg"]

    listing = tmp_path / "list.jsonl"  # the same files, with the owner's own dates
    listing.write_text("".join(json.dumps({"path": str(folder / n), "taken": "2001-01-01"}) + "\n"
                               for n in ("a.jpg", "c.jpg")))
    build_or_add(listing, tmp_path / "listed", encoder, BuildOptions(workers=0), "build")
    listed = Index.open(tmp_path / "listed")
    assert listed.field(listed.ids(), "taken") == ["2001-01-01", "2001-01-01"]
