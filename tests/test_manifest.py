"""Manifests: a folder listing gives every entry a row or a reason; reading refuses a bad manifest in one line."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermpipe.data.listing import FolderListing, list_folder, manifest_from_folder
from dermpipe.data.manifest import Manifest, ManifestError, id_problem
from dermpipe.data.reading import MASK_SUFFIXES, ImageReadError, read_image

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, sockets and /dev/zero are POSIX")


def _photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(path)
    return path


def _listed(listing: FolderListing, root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Manifest id -> path relative to root; excluded path relative to root -> reason."""
    rows = {r["image_id"]: Path(r["image_path"]).relative_to(root.resolve()).as_posix() for r in listing.manifest.rows}
    excluded = {Path(r["path"]).relative_to(root.absolute()).as_posix(): r["reason"] for r in listing.excluded}
    return rows, excluded


def _in_time(function, *args, seconds: float = 10.0):
    """Call ``function`` in a thread; fail (instead of hanging the suite) when it does not return in time."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = function(*args)
        except BaseException as error:  # handed to the test below
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} did not return within {seconds} s (it blocks on a file)"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


# ---------------------------------------------------------------------------------------------------------------------
# list_folder


def test_every_entry_is_a_row_or_a_reason_and_formats_are_named(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for name in ("b.jpg", "a.PNG", "sub/c.tiff", "sub/deeper/d.bmp", "e.jpeg"):
        _photo(root / name)
    (root / "anim.gif").write_bytes(b"GIF89a")
    (root / "pic.webp").write_bytes(b"RIFF")
    (root / "IMG_0001.HEIC").write_bytes(b"heic")
    (root / "noextension").write_bytes(b"data")
    (root / "notes.txt").write_text("hello\n")
    (root / "empty.jpg").write_bytes(b"")
    _photo(root / ".hidden.jpg")
    _photo(root / ".thumbs" / "x.jpg")
    _photo(root / "__MACOSX" / "y.jpg")

    listing = list_folder(root)
    rows, excluded = _listed(listing, root)
    assert rows == {
        "a": "a.PNG",
        "b": "b.jpg",
        "e": "e.jpeg",
        "sub/c": "sub/c.tiff",
        "sub/deeper/d": "sub/deeper/d.bmp",
    }
    assert [r["image_id"] for r in listing.manifest.rows] == ["a", "b", "e", "sub/c", "sub/deeper/d"]  # sorted
    assert set(excluded) == {
        "anim.gif", "pic.webp", "IMG_0001.HEIC", "noextension", "notes.txt", "empty.jpg", ".hidden.jpg", ".thumbs",
        "__MACOSX",
    }  # fmt: skip
    assert excluded["anim.gif"].startswith("GIF images are not read") and "PNG (.png)" in excluded["anim.gif"]
    assert excluded["pic.webp"].startswith("WebP") and excluded["IMG_0001.HEIC"].startswith("HEIC")
    for name in ("anim.gif", "noextension", "notes.txt"):
        assert "JPEG (.jpg, .jpeg), PNG (.png), BMP (.bmp), TIFF (.tif, .tiff)" in excluded[name], name
    assert excluded["noextension"].startswith("no file extension")
    assert excluded["notes.txt"].startswith("'.txt' files are not images")
    assert "empty" in excluded["empty.jpg"] and "hidden" in excluded[".hidden.jpg"]
    assert excluded[".thumbs"].startswith("hidden folder") and "macOS" in excluded["__MACOSX"]
    assert all(set(r) == {"image_id", "path", "reason"} and "\n" not in r["reason"] for r in listing.excluded)
    assert listing.manifest.classes == () and all(Path(r["image_path"]).is_absolute() for r in listing.manifest.rows)
    assert manifest_from_folder(root) == listing.manifest  # the old entry point, same rows


def test_mask_names_are_listed_with_how_to_include_them(tmp_path: Path) -> None:
    assert MASK_SUFFIXES == ("_segmentation", "_lesion", "_superpixels")
    _photo(tmp_path / "arm_lesion.jpg")  # a user's photo that only looks like a PH2 mask by its name
    _photo(tmp_path / "ISIC_0000001_segmentation.png")
    _photo(tmp_path / "ISIC_0000001_superpixels.png")
    _photo(tmp_path / "ISIC_0000001.jpg")
    rows, excluded = _listed(list_folder(tmp_path), tmp_path)
    assert rows == {"ISIC_0000001": "ISIC_0000001.jpg"}
    reason = excluded["arm_lesion.jpg"]
    assert "'_lesion'" in reason and "rename" in reason and "arm-lesion.jpg" in reason
    assert "'_segmentation'" in excluded["ISIC_0000001_segmentation.png"]
    assert "'_superpixels'" in excluded["ISIC_0000001_superpixels.png"]
    kept, _ = _listed(list_folder(tmp_path, mask_names=False), tmp_path)
    assert set(kept) == {"ISIC_0000001", "arm_lesion", "ISIC_0000001_segmentation", "ISIC_0000001_superpixels"}


def test_clashing_ids_keep_their_suffix_and_same_names_in_folders_stay_apart(tmp_path: Path) -> None:
    for name in ("dup.jpg", "dup.png", "a/x.jpg", "b/x.jpg", "solo.jpg", "dup.jpg.png", "odd.jpg.png"):
        _photo(tmp_path / name)
    listing = list_folder(tmp_path)
    rows, _ = _listed(listing, tmp_path)
    assert rows == {
        "dup.jpg": "dup.jpg",
        "dup.png": "dup.png",
        "a/x": "a/x.jpg",
        "b/x": "b/x.jpg",
        "solo": "solo.jpg",
        "dup.jpg.png": "dup.jpg.png",  # without its suffix it would be 'dup.jpg', which dup.jpg keeps
        "odd.jpg": "odd.jpg.png",  # no clash: only the last suffix goes
    }
    assert len({r["image_id"] for r in listing.manifest.rows}) == len(listing.manifest)
    assert list_folder(tmp_path) == listing  # deterministic
    ids = [r["image_id"] for r in listing.manifest.rows]  # in path order
    assert ids == ["a/x", "b/x", "dup.jpg", "dup.jpg.png", "dup.png", "odd.jpg", "solo"]


@posix_only
def test_special_files_and_bad_links_are_listed_without_opening_them(tmp_path: Path) -> None:
    root = tmp_path / "p"
    _photo(root / "ok.jpg")
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would block until a writer comes
    os.symlink("/dev/zero", root / "zero.jpg")  # reading it would never end
    os.symlink(root / "gone.jpg", root / "broken.jpg")
    os.symlink(root / "loop_b.jpg", root / "loop_a.jpg")
    os.symlink(root / "loop_a.jpg", root / "loop_b.jpg")
    os.symlink(root, root / "back")  # a folder link to an ancestor: walked once
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(root / "sock.png"))
    except OSError:  # a path too long for AF_UNIX
        server.close()
        server = None
    listing = _in_time(list_folder, root)
    rows, excluded = _listed(listing, root)
    assert rows == {"ok": "ok.jpg"}
    assert "named pipe (FIFO)" in excluded["pipe.jpg"] and "not opened" in excluded["pipe.jpg"]
    assert "character device" in excluded["zero.jpg"] and "/dev/zero" in excluded["zero.jpg"]
    assert excluded["broken.jpg"].startswith("broken link")
    assert "loop" in excluded["loop_a.jpg"] and "loop" in excluded["loop_b.jpg"]
    assert "listed already" in excluded["back"]
    if server is not None:
        assert "socket" in excluded["sock.png"]
        server.close()
    with pytest.raises(ImageReadError, match=r"pipe\.jpg: is a named pipe"):
        _in_time(read_image, root / "pipe.jpg")


@posix_only
def test_names_that_cannot_be_ids_are_excluded_and_printable(tmp_path: Path) -> None:
    _photo(tmp_path / "fine.jpg")
    _photo(tmp_path / "two\nlines.jpg")
    bad = os.fsencode(str(tmp_path)) + b"/latin\xe9.jpg"
    try:
        with open(bad, "wb") as f:
            f.write(b"x")
    except OSError:  # a file system that only takes UTF-8 names
        bad = None
    listing = list_folder(tmp_path)
    assert [r["image_id"] for r in listing.manifest.rows] == ["fine"]
    reasons = {r["image_id"]: r["reason"] for r in listing.excluded}
    assert "control character" in reasons["two\\nlines.jpg"]
    if bad is not None:
        assert "not valid UTF-8" in reasons["latin\\xe9.jpg"]
    for row in listing.excluded:
        "".join(row.values()).encode("utf-8")  # writable to skipped.csv as is


def test_list_folder_refuses_what_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such folder"):
        list_folder(tmp_path / "nowhere")
    file = _photo(tmp_path / "one.jpg")
    with pytest.raises(ImageReadError, match="is a file, not a folder"):
        list_folder(file)


def test_a_listing_writes_and_reads_back_as_a_manifest(tmp_path: Path) -> None:
    for name in ("dup.jpg", "dup.png", "sub/é.jpg"):
        _photo(tmp_path / "in" / name)
    manifest = list_folder(tmp_path / "in").manifest
    manifest.write(tmp_path / "m.csv")
    again = Manifest.read(tmp_path / "m.csv")
    assert [(r["image_id"], r["image_path"]) for r in again.rows] == [
        (r["image_id"], r["image_path"]) for r in manifest.rows
    ]
    assert [r["image_id"] for r in again.rows] == ["dup.jpg", "dup.png", "sub/é"]


# ---------------------------------------------------------------------------------------------------------------------
# Manifest.read


def _write(path: Path, text: str | bytes, classes: list[str] | None = None) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    if classes is not None:
        path.with_suffix(".json").write_text(json.dumps({"classes": classes}))
    return path


def _one_line_error(path: Path, match: str, **kwargs) -> str:
    with pytest.raises(ManifestError, match=match) as caught:
        Manifest.read(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_read_resolves_relative_paths_and_keeps_metadata(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "m.csv", "image_id,image_path,label,age\nx,imgs/x.jpg,mel,40\ny,/abs/y.jpg,,\n", ["nv", "mel"]
    )
    manifest = Manifest.read(path)
    assert manifest.classes == ("nv", "mel")
    assert manifest.rows[0]["image_path"] == str((tmp_path / "imgs" / "x.jpg").resolve())
    assert manifest.rows[1]["image_path"] == "/abs/y.jpg" and manifest.rows[0]["age"] == "40"
    bom = _write(tmp_path / "bom.csv", b"\xef\xbb\xbfimage_id,image_path\nx,x.jpg\n")  # Excel's UTF-8 CSV
    assert Manifest.read(bom).rows[0]["image_id"] == "x"


def test_duplicate_ids_are_refused_naming_the_first_few_and_the_count(tmp_path: Path) -> None:
    lines = ["image_id,image_path"] + [f"id{i % 8},p{i}.jpg" for i in range(16)] + ["solo,s.jpg"]
    message = _one_line_error(_write(tmp_path / "m.csv", "\n".join(lines) + "\n"), "8 image ids repeat")
    assert "'id0' (2 rows, lines 2, 10)" in message
    assert "'id4'" in message and "'id5'" not in message and "and 3 more" in message
    assert "'solo'" not in message


@pytest.mark.parametrize(
    ("image_id", "what"),
    [
        ('""', "empty image_id"),
        ("/etc/passwd", "absolute path"),
        ("C:\\photos\\x", "absolute path"),
        ("../outside", "'..' path part"),
        ("a/../../b", "'..' path part"),
        ('"two\nlines"', "control character U\\+000A"),
        ("nul\x00id", "control character U\\+0000"),
    ],
)
def test_unusable_ids_are_refused_naming_the_row(tmp_path: Path, image_id: str, what: str) -> None:
    path = _write(tmp_path / "m.csv", f"image_id,image_path\nok,ok.jpg\n{image_id},x.jpg\n")
    message = _one_line_error(path, what)
    assert "line 3" in message or "line 4" in message  # the row's line (a quoted newline spans two)


def test_id_problem_accepts_relative_names() -> None:
    for fine in ("ISIC_0000000", "clinic/photo", "a..b", "dup.jpg", "é"):
        assert id_problem(fine) == "", fine


def test_missing_columns_not_utf8_and_not_a_file_are_one_line(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path / "a.csv", "id,path\nx,x.jpg\n"), "no column image_id, image_path")
    assert "'id', 'path'" in message
    _one_line_error(_write(tmp_path / "b.csv", "image_id,image_path\nx,\n"), "line 2: empty image_path")
    _one_line_error(_write(tmp_path / "c.csv", "image_id,image_path\ncaf\xe9,x.jpg\n".encode("latin-1")), "not UTF-8")
    _one_line_error(_write(tmp_path / "d.csv", b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xa4\xf0"), "UTF-8")
    _one_line_error(_write(tmp_path / "e.csv", ""), "is empty")
    (tmp_path / "folder.csv").mkdir()
    _one_line_error(tmp_path / "folder.csv", "is a folder")
    _one_line_error(tmp_path / "missing.csv", "not found")


def test_labels_outside_the_sidecar_classes_are_refused(tmp_path: Path) -> None:
    rows = "image_id,image_path,label\na,a.jpg,mel\nb,b.jpg,MEL\nc,c.jpg,bcc\nd,d.jpg,MEL\ne,e.jpg,\n"
    path = _write(tmp_path / "m.csv", rows, ["mel", "nv"])
    message = _one_line_error(path, "labels not among the classes")
    assert "'MEL' (2 rows, lines 3, 5)" in message and "'bcc' (1 rows, lines 4)" in message
    assert "m.json" in message and "'mel'" not in message.split("of its sidecar")[1]
    assert Manifest.read(path, classes=["mel", "nv", "MEL", "bcc"]).classes == ("mel", "nv", "MEL", "bcc")
    _one_line_error(path, "of the classes given", classes=["mel"])
    path.with_suffix(".json").unlink()
    assert Manifest.read(path).classes == ("MEL", "bcc", "mel")  # no sidecar: the labels found, sorted


def test_unreadable_sidecar_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "image_id,image_path\na,a.jpg\n")
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ManifestError, match="m.json is not readable JSON"):
        Manifest.read(path)
    path.with_suffix(".json").write_text(json.dumps({"classes": "mel"}))
    with pytest.raises(ManifestError, match="list of class names"):
        Manifest.read(path)
    path.with_suffix(".json").write_text(json.dumps({"classes": ["mel", "nv", "mel"]}))
    with pytest.raises(ManifestError, match=r"\['mel'\] twice"):
        Manifest.read(path)
