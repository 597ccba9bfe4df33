"""What a clinic notices: CSV cells a spreadsheet would run as formulas, error lines naming the path, a converter's
missing classes, a folder with nothing readable, the page's headings, the resume log, a report rewritten byte for
byte."""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_untrained_pipeline

from dermpipe.classification.probability_tables import read_probability_table, write_probability_table
from dermpipe.data import convert
from dermpipe.data.generator import generate_dataset, make_sample
from dermpipe.data.manifest import Manifest
from dermpipe.engine import csvsafe
from dermpipe.engine.cli import run_cli
from dermpipe.engine.files import write_text_atomic
from dermpipe.ensemble.stacked_tables import read_backbone_table
from dermpipe.errors import plain_message
from dermpipe.predict import cli as predict_script
from dermpipe.predict import merge as merge_script
from dermpipe.segmentation import predict as segmentation_predict
from dermpipe.segmentation import score as score_script
from dermpipe.segmentation import train as segmentation_train
from dermpipe.serve.page import page_html

BACKBONES = ["test_resnet"]
CLASSES = ["mel", "nv", "bkl"]
CALC = "=cmd|' /C calc'!A0"  # OWASP's example: a nested path under the input folder, so the id keeps its '/'
FORMULA_IDS = [CALC, "-rf", "+1+1", "@SUM(A1)", "'=quoted", "plain"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return write_untrained_pipeline(tmp_path_factory.mktemp("stages"), BACKBONES, CLASSES)


def _predict(stages: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--device", "cpu", "--segmentation-run", str(stages / "seg"),
            "--classification-root", str(stages / "cls"), "--ensemble-run", str(stages / "ens"),
            "--set", f"run.cache_dir={out.parent / 'cache'}", *extra]  # fmt: skip


def _photos(folder: Path, ids: list[str]) -> list[Path]:
    rng = np.random.default_rng(3)
    paths = []
    for i, image_id in enumerate(ids):
        image, _ = make_sample(rng, CLASSES[i % len(CLASSES)], 64)
        path = folder / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def _raw(path: Path) -> list[list[str]]:
    """The cells as a spreadsheet gets them: no unescaping."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _safe(cells) -> bool:
    """No cell a spreadsheet would run: every text starting with a formula character is quoted (numbers aside)."""
    return all(not c.startswith(csvsafe.TRIGGERS) or csvsafe._NUMBER.fullmatch(c) for c in cells)


def test_escape_round_trips_and_leaves_numbers_alone():
    texts = [CALC, "-rf", "+x", "@x", "\tx", "\rx", "=", "'", "''", "'=x", "'x", "plain", "", "a=b", "-", "+"]
    for text in texts:
        assert csvsafe.unescape(csvsafe.escape(text)) == text
        assert not csvsafe.escape(text).startswith(csvsafe.TRIGGERS)
    for number in ["-0.5", "-3", "+2", "1e-05", "-1.5E+3", ".5", "0"]:
        assert csvsafe.escape(number) == number
    assert csvsafe.escape(-0.5) == -0.5 and csvsafe.escape(None) is None
    assert csvsafe.escape(CALC) == "'" + CALC and csvsafe.escape("-rf") == "'-rf" and csvsafe.escape("'x") == "''x"
    assert csvsafe.escape("-1+2") == "'-1+2"  # a formula, not a number


def test_formula_ids_are_escaped_in_every_csv_and_read_back_as_they_were(stages, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, FORMULA_IDS)
    (photos / "=HYPERLINK(x).jpg").write_text("not an image")  # skipped, its path and reason in skipped.csv
    out = tmp_path / "out"
    assert predict_script.main(["--input", str(photos), *_predict(stages, out, "--isic-csv")]) == 0
    rows = _raw(out / "predictions.csv")
    assert rows[0][0] == "image_id"
    raw_ids = [r[0] for r in rows[1:]]
    assert "'" + CALC in raw_ids and "'-rf" in raw_ids and "'@SUM(A1)" in raw_ids and "''=quoted" in raw_ids
    for name in ("predictions.csv", "skipped.csv", "isic_submission.csv"):
        table = _raw(out / name)
        assert len(table) > 1 and all(_safe(row) for row in table), name
    assert _raw(out / "skipped.csv")[1][0].startswith("'=HYPERLINK")
    with open(out / "predictions.csv", newline="") as f:
        ids = [r["image_id"] for r in csvsafe.DictReader(f)]
    assert sorted(ids) == sorted(FORMULA_IDS)  # the project's reader gives the ids back
    probabilities = [float(c) for r in rows[1:] for c in r[2:5]]
    assert all(0 <= p <= 1 for p in probabilities)  # numbers stay numbers

    # sharded parts merged: the parts are read back and written again, byte for byte what one process writes
    sharded = tmp_path / "sharded"
    for index in (0, 1):
        args = ["--input", str(photos), *_predict(stages, sharded, "--isic-csv")]
        assert predict_script.main([*args, "--num-shards", "2", "--shard-index", str(index)]) == 0
    assert merge_script.main(["--out", str(sharded)]) == 0
    for name in ("predictions.csv", "skipped.csv", "isic_submission.csv"):
        assert (sharded / name).read_bytes() == (out / name).read_bytes(), name


def test_a_manifest_of_formula_ids_is_escaped_and_scored_against_its_truth(stages, tmp_path):
    paths = _photos(tmp_path / "photos", FORMULA_IDS)
    rows = [{"image_id": i, "image_path": str(p), "label": CLASSES[n % 3]} for n, (i, p) in
            enumerate(zip(FORMULA_IDS, paths))]  # fmt: skip
    manifest = tmp_path / "m.csv"
    Manifest(rows=tuple(rows), classes=tuple(CLASSES)).write(manifest)
    assert all(_safe(row) for row in _raw(manifest))
    assert [r["image_id"] for r in Manifest.read(manifest).rows] == FORMULA_IDS
    out = tmp_path / "out"
    assert predict_script.main(["--manifest", str(manifest), *_predict(stages, out)]) == 0
    with open(out / "predictions.csv", newline="") as f:
        got = {r["image_id"]: r for r in csvsafe.DictReader(f)}
    assert list(got) == FORMULA_IDS
    for row in rows:
        assert got[row["image_id"]]["truth"] == row["label"]
        assert got[row["image_id"]]["correct"] == str(int(got[row["image_id"]]["predicted"] == row["label"]))


def test_probability_tables_and_crops_escape_formula_ids_and_read_them_back(stages, tmp_path):
    probs = np.full((len(FORMULA_IDS), 3), 1 / 3)
    meta = {"backbone": "b", "source": "val", "trained_on": "train", "weights_digest": "0" * 64, "settings": {}}
    labels = ["mel"] * len(FORMULA_IDS)
    keys = [f"k{i}" for i in range(len(FORMULA_IDS))]
    path = write_probability_table(tmp_path / "cls" / "b", "val", FORMULA_IDS, keys, labels, probs, CLASSES, meta)
    assert all(_safe(row) for row in _raw(path))
    assert read_probability_table(tmp_path / "cls" / "b", "val")[0] == FORMULA_IDS  # what the vote trains on
    assert read_backbone_table(tmp_path / "cls", "b", "val").ids == FORMULA_IDS

    photos = tmp_path / "photos"
    _photos(photos, FORMULA_IDS)
    crops = tmp_path / "crops"
    argv = ["--input", str(photos), "--run", str(stages / "seg"), "--out", str(crops), "--device", "cpu",
            "--set", f"run.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert segmentation_predict.main(argv) == 0
    for name in ("crops.csv", "boxes.csv"):
        assert all(_safe(row) for row in _raw(crops / name)), name
    assert sorted(r["image_id"] for r in Manifest.read(crops / "crops.csv").rows) == sorted(FORMULA_IDS)

    for folder in ("truth", "pred"):  # ISIC mask scoring's per-image table, of masks named like formulas
        (tmp_path / folder).mkdir()
        for name in ("-rf", "=x", "@y"):
            cv2.imwrite(str(tmp_path / folder / f"{name}.png"), np.full((8, 8), 255, np.uint8))
    scores = tmp_path / "scores.csv"
    assert score_script.main([str(tmp_path / "truth"), str(tmp_path / "pred"), "--csv", str(scores)]) == 0
    table = _raw(scores)
    assert all(_safe(row) for row in table) and sorted(r[0] for r in table[1:]) == ["'-rf", "'=x", "'@y"]


# --- a full or read-only disk names the path; no "[Errno N]" reaches a user ------------------------------------------


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Errno" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_a_full_disk_at_the_write_names_the_file(stages, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    _photos(photos, ["a", "b"])
    out = tmp_path / "out"

    def full(self, row):  # what a file's write() raises on a full disk: no file name in the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csvsafe.DictWriter, "writerow", full)
    assert predict_script.main(["--input", str(photos), *_predict(stages, out)]) == 2
    (line,) = _error_lines(capsys)
    assert f"cannot write {out / 'predictions.csv'}: No space left on device" in line and "free some space" in line
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize(
    ("code", "error_type", "expected"),
    [
        (errno.EROFS, OSError, "Read-only file system; the disk is read-only: pass an output folder"),
        (errno.ENOSPC, OSError, "No space left on device; free some space"),
        (errno.EACCES, PermissionError, "Permission denied (check its permissions, or pass another path)"),
    ],
)
def test_a_refused_write_names_the_file_never_its_temporary(tmp_path, monkeypatch, capsys, code, error_type, expected):
    target = tmp_path / "out" / "report.html"

    def refuse(src, dst):
        raise error_type(code, os.strerror(code), str(src))  # the OS names the temporary being renamed

    monkeypatch.setattr(os, "replace", refuse)
    assert run_cli(lambda: write_text_atomic(target, "<html>")) == 2
    (line,) = _error_lines(capsys)
    assert f"{target}: " in line and expected in line and ".tmp" not in line
    assert not target.exists() and not list(target.parent.iterdir())


def test_a_missing_path_is_one_line_without_the_errno(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "x.csv"
    assert run_cli(lambda: len(missing.read_text())) == 2
    assert _error_lines(capsys) == [f"error: {missing}: No such file or directory"]
    assert plain_message(OSError(errno.EIO, "Input/output error")) == "Input/output error"
    assert plain_message(ValueError("[Errno 5] Input/output error")) == "Input/output error"


# --- the resume log of a finished run ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_resuming_a_finished_run_says_so_never_epoch_7_of_6(tmp_path, caplog):
    manifest = generate_dataset(tmp_path / "data", n_images=40, size=48, seed=3, hair=0.0, ruler=0.0)
    args = ["--manifest", str(manifest), "--device", "cpu", "--out", str(tmp_path / "seg"), "--epochs", "2",
            "--set", f"run.cache_dir={tmp_path / 'cache'}", "--set", "train.max_steps_per_epoch=1",
            "--set", "train.panel_images=0", "--set", "model.encoder=tu-test_resnet",
            "--set", "model.encoder_weights=null", "--set", "model.decoder_channels=[16,8,8,8,8]",
            "--set", "data.image_size=32", "--set", "train.batch_size=4"]  # fmt: skip
    assert segmentation_train.main(args) == 0
    with caplog.at_level(logging.INFO):
        assert segmentation_train.main([*args, "--resume"]) == 0
    said = [m for m in caplog.messages if m.startswith("resuming")]
    assert len(said) == 1 and said[0].startswith("resuming: the run had finished after epoch 2 of 2"), said
    for message in caplog.messages:
        if match := re.search(r"epoch (\d+) of (\d+)", message):
            assert int(match.group(1)) <= int(match.group(2)), message


# --- the served page -------------------------------------------------------------------------------------------------


class _Headings(HTMLParser):
    """Each ``<h2>``'s text and whether it is hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, bool] = {}
        self._open: bool | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self._open = "hidden" in dict(attrs)

    def handle_data(self, data):
        if self._open is not None:
            self.found[data.strip()] = self._open
            self._open = None


def test_the_page_shows_no_empty_not_readable_heading():
    page = page_html("m@sha256:0", CLASSES, {}, 25)
    parser = _Headings()
    parser.feed(page)
    assert parser.found == {"Not readable": True}  # hidden until a photo of the batch could not be read
    assert "getElementById('skipped-head').hidden = !list.children.length" in page  # shown once one is listed


# --- convert: a class missing from a split ---------------------------------------------------------------------------


def test_convert_warns_in_one_line_when_a_split_lacks_a_class(tmp_path, capsys):
    layout = {"train": ["mel", "nv", "bkl"], "val": ["mel", "nv", "bkl"], "test": ["mel", "bkl"]}  # test has no nv
    for split, classes in layout.items():
        for label in classes:
            folder = tmp_path / "photos" / split / label
            folder.mkdir(parents=True)
            cv2.imwrite(str(folder / "x.png"), np.zeros((8, 8, 3), np.uint8))
    argv = ["--format", "folder", "--root", str(tmp_path / "photos"), "--out", str(tmp_path / "m.csv")]
    assert convert.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "test has no nv" in warnings[0] and "val has" not in warnings[0], warnings
    (tmp_path / "photos" / "test" / "nv").mkdir()
    cv2.imwrite(str(tmp_path / "photos" / "test" / "nv" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    assert convert.main(argv) == 0
    assert "warning:" not in capsys.readouterr().err


# --- a folder with nothing readable ----------------------------------------------------------------------------------


def test_a_folder_with_nothing_readable_exits_non_zero_with_one_line(stages, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "notes.jpg").write_text("not an image")
    (photos / "anim.gif").write_bytes(b"GIF89a")
    out = tmp_path / "out"
    assert predict_script.main(["--input", str(photos), *_predict(stages, out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"no image in {photos} could be read: all 2 entries were skipped" in lines[0]
    assert str(out / "skipped.csv") in lines[0]
    with open(out / "skipped.csv", newline="") as f:  # the reasons, where the line says
        assert len(list(csvsafe.DictReader(f))) == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_script.main(["--input", str(empty), *_predict(stages, tmp_path / "out2")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"{empty} holds no image" in line

    crops = tmp_path / "crops"  # cropping a folder with nothing readable ends the same way
    argv = ["--input", str(photos), "--run", str(stages / "seg"), "--out", str(crops), "--device", "cpu",
            "--set", f"run.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert segmentation_predict.main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"no image in {photos} could be read: all 2 entries were skipped" in line and str(crops) in line


# --- report.html depends on the inputs and models alone ---------------------------------------------------------------


def test_the_report_is_byte_identical_whatever_the_cache_held(stages, tmp_path, capsys):
    """A rerun after a kill finds part of the work cached; its report is the uninterrupted run's, byte for byte (the
    cache tally goes to the log and the summary line). tests/test_kills.py checks it after real kills."""
    photos = tmp_path / "photos"
    _photos(photos, ["a", "b", "c"])
    (photos / "broken.jpg").write_text("not an image")
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    assert predict_script.main(["--input", str(photos), *_predict(stages, cold)]) == 0  # one cache for both runs
    assert "cache: 0 reused" in capsys.readouterr().out
    assert predict_script.main(["--input", str(photos), *_predict(stages, warm)]) == 0
    assert "0 computed" in capsys.readouterr().out  # everything found in the cache this time
    assert (warm / "report.html").read_bytes() == (cold / "report.html").read_bytes()
    assert "prediction cache: " in (warm / "train.log").read_text()
