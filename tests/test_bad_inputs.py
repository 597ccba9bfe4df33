"""The bad-input corpus (tests/corpus.py) through every stage that reads it: each entry gets its documented outcome.

The folder corpus is built once and each folder stage runs once over all of it (batch prediction, lesion cropping,
the ``folder`` converter); each kind is then checked in each stage's outputs. Manifest and mask kinds are small
manifests of their own, given to every stage that reads a manifest. Every stage call runs in a thread with a time
limit, so a stage that blocks (on a FIFO, say) fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import unicodedata
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from conftest import write_untrained_pipeline
from corpus import (
    CLASSES,
    CORPUS,
    FOLDER_KINDS,
    IMAGE_KINDS,
    MANIFEST_KINDS,
    MASK_KINDS,
    OTHER_ROWS,
    Kind,
    build_folder_corpus,
    kind_folder,
)
from PIL import Image, ImageOps

from dermpipe.classification import train as classification_train
from dermpipe.data import convert
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.data.quality import QUALITY_NO_LESION, QUALITY_SEPARATOR
from dermpipe.data.reading import ImageReadError, image_size, read_image, read_mask
from dermpipe.engine import csvsafe
from dermpipe.predict import cli as ensemble_predict
from dermpipe.segmentation import predict as segmentation_predict
from dermpipe.segmentation import train as segmentation_train

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, symlinks and /dev/zero are POSIX")

RELIABILITY = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
BACKBONES = ["test_resnet"]
SECONDS = 120  # per stage call: each takes a second or two; past this it is taken to hang
TINY_UNET = [
    "--set", "model.encoder=tu-test_resnet", "--set", "model.encoder_weights=null",
    "--set", "model.decoder_channels=[16,8,8,8,8]", "--set", "data.image_size=32", "--set", "train.batch_size=8",
    "--set", "train.panel_images=0", "--set", "train.max_steps_per_epoch=1", "--set", "run.threads=1",
]  # fmt: skip
TINY_CLASSIFIER = [
    "--backbone", BACKBONES[0], "--set", "model.pretrained=false", "--set", "data.image_size=32",
    "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "train.freeze_epochs=0",
    "--set", "run.threads=1",
]  # fmt: skip


def _ids(kinds: list[Kind]) -> list[str]:
    return [kind_folder(k) for k in kinds]


def _call(main, argv: list[str], seconds: float = SECONDS) -> tuple[int, str, str]:
    """``main(argv)`` in a thread with stdout and stderr captured: (exit status, stdout, stderr). Fails when it does
    not return within ``seconds``; an exception it raises (a bug: no ``error:`` line) is raised here."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["status"] = main(argv)
        except BaseException as error:  # handed to the test below
            box["error"] = error

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(seconds)
    for handler in [h for h in logging.getLogger().handlers if getattr(h, "_dermpipe", False)]:
        logging.getLogger().removeHandler(handler)  # the stage's console handler writes to the captured stream
        handler.close()
    assert not thread.is_alive(), f"{main.__module__} {argv} did not return within {seconds} s: it hangs"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["status"], out.getvalue(), err.getvalue()  # type: ignore[return-value]


def _shown(path: Path) -> str:
    """An entry's path as the stages write it: absolute, control characters escaped (a newline as ``\\n``)."""
    return "".join(c if unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in os.path.abspath(path))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csvsafe.DictReader(f))  # unescaped as the project reads its own tables (-rf is written '-rf)


