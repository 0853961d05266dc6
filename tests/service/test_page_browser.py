"""The web page end to end in headless Chromium against a real `imsearch serve` process."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from training.scenes import write_scenes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUERY = "a small red circle left of a large blue square"
OTHER = "a large green triangle above a small yellow circle"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    write_scenes(root / "src", 40, seed=91, twins=True)
    write_scenes(root / "plain" / "shots", 6, seed=7)  # indexed as a folder: no captions, paths below it
    return root


@pytest.fixture(scope="module")
def server(encoder: DualEncoder, scenes: Path) -> Iterator[str]:
    build_or_add(scenes / "src" / "captions.jsonl", scenes / "idx", encoder, BuildOptions(workers=0), "build")
    build_or_add(scenes / "plain", scenes / "plain-idx", encoder, BuildOptions(workers=0), "build")
    port = _free_port()
    cli = Path(sys.executable).parent / "imsearch"
    indexes = ["--index", f"demo={scenes / 'idx'}", "--index", f"plain={scenes / 'plain-idx'}"]
    proc = subprocess.Popen([str(cli), "serve", *indexes, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "IMSEARCH_CACHE": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian chromium and chromium-driver are needed (make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
             # no host name resolves: the pages must work with nothing but the server on 127.0.0.1
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    for flag in flags:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(driver: webdriver.Chrome, url: str) -> WebDriverWait[webdriver.Chrome]:
    driver.get(url)
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    return wait


def _column(driver: webdriver.Chrome, name: str) -> tuple[list[str], dict[str, str]]:
    """(hit ids, stage → chip text) of one result column, read in one script (the page re-renders)."""
    ids, chips = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return [[...c.querySelectorAll('li.hit')].map((li) => li.dataset.id),"
        "        Object.fromEntries([...c.querySelectorAll('.timing')].map((t) => [t.dataset.stage, t.textContent]))];",
        name)
    return list(ids), dict(chips)


def _idle(driver: webdriver.Chrome) -> bool:
    return all(driver.find_element(By.ID, c).get_attribute("aria-busy") != "true" for c in ("fast", "deep"))


def _ids(server: str, **body: Any) -> list[str]:
    """The ids /v1/search answers for this body (the page's answers must be the same)."""
    response = httpx.post(f"{server}/v1/search", json={"k": 12, **body}, timeout=30)
    response.raise_for_status()
    return [str(hit["id"]) for hit in response.json()["hits"]]


def _image_ids(server: str, path: Path, k: int = 12) -> list[str]:
    response = httpx.post(f"{server}/v1/search/image", files={"file": (path.name, path.read_bytes())},
                          data={"k": str(k)}, timeout=30)
    response.raise_for_status()
    return [str(hit["id"]) for hit in response.json()["hits"]]


def _query_string(driver: webdriver.Chrome) -> dict[str, list[str]]:
    return parse_qs(urlsplit(driver.current_url).query)


# Holds the responses to requests whose body contains `arguments[0]` for `arguments[1]` ms, and for those
# ignores the page's abort signal: their answers land after everything else, as a slow server's would.
LATE_ANSWERS = """
const [marker, delay] = arguments, fetch0 = window.fetch;
window.late = { started: 0, done: 0 };
window.fetch = async (url, init = {}) => {
  const late = String(init.body || "").includes(marker);
  if (!late) return fetch0(url, init);
  window.late.started += 1;
  try {
    const response = await fetch0(url, { ...init, signal: undefined });
    await new Promise((resolve) => setTimeout(resolve, delay));
    return response;
  } finally { window.late.done += 1; }
};
"""


def test_query_shows_fast_and_reranked_columns_with_timings(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, server)
    tiers = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "tier")).options]
    assert tiers == ["mid", "early", "auto", "none"]  # the tiers the service loaded, auto (mid is), and none
    box = browser.find_element(By.ID, "query")
    box.send_keys(QUERY)
    browser.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
    wait.until(lambda d: len(_column(d, "fast")[0]) == 12 and len(_column(d, "deep")[0]) == 12)
    fast_ids, fast_chips = _column(browser, "fast")
    deep_ids, deep_chips = _column(browser, "deep")
    assert set(fast_chips) == set(deep_chips) == {"encode", "search", "rerank", "fetch", "total"}
    assert all(chip.endswith(" ms") for chip in deep_chips.values())
    assert float(deep_chips["rerank"].split()[1]) > 0.0  # the deeper column paid for its depth
    # the reranked column holds the same 16 candidates' best 12, so its set overlaps the fast column's
    assert len(set(fast_ids) & set(deep_ids)) >= 8
    captions = [p.text for p in browser.find_elements(By.CSS_SELECTOR, "#deep .caption")]
    assert all(captions)
    assert browser.find_elements(By.CSS_SELECTOR, "#deep .move")  # reranking moved some results
    assert {"q": [QUERY], "rerank": ["mid"], "k": ["12"]}.items() <= _query_string(browser).items()
    images = browser.find_elements(By.CSS_SELECTOR, "#fast li.hit img")
    wait.until(lambda d: all(d.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images))
    sources = [urlsplit(img.get_attribute("src")) for img in browser.find_elements(By.CSS_SELECTOR, "li.hit img")]
    assert len(sources) == 24
    assert all(parse_qs(src.query).get("thumb") and parse_qs(src.query).get("index") == ["demo"] for src in sources)

    # switching the tier re-runs only the reranked column
    Select(browser.find_element(By.ID, "tier")).select_by_value(tiers[1])
    wait.until(lambda d: d.find_element(By.ID, "deep").get_attribute("data-tier") == tiers[1] and _idle(d))
    assert _column(browser, "fast")[0] == fast_ids
    assert _column(browser, "deep")[0] == _ids(server, text=QUERY, rerank=tiers[1], rerank_k=16)
    assert browser.find_element(By.ID, "deep-what").text.startswith(tiers[1])
    assert _query_string(browser)["rerank"] == [tiers[1]]


