"""Bounds and links: the decode bound counts bytes of decoded pixels, from the header alone, in every reader path; a
folder walk never leaves the input folder through a link unless --follow-links allows it, and never reads the
command's own outputs; an output folder reached through a link into the input is refused; DataLoader workers end
with their parent, whether it is killed (SIGKILL) or terminated (SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_untrained_pipeline
from corpus import png_header_only
from PIL import Image

from dermpipe.data import pixels as pixel_conversion
from dermpipe.data import reading
from dermpipe.data.formats.class_folders import read_folder
from dermpipe.data.listing import list_folder, list_images, walk_files
from dermpipe.data.reading import ImageTooLargeError, image_size, read_image, read_mask
from dermpipe.engine.files import OutputPathError, check_output_folder
from dermpipe.pipeline.demo import write_photo_folder
from dermpipe.predict import cli as predict
from dermpipe.serve.uploads import Upload, check_upload

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="symlinks, /proc and prctl are POSIX/Linux")

CLASSES = ("nv", "mel", "bkl", "bcc")


# --- the decode bound, in bytes of decoded pixels -------------------------------------------------------------------


def test_a_16_bit_rgba_png_under_the_pixel_count_is_refused_by_its_decoded_bytes(tmp_path, monkeypatch):
    path = tmp_path / "deep.png"
    path.write_bytes(png_header_only(12_000, 12_000, depth=16, colour=6))  # 144 Mpx x 8 bytes, in 200 bytes
    assert path.stat().st_size < 1000

    def no_decode(*args, **kwargs):
        raise AssertionError("pixels decoded past the bound")

    monkeypatch.setattr(reading.cv2, "imdecode", no_decode)  # the header alone must refuse it
    expected = "12000x12000 pixels (144 megapixels) of 4 channel(s) x 16 bits: 1,152 MB decoded, over the 450 MB bound"
    for reader in (read_image, read_mask, image_size):  # batch prediction, training and the server read with these
        with pytest.raises(ImageTooLargeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            reader(path)
    head = path.read_bytes()[:16]
    status, reason = check_upload(Upload("deep.png", path, path.stat().st_size, head))  # the server's check
    assert status == 413 and reason.startswith("deep.png: image is 12000x12000") and "450 MB bound" in reason


@pytest.mark.parametrize(
    ("pixels", "decoded"),
    [
        (np.zeros((100, 100, 3), np.uint8), 30_000),
        (np.zeros((100, 100), np.uint8), 30_000),  # grey: counted as the 8-bit RGB image it becomes
        (np.zeros((100, 100, 4), np.uint8), 40_000),
        (np.zeros((100, 100, 3), np.uint16), 60_000),
        (np.zeros((100, 100, 4), np.uint16), 80_000),
        (np.zeros((100, 100), np.uint16), 30_000),  # 20,000 bytes of samples, 30,000 as 8-bit RGB
    ],
    ids=["rgb8", "grey8", "rgba8", "rgb16", "rgba16", "grey16"],
)
def test_the_bound_counts_channels_and_bytes_per_sample(tmp_path, monkeypatch, pixels, decoded):
    path = tmp_path / "image.png"
    assert cv2.imwrite(str(path), pixels)
    monkeypatch.setattr(reading, "MAX_DECODED_BYTES", decoded)
    assert read_image(path).shape == (100, 100, 3)
    monkeypatch.setattr(reading, "MAX_DECODED_BYTES", decoded - 1)
    with pytest.raises(ImageTooLargeError, match=f"{decoded:,} bytes decoded, over the {decoded - 1:,} bytes bound"):
        read_image(path)


def test_conversions_band_by_band_give_the_same_pixels(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rgba16 = rng.integers(0, 65536, (37, 23, 4), dtype=np.uint16)
    grey16 = rng.integers(0, 65536, (37, 23), dtype=np.uint16)
    paths = [tmp_path / "rgba16.png", tmp_path / "grey16.png"]
    for path, pixels in zip(paths, (rgba16, grey16)):
        assert cv2.imwrite(str(path), pixels)
    whole = [read_image(p) for p in paths]
    monkeypatch.setattr(pixel_conversion, "_CONVERT_PIXELS", 50)  # two rows a band, the last band shorter
    assert all(np.array_equal(read_image(p), w) for p, w in zip(paths, whole))
    colour, alpha = rgba16[:, :, 2::-1] / 65535.0, rgba16[:, :, 3:] / 65535.0
    expected = np.clip((colour * alpha + 1 - alpha) * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(whole[0].astype(int) - expected).max() <= 1  # composited over white, as documented


# --- folder walks and links ------------------------------------------------------------------------------------------


def _photo(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def linked(tmp_path: Path) -> dict[str, Path]:
    """An input folder with a photo, a folder link to /, a folder link and a file link to photos outside it, and a
    folder link and a file link that stay inside it."""
    inp, outside = tmp_path / "input", tmp_path / "outside"
    _photo(inp / "a.png", 1)
    _photo(inp / "sub" / "b.png", 2)
    _photo(outside / "far" / "c.png", 3)
    _photo(outside / "d.png", 4)
    os.symlink("/", inp / "root")
    os.symlink(outside / "far", inp / "far")
    os.symlink(outside / "d.png", inp / "d.png")
    os.symlink(inp / "sub", inp / "again")  # inside: listed once, under its real path
    os.symlink(inp / "sub" / "b.png", inp / "b_link.png")  # inside: read
    return {"input": inp, "outside": outside}


def test_a_folder_listing_never_leaves_the_input_through_a_link(linked):
    listing = list_folder(linked["input"])
    assert sorted(r["image_id"] for r in listing.manifest.rows) == ["a", "b_link", "sub/b"]
    reasons = {row["image_id"]: row["reason"] for row in listing.excluded}
    assert reasons["root"] == "link to a folder outside the input folder (/): not searched (pass --follow-links to " \
        "search it)"  # fmt: skip
    assert reasons["far"].startswith(f"link to a folder outside the input folder ({linked['outside'] / 'far'})")
    assert reasons["d.png"] == f"link to a file outside the input folder ({linked['outside'] / 'd.png'}): not read " \
        "(pass --follow-links to read it)"  # fmt: skip
    assert "again" in reasons and "listed already" in reasons["again"]
    os.unlink(linked["input"] / "root")
    # with --follow-links too, nothing in the command's output folder is read: here the outside folder is the output
    followed = list_folder(linked["input"], follow_links=True, outputs=[linked["outside"]])
    assert sorted(r["image_id"] for r in followed.manifest.rows) == ["a", "b_link", "sub/b"]
    reasons = {row["image_id"]: row["reason"] for row in followed.excluded}
    assert "this command's output folder" in reasons["far"] and "this command's output folder" in reasons["d.png"]


def test_follow_links_reads_the_links_out_of_the_input(linked):
    os.unlink(linked["input"] / "root")
    listing = list_folder(linked["input"], follow_links=True)
    assert sorted(r["image_id"] for r in listing.manifest.rows) == ["a", "b_link", "d", "far/c", "sub/b"]


def test_the_other_walks_stay_inside_the_input_too(linked, tmp_path):
    excluded: list[tuple[Path, str]] = []
    files = walk_files(linked["input"], excluded=excluded)
    assert sorted(p.name for p in files) == ["a.png", "b.png", "b_link.png"]  # b.png once, through one of its paths
    assert sorted(p.name for p, _ in excluded) == ["d.png", "far", "root"]
    assert sorted(p.name for p in list_images(linked["input"])) == ["a.png", "b.png", "b_link.png"]
    converted = read_folder(linked["input"])  # the folder converter
    assert sorted(Path(row["image_path"]).name for row in converted.rows) == ["a.png", "b.png", "b_link.png"]
    (note,) = [note for note in converted.report.notes if "out of the folder" in note]
    assert note.startswith("3 link(s) out of the folder not followed: ") and "'d.png': link to a file outside" in note


def test_an_output_folder_reached_through_a_link_into_the_input_is_refused(tmp_path):
    inp, elsewhere = tmp_path / "input", tmp_path / "elsewhere"
    inp.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, inp / "results")
    with pytest.raises(OutputPathError, match="is inside the input folder"):
        check_output_folder(inp / "results", "--out", [inp])  # as written, inside; resolved, outside
    os.symlink(inp, tmp_path / "input_link")
    with pytest.raises(OutputPathError, match="is inside the input folder"):
        check_output_folder(inp / "out", "--out", [tmp_path / "input_link"])  # the input named through a link
    assert check_output_folder(elsewhere, "--out", [inp]) == elsewhere


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_untrained_pipeline(tmp_path_factory.mktemp("stages"), ("test_resnet",), CLASSES)


def _predict(stages: Path, photos: Path, out: Path, *extra: str) -> int:
    return predict.main([
        "--input", str(photos), "--out", str(out), "--device", "cpu", "--segmentation-run", str(stages / "seg"),
        "--classification-root", str(stages / "cls"), "--ensemble-run", str(stages / "ens"),
        "--set", f"run.cache_dir={out.parent / 'cache'}", "--set", "run.threads=1", *extra,
    ])  # fmt: skip


def test_a_link_to_the_output_inside_the_input_never_makes_its_outputs_inputs(stages, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    write_photo_folder(photos, 3, 48, seed=1)
    os.symlink(out, photos / "results")  # the report's pictures would come back as photos
    assert _predict(stages, photos, out, "--set", "outputs.crops=true") == 0
    first = (out / "predictions.csv").read_bytes()
    for extra in ((), ("--follow-links",)):
        assert _predict(stages, photos, out, "--set", "outputs.crops=true", *extra) == 0
        assert (out / "predictions.csv").read_bytes() == first  # the same three photos, no picture of the report
        skipped = (out / "skipped.csv").read_text()
        assert "results" in skipped and ("outside the input folder" in skipped or "output folder" in skipped)


# --- DataLoader workers end with their parent ------------------------------------------------------------------------

# The prediction's workers mark themselves (a file named by their pid) and then work for ten minutes.
SLOW_WORKERS = """
import os, sys, time
from dermpipe.predict import cli as predict
from dermpipe.segmentation import prediction
marks = sys.argv[1]
def slow(self, index):
    open(os.path.join(marks, str(os.getpid())), "w").close()
    time.sleep(600)