def _reasons(cell: str) -> list[str]:
    return [r for r in cell.split(QUALITY_SEPARATOR) if r]


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# --- the folder corpus, each folder stage run once over it ------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_untrained_pipeline(tmp_path_factory.mktemp("pipeline"), BACKBONES, list(CLASSES))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pipeline):
    """The folder corpus and what each folder stage made of it: prediction, cropping, the ``folder`` converter."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_inputs").resolve()  # paths in the outputs are absolute and resolved
    corpus = root / "corpus"
    built = build_folder_corpus(corpus)
    calls = {
        "predict": (ensemble_predict.main, [
            "--input", str(corpus), "--out", str(root / "predict"), "--device", "cpu",
            "--segmentation-run", str(pipeline / "seg"), "--classification-root", str(pipeline / "cls"),
            "--ensemble-run", str(pipeline / "ens"), "--set", f"run.cache_dir={root / 'cache_predict'}",
            "--set", "batch_size=8",
        ]),
        "segment": (segmentation_predict.main, [
            "--input", str(corpus), "--run", str(pipeline / "seg"), "--out", str(root / "segment"), "--device", "cpu",
            "--set", f"run.cache_dir={root / 'cache_segment'}",
        ]),
        "convert": (convert.main, [
            "--format", "folder", "--root", str(corpus), "--out", str(root / "convert" / "manifest.csv"),
        ]),
    }  # fmt: skip
    (root / "convert").mkdir()
    try:
        results = {name: _call(main, argv) for name, (main, argv) in calls.items()}
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "corpus": corpus, "built": built, "results": results}


def _folder_outcomes(runs, stage: str) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Shown path -> its rows in the stage's table of results and in its skipped.csv."""
    out = runs["root"] / stage
    table = "predictions.csv" if stage == "predict" else "crops.csv"
    column = "path" if stage == "predict" else "image_path"
    done: dict[str, list[dict]] = {}
    for row in _rows(out / table):
        done.setdefault(row[column], []).append(row)
    skipped: dict[str, list[dict]] = {}
    for row in _rows(out / "skipped.csv"):
        skipped.setdefault(row["path"], []).append(row)
    return done, skipped


def test_the_registry_has_every_kind_once_and_an_outcome_for_its_level() -> None:
    assert len(CORPUS) >= 30
    assert len({k.name for k in CORPUS}) == len(CORPUS) and len(set(_ids(CORPUS))) == len(CORPUS)
    allowed = {
        "folder": {"predicted", "predicted+flagged", "skipped", "excluded"},
        "manifest": {"refused"},
        "mask": {"accepted", "refused"},
        "image": {"refused"},
    }
    for kind in CORPUS:
        assert kind.outcome in allowed[kind.level], kind.name
        assert bool(kind.expect) != (kind.outcome in ("predicted", "accepted")), kind.name  # what else it checks
        assert kind.behaviour.startswith(kind.outcome), kind.name  # the docs say the outcome first
        assert "|" not in kind.name + kind.behaviour and "\n" not in kind.behaviour


@pytest.mark.parametrize("stage", ["predict", "segment", "convert"])
def test_each_folder_stage_ends_cleanly(runs, stage: str) -> None:
    status, stdout, stderr = runs["results"][stage]
    assert status == 0, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr


@pytest.mark.parametrize("stage", ["predict", "segment"])
def test_folder_runs_write_a_row_per_entry_and_no_other(runs, stage: str) -> None:
    done, skipped = _folder_outcomes(runs, stage)
    entries = [_shown(p) for paths in runs["built"].values() for p in paths]
    assert len(entries) == len(set(entries))
    assert sorted([*done, *skipped]) == sorted(entries)
    ids = [r["image_id"] for rows in done.values() for r in rows]
    assert len(ids) == len(set(ids))  # no two rows share an id (dup.jpg + dup.png, a/x.jpg + b/x.jpg)


def _upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as viewed (EXIF orientation applied), by Pillow: an oracle apart from ours."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).size


@pytest.mark.parametrize("stage", ["predict", "segment"])
@pytest.mark.parametrize("kind", FOLDER_KINDS, ids=_ids(FOLDER_KINDS))
def test_each_folder_kind_has_its_outcome(runs, stage: str, kind: Kind) -> None:
    done, skipped = _folder_outcomes(runs, stage)
    quality_rows = {r["image_id"]: r for r in _rows(runs["root"] / stage / "boxes.csv")} if stage == "segment" else {}
    for path in runs["built"][kind.name]:
        shown = _shown(path)
        rows, skips = done.get(shown, []), skipped.get(shown, [])
        assert len(rows) + len(skips) == 1, f"{shown}: {len(rows)} result rows and {len(skips)} skipped rows"
        if kind.outcome in ("skipped", "excluded"):
            assert skips, f"{shown} was predicted: {rows}"
            reason = skips[0]["reason"]
            assert kind.expect in reason, reason
            # the reader opened it and names the file; the listing's reason goes beside the path it never opened
            assert reason.startswith(f"{shown}: ") == (kind.outcome == "skipped"), reason
            continue
        assert rows, f"{shown} was skipped: {skips[0]['reason']}"
        row = rows[0]
        quality = _reasons(quality_rows[row["image_id"]]["quality"] if quality_rows else row["quality"])
        if kind.outcome == "predicted+flagged":
            assert any(kind.expect in r for r in quality), quality
            if stage == "predict":
                assert row["refer"] == "1"
        else:
            assert set(quality) <= {QUALITY_NO_LESION}, quality  # nothing wrong with the photo itself
        width, height = _upright_size(path)
        x0, y0, x1, y1 = map(int, row["box"].split())
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (row["box"], width, height)