def test_changing_the_tier_reruns_the_text_in_the_box(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, f"{server}/?q={QUERY}")
    wait.until(lambda d: len(_column(d, "deep")[0]) == 12 and _idle(d))
    box = browser.find_element(By.ID, "query")
    box.clear()
    box.send_keys(OTHER)  # typed, not submitted
    Select(browser.find_element(By.ID, "tier")).select_by_value("early")
    expected = _ids(server, text=OTHER, rerank="early", rerank_k=16)
    wait.until(lambda d: _column(d, "deep")[0] == expected and _idle(d))
    assert _column(browser, "fast")[0] == _ids(server, text=OTHER, rerank="none")
    assert _query_string(browser)["q"] == [OTHER]


def test_an_older_answer_never_overwrites_a_newer_one(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, server)
    browser.execute_script(LATE_ANSWERS, OTHER, 1500)
    # the first query is the slower one (early fusion over 256 candidates), and its answers land last
    browser.execute_script(
        "const [first, second] = arguments, form = document.getElementById('search-form');"
        "const set = (id, value) => { document.getElementById(id).value = value; };"
        "set('tier', 'early'); set('rerank-k', '256'); set('query', first); form.requestSubmit();"
        "set('rerank-k', '16'); set('query', second); form.requestSubmit();", OTHER, QUERY)
    wait.until(lambda d: d.execute_script("return window.late.started > 0 && window.late.done === window.late.started"))
    wait.until(_idle)
    time.sleep(0.2)  # time for a late answer to render, were it allowed to
    fast = _ids(server, text=QUERY, rerank="none")
    assert fast != _ids(server, text=OTHER, rerank="none")
    assert _column(browser, "fast")[0] == fast
    assert _column(browser, "deep")[0] == _ids(server, text=QUERY, rerank="early", rerank_k=16)


