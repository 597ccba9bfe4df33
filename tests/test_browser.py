"""The served page in a real headless Chromium: upload a synthetic photo, the rendered probabilities are the API's, the
CSV download is the API's CSV; a screenshot is kept as a test artifact.

Needs Debian's ``chromium`` and ``chromium-driver`` and pip's ``selenium`` (``.ci/run`` installs them). Without them
the test is skipped, unless ``DERMPIPE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from browser import browser_missing, chromium, downloaded_csv, upload
from conftest import served, write_untrained_bundle

from dermpipe.data.generator import make_sample
from dermpipe.data.reading import write_image

CLASSES = ["mel", "nv", "bkl"]
ARTIFACTS = Path(os.environ.get("DERMPIPE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "runs" / "tests"))


@pytest.fixture
def browser():
    missing = browser_missing()
    if missing:
        if os.environ.get("DERMPIPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test must run here, but {missing} is missing (apt-get install chromium "
                        "chromium-driver; pip install selenium)")  # fmt: skip
        pytest.skip(f"no browser to drive: {missing} missing (apt-get install chromium chromium-driver)")
    driver = chromium()
    yield driver
    driver.quit()


@pytest.mark.e2e
def test_page_shows_the_apis_probabilities(browser, tmp_path):
    bundle = write_untrained_bundle(tmp_path, ["test_resnet", "test_efficientnet"], CLASSES)
    rng = np.random.default_rng(3)
    photos = []
    for i, label in enumerate(("mel", "bkl")):
        image, _ = make_sample(rng, label, 96)
        photos.append(write_image(tmp_path / "photos" / f"lesion_{i}.png", image))
    with served("--model", bundle, "--device", "cpu", "--root", tmp_path / "root") as (url, _):
        shown = upload(browser, url + "/", photos)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
        page_csv = downloaded_csv(browser)
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in photos]
        api = httpx.post(f"{url}/v1/predict", files=files, timeout=120).json()["predictions"]
        api_csv = httpx.post(f"{url}/v1/predict?format=csv", files=files, timeout=120).text
    assert [row["attributes"]["data-id"] for row in shown] == [p.stem for p in photos]
    for row, prediction in zip(shown, api):
        attributes = row["attributes"]
        assert [attributes[f"data-p{i}"] for i in range(len(CLASSES))] == [f"{prediction[c]:.6f}" for c in CLASSES]
        assert attributes["data-predicted"] == prediction["predicted"]
        for c in CLASSES:  # the bars' visible numbers
            assert f"{prediction[c]:.3f}" in row["text"]
        assert row["images"] == 3  # the photo with the lesion's contour, the crop, the Grad-CAM
        assert ("refer" in row["text"]) == prediction["refer"]
    assert page_csv.replace("\r\n", "\n") == api_csv.replace("\r\n", "\n")
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000
