"""Tests for data.preprocess (colour constancy, hair removal) and data.augment (aligned transforms, fingerprints)."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from dermpipe.data.augment import AugmentConfig, SyntheticHair, build_transform, transform_fingerprint
from dermpipe.data.preprocess import PreprocessConfig, preprocess, remove_hair, shades_of_gray


def _textured_gray(size: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur(rng.uniform(60, 170, size=(size, size)).astype(np.float32), (0, 0), 2)
    return np.repeat(texture[:, :, None], 3, axis=2)


def _skin_with_lesion(size: int = 128) -> np.ndarray:
    y, x = np.mgrid[:size, :size].astype(np.float32)
    skin = np.empty((size, size, 3), dtype=np.float32)
    skin[...] = (205, 160, 140)
    skin += (0.15 * x - 0.1 * y)[:, :, None]
    image = skin.clip(0, 255).astype(np.uint8)
    cv2.circle(image, (size // 2, size // 2), 26, (90, 55, 45), -1)
    return image


def _draw_hair(image: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hairy = image.copy()
    size = image.shape[0]
    for _ in range(6):
        start = tuple(int(v) for v in rng.integers(0, size, 2))
        end = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(hairy, start, end, (35, 25, 20), int(rng.integers(1, 3)), cv2.LINE_AA)
    return hairy


def test_shades_of_gray_equalises_a_colour_cast() -> None:
    neutral = _textured_gray()
    cast = np.clip(neutral * np.array([1.3, 1.0, 0.6], dtype=np.float32), 0, 255).astype(np.uint8)
    before = cast.reshape(-1, 3).mean(axis=0)
    assert before.max() / before.min() > 2.0
    corrected = shades_of_gray(cast, p=6)
    after = corrected.reshape(-1, 3).mean(axis=0)
    assert corrected.dtype == np.uint8 and corrected.shape == cast.shape
    assert after.max() / after.min() < 1.02
    # A neutral image has nothing to correct.
    gray = neutral.astype(np.uint8)
    assert np.abs(shades_of_gray(gray).astype(int) - gray).max() <= 1


def test_shades_of_gray_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        shades_of_gray(np.zeros((8, 8), dtype=np.uint8))


def test_remove_hair_removes_thin_lines_and_keeps_the_lesion() -> None:
    clean = _skin_with_lesion()
    hairy = _draw_hair(clean)
    hair_pixels = np.abs(hairy.astype(int) - clean).sum(axis=2) > 30
    assert hair_pixels.mean() > 0.02

    cleaned = remove_hair(hairy, kernel_size=17, threshold=10)
    error_before = np.abs(hairy.astype(int) - clean)[hair_pixels].mean()
    error_after = np.abs(cleaned.astype(int) - clean)[hair_pixels].mean()
    assert error_after < 0.2 * error_before

    lesion = np.zeros(clean.shape[:2], dtype=np.uint8)
    cv2.circle(lesion, (64, 64), 22, 1, -1)
    lesion_only = lesion.astype(bool) & ~hair_pixels
    assert np.abs(cleaned[lesion_only].astype(int) - clean[lesion_only]).mean() < 3
    # Without hair the lesion is wider than the kernel and left as it is.
    assert np.abs(remove_hair(clean).astype(int) - clean).mean() < 1


def test_preprocess_applies_enabled_steps_in_order() -> None:
    image = _draw_hair(_skin_with_lesion())
    assert preprocess(image, PreprocessConfig()) is image
    colour_only = preprocess(image, PreprocessConfig(colour_constancy=True, shades_of_gray_p=4))
    assert np.array_equal(colour_only, shades_of_gray(image, 4))
    both = preprocess(image, PreprocessConfig(colour_constancy=True, hair_removal=True, hair_kernel=9))
    assert np.array_equal(both, remove_hair(shades_of_gray(image, 6), 9, 10))
    with pytest.raises(ValueError, match="hair_kernel"):
        PreprocessConfig(hair_kernel=1)


def _square_scene(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((size, size, 3), 20, dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    image[22:58, 30:70] = 230
    mask[22:58, 30:70] = 1
    return image, mask


def test_geometric_augmentation_keeps_image_and_mask_aligned() -> None:
    cfg = AugmentConfig(rotate_p=1.0, affine_p=1.0, colour_p=0.0, blur_p=0.0, sharpen_p=0.0)
    image, mask = _square_scene()
    plain = build_transform(cfg, 64, train=False)(image=image, mask=mask)["mask"]
    moved = 0
    for seed in range(8):
        transform = build_transform(cfg, 64, train=True)
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        out_image, out_mask = out["image"], out["mask"]
        assert out_image.shape == (64, 64, 3) and out_mask.shape == (64, 64)
        assert set(np.unique(out_mask).tolist()) <= {0, 1}
        # Compare away from the square's edge, where interpolation mixes bright and dark.
        inside = cv2.erode(out_mask, np.ones((3, 3), np.uint8)).astype(bool)
        outside = ~cv2.dilate(out_mask, np.ones((3, 3), np.uint8)).astype(bool)
        assert inside.sum() > 50
        gray = out_image.mean(axis=2)
        assert gray[inside].mean() > 200, seed
        assert gray[outside].mean() < 40, seed
        moved += int(not np.array_equal(out_mask, plain))
    assert moved >= 6  # the transform really moved things, so the check above means something


def test_colour_and_hair_change_the_image_only() -> None:
    cfg = AugmentConfig(hflip=0, vflip=0, rotate_p=0, affine_p=0, colour_p=1.0, synthetic_hair_p=1.0)
    image, mask = _square_scene(64)
    transform = build_transform(cfg, 64, train=True)
    transform.set_random_seed(3)
    out = transform(image=image, mask=mask)
    assert np.array_equal(out["mask"], mask)
    assert not np.array_equal(out["image"], image)


def test_eval_transform_is_deterministic_and_sized() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(100, 140, 3), dtype=np.uint8)
    mask = (rng.random((100, 140)) > 0.5).astype(np.uint8)
    cfg = AugmentConfig()
    first = build_transform(cfg, 48, train=False)(image=image, mask=mask)
    second = build_transform(cfg, 48, train=False)(image=image, mask=mask)
    assert first["image"].shape == (48, 48, 3) and first["image"].dtype == np.uint8
    assert first["mask"].shape == (48, 48)
    assert np.array_equal(first["image"], second["image"]) and np.array_equal(first["mask"], second["mask"])
    train_out = build_transform(cfg, 48, train=True)(image=image, mask=mask)
    assert train_out["image"].shape == (48, 48, 3)
    # A disabled config is the eval transform even when training.
    disabled = build_transform(replace(cfg, enabled=False), 48, train=True)
    assert transform_fingerprint(disabled) == transform_fingerprint(build_transform(cfg, 48, train=False))


def test_normalised_output_is_tensors() -> None:
    image = np.full((30, 40, 3), 255, dtype=np.uint8)
    mask = np.ones((30, 40), dtype=np.uint8)
    transform = build_transform(AugmentConfig(), 32, train=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = transform(image=image, mask=mask)
    assert isinstance(out["image"], torch.Tensor) and out["image"].dtype == torch.float32
    assert tuple(out["image"].shape) == (3, 32, 32)
    assert isinstance(out["mask"], torch.Tensor) and tuple(out["mask"].shape) == (32, 32)
    evaluated = build_transform(AugmentConfig(), 32, train=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(evaluated(image=image, mask=mask)["image"], torch.full((3, 32, 32), 2.0))
    with pytest.raises(ValueError, match="mean and std"):
        build_transform(AugmentConfig(), 32, train=False, mean=(0.5, 0.5, 0.5))


def test_synthetic_hair_draws_dark_strands_reproducibly() -> None:
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    hair = SyntheticHair(num_hairs=(3, 3), p=1.0)
    hair.set_random_seed(1)
    first = hair(image=image)["image"]
    hair.set_random_seed(1)
    second = hair(image=image)["image"]
    dark = first.mean(axis=2) < 120
    assert 0.01 < dark.mean() < 0.3
    assert np.array_equal(first, second)
    assert np.array_equal(image, np.full((64, 64, 3), 200, dtype=np.uint8))  # input left untouched


def test_fingerprint_is_json_and_tracks_settings() -> None:
    cfg = AugmentConfig(synthetic_hair_p=0.3)
    fingerprint = transform_fingerprint(build_transform(cfg, 64, train=True, mean=(0.5,) * 3, std=(0.2,) * 3))
    assert fingerprint == json.loads(json.dumps(fingerprint))
    assert fingerprint == transform_fingerprint(build_transform(cfg, 64, True, (0.5,) * 3, (0.2,) * 3))
    assert "SyntheticHair" in json.dumps(fingerprint)
    others = [
        build_transform(replace(cfg, hflip=0.4), 64, True, (0.5,) * 3, (0.2,) * 3),
        build_transform(replace(cfg, rotate_limit=90), 64, True, (0.5,) * 3, (0.2,) * 3),
        build_transform(replace(cfg, synthetic_hair_p=0.0), 64, True, (0.5,) * 3, (0.2,) * 3),
        build_transform(cfg, 65, True, (0.5,) * 3, (0.2,) * 3),
        build_transform(cfg, 64, False, (0.5,) * 3, (0.2,) * 3),
        build_transform(cfg, 64, True, (0.4, 0.5, 0.5), (0.2,) * 3),
        build_transform(cfg, 64, True),
    ]
    prints = [json.dumps(transform_fingerprint(t), sort_keys=True) for t in others]
    assert json.dumps(fingerprint, sort_keys=True) not in prints
    assert len(set(prints)) == len(prints)


def test_augment_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="hflip"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError, match="hue"):
        AugmentConfig(hue=0.7)