def test_each_column_shows_its_request_in_flight_and_its_errors(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, server)
    browser.execute_script(LATE_ANSWERS, QUERY, 1000)
    browser.find_element(By.ID, "query").send_keys(QUERY + Keys.ENTER)
    for name in ("fast", "deep"):
        assert browser.find_element(By.ID, name).get_attribute("aria-busy") == "true"
        indicator = browser.find_element(By.CSS_SELECTOR, f"#{name} .busy")
        assert indicator.is_displayed() and indicator.text == "searching…"
    wait.until(lambda d: _idle(d) and len(_column(d, "deep")[0]) == 12)
    assert [browser.find_element(By.ID, name).get_attribute("aria-busy") for name in ("fast", "deep")] == ["false"] * 2
    assert not any(b.is_displayed() for b in browser.find_elements(By.CSS_SELECTOR, ".busy"))

    # an index the server does not hold: each column says why, and neither stays busy
    browser.execute_script("const s = document.getElementById('index'); s.add(new Option('gone', 'gone'));"
                           "s.value = 'gone'; document.getElementById('search-form').requestSubmit();")
    wait.until(lambda d: _idle(d) and len(d.find_elements(By.CSS_SELECTOR, ".column .note.error")) == 2)
    for error in browser.find_elements(By.CSS_SELECTOR, ".column .note.error"):
        assert "unknown index 'gone'" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "li.hit")


def test_a_link_reproduces_its_search(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, f"{server}/?q={QUERY}&rerank=early&k=5")
    wait.until(lambda d: len(_column(d, "fast")[0]) == 5 and len(_column(d, "deep")[0]) == 5 and _idle(d))
    assert browser.find_element(By.ID, "query").get_attribute("value") == QUERY
    assert Select(browser.find_element(By.ID, "tier")).first_selected_option.get_attribute("value") == "early"
    assert browser.find_element(By.ID, "k").get_attribute("value") == "5"
    assert _column(browser, "fast")[0] == _ids(server, text=QUERY, rerank="none", k=5)
    assert _column(browser, "deep")[0] == _ids(server, text=QUERY, rerank="early", rerank_k=16, k=5)

    box = browser.find_element(By.ID, "query")
    box.clear()
    box.send_keys(OTHER + Keys.ENTER)
    wait.until(lambda d: _column(d, "fast")[0] == _ids(server, text=OTHER, rerank="none", k=5))
    assert {"q": [OTHER], "rerank": ["early"], "k": ["5"]}.items() <= _query_string(browser).items()


def test_the_filter_box_restricts_both_columns_and_says_what_it_cannot_read(server: str,
                                                                            browser: webdriver.Chrome) -> None:
    wait = _open(browser, server)
    browser.find_element(By.ID, "filter").send_keys("caption~circle width>=64")
    browser.find_element(By.ID, "query").send_keys(QUERY + Keys.ENTER)
    flt = {"caption_contains": "circle", "where": {"width": {"gte": 64}}}
    fast = _ids(server, text=QUERY, rerank="none", filter=flt)
    wait.until(lambda d: _column(d, "fast")[0] == fast and len(_column(d, "deep")[0]) == 12 and _idle(d))
    assert _column(browser, "deep")[0] == _ids(server, text=QUERY, rerank="mid", rerank_k=16, filter=flt)
    captions = [p.text for p in browser.find_elements(By.CSS_SELECTOR, ".column .caption")]
    assert len(captions) == 24 and all("circle" in c for c in captions)
    assert _query_string(browser)["filter"] == ["caption~circle width>=64"]
    box = browser.find_element(By.ID, "filter")
    box.clear()
    box.send_keys("circle" + Keys.ENTER)
    wait.until(lambda d: _idle(d) and len(d.find_elements(By.CSS_SELECTOR, ".column .note.error")) == 2)
    assert all('filter "circle": write FIELD=VALUE' in e.text
               for e in browser.find_elements(By.CSS_SELECTOR, ".column .note.error"))


def test_the_auto_tier_says_whether_it_reranked(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, f"{server}/?q={QUERY}&rerank=auto")
    wait.until(lambda d: len(_column(d, "deep")[0]) == 12 and _idle(d))
    answer = httpx.post(f"{server}/v1/search", json={"text": QUERY, "k": 12, "rerank": "auto", "rerank_k": 16}).json()
    assert _column(browser, "deep")[0] == [str(h["id"]) for h in answer["hits"]]
    label = browser.find_element(By.ID, "deep-what").text
    scored = sum(h["rerank_score"] is not None for h in answer["hits"])
    assert label == (f"auto: mid reranked the {scored} closest to the best" if answer["reranked"] else
                     "auto: not reranked (the dual encoder's best is clearly apart)")


