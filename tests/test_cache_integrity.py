"""A cache entry's digest covers its key, its metadata and its arrays: a swapped, edited or permuted entry is
recomputed and counted, never trusted; a non-file where an entry belongs is replaced, never fatal."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from conftest import write_photos, write_untrained_pipeline

from dermpipe.engine.cache import StageCache, arrays_digest, stage_key

VERSIONS = {"torch": "x"}


def _key(n: int) -> str:
    return stage_key("crops", inputs=f"image-{n}", settings={"size": 8}, model="m", versions=VERSIONS)


def _entry(n: int) -> tuple[dict[str, np.ndarray], dict]:
    crop = np.full((4, 4, 3), n, np.uint8)
    return {"crop": crop, "probability": np.arange(6, dtype=np.float32) + n}, {"box": [n, n, n + 4, n + 4]}


def _members(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _rewrite(path, members: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **members)


@pytest.fixture
def filled(tmp_path):
    cache = StageCache(tmp_path, "crops")
    for n in range(3):
        cache.put(_key(n), *_entry(n))
    return StageCache(tmp_path, "crops")


def _recompute(cache: StageCache, n: int) -> tuple[dict[str, np.ndarray], dict]:
    return cache.get_or_compute(_key(n), lambda: _entry(n))


def test_swapped_entries_are_recomputed_and_counted(filled):
    a, b = filled.path(_key(0)), filled.path(_key(1))
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for n in (0, 1):
        arrays, meta = _recompute(filled, n)
        assert meta == _entry(n)[1] and np.array_equal(arrays["crop"], _entry(n)[0]["crop"])
    assert (filled.corrupt, filled.computed, filled.reused) == (2, 2, 0)
    assert "2 corrupt recomputed" in filled.summary()
    assert filled.get(_key(0)) is not None and filled.get(_key(1)) is not None  # replaced by valid entries


def test_swapped_entry_with_its_stored_key_rewritten_is_still_refused(filled):
    """The digest covers the key the entry is asked under, not only the key it says it has."""
    a, b = filled.path(_key(0)), filled.path(_key(1))
    members = _members(b)
    members["__key__"] = np.array(_key(0))
    _rewrite(a, members)
    assert filled.get(_key(0)) is None and filled.corrupt == 1


def test_an_edited_box_in_the_metadata_is_recomputed(filled):
    path = filled.path(_key(2))
    members = _members(path)
    meta = json.loads(str(members["__meta__"]))
    meta["box"][0] += 1  # the arrays and their digest untouched: only the box moves
    members["__meta__"] = np.array(json.dumps(meta))
    _rewrite(path, members)
    arrays, meta = _recompute(filled, 2)
    assert meta["box"] == [2, 2, 6, 6] and filled.corrupt == 1 and filled.computed == 1


def test_permuted_probability_entries_are_all_recomputed(filled):
    paths = [filled.path(_key(n)) for n in range(3)]
    data = [p.read_bytes() for p in paths]
    for p, d in zip(paths, data[1:] + data[:1]):
        p.write_bytes(d)
    for n in range(3):
        arrays, _ = _recompute(filled, n)
        assert arrays["probability"].tolist() == (np.arange(6) + n).tolist()
    assert (filled.corrupt, filled.computed, filled.reused) == (3, 3, 0)


def test_an_edited_array_with_the_old_array_only_digest_is_recomputed(filled):
    """Rewriting the digest as the earlier format computed it (over the arrays alone) no longer verifies."""
    path = filled.path(_key(0))
    members = _members(path)
    members["probability"] = members["probability"][::-1].copy()
    arrays = {k: v for k, v in members.items() if not k.startswith("__")}
    members["__digest__"] = np.array(arrays_digest(arrays))
    _rewrite(path, members)
    assert filled.get(_key(0)) is None and filled.corrupt == 1


def test_an_entry_of_the_earlier_format_is_a_plain_miss(tmp_path):
    cache = StageCache(tmp_path, "crops")
    path = cache.path(_key(0))
    path.parent.mkdir(parents=True)
    arrays, meta = _entry(0)
    _rewrite(path, {**arrays, "__digest__": np.array(arrays_digest(arrays)), "__meta__": np.array(json.dumps(meta))})
    _recompute(cache, 0)
    assert (cache.corrupt, cache.computed) == (0, 1) and cache.get(_key(0)) is not None


@pytest.mark.parametrize("kind", ["folder", "folder with files", "fifo", "file for its folder"])
def test_a_non_file_where_an_entry_belongs_is_replaced(tmp_path, kind):
    cache = StageCache(tmp_path, "crops")
    path = cache.path(_key(0))
    if kind == "file for its folder":
        path.parent.parent.mkdir(parents=True)
        path.parent.write_text("not a folder")
    else:
        path.parent.mkdir(parents=True)
    if kind.startswith("folder"):
        path.mkdir()
        if kind == "folder with files":
            (path / "inner").mkdir()
            (path / "inner" / "x.txt").write_text("x")
    elif kind == "fifo":
        os.mkfifo(path)
    arrays, meta = _recompute(cache, 0)
    assert meta == _entry(0)[1] and path.is_file() and cache.computed == 1
    assert StageCache(tmp_path, "crops").get(_key(0)) is not None


def test_force_replaces_a_folder_where_an_entry_belongs(tmp_path):
    cache = StageCache(tmp_path, "crops", force=True)
    path = cache.path(_key(0))
    path.mkdir(parents=True)
    cache.put(_key(0), *_entry(0))
    assert path.is_file() and StageCache(tmp_path, "crops").get(_key(0)) is not None


def test_a_folder_outside_the_cache_is_never_removed(tmp_path):
    """An entry's ``ab/`` folder linked elsewhere: the folder found there is named, not deleted."""
    outside = tmp_path / "elsewhere"
    cache = StageCache(tmp_path / "cache", "crops")
    path = cache.path(_key(0))
    (outside / path.name / "keep").mkdir(parents=True)
    path.parent.parent.mkdir(parents=True)
    path.parent.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the cache folder"):
        cache.put(_key(0), *_entry(0))
    assert (outside / path.name / "keep").is_dir()


