"""Stage cache: hits, misses on a changed pixel/setting/checkpoint, atomic and corrupt entries, --force."""

import numpy as np
import pytest

from dermpipe.engine.cache import StageCache, stage_key
from dermpipe.engine.files import file_digest, write_text_atomic

VERSIONS = {"torch": "x"}


def _key(img_path, settings=None, model="m1", upstream=()):
    return stage_key(
        "crop",
        inputs=file_digest(img_path),
        settings=settings or {"size": 64},
        model=model,
        upstream=upstream,
        versions=VERSIONS,
    )


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.npy"
    np.save(path, np.zeros((8, 8, 3), np.uint8))
    return path


def test_hit_after_put(tmp_path, image):
    cache = StageCache(tmp_path / "cache", "crop")
    key = _key(image)
    assert cache.get(key) is None
    cache.put(key, {"crop": np.arange(12).reshape(3, 4)}, {"box": [1, 2, 3, 4]})
    arrays, meta = cache.get(key)
    assert np.array_equal(arrays["crop"], np.arange(12).reshape(3, 4)) and meta == {"box": [1, 2, 3, 4]}
    assert (cache.reused, cache.computed) == (1, 1)
    assert cache.summary().startswith("cache: 1 reused, 1 computed")


def test_key_misses_on_pixel_setting_model_upstream_version(tmp_path, image):
    base = _key(image)
    assert base == _key(image)
    other = tmp_path / "img2.npy"
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[3, 4, 1] = 1  # one pixel
    np.save(other, arr)
    assert _key(other) != base
    assert _key(image, settings={"size": 65}) != base
    assert _key(image, model="m2") != base
    assert _key(image, upstream=["abc"]) != base
    newer = {"torch": "y"}
    assert stage_key("crop", inputs=file_digest(image), settings={"size": 64}, model="m1", versions=newer) != base
    # the path does not matter, only the bytes
    copy = tmp_path / "copy.npy"
    copy.write_bytes(image.read_bytes())
    assert _key(copy) == base


def test_settings_order_does_not_matter(image):
    assert _key(image, {"a": 1, "b": [1, 2]}) == _key(image, {"b": [1, 2], "a": 1})


def test_get_or_compute_runs_once(tmp_path, image):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.ones(3)}, {"n": 1}

    cache = StageCache(tmp_path, "s")
    key = _key(image)
    cache.get_or_compute(key, compute)
    arrays, meta = cache.get_or_compute(key, compute)
    assert len(calls) == 1 and meta == {"n": 1} and arrays["x"].sum() == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_entry_is_recomputed(tmp_path, image, damage):
    cache = StageCache(tmp_path, "s")
    key = _key(image)
    path = cache.put(key, {"x": np.arange(1000, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        # change one value inside the stored array but keep the zip valid: rewrite with a wrong digest
        import io
        import zipfile

        with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
            members = {n: z.read(n) for n in z.namelist()}
        x = bytearray(members["x.npy"])
        x[-1] ^= 0xFF
        members["x.npy"] = bytes(x)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
        path.write_bytes(out.getvalue())
    elif damage == "garbage":
        path.write_bytes(b"not a zip at all")
    else:
        path.write_bytes(b"")
    assert cache.get(key) is None
    assert cache.corrupt == 1 and not path.exists()
    calls = []
    arrays, _ = cache.get_or_compute(key, lambda: (calls.append(1), {"x": np.arange(3)})[1])
    assert calls == [1] and arrays["x"].tolist() == [0, 1, 2]


def test_half_written_temp_file_is_never_read(tmp_path, image):
    cache = StageCache(tmp_path, "s")
    key = _key(image)
    final = cache.path(key)
    final.parent.mkdir(parents=True)
    (final.parent / f".{final.name}.123.tmp").write_bytes(b"PK half")  # what a killed writer leaves
    assert cache.get(key) is None and key not in cache
    cache.put(key, {"x": np.zeros(2)})
    assert cache.get(key) is not None


def test_force_recomputes(tmp_path, image):
    key = _key(image)
    StageCache(tmp_path, "s").put(key, {"x": np.zeros(2)})
    forced = StageCache(tmp_path, "s", force=True)
    assert forced.get(key) is None
    forced.get_or_compute(key, lambda: {"x": np.ones(2)})
    assert StageCache(tmp_path, "s").get(key)[0]["x"].tolist() == [1, 1]


def test_write_text_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_text_atomic(path, "first, a longer text\n")
    write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_write_text_atomic_keeps_the_old_file_when_the_write_is_cut_off(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "finished\n")

    def cut_off(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("dermpipe.engine.files.os.replace", cut_off)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "half")
    assert path.read_text() == "finished\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