def test_none_tier_says_there_is_no_reranking(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, f"{server}/?q={QUERY}&rerank=none")
    wait.until(lambda d: len(_column(d, "fast")[0]) == 12 and _idle(d))
    deep = browser.find_element(By.ID, "deep")
    assert deep.get_attribute("data-tier") == "none"
    assert not _column(browser, "deep")[0]
    assert "No reranking" in deep.text and "fast column is the whole answer" in deep.text
    Select(browser.find_element(By.ID, "tier")).select_by_value("mid")
    wait.until(lambda d: len(_column(d, "deep")[0]) == 12)
    assert "No reranking" not in deep.text


def test_clicking_a_result_searches_by_that_image(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, f"{server}/?q={QUERY}")
    wait.until(lambda d: len(_column(d, "fast")[0]) == 12)
    target = _column(browser, "fast")[0][3]
    browser.find_element(By.CSS_SELECTOR, f"#fast li.hit[data-id='{target}']").click()
    wait.until(lambda d: d.find_element(By.ID, "image-query").is_displayed() and _column(d, "fast")[0][:1] == [target])
    assert "image queries use the dual encoder only" in browser.find_element(By.ID, "deep").text
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)"
                                     ".filter((name) => name.includes('/v1/images/'))")
    of_target = [urlsplit(name) for name in fetched if urlsplit(name).path == f"/v1/images/{target}"]
    assert of_target and all(parse_qs(url.query).get("thumb") for url in of_target)  # never the original
    assert any(parse_qs(url.query)["thumb"] == ["512"] for url in of_target)


def _focused_hit(driver: webdriver.Chrome) -> str | None:
    return driver.execute_script("return document.activeElement.closest('#fast li.hit')?.dataset.id ?? null")


def test_results_are_reachable_by_keyboard(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, f"{server}/?q={QUERY}")
    wait.until(lambda d: len(_column(d, "fast")[0]) == 12 and _idle(d))
    browser.execute_script("document.querySelector('#search-form button[type=submit]').focus()")
    for _ in range(10):  # from the form's last controls into the results
        if _focused_hit(browser) is not None:
            break
        ActionChains(browser).send_keys(Keys.TAB).perform()  # to the focused element, whatever it is
    ids = _column(browser, "fast")[0]
    assert _focused_hit(browser) == ids[0]
    assert browser.switch_to.active_element.tag_name == "button"
    outline = browser.execute_script("const s = getComputedStyle(document.activeElement);"
                                     "return [s.outlineStyle, parseFloat(s.outlineWidth)]")
    assert outline[0] != "none" and outline[1] >= 2  # a visible focus ring
    ActionChains(browser).send_keys(Keys.TAB, Keys.TAB).perform()
    assert _focused_hit(browser) == ids[2]

    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait.until(lambda d: d.find_element(By.ID, "image-query").is_displayed() and _column(d, "fast")[0][:1] == [ids[2]]
               and _idle(d))
    other = _column(browser, "fast")[0][1]
    browser.execute_script("document.querySelector(`#fast li.hit[data-id='${arguments[0]}'] button`).focus()", other)
    ActionChains(browser).send_keys(Keys.SPACE).perform()
    wait.until(lambda d: _column(d, "fast")[0][:1] == [other])


def test_search_by_an_uploaded_or_dropped_image(server: str, scenes: Path, browser: webdriver.Chrome) -> None:
    wait = _open(browser, server)
    upload = scenes / "src" / "scene_0000005.png"
    browser.find_element(By.ID, "image-file").send_keys(str(upload))
    expected = _image_ids(server, upload)
    wait.until(lambda d: _column(d, "fast")[0] == expected and _idle(d))
    assert browser.find_element(By.ID, "image-query").is_displayed()
    assert "scene_0000005.png" in browser.find_element(By.ID, "image-query").text
    assert "image queries use the dual encoder only" in browser.find_element(By.ID, "deep").text
    assert "q" not in _query_string(browser)

    dropped = scenes / "src" / "scene_0000011.png"
    expected = _image_ids(server, dropped)
    browser.execute_script(
        "const [name, bytes] = arguments, data = new DataTransfer();"
        "data.items.add(new File([Uint8Array.from(bytes)], name, { type: 'image/png' }));"
        "const box = document.getElementById('query');"
        "for (const type of ['dragenter', 'dragover', 'drop'])"
        "  box.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));",
        dropped.name, list(dropped.read_bytes()))
    wait.until(lambda d: _column(d, "fast")[0] == expected and _idle(d))
    assert "scene_0000011.png" in browser.find_element(By.ID, "image-query").text


