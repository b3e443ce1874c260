"""The feature pages in a real headless Chromium, opened from file:// and from `switchsae serve`.

One browser for the module; every test asserts what a user sees on the page.
"""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys

import pytest

from switchsae.apps import pages
from switchsae.apps.pages import headless
from switchsae.apps.records import example_acts

pytestmark = pytest.mark.skipif(headless.missing() is not None, reason=f"no headless browser: {headless.missing()}")

from selenium.webdriver.common.by import By  # noqa: E402  (after the skip: selenium may be missing)
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with headless.headless_chrome() as driver:
        yield driver


@pytest.fixture(scope="module")
def server_url(pages_dir):
    """`switchsae serve` in its own process on a free port of 127.0.0.1."""
    process = subprocess.Popen([sys.executable, "-m", "switchsae.cli", "serve", str(pages_dir), "--port", "0"],
                               stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, f"the server printed no address: {line!r}"
        yield match.group(0)
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(params=["file", "http"])
def site(request, pages_dir) -> str:
    """The URL of the pages' index.html, from the disk or from the server."""
    if request.param == "file":
        return (pages_dir / "index.html").as_uri()
    return request.getfixturevalue("server_url") + "index.html"


@pytest.fixture(scope="module")
def data(pages_dir):
    return pages.read_data(pages_dir, pages.INDEX), pages.read_data(pages_dir, pages.VOCAB)


def shown(token: int, vocab: dict) -> str:
    """A token as the pages write it."""
    return vocab[str(token)].replace("\n", "↵").replace("\t", "⇥")


def column(driver, n: int) -> list[str]:
    """The texts of the index table's column ``n`` (1-based), read in one round trip."""
    return driver.execute_script(f"return [...document.querySelectorAll('#features tbody td:nth-child({n})')]"
                                 ".map((td) => td.textContent.trim())")


def alpha(css_colour: str) -> float:
    """The opacity of a computed CSS colour, ``rgb(r, g, b)`` or ``rgba(r, g, b, a)``."""
    parts = re.findall(r"[\d.]+", css_colour)
    return float(parts[3]) if len(parts) == 4 else 1.0


def text_of(driver, selector: str) -> str:
    """The text of the first element matching ``selector`` ('' if none), read in one step (an
    element found first and read later may have been replaced by a re-render meanwhile)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
                                 selector)


def wait_for_heading(driver, prefix: str) -> str:
    WebDriverWait(driver, 10).until(lambda d: text_of(d, "main h1").startswith(prefix))
    return text_of(driver, "main h1")


def count(driver) -> str:
    return driver.find_element(By.ID, "count").text


def test_index_sorts_and_pages(browser, site, data):
    index, _ = data
    headless.open_pages(browser, site)
    assert count(browser) == "256 of 256 features"
    assert len(column(browser, 1)) == 100 and browser.find_element(By.ID, "page").text == "page 1 of 3"
    densest = max(range(256), key=lambda i: (index["density"][i], -index["id"][i]))
    assert column(browser, 1)[0] == str(index["id"][densest])  # sorted by density, highest first
    browser.find_element(By.CSS_SELECTOR, "th[data-sort=id]").click()
    assert column(browser, 1)[:3] == ["0", "1", "2"]
    browser.find_element(By.CSS_SELECTOR, "th[data-sort=id]").click()
    assert column(browser, 1)[0] == "255"
    browser.find_element(By.ID, "next").click()
    assert column(browser, 1)[0] == "155" and browser.find_element(By.ID, "page").text == "page 2 of 3"
    print(f"index render {browser.execute_script('return document.body.dataset.renderMs')} ms")


def test_index_filters_by_expert_and_density(browser, site, data):
    index, _ = data
    headless.open_pages(browser, site)
    Select(browser.find_element(By.ID, "expert")).select_by_value("2")
    assert count(browser) == "64 of 256 features" and set(column(browser, 2)) == {"2"}
    threshold = sorted(index["density"])[200]
    browser.find_element(By.ID, "min").send_keys(str(threshold))
    expected = sum(1 for e, d in zip(index["expert"], index["density"]) if e == 2 and d >= threshold)
    assert count(browser) == f"{expected} of 256 features"


def test_token_search_finds_features_by_their_tokens(browser, site, data):
    index, vocab = data
    query = next(shown(t, vocab).strip() for tops in index["top"] for t in tops if len(shown(t, vocab).strip()) >= 3)
    hits = [i for i, tokens in zip(index["id"], index["top"])
            if any(query.lower() in shown(t, vocab).strip().lower() for t in tokens + index["boost"][index["id"].index(i)])]
    headless.open_pages(browser, site)
    browser.find_element(By.CSS_SELECTOR, "th[data-sort=id]").click()
    browser.find_element(By.ID, "search").send_keys(query.upper())
    assert count(browser) == f"{len(hits)} of 256 features"
    assert column(browser, 1) == [str(i) for i in hits[:100]]


def test_feature_view_and_back_to_the_index(browser, site, pages_dir, data):
    _, vocab = data
    headless.open_pages(browser, site + "#sort=id&desc=0")
    link = browser.find_elements(By.CSS_SELECTOR, "#features tbody a")[7]
    feature = int(link.text)
    record = pages.load_record(pages_dir, feature)
    link.click()
    assert f"expert {record['expert']}" in wait_for_heading(browser, f"Feature {feature}")
    top = record["top"][0]
    _, _, at, tokens, _ = top
    first = browser.find_element(By.CSS_SELECTOR, "#top .ex .ctx")
    assert first.get_attribute("textContent") == "".join(shown(t, vocab) for t in tokens)
    hit = first.find_element(By.CSS_SELECTOR, ".hit").get_attribute("textContent")
    assert hit == shown(tokens[at], vocab)
    shades = [alpha(span.value_of_css_property("background-color")) for span in first.find_elements(By.CSS_SELECTOR, ".tok")]
    assert shades == pytest.approx([min(1, (a or 0) / record["max"]) for a in example_acts(top)], abs=0.006)
    assert shades[at] == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg#hist rect")) == len(record["hist"]["counts"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "ol.logits li")) == 20
    browser.find_element(By.ID, "back").click()
    WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.ID, "features"))
    assert column(browser, 1)[:2] == ["0", "1"]  # the index keeps its sort order
    browser.back()  # the browser's own back button returns to the feature
    wait_for_heading(browser, f"Feature {feature}")
    browser.back()
    WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.ID, "features"))


def test_nearest_rows_link_to_their_features(browser, site, pages_dir):
    record = pages.load_record(pages_dir, 3)
    headless.open_pages(browser, site + "#f=3")
    wait_for_heading(browser, "Feature 3")
    near = browser.find_elements(By.CSS_SELECTOR, "ol.near a")
    assert [a.text for a in near] == [str(j) for j, _ in record["near"]]
    near[0].click()
    wait_for_heading(browser, f"Feature {record['near'][0][0]}")


def test_a_feature_not_in_the_pages_is_a_one_line_error(browser, site):
    headless.open_pages(browser, site + "#f=99999")
    assert "Feature 99999 is not in these pages; they hold 256 features" in text_of(browser, ".error")
