"""Drive the served page in a real headless Chromium (Debian's ``chromium`` and ``chromedriver``, through Selenium; no
browser is downloaded): upload photos, wait for their rows, read what the page shows, save a screenshot.

Used by tests/test_browser.py; run by path it makes the screenshot of a served bundle (README.md, docs/bundles.md)::

    python tests/browser.py --url http://127.0.0.1:8000/ --photos runs/demo/photos --out docs/serve_page.png
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("DERMPIPE_CHROMIUM", "chromium")
CHROMEDRIVER = os.environ.get("DERMPIPE_CHROMEDRIVER", "chromedriver")


def browser_missing() -> str:
    """What is missing to drive a browser here (``""`` when nothing is)."""
    missing = [name for name in (CHROMIUM, CHROMEDRIVER) if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    return ", ".join(missing)


def chromium(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium under Selenium, from the system's binaries."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM) or CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which(CHROMEDRIVER) or CHROMEDRIVER), options=options)


def upload(driver: Any, url: str, photos: Sequence[Path], timeout: float = 120) -> list[dict[str, Any]]:
    """Open the page, upload ``photos`` through its file input, wait until the answer is shown; per table row what
    the page renders: the image id, the data-p* probabilities, the predicted class, the visible texts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    done = driver.find_element(By.TAG_NAME, "body").get_attribute("data-done") or "0"
    driver.find_element(By.ID, "files").send_keys("\n".join(str(Path(p).resolve()) for p in photos))
    WebDriverWait(driver, timeout).until(
        lambda d: (
            (d.find_element(By.TAG_NAME, "body").get_attribute("data-done") or "0") != done
            or d.find_element(By.ID, "status").get_attribute("class") == "error"
        )
    )
    status = driver.find_element(By.ID, "status")
    if status.get_attribute("class") == "error":
        raise AssertionError(f"the page says {status.text}")
    rows = []
    for tr in driver.find_elements(By.CSS_SELECTOR, "#preds tbody tr"):
        attributes = driver.execute_script(
            "const a={}; for(const x of arguments[0].attributes){a[x.name]=x.value}; return a;", tr
        )
        rows.append({"attributes": attributes, "text": tr.text, "images": len(tr.find_elements(By.TAG_NAME, "img"))})
    return rows


def downloaded_csv(driver: Any) -> str:
    """The text behind the page's 'download the rows as CSV' link."""
    return driver.execute_async_script(
        "const done=arguments[0]; fetch(document.getElementById('download').href).then(r=>r.text()).then(done);"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the served page, e.g. http://127.0.0.1:8000/")
    parser.add_argument("--photos", required=True, help="folder of photos to upload (its .jpg/.png files)")
    parser.add_argument("--n", type=int, default=4, help="how many photos (default 4)")
    parser.add_argument("--out", required=True, help="the screenshot (PNG)")
    args = parser.parse_args(argv)
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".png"))[: args.n]
    driver = chromium()
    try:
        upload(driver, args.url, photos)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
