"""A corpus of bad inputs, generated at test time (no committed images), with the behaviour each must have.

``CORPUS`` is the registry: one :class:`Kind` per kind of input, in the order of the table in docs/reliability.md
(a test keeps the two equal). ``build(folder)`` writes the kind into an empty ``folder`` and returns what a stage is
given: for a ``folder`` kind, its entries (each must be accounted for once by a folder run); for a ``manifest``,
``mask`` or ``image`` kind (a bad manifest, a bad mask or image that a good manifest names), ``[manifest CSV]``, with
its class sidecar, images and masks beside it.

Outcomes, as tests/test_bad_inputs.py asserts them:

- ``predicted``: one row in predictions.csv (and crops.csv), no quality reason about the photo itself;
- ``predicted+flagged``: one row, a quality reason containing ``expect``, and ``refer`` = 1;
- ``skipped``: one row in skipped.csv whose reason (the reader's, from opening the file) contains ``expect``;
- ``excluded``: one row in skipped.csv whose reason (the folder listing's, the file never opened) contains ``expect``;
- ``accepted``: (mask kinds) read as documented, and segmentation training runs on it;
- ``refused``: every stage that reads the manifest (for a mask or image kind: every training that reads the file)
  ends with one ``error:`` line containing ``expect`` and exit status 2, and makes no run or output folder.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from dermpipe.data.generator import make_sample

Outcome = Literal["predicted", "predicted+flagged", "skipped", "excluded", "accepted", "refused"]
CLASSES = ("nv", "mel")
SIDE = 96  # photos of the corpus: large enough (>= 64 px) not to be flagged as too small


@dataclass(frozen=True)
class Kind:
    """One kind of bad input: how to make it, what the docs say happens, and what the tests assert."""

    name: str
    build: Callable[[Path], list[Path]]
    behaviour: str  # the one-line documented behaviour, as in docs/reliability.md's table
    outcome: Outcome
    expect: str = ""  # a fragment of the reason (skipped, excluded, refused) or of the quality cell (flagged)
    # what it is: an entry of a folder, a manifest, a mask or image a manifest row names
    level: Literal["folder", "manifest", "mask", "image"] = "folder"


# --- pixels ---------------------------------------------------------------------------------------------------------


def photo(seed: int = 0, side: int = SIDE, label: str = "nv") -> np.ndarray:
    """A synthetic dermoscopy photo (RGB uint8) that the quality checks do not flag."""
    image, _ = make_sample(np.random.default_rng(seed), label, side, hair=0.0, ruler=0.0)
    return image


def sample(seed: int, side: int = 48, label: str = "nv") -> tuple[np.ndarray, np.ndarray]:
    """A synthetic photo and its exact 0/1 lesion mask."""
    return make_sample(np.random.default_rng(seed), label, side, hair=0.0, ruler=0.0)


def save(path: Path, pixels: np.ndarray, **options) -> Path:
    """Write RGB(A) or grey pixels with Pillow (the suffix picks the format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return path


def png_header_only(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels of ``depth`` bits and PNG colour type ``colour`` (0:
    grey, 6: RGBA), with a tiny IDAT: a few hundred bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# --- folder kinds ---------------------------------------------------------------------------------------------------


def _truncated_jpeg(folder: Path) -> list[Path]:
    whole = save(folder / "whole.tmp.jpg", photo(1), quality=90)
    path = folder / "truncated.jpg"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    return [path]


def _truncated_png(folder: Path) -> list[Path]:
    whole = save(folder / "whole.tmp.png", photo(2))
    path = folder / "truncated.png"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    return [path]


def _zero_bytes(folder: Path) -> list[Path]:
    path = folder / "empty.jpg"
    path.write_bytes(b"")
    return [path]


def _text_as_jpeg(folder: Path) -> list[Path]:
    path = folder / "notes.jpg"
    path.write_text("this is a text file, not a photo\n")
    return [path]


def _html_as_png(folder: Path) -> list[Path]:
    path = folder / "page.png"
    path.write_text("<!DOCTYPE html><html><body><img src='lesion.png'></body></html>\n")
    return [path]


def _rgba_png(folder: Path) -> list[Path]:
    pixels = np.dstack([photo(3), np.full((SIDE, SIDE), 255, np.uint8)])
    pixels[:8, :8, 3] = 0  # a transparent corner: composited over white
    return [save(folder / "rgba.png", pixels)]


def _grey_png(folder: Path) -> list[Path]:
    return [save(folder / "grey.png", cv2.cvtColor(photo(4), cv2.COLOR_RGB2GRAY))]


def _grey_alpha_png(folder: Path) -> list[Path]:
    grey = cv2.cvtColor(photo(5), cv2.COLOR_RGB2GRAY)
    image = Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA")
    path = folder / "grey_alpha.png"
    image.save(path)
    return [path]


def _palette_png(folder: Path) -> list[Path]:
    path = folder / "palette.png"
    Image.fromarray(photo(6)).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(path)
    return [path]


def _cmyk_jpeg(folder: Path) -> list[Path]:
    path = folder / "cmyk.jpg"
    Image.fromarray(photo(7)).convert("CMYK").save(path, quality=95)
    return [path]


def _png16(folder: Path) -> list[Path]:
    path = folder / "deep16.png"
    assert cv2.imwrite(str(path), (photo(8).astype(np.uint16) * 257)[:, :, ::-1].copy())
    return [path]


def _tiff16(folder: Path) -> list[Path]:
    path = folder / "deep16.tif"
    assert cv2.imwrite(str(path), (photo(9).astype(np.uint16) * 257)[:, :, ::-1].copy())
    return [path]


def _multipage_tiff(folder: Path) -> list[Path]:
    path = folder / "pages.tiff"
    first, *rest = [Image.fromarray(photo(10 + i)) for i in range(3)]
    first.save(path, save_all=True, append_images=rest)
    return [path]


def _exif_rotated_jpeg(folder: Path) -> list[Path]:
    stored = photo(13)[:, : SIDE * 3 // 4]  # 96 high, 72 wide as stored; 72 high, 96 wide upright
    picture = Image.fromarray(np.ascontiguousarray(stored))
    exif = picture.getexif()
    exif[274] = 6  # rotate 90 degrees clockwise to view
    path = folder / "rotated.jpg"
    picture.save(path, exif=exif, quality=95)
    return [path]


def _huge_image(folder: Path) -> list[Path]:
    path = folder / "huge.png"
    path.write_bytes(png_header_only(13_000, 12_000))  # 156 Mpx: just over the 150 Mpx bound, from the header alone
    return [path]


def _rgba16_over_bound(folder: Path) -> list[Path]:
    path = folder / "deep_rgba.png"
    # 144 Mpx, under 150 Mpx, but 8 bytes a pixel decoded: 1,152 MB, over the 450 MB bound on decoded pixels
    path.write_bytes(png_header_only(12_000, 12_000, depth=16, colour=6))
    return [path]


def _decompression_bomb(folder: Path) -> list[Path]:
    path = folder / "bomb.png"
    path.write_bytes(png_header_only(40_000, 40_000))  # 1.6 Gpx claimed by a file of a few hundred bytes
    return [path]


def _space_name(folder: Path) -> list[Path]:
    return [save(folder / "my lesion photo.jpg", photo(14), quality=90)]


def _unicode_name(folder: Path) -> list[Path]:
    return [save(folder / "läsion_ünïcode_皮膚.jpg", photo(15), quality=90)]


def _leading_dash_name(folder: Path) -> list[Path]:
    return [save(folder / "-rf.jpg", photo(16), quality=90)]


def _newline_name(folder: Path) -> list[Path]:
    return [save(folder / "two\nlines.jpg", photo(17), quality=90)]


def _nested_folders(folder: Path) -> list[Path]:
    return [save(folder / "a" / "b" / "c" / "deep.jpg", photo(18), quality=90)]


def _symlink_loop(folder: Path) -> list[Path]:
    a, b = folder / "loop_a.jpg", folder / "loop_b.jpg"
    os.symlink(b, a)
    os.symlink(a, b)
    return [a, b]


def _folder_link_to_root(folder: Path) -> list[Path]:
    path = folder / "everything"
    os.symlink("/", path)  # followed, it would list /proc, /dev and /usr
    return [path]


def _file_link_outside(folder: Path) -> list[Path]:
    # the corpus folder is ROOT/corpus/<class>/<kind>: the photo goes to ROOT/outside_the_corpus, beside the input
    outside = save(folder.parents[2] / "outside_the_corpus" / "elsewhere.jpg", photo(40), quality=90)
    path = folder / "elsewhere.jpg"
    os.symlink(outside, path)
    return [path]


def _broken_symlink(folder: Path) -> list[Path]:
    path = folder / "broken.jpg"
    os.symlink(folder / "gone.jpg", path)
    return [path]


def _fifo(folder: Path) -> list[Path]:
    path = folder / "pipe.jpg"
    os.mkfifo(path)  # opening it for reading would block until a writer comes
    return [path]


def _dev_zero(folder: Path) -> list[Path]:
    path = folder / "zero.png"
    os.symlink("/dev/zero", path)  # reading it would never end
    return [path]


def _gif(folder: Path) -> list[Path]:
    return [save(folder / "anim.gif", photo(19))]


def _webp(folder: Path) -> list[Path]:
    return [save(folder / "photo.webp", photo(20))]


def _no_extension(folder: Path) -> list[Path]:
    path = folder / "IMG_0001"
    path.write_bytes(save(folder / "x.tmp.jpg", photo(21), quality=90).read_bytes())
    (folder / "x.tmp.jpg").unlink()
    return [path]


def _mask_like_name(folder: Path) -> list[Path]:
    return [save(folder / "arm_lesion.jpg", photo(22), quality=90)]


def _same_stem_two_formats(folder: Path) -> list[Path]:
    return [save(folder / "dup.jpg", photo(23), quality=90), save(folder / "dup.png", photo(24))]


def _same_name_two_folders(folder: Path) -> list[Path]:
    return [save(folder / "a" / "x.jpg", photo(25), quality=90), save(folder / "b" / "x.jpg", photo(26), quality=90)]


def _one_pixel(folder: Path) -> list[Path]:
    return [save(folder / "one.png", np.full((1, 1, 3), 128, np.uint8))]


def _ten_pixels(folder: Path) -> list[Path]:
    return [save(folder / "ten.png", cv2.resize(photo(27), (10, 10), interpolation=cv2.INTER_AREA))]


def _near_black_16bit(folder: Path) -> list[Path]:
    path = folder / "dark12.png"
    twelve_bit = photo(28).astype(np.uint16) * 16 + 8  # 0..4095: a 12-bit camera's data in a 16-bit file
    assert cv2.imwrite(str(path), np.ascontiguousarray(twelve_bit[:, :, ::-1]))
    return [path]


# --- manifest kinds -------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, rows: list[dict[str, str]], classes=CLASSES, name: str = "manifest.csv") -> Path:
    """A manifest CSV of ``rows`` (columns from the first row) with its class sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path.with_suffix(".json").write_text(json.dumps({"classes": list(classes)}))
    return path


def training_rows(folder: Path, n: int = 8, side: int = 48) -> list[dict[str, str]]:
    """``n`` good rows (photo, exact mask, label, crop), six train and the rest val, both classes on each side."""
    rows = []
    for i in range(n):
        label = CLASSES[i % 2]
        image, mask = sample(100 + i, side, label)
        image_path = save(folder / "images" / f"img{i}.png", image)
        mask_path = save(folder / "masks" / f"img{i}_segmentation.png", mask * 255)
        split = "train" if i < n - 2 else "val"
        rows.append(
            {
                "image_id": f"img{i}",
                "image_path": str(image_path),
                "mask_path": str(mask_path),
                "label": label,
                "group": f"g{i}",
                "split": split,
                "crop_path": str(image_path),
            }
        )
    return rows


def _with_mask(folder: Path, mask: np.ndarray) -> list[Path]:
    rows = training_rows(folder)
    save(folder / "masks" / "img0_segmentation.png", mask)  # the first training image's mask replaced
    return [write_manifest(folder, rows)]


def _mask_wrong_size(folder: Path) -> list[Path]:
    return _with_mask(folder, np.zeros((48, 80), np.uint8))  # 48x80 for a 48x48 image: another aspect ratio


def _mask_all_zero(folder: Path) -> list[Path]:
    return _with_mask(folder, np.zeros((48, 48), np.uint8))


def _mask_non_binary(folder: Path) -> list[Path]:
    greys = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (48, 1))  # every grey from 0 to 255
    return _with_mask(folder, greys)


def _missing_columns(folder: Path) -> list[Path]:
    rows = [{"id": r["image_id"], "path": r["image_path"], "label": r["label"]} for r in training_rows(folder)]
    return [write_manifest(folder, rows)]


def _unknown_label(folder: Path) -> list[Path]:
    rows = training_rows(folder)
    rows[1]["label"] = "melanoma"  # the sidecar says nv, mel
    return [write_manifest(folder, rows)]


def _duplicate_ids(folder: Path) -> list[Path]:
    rows = training_rows(folder)
    rows[3]["image_id"] = rows[2]["image_id"]
    return [write_manifest(folder, rows)]


def _not_utf8(folder: Path) -> list[Path]:
    rows = training_rows(folder)
    rows[4]["group"] = "patient-é"
    path = write_manifest(folder, rows)
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))  # as an old spreadsheet saves it
    return [path]


def _id_outside(folder: Path) -> list[Path]:
    rows = training_rows(folder)
    rows[5]["image_id"] = "../../x"  # an id names output files: this one would write outside the output folder
    return [write_manifest(folder, rows)]


def _with_image(folder: Path, make: Callable[[Path], None]) -> list[Path]:
    rows = training_rows(folder)
    image = Path(rows[0]["image_path"])  # the first training image (its crop_path too) replaced
    image.unlink()
    make(image)
    return [write_manifest(folder, rows)]


def _image_missing(folder: Path) -> list[Path]:
    return _with_image(folder, lambda path: None)


def _image_fifo(folder: Path) -> list[Path]:
    return _with_image(folder, os.mkfifo)


def _image_link_loop(folder: Path) -> list[Path]:
    def loop(path: Path) -> None:
        os.symlink(path.with_name("other.png"), path)
        os.symlink(path, path.with_name("other.png"))

    return _with_image(folder, loop)


# --- the registry ---------------------------------------------------------------------------------------------------

_SKIP = "skipped: listed in skipped.csv with the reader's reason"
_EXCLUDE = "excluded unopened: listed in skipped.csv with the reason"
_TRAIN = "refused by training: one error line naming the file"
_PREDICT = "prediction from the manifest skips it (skipped.csv)"

# fmt: off
CORPUS: list[Kind] = [
    Kind("truncated JPEG", _truncated_jpeg, f"{_SKIP} (corrupt or truncated)", "skipped", "truncated"),
    Kind("truncated PNG", _truncated_png, f"{_SKIP} (corrupt or truncated)", "skipped", "truncated"),
    Kind("zero-byte file", _zero_bytes, f"{_EXCLUDE} (file is empty)", "excluded", "file is empty (0 bytes)"),
    Kind("text named .jpg", _text_as_jpeg, f"{_SKIP} (not a readable image)", "skipped", "not a readable image"),
    Kind("HTML named .png", _html_as_png, f"{_SKIP} (not a readable image)", "skipped", "not a readable image"),
    Kind("RGBA PNG", _rgba_png, "predicted: transparency composited over white", "predicted"),
    Kind("grey PNG", _grey_png, "predicted: grey copied into R, G and B", "predicted"),
    Kind("grey+alpha PNG", _grey_alpha_png, "predicted: composited over white, then grey to RGB", "predicted"),
    Kind("palette PNG", _palette_png, "predicted: the palette's colours", "predicted"),
    Kind("CMYK JPEG", _cmyk_jpeg, "predicted: converted to RGB", "predicted"),
    Kind("16-bit PNG", _png16, "predicted: the full 16-bit range scaled to 8 bits", "predicted"),
    Kind("16-bit TIFF", _tiff16, "predicted: the full 16-bit range scaled to 8 bits", "predicted"),
    Kind("multi-page TIFF", _multipage_tiff, "predicted: the first page", "predicted"),
    Kind("EXIF-rotated JPEG", _exif_rotated_jpeg, "predicted: turned upright first; the box is in upright pixels",
         "predicted"),
    Kind("huge image (156 Mpx)", _huge_image,
         f"{_SKIP} (over the 450 MB bound on decoded pixels, 150 Mpx of 8-bit RGB, from the header alone)",
         "skipped", "468 MB decoded, over the 450 MB bound on decoded pixels"),
    Kind("16-bit RGBA PNG over the byte bound (144 Mpx)", _rgba16_over_bound,
         f"{_SKIP} (over the 450 MB bound on decoded pixels: 8 bytes a pixel, from the header alone)",
         "skipped", "1,152 MB decoded, over the 450 MB bound on decoded pixels"),
    Kind("decompression bomb", _decompression_bomb, f"{_SKIP} (too large to decode safely, from the header alone)",
         "skipped", "too large to decode safely"),
    Kind("name with spaces", _space_name, "predicted: the id keeps the spaces", "predicted"),
    Kind("unicode name", _unicode_name, "predicted: the id keeps the characters", "predicted"),
    Kind("name with a leading dash", _leading_dash_name, "predicted: the id keeps the dash (-rf)", "predicted"),
    Kind("name with a newline", _newline_name, f"{_EXCLUDE} (a control character in the name)", "excluded",
         "control character"),
    Kind("nested folders", _nested_folders, "predicted: the id is the path under the input folder", "predicted"),
    Kind("symlink loop", _symlink_loop, f"{_EXCLUDE} (symbolic link loop)", "excluded", "symbolic link loop"),
    Kind("broken symlink", _broken_symlink, f"{_EXCLUDE} (broken link)", "excluded", "broken link"),
    Kind("FIFO", _fifo, f"{_EXCLUDE} (a named pipe: never opened, so nothing blocks)", "excluded",
         "named pipe (FIFO)"),
    Kind("symlink to /dev/zero", _dev_zero, f"{_EXCLUDE} (a character device: never read)", "excluded",
         "character device"),
    Kind("directory symlink to /", _folder_link_to_root,
         f"{_EXCLUDE} (a link out of the input folder: not searched; --follow-links searches it)", "excluded",
         "link to a folder outside the input folder (/): not searched (pass --follow-links to search it)"),
    Kind("file symlink outside the input", _file_link_outside,
         f"{_EXCLUDE} (a link out of the input folder: not read; --follow-links reads it)", "excluded",
         "link to a file outside the input folder"),
    Kind("GIF", _gif, f"{_EXCLUDE} (GIF is not read: convert it to JPEG or PNG)", "excluded",
         "GIF images are not read"),
    Kind("WEBP", _webp, f"{_EXCLUDE} (WebP is not read: convert it to JPEG or PNG)", "excluded",
         "WebP images are not read"),
    Kind("no extension", _no_extension, f"{_EXCLUDE} (no file extension)", "excluded", "no file extension"),
    Kind("photo named like a mask (arm_lesion.jpg)", _mask_like_name,
         f"{_EXCLUDE} (the name marks a mask; the reason says how to rename it)", "excluded",
         "rename it so the name does not end with '_lesion'"),
    Kind("same stem, two formats (dup.jpg + dup.png)", _same_stem_two_formats,
         "predicted: both, the ids keep their suffix (dup.jpg, dup.png)", "predicted"),
    Kind("same name, two folders (a/x.jpg + b/x.jpg)", _same_name_two_folders,
         "predicted: both, the ids keep their folder (a/x, b/x)", "predicted"),
    Kind("1x1 image", _one_pixel, "predicted+flagged: quality 'too small', refer=1", "predicted+flagged",
         "too small: 1x1 px"),
    Kind("10x10 image", _ten_pixels, "predicted+flagged: quality 'too small', refer=1", "predicted+flagged",
         "too small: 10x10 px"),
    Kind("near-black 12-bit data in a 16-bit PNG", _near_black_16bit,
         "predicted+flagged: quality 'under-exposed', refer=1", "predicted+flagged", "under-exposed"),
    Kind("mask of another aspect ratio", _mask_wrong_size,
         "refused by segmentation training: one error line naming the mask and both sizes", "refused",
         "aspect ratios differ", "mask"),
    Kind("all-zero mask", _mask_all_zero, "accepted: a legitimate 'no lesion' mask", "accepted", "", "mask"),
    Kind("non-binary mask (0..255 greys)", _mask_non_binary, "accepted: binarised, lesion where a pixel is over 127",
         "accepted", "", "mask"),
    Kind("manifest without image_id/image_path", _missing_columns,
         "refused: one error line naming the missing columns", "refused", "no column image_id, image_path",
         "manifest"),
    Kind("unknown label", _unknown_label, "refused: one error line naming the label, its lines and the classes",
         "refused", "labels not among the classes", "manifest"),
    Kind("duplicate ids in a manifest", _duplicate_ids, "refused: one error line naming the ids and their lines",
         "refused", "image ids repeat", "manifest"),
    Kind("manifest not UTF-8", _not_utf8, "refused: one error line naming the byte (save it as UTF-8)", "refused",
         "is not UTF-8 text", "manifest"),
    Kind("id like ../../x", _id_outside, "refused: one error line naming the row (ids are relative names)",
         "refused", "has a '..' path part", "manifest"),
    Kind("manifest image that does not exist", _image_missing, f"{_TRAIN} (no such file); {_PREDICT}", "refused",
         "no such file", "image"),
    Kind("manifest image that is a FIFO", _image_fifo, f"{_TRAIN} (not a regular file; never opened); {_PREDICT}",
         "refused", "FIFO", "image"),
    Kind("manifest image that is a symlink loop", _image_link_loop, f"{_TRAIN} (symbolic link loop); {_PREDICT}",
         "refused", "symbolic link", "image"),
]

# Failures that are not inputs: docs/reliability.md's table ends with these rows (tested where they say).
OTHER_ROWS: list[tuple[str, str]] = [
    ("a run killed outright (SIGKILL)", "rerun it: it writes what an uninterrupted run writes, no temporary left "
     "behind (tests/test_kills.py)"),
    ("a full disk", "one error line, exit 2; finished outputs stay whole (tests/test_reliability.py)"),
]
# fmt: on

FOLDER_KINDS = [k for k in CORPUS if k.level == "folder"]
MANIFEST_KINDS = [k for k in CORPUS if k.level == "manifest"]
MASK_KINDS = [k for k in CORPUS if k.level == "mask"]
IMAGE_KINDS = [k for k in CORPUS if k.level == "image"]


def kind_folder(kind: Kind) -> str:
    """The folder name a kind is built in (class folders hold these)."""
    return "".join(c if c.isalnum() else "_" for c in kind.name.lower()).strip("_")


def build_folder_corpus(root: Path) -> dict[str, list[Path]]:
    """Every folder kind under ``root/<class>/<kind folder>/``, the classes taken in turn; kind name -> entries."""
    built = {}
    for i, kind in enumerate(FOLDER_KINDS):
        folder = root / CLASSES[i % len(CLASSES)] / kind_folder(kind)
        folder.mkdir(parents=True)
        built[kind.name] = kind.build(folder)
    return built