def test_phone_width_switches_columns_with_tabs(server: str, browser: webdriver.Chrome) -> None:
    browser.set_window_size(390, 844)
    try:
        wait = _open(browser, f"{server}/?q={QUERY}")
        wait.until(lambda d: len(_column(d, "fast")[0]) == 12 and len(_column(d, "deep")[0]) == 12)
        tabs = browser.find_elements(By.CSS_SELECTOR, "[role=tablist] [role=tab]")
        assert [tab.text for tab in tabs] == ["Fast", "Reranked"] and all(tab.is_displayed() for tab in tabs)
        fast, deep = browser.find_element(By.ID, "fast"), browser.find_element(By.ID, "deep")
        assert fast.is_displayed() and not deep.is_displayed()
        tabs[1].click()
        assert deep.is_displayed() and not fast.is_displayed()
        assert tabs[1].get_attribute("aria-selected") == "true" and tabs[0].get_attribute("aria-selected") == "false"
        tabs[1].send_keys(Keys.ARROW_LEFT)
        assert fast.is_displayed() and not deep.is_displayed()
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390  # nothing sticks out sideways
    finally:
        browser.set_window_size(1280, 900)


def test_an_image_without_caption_shows_its_file_name(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, server)
    select = browser.find_element(By.ID, "index")
    assert select.is_displayed()
    assert [o.get_attribute("value") for o in Select(select).options] == ["demo", "plain"]
    Select(select).select_by_value("plain")
    browser.find_element(By.ID, "query").send_keys(QUERY + Keys.ENTER)
    wait.until(lambda d: len(_column(d, "fast")[0]) == 6 and len(_column(d, "deep")[0]) == 6)
    response = httpx.post(f"{server}/v1/search", json={"text": QUERY, "k": 6, "index": "plain"}, timeout=30).json()
    names = {str(hit["id"]): Path(hit["path"]).name for hit in response["hits"]}
    assert all(hit["caption"] is None for hit in response["hits"])
    shown = browser.execute_script("return [...document.querySelectorAll('li.hit')]"
                                   ".map((li) => [li.dataset.id, li.querySelector('.caption').textContent])")
    assert len(shown) == 12
    for hit_id, caption in shown:
        assert caption == names[hit_id] and re.fullmatch(r"scene_\d{7}\.png", caption)
    assert _query_string(browser)["index"] == ["plain"]


@pytest.mark.parametrize(("path", "rendered"), [("/docs", ".opblock"), ("/redoc", "[data-section-id]")])
def test_api_docs_render_offline(server: str, browser: webdriver.Chrome, path: str, rendered: str) -> None:
    html = httpx.get(f"{server}{path}").text
    assert not re.search(r"https?://", html)  # every script, style and icon comes from this server
    browser.get(f"{server}{path}")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, rendered)) >= 5)
    assert "imsearch" in browser.find_element(By.TAG_NAME, "body").text
    assert "/v1/search" in browser.find_element(By.TAG_NAME, "body").text


def test_the_page_says_what_the_embedded_model_knows(server: str, browser: webdriver.Chrome) -> None:
    wait = _open(browser, server)
    known = httpx.get(f"{server}/v1/model", timeout=10).json()
    line = browser.find_element(By.ID, "vocabulary").text
    assert browser.find_element(By.ID, "knows").is_displayed()
    assert all(word in line for words in known["vocabulary"].values() for word in words)
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button.example")
    assert [b.text for b in examples] == known["examples"]
    examples[-1].click()  # a click searches it, as typed
    text = known["examples"][-1]
    wait.until(lambda d: _column(d, "fast")[0] == _ids(server, text=text, rerank="none") and _idle(d))
    assert browser.find_element(By.ID, "query").get_attribute("value") == text
    assert _query_string(browser)["q"] == [text]


