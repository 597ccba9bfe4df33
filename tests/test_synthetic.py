"""Tests for the synthetic dermoscopy generator: determinism, exact masks, classes, groups, manifest and CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dermpipe.data.generator import (
    DEFAULT_CLASSES,
    LesionProfile,
    SyntheticDataError,
    class_counts,
    class_profile,
    generate_dataset,
    make_lesion_views,
    make_sample,
)
from dermpipe.data.manifest import SPLITS, Manifest
from dermpipe.data.splits import check_grouping
from dermpipe.data.synthetic import main

# Tiny data sets leave scikit-learn's stratified splitter a few members per class; it warns, which is expected here.


REPO = Path(__file__).resolve().parents[1]
HAM_CLASSES = ("nv", "mel", "bkl", "bcc", "akiec", "df", "vasc")
CLEAN = {"hair": 0.0, "vignette": 0.0, "ruler": 0.0}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_sample_is_deterministic_by_seed() -> None:
    first = make_sample(np.random.default_rng(7), "mel", 64, hair=1.0, vignette=1.0, ruler=1.0)
    again = make_sample(np.random.default_rng(7), "mel", 64, hair=1.0, vignette=1.0, ruler=1.0)
    other = make_sample(np.random.default_rng(8), "mel", 64, hair=1.0, vignette=1.0, ruler=1.0)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])
    image, mask = first
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.uint8


def test_generate_dataset_is_byte_identical_for_the_same_arguments(tmp_path: Path) -> None:
    kwargs = {"n_images": 24, "size": 32, "seed": 3}
    generate_dataset(tmp_path / "a", **kwargs)
    generate_dataset(tmp_path / "b", **kwargs)
    generate_dataset(tmp_path / "c", **{**kwargs, "seed": 4})
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 2 * 24 + 2  # images, masks, manifest.csv and its class sidecar
    assert a == b
    assert a.keys() == c.keys()
    assert a["images/SYN_0000000.jpg"] != c["images/SYN_0000000.jpg"]


def _edge_contrast(image: np.ndarray, mask: np.ndarray, skin: np.ndarray) -> float:
    """Worst of 8 sectors around the lesion: distance from the skin colour just inside the mask edge (2 px) over the
    same just outside it. Large when the mask edge sits on the colour edge; near 1 when it is off by a pixel or two."""
    kernel = np.ones((3, 3), np.uint8)
    distance = np.linalg.norm(image.astype(float) - skin, axis=2)
    inner = (mask > 0) & (cv2.erode(mask, kernel, iterations=2) == 0)
    outer = (cv2.dilate(mask, kernel, iterations=2) > 0) & (mask == 0)
    moments = cv2.moments(mask, True)
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    angle = np.arctan2(yy - moments["m01"] / moments["m00"], xx - moments["m10"] / moments["m00"])
    sector = ((angle + np.pi) / (2 * np.pi) * 8).astype(int) % 8
    ratios = [
        distance[inner & (sector == s)].mean() / max(distance[outer & (sector == s)].mean(), 1.0)
        for s in range(8)
        if (inner & (sector == s)).sum() >= 3 and (outer & (sector == s)).sum() >= 3
    ]
    return min(ratios)


@pytest.mark.parametrize("label", DEFAULT_CLASSES)
def test_mask_is_binary_and_marks_where_the_lesion_colour_is(label: str) -> None:
    rng = np.random.default_rng(11)
    size = 64
    edge_contrast = []
    for _ in range(8):
        image, mask = make_sample(rng, label, size, **CLEAN)
        assert set(np.unique(mask).tolist()) <= {0, 1}
        assert 0.05 <= mask.mean() <= 0.75
        lesion = mask > 0
        ring = (cv2.dilate(mask, np.ones((9, 9), np.uint8)) > 0) & ~lesion
        pixels = image.reshape(-1, 3).astype(float)
        skin = np.median(pixels[ring.ravel()], axis=0)
        inside_gap = np.linalg.norm(pixels[lesion.ravel()].mean(0) - skin)
        assert inside_gap > 15, f"{label}: lesion colour too close to the skin around it ({inside_gap:.1f})"
        # Around the mask, the pixels that look like lesion (far from the local skin colour) must coincide with it.
        nearby = cv2.dilate(mask, np.ones((15, 15), np.uint8)) > 0
        distance = np.linalg.norm(pixels - skin, axis=1).reshape(size, size)
        looks_like_lesion = (distance > inside_gap / 2) & nearby
        iou = (looks_like_lesion & lesion).sum() / (looks_like_lesion | lesion).sum()
        assert iou > 0.6, f"{label}: mask and lesion colour overlap only {iou:.2f}"
        ys, xs = np.nonzero(lesion)
        cys, cxs = np.nonzero(looks_like_lesion)
        assert abs(ys.mean() - cys.mean()) < 0.08 * size and abs(xs.mean() - cxs.mean()) < 0.08 * size
        edge_contrast.append(_edge_contrast(image, mask, skin))
    # Pixel-exact: the colour changes right at the mask edge all around (a mask 2 px off scores about 1).
    assert np.median(edge_contrast) > 1.8, edge_contrast


def test_lesion_false_gives_skin_only_and_an_empty_mask() -> None:
    image, mask = make_sample(np.random.default_rng(0), "mel", 48, lesion=False, **CLEAN)
    assert mask.shape == (48, 48) and not mask.any()
    # Skin: no dark lesion-like region, some texture.
    luminance = image.mean(axis=2)
    assert luminance.min() > 0.7 * np.median(luminance)
    assert image.std() > 0.5


def test_hair_and_ruler_change_the_image_but_not_the_mask() -> None:
    size = 64
    plain = make_sample(np.random.default_rng(5), "nv", size, **CLEAN)
    hairy = make_sample(np.random.default_rng(5), "nv", size, **{**CLEAN, "hair": 1.0})
    ruled = make_sample(np.random.default_rng(5), "nv", size, **{**CLEAN, "ruler": 1.0})
    assert np.array_equal(plain[1], hairy[1]) and np.array_equal(plain[1], ruled[1])
    hair_changed = np.any(plain[0] != hairy[0], axis=2)
    assert hair_changed.any()
    assert (hairy[0][hair_changed].astype(int).sum(1) < plain[0][hair_changed].astype(int).sum(1)).mean() > 0.9
    # Ruler ticks hug one edge of the image.
    ys, xs = np.nonzero(np.any(plain[0] != ruled[0], axis=2))
    assert len(ys) > 0
    band = 0.25 * size
    assert min(ys.max(), xs.max()) < band or max(ys.min(), xs.min()) > size - 1 - band


def test_vignette_darkens_the_corners() -> None:
    image, _ = make_sample(np.random.default_rng(2), None, 64, hair=0.0, ruler=0.0, vignette=1.0, lesion=False)
    luminance = image.mean(axis=2)
    corners = np.mean([luminance[:4, :4].mean(), luminance[:4, -4:].mean(), luminance[-4:, :4].mean()])
    assert corners < 0.5 * luminance[24:40, 24:40].mean()


def _best_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Highest IoU of mask ``b`` onto ``a`` over centroid-aligned small rotations and zooms."""
    moments_a, moments_b = cv2.moments(a, True), cv2.moments(b, True)
    centre_a = np.array([moments_a["m10"], moments_a["m01"]]) / moments_a["m00"]
    centre_b = np.array([moments_b["m10"], moments_b["m01"]]) / moments_b["m00"]
    best = 0.0
    for angle in range(-24, 25, 3):
        for zoom in np.arange(0.86, 1.15, 0.03):
            warp = cv2.getRotationMatrix2D(tuple(centre_b), angle, zoom)
            warp[:, 2] += centre_a - centre_b
            moved = cv2.warpAffine(b, warp, a.shape[::-1], flags=cv2.INTER_NEAREST)
            best = max(best, (moved & a).sum() / (moved | a).sum())
    return best


