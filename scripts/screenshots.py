"""Screenshots of feature pages in headless Chromium at 1280x800 (the README's), and the time the
index takes to render there (logged; nothing is asserted).

    python scripts/screenshots.py runs/demo/pages --out docs/screenshots [--feature ID]

Writes OUT/index.png (the index, sorted by density) and OUT/feature.png (one feature's view:
by default the alive feature of median density, whose examples are typical rather than extreme).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from switchsae.apps import pages
from switchsae.apps.pages.headless import headless_chrome, open_pages


def median_feature(folder: Path) -> int:
    """The id of the feature of median density among those that fired."""
    index = pages.read_data(folder, pages.INDEX)
    alive = sorted((d, i) for d, i in zip(index["density"], index["id"]) if d > 0)
    return alive[len(alive) // 2][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", type=Path, help="a folder written by `switchsae inspect`")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="where the PNGs go")
    parser.add_argument("--feature", type=int, default=None, help="feature for feature.png (default: median density)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    url = (args.pages.resolve() / "index.html").as_uri()
    feature = median_feature(args.pages) if args.feature is None else args.feature
    with headless_chrome(1280, 800) as browser:
        open_pages(browser, url)
        ready, rows = (float(browser.execute_script(f"return document.body.dataset.{key}")) for key in ("readyMs", "renderMs"))
        resorts = []
        for _ in range(5):
            browser.find_element(By.CSS_SELECTOR, "th[data-sort=max]").click()
            resorts.append(float(browser.execute_script("return document.body.dataset.renderMs")))
        features = pages.read_data(args.pages, pages.META)["features"]
        print(f"index of {features} features: first view {ready:.0f} ms after navigation start "
              f"(rows {rows:.1f} ms); re-sort and render, median of 5: {statistics.median(resorts):.1f} ms")
        open_pages(browser, url)
        browser.save_screenshot(str(args.out / "index.png"))
        browser.get(f"{url}#f={feature}")
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#top"))
        browser.save_screenshot(str(args.out / "feature.png"))
    print(f"wrote {args.out / 'index.png'} and {args.out / 'feature.png'} (feature {feature})")


if __name__ == "__main__":
    main()
