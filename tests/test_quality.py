"""Input quality checks: each reason from a made-up image, none for synthetic dermoscopy; the report shows them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dermpipe.data.generator import generate_dataset, make_sample
from dermpipe.data.quality import (
    DEFAULT_QUALITY,
    QUALITY_NO_LESION,
    QUALITY_SEPARATOR,
    QualityConfig,
    assess_quality,
    quality_statistics,
    quality_text,
)
from dermpipe.data.reading import image_size, read_image
from dermpipe.predict.report import ReportRow, write_report


def _sample(label: str = "mel", size: int = 256, seed: int = 0, vignette: float = 1.0) -> np.ndarray:
    image, _ = make_sample(np.random.default_rng(seed), label, size, hair=1.0, vignette=vignette, ruler=1.0)
    return image


def _kinds(reasons: list[str]) -> list[str]:
    return [r.split(":", 1)[0] for r in reasons]


@pytest.mark.parametrize("side", [1, 10, 63])
def test_tiny_images_are_too_small(side: int) -> None:
    image = np.full((side, side, 3), 128, np.uint8)
    reasons = assess_quality(image, (side, side))
    assert reasons == [f"too small: {side}x{side} px (below {DEFAULT_QUALITY.min_side} px)"]


def test_size_is_judged_on_the_original_not_the_decoded_image() -> None:
    small = cv2.resize(_sample(size=512), (40, 40), interpolation=cv2.INTER_AREA)
    assert assess_quality(small, (4000, 4000)) == []  # a 4000 px photo decoded (or passed) reduced is not tiny
    assert _kinds(assess_quality(_sample(size=256), (50, 300))) == ["too small"]


def test_constant_grey_has_low_dynamic_range_only() -> None:
    reasons = assess_quality(np.full((300, 400, 3), 128, np.uint8), (300, 400))
    assert _kinds(reasons) == ["low dynamic range"]


def test_near_black_image_is_under_exposed() -> None:
    dark = (_sample().astype(np.uint16) // 16).astype(np.uint8)  # a 12-bit-like range squeezed into 0..15
    assert "under-exposed" in _kinds(assess_quality(dark, dark.shape[:2]))


@pytest.mark.parametrize("vignette", [0.0, 1.0])
def test_over_exposed_image(vignette: float) -> None:
    bright = np.clip(_sample("nv", vignette=vignette, seed=3).astype(np.int32) * 4, 0, 255).astype(np.uint8)
    assert _kinds(assess_quality(bright, bright.shape[:2])) == ["over-exposed"]


def test_heavily_blurred_image_is_blurred_at_any_decode_size() -> None:
    blurred = cv2.GaussianBlur(_sample(size=512), (0, 0), 12)
    assert _kinds(assess_quality(blurred, (512, 512))) == ["blurred"]
    # The same photo decoded at half or double size (read_image may reduce a JPEG) gets the same verdict.
    for side in (256, 1024):
        resized = cv2.resize(blurred, (side, side), interpolation=cv2.INTER_AREA if side < 512 else cv2.INTER_LINEAR)
        assert _kinds(assess_quality(resized, (512, 512))) == ["blurred"]
    sharp = _sample(size=512)
    for side in (256, 512):
        assert assess_quality(cv2.resize(sharp, (side, side), interpolation=cv2.INTER_AREA), (512, 512)) == []


@pytest.mark.parametrize("size", [64, 96, 128, 256, 512])
@pytest.mark.parametrize("label", ["nv", "mel", "bkl", "bcc", "df", "vasc"])
def test_synthetic_images_are_not_flagged(label: str, size: int) -> None:
    for seed in range(2):
        image, _ = make_sample(np.random.default_rng([size, seed]), label, size, hair=1.0, vignette=1.0, ruler=1.0)
        assert assess_quality(image, image.shape[:2]) == [], (label, size, seed, quality_statistics(image))
    skin, _ = make_sample(np.random.default_rng(size), label, size, hair=0.0, vignette=0.0, ruler=0.0, lesion=False)
    assert assess_quality(skin, skin.shape[:2]) == [], quality_statistics(skin)


def test_generated_jpeg_dataset_is_not_flagged(tmp_path) -> None:
    generate_dataset(tmp_path / "syn", n_images=40, size=96, seed=1, hair=1.0, vignette=1.0, imbalance=1.0)
    paths = sorted((tmp_path / "syn" / "images").glob("*.jpg"))
    assert len(paths) == 40
    for path in paths:
        assert assess_quality(read_image(path), image_size(path)) == [], path.name


def test_twelve_bit_data_in_a_sixteen_bit_png_is_flagged(tmp_path) -> None:
    twelve_bit = _sample("bcc").astype(np.uint16) * 16 + 8  # 0..4095 as a 12-bit camera writes it
    path = tmp_path / "raw12.png"
    assert cv2.imwrite(str(path), np.ascontiguousarray(twelve_bit[:, :, ::-1]))
    image = read_image(path)
    assert image.dtype == np.uint8 and image.max() <= 16
    reasons = assess_quality(image, image_size(path))
    assert "under-exposed" in _kinds(reasons)
    # The same data scaled to the full 16-bit range is fine.
    full = tmp_path / "full16.png"
    assert cv2.imwrite(str(full), np.ascontiguousarray((twelve_bit * 16)[:, :, ::-1]))
    assert assess_quality(read_image(full), image_size(full)) == []


def test_config_thresholds_apply() -> None:
    image = _sample()
    assert assess_quality(image, (256, 256), QualityConfig(min_side=300)) == ["too small: 256x256 px (below 300 px)"]
    assert _kinds(assess_quality(image, (256, 256), QualityConfig(min_bright=255.5))) == ["under-exposed"]


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        assess_quality(np.zeros((100, 100, 3), np.float32), (100, 100))
    with pytest.raises(ValueError):
        assess_quality(np.zeros((100, 100, 4), np.uint8), (100, 100))
    with pytest.raises(ValueError):
        assess_quality(np.zeros((100, 100, 3), np.uint8), (0, 100))
    assert assess_quality(np.full((100, 100), 7, np.uint8), (100, 100))  # grey works, and is flagged


def test_quality_text() -> None:
    assert quality_text([]) == ""
    assert quality_text(["too small: 1x1 px (below 64 px)"]) == "too small: 1x1 px (below 64 px)"
    assert quality_text(["a", "", "b"]) == "a; b"
    assert QUALITY_SEPARATOR == "; " and QUALITY_SEPARATOR not in QUALITY_NO_LESION
    assert QUALITY_NO_LESION.startswith("no lesion found")
    reasons = assess_quality(np.full((300, 300, 3), 3, np.uint8), (300, 300))
    assert len(reasons) >= 2 and all(QUALITY_SEPARATOR not in r for r in reasons)
    assert quality_text(reasons).split(QUALITY_SEPARATOR) == reasons


def test_report_shows_escaped_quality_reasons(tmp_path) -> None:
    probs = {"nv": 0.2, "mel": 0.8}
    flagged = ReportRow(
        "IMG_<1>", probs, "mel", 0.8, False, "", quality=("blurred: <b>soft</b> & dim", QUALITY_NO_LESION)
    )
    plain = ReportRow("IMG_2", probs, "mel", 0.8, False, "", {})  # positional, as existing callers build it
    path = write_report(tmp_path / "report.html", [flagged, plain], ["nv", "mel"], {"images": 2})
    page = path.read_text()
    assert "blurred: &lt;b&gt;soft&lt;/b&gt; &amp; dim" in page and "<b>soft</b>" not in page
    assert QUALITY_NO_LESION in page and "IMG_&lt;1&gt;" in page
    assert page.count("<tr data-id=") == 1 and page.count('<tr class="warn" data-id=') == 1
    assert 'data-quality="1"' in page and 'data-quality="0"' in page
    assert plain.quality == ()