def test_lesion_views_show_one_lesion_from_slightly_different_angles() -> None:
    views = make_lesion_views(np.random.default_rng(9), "mel", 3, 48, **CLEAN)
    others = [make_sample(np.random.default_rng(seed), "mel", 48, **CLEAN)[1] for seed in (20, 21, 22)]
    assert len(views) == 3
    assert not np.array_equal(views[0][1], views[1][1]) and not np.array_equal(views[0][0], views[1][0])
    same = min(_best_overlap(views[0][1], mask) for _, mask in views[1:])
    different = max(_best_overlap(views[0][1], mask) for mask in others)
    assert same > 0.9 and same > different + 0.05, (same, different)


def test_class_counts_follow_the_imbalance() -> None:
    counts = class_counts(400, 4, 4.0)
    assert sum(counts) == 400
    assert counts == sorted(counts, reverse=True)
    assert counts[0] / counts[-1] == pytest.approx(4.0, rel=0.05)
    assert class_counts(90, 3, 1.0) == [30, 30, 30]
    assert min(class_counts(7, 7, 50.0)) == 1  # every class present when there are enough images


def test_dataset_counts_groups_and_splits(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path / "syn", n_images=60, size=32, seed=1, imbalance=3.0, images_per_lesion=(2, 3))
    manifest = Manifest.read(path)
    assert manifest.classes == DEFAULT_CLASSES
    assert list(manifest.class_counts().values()) == class_counts(60, 4, 3.0)
    by_group: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in manifest.rows:
        by_group[row["group"]].append(row)
    assert all(group.startswith("LES_") for group in by_group)
    assert Counter(len(rows) for rows in by_group.values())[1] <= len(DEFAULT_CLASSES)  # only a class's last lesion
    assert max(len(rows) for rows in by_group.values()) == 3
    for rows in by_group.values():
        assert len({r["label"] for r in rows}) == 1
        assert len({r["split"] for r in rows}) == 1
    check_grouping(manifest)
    assert {r["split"] for r in manifest.rows} == set(SPLITS)


