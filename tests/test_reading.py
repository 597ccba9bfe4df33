"""Tests for data.reading: formats, EXIF orientation, bit depths, clear errors, masks, listing, memory bound."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from corpus import png_header_only
from PIL import Image, ImageOps

from dermpipe.data import reading
from dermpipe.data.listing import list_images
from dermpipe.data.reading import IMAGE_EXTENSIONS, ImageReadError, image_size, read_image, read_mask
from dermpipe.engine.files import FileInputError, file_digest


def _smooth_rgb(height: int, width: int) -> np.ndarray:
    """A smooth colour image (compresses well, so JPEG stays close to it)."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    red = 200 * x / max(1, width - 1) + 30
    green = 200 * y / max(1, height - 1) + 30
    blue = np.full_like(x, 90.0)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def _quadrant_image(height: int, width: int) -> np.ndarray:
    """Dark image with a bright red top-left quadrant and a green bottom-right one: any flip or turn shows."""
    image = np.full((height, width, 3), 20, dtype=np.uint8)
    image[: height // 2, : width // 2] = (230, 30, 30)
    image[height // 2 :, width // 2 :] = (30, 200, 30)
    return image


@pytest.mark.parametrize("extension", [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".JPG"])
def test_read_image_formats_give_rgb_uint8(tmp_path: Path, extension: str) -> None:
    pixels = _smooth_rgb(48, 64)
    path = tmp_path / f"img{extension}"
    options = {"quality": 95} if extension.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(pixels).save(path, **options)
    image = read_image(path)
    assert image.shape == (48, 64, 3)
    assert image.dtype == np.uint8
    tolerance = 4 if extension.lower() in (".jpg", ".jpeg") else 0
    assert np.abs(image.astype(int) - pixels.astype(int)).mean() <= tolerance  # RGB order kept, not BGR


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_full_and_reduced(tmp_path: Path, orientation: int) -> None:
    stored = _quadrant_image(64, 128)
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[274] = orientation
    path = tmp_path / "oriented.jpg"
    picture.save(path, exif=exif, quality=95)
    with Image.open(path) as opened:
        upright = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))

    full = read_image(path)
    assert full.shape == upright.shape
    assert np.abs(full.astype(int) - upright.astype(int)).mean() < 3
    assert image_size(path) == upright.shape[:2]

    # max_side=16 on a 128 px long side makes the reader use the 1/8 reduced JPEG decode.
    reduced = read_image(path, max_side=16)
    expected = cv2.resize(upright, (reduced.shape[1], reduced.shape[0]), interpolation=cv2.INTER_AREA)
    assert max(reduced.shape[:2]) == 16
    assert reduced.shape[:2] == ((16, 8) if orientation >= 5 else (8, 16))
    assert np.abs(reduced.astype(int) - expected.astype(int)).mean() < 12


def test_max_side_keeps_aspect_and_leaves_small_images(tmp_path: Path) -> None:
    pixels = _smooth_rgb(200, 300)
    png = tmp_path / "wide.png"
    jpg = tmp_path / "wide.jpg"
    Image.fromarray(pixels).save(png)
    Image.fromarray(pixels).save(jpg, quality=95)
    assert read_image(png, max_side=100).shape == (67, 100, 3)
    assert read_image(jpg, max_side=100).shape == (67, 100, 3)
    reference = cv2.resize(pixels, (100, 67), interpolation=cv2.INTER_AREA)
    assert np.abs(read_image(jpg, max_side=100).astype(int) - reference.astype(int)).mean() < 3
    assert read_image(png, max_side=500).shape == (200, 300, 3)
    with pytest.raises(ValueError, match="max_side"):
        read_image(png, max_side=0)