@pytest.mark.parametrize(
    "kind", [k for k in FOLDER_KINDS if k.outcome.startswith("predicted")],
    ids=_ids([k for k in FOLDER_KINDS if k.outcome.startswith("predicted")]),
)  # fmt: skip
def test_predicted_kinds_decode_to_what_pillow_shows(runs, kind: Kind) -> None:
    for path in runs["built"][kind.name]:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                white = Image.new("RGBA", upright.size, "white")
                upright = Image.alpha_composite(white, upright.convert("RGBA"))
            expected = np.asarray(upright.convert("RGB"), dtype=np.int16)
        decoded = read_image(path)
        assert decoded.shape == expected.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(np.int16) - expected).mean() < 3, path.name


# --- the folder converter: every entry a manifest row or named in the conversion report, once ---------------------


def _report_mentions(report: dict, rel: str) -> int:
    """How many items of the conversion report (its id lists and notes) name the entry at ``rel``."""
    names = {rel, PurePosixPath(rel).with_suffix("").as_posix()}
    listed = sum(1 for ids in report["ids"].values() for item in ids if item in names)
    quoted = {rel, repr(rel)[1:-1]}
    noted = sum(1 for note in report["notes"] if any(q in note for q in quoted))
    return listed + noted


@pytest.mark.parametrize("kind", FOLDER_KINDS, ids=_ids(FOLDER_KINDS))
def test_the_folder_converter_accounts_for_each_entry_once(runs, kind: Kind) -> None:
    manifest = runs["root"] / "convert" / "manifest.csv"
    rows = _rows(manifest)
    report = json.loads(manifest.with_suffix(".json").read_text())["report"]
    for path in runs["built"][kind.name]:
        rel = path.relative_to(runs["corpus"]).as_posix()
        as_rows = [r for r in rows if r["image_path"] == os.path.abspath(path)]
        mentions = _report_mentions(report, rel)
        assert len(as_rows) + mentions == 1, f"{rel!r}: {len(as_rows)} manifest rows, {mentions} report items"
        for row in as_rows:  # the class is the first folder under the root
            assert row["label"] == rel.split("/")[0]


def test_the_converted_manifest_reads_back(runs) -> None:
    manifest = Manifest.read(runs["root"] / "convert" / "manifest.csv")
    assert set(manifest.classes) == set(CLASSES) and all(r["label"] for r in manifest.rows)


# --- manifest kinds: refused in one line by every stage that reads a manifest, before any folder is made -------------


def _manifest_stages(manifest: Path, out: Path, cache: Path, pipeline: Path) -> dict[str, tuple]:
    cache_set = ["--set", f"run.cache_dir={cache}"]
    return {
        "segmentation/train.py": (segmentation_train.main, [
            "--manifest", str(manifest), "--out", str(out), "--device", "cpu", "--epochs", "1", *cache_set,
            *TINY_UNET]),
        "classification/train.py": (classification_train.main, [
            "--manifest", str(manifest), "--out", str(out), "--device", "cpu", *cache_set, *TINY_CLASSIFIER]),
        "segmentation/predict.py": (segmentation_predict.main, [
            "--manifest", str(manifest), "--run", str(pipeline / "seg"), "--out", str(out), "--device", "cpu",
            *cache_set]),
        "ensemble/predict.py": (ensemble_predict.main, [
            "--manifest", str(manifest), "--out", str(out), "--device", "cpu",
            "--segmentation-run", str(pipeline / "seg"), "--classification-root", str(pipeline / "cls"),
            "--ensemble-run", str(pipeline / "ens"), *cache_set]),
    }  # fmt: skip


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", MANIFEST_KINDS, ids=_ids(MANIFEST_KINDS))
def test_each_manifest_kind_is_refused_in_one_line_by_every_stage(tmp_path: Path, pipeline: Path, kind: Kind) -> None:
    (manifest,) = kind.build(tmp_path / "data")
    with pytest.raises(ManifestError) as caught:
        Manifest.read(manifest)
    message = str(caught.value)
    assert kind.expect in message and str(manifest) in message and "\n" not in message
    for name, (main, argv) in _manifest_stages(manifest, tmp_path / "out", tmp_path / "cache", pipeline).items():
        status, _, stderr = _call(main, argv)
        assert status == 2, (name, stderr)
        line = _one_error_line(stderr)
        assert kind.expect in line and str(manifest) in line, (name, line)
        assert not (tmp_path / "out").exists(), f"{name} wrote {tmp_path / 'out'} although it refused the manifest"