def test_manifest_reads_back_with_existing_images_and_masks(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    path = generate_dataset(out, n_images=20, size=40, seed=0, image_format="png")
    assert path == out / "manifest.csv"
    raw = path.read_text().splitlines()
    assert raw[0] == "image_id,image_path,mask_path,label,group,split"
    assert raw[1].split(",")[1:3] == ["images/SYN_0000000.png", "masks/SYN_0000000_segmentation.png"]
    manifest = Manifest.read(path)
    assert len(manifest) == 20
    for row in manifest.rows:
        image = cv2.imread(row["image_path"], cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(row["mask_path"], cv2.IMREAD_UNCHANGED)
        assert image.shape == (40, 40, 3)
        assert mask.shape == (40, 40)
        assert set(np.unique(mask).tolist()) <= {0, 255} and mask.any()
        assert Path(row["image_path"]).stem == row["image_id"]


def test_cli_writes_a_dataset_and_prints_one_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    code = main(["--out", str(out), "--n", "24", "--size", "32", "--classes", "a,b,c", "--imbalance", "2"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    a, b, c = class_counts(24, 3, 2.0)
    assert len(lines) == 1 and "24 images" in lines[0] and f"a {a}, b {b}, c {c}" in lines[0]
    manifest = Manifest.read(out / "manifest.csv")
    assert manifest.classes == ("a", "b", "c")
    assert len(list((out / "images").glob("*.jpg"))) == 24


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--n", "0"], "at least 1"),
        (["--hair", "2"], "hair"),
        (["--images-per-lesion", "3,1"], "--images-per-lesion"),
        (["--classes", "nv,nv"], "distinct"),
    ],
)
def test_cli_reports_bad_arguments_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], needle: str
) -> None:
    assert main(["--out", str(tmp_path / "bad"), "--size", "32", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_cli_reports_an_output_folder_it_cannot_create(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["--out", str(blocker / "out"), "--n", "20", "--size", "32"]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot create the output folder {blocker / 'out'}")


def test_bad_image_format_raises() -> None:
    with pytest.raises(SyntheticDataError, match="bmp"):
        generate_dataset("unused", n_images=4, image_format="bmp")


def test_script_runs_from_the_repo_root(tmp_path: Path) -> None:
    out = tmp_path / "script"
    cmd = [sys.executable, "data/synthetic.py", "--out", str(out), "--n", "20", "--size", "32"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "20 images" in result.stdout
    assert len(Manifest.read(out / "manifest.csv")) == 20


def _lesion_features(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean lesion RGB, mean and spread of colour plus shape: solidity, border roughness, asymmetry, area)."""
    pixels = image[mask > 0].astype(float)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    area = max(cv2.contourArea(contour), 1.0)
    solidity = area / max(cv2.contourArea(cv2.convexHull(contour)), 1.0)
    roughness = cv2.arcLength(contour, True) ** 2 / (4 * np.pi * area)
    moments = cv2.moments(mask, binaryImage=True)
    cx = moments["m10"] / moments["m00"]
    mirrored = cv2.warpAffine(mask, np.float32([[-1, 0, 2 * cx], [0, 1, 0]]), mask.shape[::-1])
    asymmetry = (mirrored ^ mask).sum() / mask.sum()
    mean = pixels.mean(0)
    return mean, np.concatenate([mean, pixels.std(0), [solidity, roughness, asymmetry, mask.mean()]])


def test_colour_alone_does_not_separate_the_classes_but_shape_and_texture_help() -> None:
    rng = np.random.default_rng(0)
    colour, combined, labels = [], [], []
    for i in range(240):
        label = i % len(DEFAULT_CLASSES)
        mean, features = _lesion_features(*make_sample(rng, DEFAULT_CLASSES[label], 64, **CLEAN))
        colour.append(mean)
        combined.append(features)
        labels.append(label)

    def accuracy(features: list[np.ndarray]) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return float(cross_val_score(model, np.array(features), np.array(labels), cv=4).mean())

    colour_only, with_shape = accuracy(colour), accuracy(combined)
    assert colour_only < 0.92, f"mean lesion colour alone separates the classes ({colour_only:.2f})"
    assert with_shape > 0.6 and with_shape > colour_only + 0.03, (colour_only, with_shape)


def test_any_class_name_gets_a_stable_profile(tmp_path: Path) -> None:
    custom = class_profile("lentigo_custom")
    assert isinstance(custom, LesionProfile) and custom.name == "lentigo_custom"
    assert custom == class_profile("lentigo_custom")
    assert custom != class_profile("another_class")
    # Stable across processes (Python's str hash is salted per process).
    code = "from dermpipe.data.generator import class_profile; print(repr(class_profile('lentigo_custom')))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == repr(custom)
    # Other spellings of known classes keep their hand-made look.
    assert class_profile("MEL").asymmetry == class_profile("mel").asymmetry and class_profile("MEL").name == "MEL"
    image, mask = make_sample(np.random.default_rng(0), "lentigo_custom", 32)
    assert image.shape == (32, 32, 3) and mask.any()
    manifest = Manifest.read(generate_dataset(tmp_path / "ham", n_images=40, size=32, classes=HAM_CLASSES))
    assert manifest.classes == HAM_CLASSES
    assert all(n > 0 for n in manifest.class_counts().values())