def test_sixteen_bit_palette_grayscale_become_8bit_rgb(tmp_path: Path) -> None:
    colour16 = np.zeros((8, 10, 3), dtype=np.uint16)
    colour16[..., 0] = 65535  # OpenCV writes BGR: blue at full scale
    colour16[..., 2] = 60000
    cv2.imwrite(str(tmp_path / "c16.png"), colour16)
    cv2.imwrite(str(tmp_path / "c16.tif"), colour16)
    for name in ("c16.png", "c16.tif"):
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8
        assert tuple(image[0, 0]) == (233, 0, 255)  # 60000/257 = 233.5 -> 233, RGB order

    gray16 = np.full((8, 10), 257 * 100, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    assert tuple(read_image(tmp_path / "g16.png")[3, 3]) == (100, 100, 100)

    rgb = _quadrant_image(16, 16)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=3).save(tmp_path / "palette.png")
    assert np.array_equal(read_image(tmp_path / "palette.png"), rgb)

    gray = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (16, 16, 3)
    assert np.array_equal(image[..., 0], gray) and np.array_equal(image[..., 2], gray)


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 0, 0)
    rgba[0, :, 3] = 255  # opaque: its own colour
    rgba[1, :, 3] = 0  # transparent: white
    rgba[2, :, 3] = 128  # half: the blend
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png").astype(int)
    assert tuple(image[0, 0]) == (200, 0, 0)
    assert tuple(image[1, 0]) == (255, 255, 255)
    assert np.allclose(image[2, 0], (227, 127, 127), atol=1)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    noise = np.random.default_rng(0).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, quality=90)
    png = tmp_path / "good.png"
    Image.fromarray(_smooth_rgb(64, 64)).save(png)
    tif = tmp_path / "good.tif"
    Image.fromarray(noise).save(tif)
    bmp = tmp_path / "good.bmp"
    Image.fromarray(noise).save(bmp)
    files = {
        "missing": tmp_path / "missing.jpg",
        "empty": tmp_path / "empty.jpg",
        "text": tmp_path / "notes.jpg",
        "truncated_jpeg": tmp_path / "cut.jpg",
        "truncated_jpeg_late": tmp_path / "cut_late.jpg",  # header intact: the pixel decoder must notice
        "truncated_png": tmp_path / "cut.png",
        "truncated_tiff": tmp_path / "cut.tif",
        "truncated_bmp": tmp_path / "cut.bmp",
        "garbled": tmp_path / "garbled.png",
        "folder": tmp_path / "folder.png",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    files["truncated_jpeg"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated_jpeg_late"].write_bytes(good.read_bytes()[: good.stat().st_size * 9 // 10])
    files["truncated_png"].write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    for kind, good_file in (("truncated_tiff", tif), ("truncated_bmp", bmp)):
        files[kind].write_bytes(good_file.read_bytes()[: good_file.stat().st_size * 3 // 4])
    data = bytearray(png.read_bytes())
    data[60:200] = b"\x00" * 140  # header intact, pixel data destroyed
    files["garbled"].write_bytes(bytes(data))
    files["folder"].mkdir()
    return files


def test_unreadable_files_raise_one_clear_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    for kind, path in _bad_files(tmp_path).items():
        for reader in (read_image, read_mask):
            with pytest.raises(ImageReadError) as caught:
                reader(path)
            message = str(caught.value)
            assert message.startswith(f"{path}: "), kind
            assert message.endswith(")") and "(" in message, kind  # "<path>: <what> (<fix>)"
            assert "\n" not in message
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # no OpenCV/libpng noise beside our one message
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageReadError, match="no such file"):
        image_size(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match="not a readable image"):
        image_size(tmp_path / "notes.jpg")


def test_unsupported_format_is_named(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    Image.fromarray(_smooth_rgb(8, 8)).save(path)
    with pytest.raises(ImageReadError, match="GIF images are not supported"):
        read_image(path)


def _returns_in_time(function, *args, seconds: float = 10.0) -> BaseException | None:
    """Call ``function`` in a thread; the exception it raised (None if none), failing if it blocks past ``seconds``."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            function(*args)
        except BaseException as error:  # handed back to the test
            box[0] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__}{args} blocked: it opened a file it should only have stat-ed"
    return box[0]


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")
def test_special_files_and_bad_links_are_refused_unopened(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink(tmp_path / "loop_b.jpg", tmp_path / "loop_a.jpg")
    os.symlink(tmp_path / "loop_a.jpg", tmp_path / "loop_b.jpg")
    expected = {
        "pipe.jpg": "is a named pipe (FIFO), not an image file",
        "zero.png": "is a character device (via a link to /dev/zero)",
        "broken.jpg": "broken link: it points to",
        "loop_a.jpg": "symbolic link loop",
    }
    for name, what in expected.items():
        for reader in (read_image, read_mask, image_size):
            error = _returns_in_time(reader, tmp_path / name)
            assert isinstance(error, ImageReadError), (name, reader.__name__, error)
            message = str(error)
            assert message.startswith(f"{tmp_path / name}: {what}"), message
            assert message.endswith(")") and "\n" not in message
    assert capfd.readouterr().err == ""


def test_file_size_bound_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "photo.png"
    Image.fromarray(_smooth_rgb(32, 32)).save(path)
    assert read_image(path).shape == (32, 32, 3)
    monkeypatch.setattr(reading, "MAX_FILE_BYTES", path.stat().st_size - 1)
    for reader in (read_image, read_mask, image_size):
        with pytest.raises(ImageReadError) as caught:
            reader(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: file is ") and "bound on one image file" in message
        assert "MAX_FILE_BYTES" in message and message.endswith(")")
    assert reading.MAX_FILE_BYTES < 2**30  # the shipped bound: 512 MiB
    monkeypatch.undo()
    assert reading.MAX_FILE_BYTES == 512 * 2**20


def test_pixel_bound_and_decompression_bombs_are_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between our bound (150 Mpx) and Pillow's refusal (about 179 Mpx): ours speaks, from the header alone.
    ours = tmp_path / "ours.png"
    ours.write_bytes(png_header_only(13_000, 12_000))
    # Far over Pillow's decompression-bomb bound: Pillow refuses at open, we say it in our form.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40_000, 40_000))
    over = "156 megapixels) of 1 channel(s) x 8 bits: 468 MB decoded, over the 450 MB bound on decoded pixels"
    for path, what in ((ours, over), (bomb, "too large to decode")):
        assert path.stat().st_size < 1000
        for reader in (read_image, read_mask, image_size):
            with pytest.raises(ImageReadError) as caught:
                reader(path)
            message = str(caught.value)
            assert message.startswith(f"{path}: image is ") and what in message, message
            assert "decompression bomb" in message and message.endswith(")") and "\n" not in message
    small = tmp_path / "small.png"
    Image.fromarray(_smooth_rgb(20, 10)).save(small)
    monkeypatch.setattr(reading, "MAX_DECODED_BYTES", 599)  # 20 x 10 pixels of 8-bit RGB: 600 bytes
    expected = r"20 pixels \(0 megapixels\) of 3 channel\(s\) x 8 bits: 600 bytes decoded, over the 599 bytes bound"
    with pytest.raises(ImageReadError, match=expected):
        read_image(small)
    monkeypatch.setattr(reading, "MAX_DECODED_BYTES", 600)
    assert read_image(small).shape == (20, 10, 3)


def test_read_mask_binarises_and_checks_size(tmp_path: Path) -> None:
    values = np.array([[0, 127, 128, 255]] * 3, dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m_segmentation.png")
    mask = read_mask(tmp_path / "m_segmentation.png")
    assert mask.dtype == np.uint8
    assert mask.tolist() == [[0, 0, 1, 1]] * 3

    rgb_mask = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb_mask[:, 2:] = 255
    Image.fromarray(rgb_mask).save(tmp_path / "rgb_mask.bmp")
    assert read_mask(tmp_path / "rgb_mask.bmp", size=(3, 4)).tolist() == [[0, 0, 1, 1]] * 3

    with pytest.raises(ImageReadError) as caught:
        read_mask(tmp_path / "m_segmentation.png", size=(5, 4))
    assert "3x4" in str(caught.value) and "5x4" in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "m_segmentation.png"))


def test_read_mask_resizes_same_aspect_mask(tmp_path: Path) -> None:
    # HAM10000 style: the mask at 3x its image's size.
    big = np.zeros((30, 45), dtype=np.uint8)
    big[:15, :] = 255
    Image.fromarray(big).save(tmp_path / "ham_segmentation.png")
    mask = read_mask(tmp_path / "ham_segmentation.png", size=(10, 15))
    assert mask.shape == (10, 15)
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert mask[:5].all() and not mask[5:].any()
    with pytest.raises(ImageReadError, match="aspect"):
        read_mask(tmp_path / "ham_segmentation.png", size=(10, 20))


def test_list_images_recursive_sorted_skips_hidden_and_masks(tmp_path: Path) -> None:
    names = [
        "b.jpg",
        "a.PNG",
        "sub/c.tiff",
        "sub/deeper/d.BMP",
        "sub/e.jpeg",
        "sub/f.tif",
        "ISIC_0000001_segmentation.png",
        "ISIC_0000001_Segmentation.png",
        "IMD002_lesion.bmp",
        "ISIC_0000001_superpixels.png",
        ".hidden.jpg",
        ".cache/x.jpg",
        "notes.txt",
        "labels.csv",
        "empty.jpg",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"" if name == "empty.jpg" else b"x")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.jpg")  # never listed, never opened
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.PNG", "b.jpg", "sub/c.tiff", "sub/deeper/d.BMP", "sub/e.jpeg", "sub/f.tif"]
    assert all(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in found)
    with pytest.raises(ImageReadError, match="no such folder"):
        list_images(tmp_path / "nowhere")


def test_file_digest_is_sha256_of_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, size=(5 << 20) // 2, dtype=np.uint8).tobytes()  # 2.5 MiB
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_digest(path) != hashlib.sha256(data).hexdigest()
    with pytest.raises(FileInputError, match="no such file"):
        file_digest(tmp_path / "gone.bin")


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from dermpipe.data.reading import read_image
    image = read_image(sys.argv[1], max_side=int(sys.argv[2]) or None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    print(json.dumps({"shape": list(image.shape), "peak_mb": peak * scale / 2**20}))
    """
)


# Linux carries the spawning process's peak RSS into the child's ru_maxrss across vfork+exec, so a large pytest
# process would inflate the number: a small intermediate Python starts the measured one.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def _peak_rss(path: Path, max_side: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", _PEAK_SCRIPT, str(path), str(max_side)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_large_jpeg_reduced_decode_keeps_memory_bounded(tmp_path: Path) -> None:
    pytest.importorskip("resource")
    height, width = 4000, 6000
    row = np.linspace(0, 255, width, dtype=np.float32)
    column = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = row
    image[..., 1] = column
    image[..., 2] = 128
    path = tmp_path / "big.jpg"
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    del image

    reduced = _peak_rss(path, 1024)
    full = _peak_rss(path, 0)
    assert reduced["shape"] == [683, 1024, 3]
    assert full["shape"] == [4000, 6000, 3]
    assert reduced["peak_mb"] < 1024
    # The full decode holds at least one 72 MB frame; the reduced decode never does.
    assert full["peak_mb"] - reduced["peak_mb"] > 50