# ---- end to end: batch prediction over tampered entries


CLASSES = ["nv", "mel", "bcc"]
BACKBONES = ["test_resnet", "test_efficientnet"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return write_untrained_pipeline(tmp_path_factory.mktemp("stages"), BACKBONES, CLASSES)


def _predict(stages, photos, out, cache):
    from dermpipe.predict import cli as predict_script

    args = ["--input", str(photos), "--out", str(out), "--device", "cpu", "--no-report",
            "--segmentation-run", str(stages / "seg"), "--classification-root", str(stages / "cls"),
            "--ensemble-run", str(stages / "ens"), "--set", f"run.cache_dir={cache}"]  # fmt: skip
    assert predict_script.main(args) == 0
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_prediction_over_swapped_and_permuted_entries_equals_a_clean_run(stages, tmp_path, capsys, one_thread):
    photos, cache = tmp_path / "photos", tmp_path / "cache"
    write_photos(photos, 4, seed=3, classes=CLASSES)
    clean = _predict(stages, photos, tmp_path / "clean", cache)
    capsys.readouterr()
    probabilities = sorted((cache / "crop_probabilities").rglob("*.npz"))
    crops = sorted((cache / "crops").rglob("*.npz"))
    assert len(probabilities) == 8 and len(crops) == 4
    data = [p.read_bytes() for p in probabilities]
    for p, d in zip(probabilities, data[1:] + data[:1]):  # every probability entry under another's name
        p.write_bytes(d)
    a, b = crops[0].read_bytes(), crops[1].read_bytes()  # two images' crops and boxes exchanged
    crops[0].write_bytes(b)
    crops[1].write_bytes(a)
    again = _predict(stages, photos, tmp_path / "again", cache)
    line = capsys.readouterr().out
    assert again == clean
    assert "cache: 2 reused, 10 computed, 10 corrupt recomputed" in line
    shutil.rmtree(tmp_path / "again")
    assert _predict(stages, photos, tmp_path / "again", cache) == clean
    assert "cache: 12 reused, 0 computed" in capsys.readouterr().out


# ---- a recomputed entry is bit-identical to the first computation


def test_recomputed_probabilities_are_bit_identical(tmp_path, one_thread):
    """Crops recomputed while the rest of their batch is still cached get exactly the first computation's
    probabilities: a batch that holds a miss is computed whole, as the first run computed it (computing the misses
    alone, in a smaller batch and at other places in it, moved their last bits)."""
    import torch

    from dermpipe.classification.backbones import build_classifier
    from dermpipe.classification.prediction import CropProbabilities
    from dermpipe.data.generator import make_sample

    torch.manual_seed(0)
    model = build_classifier("test_convnext", len(CLASSES), False).eval()  # its sums move with the batch
    model.input_size = 64
    rng = np.random.default_rng(0)
    crops = [make_sample(rng, CLASSES[i % 3], 64)[0] for i in range(8)]
    keys = [f"crop-{i}" for i in range(8)]

    def predictor():
        return CropProbabilities(model, "weights", StageCache(tmp_path, "crop_probabilities"), batch_size=4)

    first = predictor()
    probs = first(keys, lambda i: crops[i])
    stored = {i: first.cache.path(first.key(k)).read_bytes() for i, k in enumerate(keys)}
    for i in (1, 4, 6):  # lost: the next run computes these three again, beside five hits
        first.cache.path(first.key(keys[i])).unlink()
    again = predictor()
    assert again(keys, lambda i: crops[i]).tobytes() == probs.tobytes()
    assert (again.cache.reused, again.cache.computed) == (5, 3)
    assert all(again.cache.path(again.key(k)).read_bytes() == stored[i] for i, k in enumerate(keys))


def test_recomputed_crops_see_the_batch_the_first_run_saw(stages, tmp_path, monkeypatch, one_thread):
    """The U-Net computes a lost crop beside the rest of its batch (cached or not), so the recomputed entry comes
    from the same forward pass a run with nothing cached made, and equals the first entry byte for byte."""
    import torch

    from dermpipe.configs.loader import load_config
    from dermpipe.segmentation import prediction as module
    from dermpipe.segmentation.config import SegmentationConfig

    photos = write_photos(tmp_path / "photos", 6, seed=5, classes=CLASSES)
    items = [(p.stem, str(p)) for p in sorted(photos.iterdir())]
    cfg = load_config(SegmentationConfig, stages / "seg" / "config.yaml")
    seen, real = [], module.predict_probabilities
    monkeypatch.setattr(
        module, "predict_probabilities", lambda model, images, *a: seen.append(len(images)) or real(model, images, *a)
    )

    def predictor():
        return module.SegmentationPredictor(stages / "seg" / "best.safetensors", cfg, torch.device("cpu"), tmp_path)

    first = predictor()
    crops = [r.crop_key for r in first.crop(items)]
    stored = {k: first.cache.path(k).read_bytes() for k in crops}
    for k in crops[1:3]:
        first.cache.path(k).unlink()
    again = predictor()
    assert [r.crop_key for r in again.crop(items)] == crops and (again.cache.reused, again.cache.computed) == (4, 2)
    assert seen == [4, 2, 4]  # batches of 4: the lost crops' batch ran whole again, the other one not at all
    assert all(again.cache.path(k).read_bytes() == stored[k] for k in crops)