# --- image kinds: a manifest row whose image cannot be read ---------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=_ids(IMAGE_KINDS))
def test_each_image_kind_is_refused_by_training_and_skipped_by_prediction(
    tmp_path: Path, pipeline: Path, kind: Kind
) -> None:
    (manifest,) = kind.build(tmp_path / "data")
    rows = _rows(manifest)
    bad = rows[0]["image_path"]
    assert len(_call(Manifest.read, manifest)[0]) == len(rows)  # the manifest itself is fine: nothing is opened
    for name, (main, argv) in _manifest_stages(manifest, tmp_path / "out", tmp_path / "cache", pipeline).items():
        status, _, stderr = _call(main, argv)
        if name.endswith("train.py"):
            assert status == 2, (name, stderr)
            line = _one_error_line(stderr)
            assert kind.expect in line and bad in line, (name, line)
            assert not (tmp_path / "out").exists(), f"{name} wrote {tmp_path / 'out'} although it refused the manifest"
            continue
        assert status == 0 and "Traceback" not in stderr and "error:" not in stderr, (name, stderr)
        skipped = _rows(tmp_path / "out" / "skipped.csv")
        assert [r["image_id"] for r in skipped] == [rows[0]["image_id"]], (name, skipped)
        assert kind.expect in skipped[0]["reason"], (name, skipped[0]["reason"])
        table = "predictions.csv" if name == "ensemble/predict.py" else "crops.csv"
        assert [r["image_id"] for r in _rows(tmp_path / "out" / table)] == [r["image_id"] for r in rows[1:]]
        shutil.rmtree(tmp_path / "out")  # the next stage starts without an output folder


# --- mask kinds: what reading a mask and segmentation training make of them ------------------------------------------


def _first_pair(manifest: Path) -> tuple[Path, Path]:
    row = _rows(manifest)[0]
    return Path(row["image_path"]), Path(row["mask_path"])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", MASK_KINDS, ids=_ids(MASK_KINDS))
def test_each_mask_kind_has_its_outcome_in_segmentation_training(tmp_path: Path, pipeline: Path, kind: Kind) -> None:
    (manifest,) = kind.build(tmp_path / "data")
    image, mask = _first_pair(manifest)
    stored = np.asarray(Image.open(mask).convert("L"))
    main, argv = _manifest_stages(manifest, tmp_path / "run", tmp_path / "cache", pipeline)["segmentation/train.py"]
    if kind.outcome == "refused":
        with pytest.raises(ImageReadError, match=re.escape(kind.expect)):
            read_mask(mask, size=image_size(image))
        status, _, stderr = _call(main, argv)
        assert status == 2, stderr
        line = _one_error_line(stderr)
        assert kind.expect in line and str(mask) in line
        assert not (tmp_path / "run").exists(), "the refused training wrote its run folder"
        return
    read = read_mask(mask, size=image_size(image))
    assert read.dtype == np.uint8 and set(np.unique(read)) <= {0, 1}
    assert np.array_equal(read, (stored > 127).astype(np.uint8))  # all zero stays "no lesion"; greys split at 127
    status, stdout, stderr = _call(main, argv)
    assert status == 0 and "Traceback" not in stderr and "error:" not in stderr, stderr
    assert (tmp_path / "run" / "best.safetensors").is_file() and len(_rows(tmp_path / "run" / "metrics.csv")) == 1


# --- docs/reliability.md: its table is the registry -----------------------------------------------------------------


def _reliability_table() -> list[tuple[str, str]]:
    text = RELIABILITY.read_text(encoding="utf-8")
    section = text.split("\n## What each input does\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    assert rows[0].replace(" ", "") == "|input|behaviour|" and set(rows[1]) <= set("|-: ")
    cells = [tuple(cell.strip() for cell in row.strip("|").split("|")) for row in rows[2:]]
    assert all(len(c) == 2 for c in cells), cells
    return cells  # type: ignore[return-value]


def test_the_docs_reliability_table_is_the_registry() -> None:
    assert _reliability_table() == [(k.name, k.behaviour) for k in CORPUS] + OTHER_ROWS
