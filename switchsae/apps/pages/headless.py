"""Headless Chromium driven by Selenium, for the browser tests and the README's screenshots.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install.sh`` installs them) and the
``selenium`` package (the ``test`` extras). Each browser gets a fresh profile folder, removed when
it closes, and flags that keep it off the network.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def missing() -> str | None:
    """Why headless Chromium cannot run here (a sentence), or None if it can."""
    if importlib.util.find_spec("selenium") is None:
        return "the selenium package is not installed (pip install -e '.[test]')."
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)."
    return None


@contextmanager
def headless_chrome(width: int = 1280, height: int = 800) -> Iterator["WebDriver"]:
    """A Selenium Chrome driver of headless Chromium with a ``width`` x ``height`` window."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    reason = missing()
    if reason:
        raise RuntimeError(f"Headless Chromium is unavailable: {reason}")
    with tempfile.TemporaryDirectory(prefix="switchsae-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"  # missing() checked it is there
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_pages(driver: "WebDriver", url: str, timeout: float = 10.0) -> None:
    """Load a pages URL afresh (not as a hash change of the page already open) and wait until the
    site has rendered its first view."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.readyMs"))