def test_reranked_hits_carry_markers_where_the_tier_located_each_named_object(server: str,
                                                                              browser: webdriver.Chrome) -> None:
    wait = _open(browser, f"{server}/?q={QUERY}&rerank=mid")
    wait.until(lambda d: len(_column(d, "deep")[0]) == 12 and _idle(d))
    answer = httpx.post(f"{server}/v1/search", json={"text": QUERY, "k": 12, "rerank": "mid", "rerank_k": 16,
                                                       "explain": True}).json()
    images = browser.find_elements(By.CSS_SELECTOR, "#deep li.hit img")
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                             for i in images))
    shown = browser.execute_script(  # per hit: its image's box, and each marker's centre and label
        "return [...document.querySelectorAll('#deep li.hit')].map((li) => {"
        "  const box = li.querySelector('img').getBoundingClientRect();"
        "  return [box.left, box.top, box.width, box.height, [...li.querySelectorAll('.marker')].map((m) => {"
        "    const r = m.getBoundingClientRect();"
        "    return [r.left + r.width / 2, r.top + r.height / 2, m.textContent]; })]; })")
    assert [h["explain"] for h in answer["hits"]] and all(h["explain"] for h in answer["hits"])
    for hit, (left, top, width, height, markers) in zip(answer["hits"], shown, strict=True):
        assert [m[2] for m in markers] == [p["phrase"] for p in hit["explain"]]  # e.g. "small red circle"
        for (x, y, _), place in zip(markers, hit["explain"], strict=True):
            assert abs(x - (left + place["x"] * width)) < 2 and abs(y - (top + place["y"] * height)) < 2
    assert not browser.find_elements(By.CSS_SELECTOR, "#fast .marker")  # the dual encoder locates nothing


def test_composed_queries_text_minus_text_and_image_plus_text(server: str, scenes: Path,
                                                             browser: webdriver.Chrome) -> None:
    wait = _open(browser, server)
    browser.find_element(By.ID, "query").send_keys("a red circle - a blue square" + Keys.ENTER)
    expected = _ids(server, terms=[{"text": "a red circle", "weight": 1}, {"text": "a blue square", "weight": -1}])
    wait.until(lambda d: _column(d, "fast")[0] == expected and _idle(d))
    reranked = _ids(server, terms=[{"text": "a red circle", "weight": 1}, {"text": "a blue square", "weight": -1}],
                    rerank="mid", rerank_k=16)  # against its one added text
    wait.until(lambda d: _column(d, "deep")[0] == reranked and _idle(d))
    box = browser.find_element(By.ID, "query")
    box.clear()
    box.send_keys("a red circle + a blue square" + Keys.ENTER)
    wait.until(lambda d: "this query uses the dual encoder only" in d.find_element(By.ID, "deep").text)

    upload = scenes / "src" / "scene_0000005.png"
    browser.find_element(By.ID, "image-file").send_keys(str(upload))
    wait.until(lambda d: _column(d, "fast")[0] == _image_ids(server, upload) and _idle(d))
    browser.find_element(By.ID, "query").send_keys("a large green triangle" + Keys.ENTER)
    image = base64.b64encode(upload.read_bytes()).decode()
    terms = [{"text": "a large green triangle", "weight": 1}, {"image": image, "weight": 1}]
    expected, reranked = _ids(server, terms=terms), _ids(server, terms=terms, rerank="mid", rerank_k=16)
    wait.until(lambda d: _column(d, "fast")[0] == expected and _column(d, "deep")[0] == reranked and _idle(d))
    chip = browser.find_element(By.ID, "image-query").text
    assert "scene_0000005.png" in chip and '+ "a large green triangle"' in chip
    browser.find_element(By.ID, "clear-image").click()  # the image dropped: the text alone again
    browser.find_element(By.ID, "query").send_keys(Keys.ENTER)
    alone = _ids(server, text="a large green triangle", rerank="none")
    wait.until(lambda d: _column(d, "fast")[0] == alone and _idle(d))