prediction._Preparing.__getitem__ = slow
raise SystemExit(predict.main(sys.argv[2:]))
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_dataloader_workers_end_with_their_parent(stages, tmp_path, how):
    photos, marks = tmp_path / "photos", tmp_path / "marks"
    write_photo_folder(photos, 6, 48, seed=2)
    marks.mkdir()
    command = [
        sys.executable, "-c", SLOW_WORKERS, str(marks), "--input", str(photos), "--out", str(tmp_path / "out"),
        "--device", "cpu", "--segmentation-run", str(stages / "seg"), "--classification-root", str(stages / "cls"),
        "--ensemble-run", str(stages / "ens"), "--set", f"run.cache_dir={tmp_path / 'cache'}",
        "--set", "run.num_workers=2", "--set", "batch_size=2", "--set", "run.threads=1",
    ]  # fmt: skip
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(workers) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = sorted(int(p.name) for p in marks.iterdir())
        assert len(workers) == 2, parent.stderr.read().decode() if parent.poll() is not None else "no workers"
        parent.send_signal(how)
        parent.wait(60)
        deadline = time.monotonic() + 30  # the kernel kills them at once; a worker left behind sleeps ten minutes
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], f"workers outlived their parent ({how.name})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers:  # only this test's own workers, by their id, if the assertion above failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
