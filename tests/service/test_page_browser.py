"""The web page end to end in headless Chromium against a real `imsearch serve` process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from indexer.scenes import write_scenes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUERY = "a small red circle left of a large blue square"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("browser")
    write_scenes(root / "src", 40, seed=91, twins=True)
    build_or_add(root / "src" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0), "build")
    port = _free_port()
    cli = Path(sys.executable).parent / "imsearch"
    proc = subprocess.Popen([str(cli), "serve", "--index", f"demo={root / 'idx'}", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
    flags = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900")
    for flag in flags:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _column(driver: webdriver.Chrome, name: str) -> tuple[list[str], dict[str, str]]:
    """(hit ids, stage → chip text) of one result column, read in one script (the page re-renders)."""
    ids, chips = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return [[...c.querySelectorAll('li.hit')].map((li) => li.dataset.id),"
        "        Object.fromEntries([...c.querySelectorAll('.timing')].map((t) => [t.dataset.stage, t.textContent]))];",
        name)
    return list(ids), dict(chips)


def test_query_shows_fast_and_reranked_columns_with_timings(server: str, browser: webdriver.Chrome) -> None:
    browser.get(server)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    tiers = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "tier")).options]
    assert tiers == ["mid", "early"]  # the page lists the tiers the service loaded
    box = browser.find_element(By.ID, "query")
    box.send_keys(QUERY)
    browser.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
    wait.until(lambda d: len(_column(d, "fast")[0]) == 12 and len(_column(d, "deep")[0]) == 12)
    fast_ids, fast_chips = _column(browser, "fast")
    deep_ids, deep_chips = _column(browser, "deep")
    assert set(fast_chips) == set(deep_chips) == {"encode", "search", "rerank", "total"}
    assert all(chip.endswith(" ms") for chip in deep_chips.values())
    assert float(deep_chips["rerank"].split()[1]) > 0.0  # the deeper column paid for its depth
    # the reranked column holds the same 16 candidates' best 12, so its set overlaps the fast column's
    assert len(set(fast_ids) & set(deep_ids)) >= 8
    captions = [p.text for p in browser.find_elements(By.CSS_SELECTOR, "#deep .caption")]
    assert all(captions)
    images = browser.find_elements(By.CSS_SELECTOR, "#fast li.hit img")
    wait.until(lambda d: all(d.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images))

    # switching the tier re-runs only the reranked column
    Select(browser.find_element(By.ID, "tier")).select_by_value(tiers[1])
    wait.until(lambda d: d.find_element(By.ID, "deep").get_attribute("data-tier") == tiers[1]
               and d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") is None)
    assert _column(browser, "fast")[0] == fast_ids
    assert len(_column(browser, "deep")[0]) == 12
    assert browser.find_element(By.ID, "deep-what").text.startswith(tiers[1])


def test_clicking_a_result_searches_by_that_image(server: str, browser: webdriver.Chrome) -> None:
    browser.get(f"{server}/?q={QUERY}")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(_column(d, "fast")[0]) == 12)
    target = _column(browser, "fast")[0][3]
    browser.find_element(By.CSS_SELECTOR, f"#fast li.hit[data-id='{target}']").click()
    wait.until(lambda d: d.find_element(By.ID, "image-query").is_displayed() and _column(d, "fast")[0][:1] == [target])
    assert "image queries use the dual encoder only" in browser.find_element(By.ID, "deep").text
