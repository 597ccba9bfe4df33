"""Validation before work: every count, size, port and timeout is range-checked when the config loads (one `error:`
line naming the key, the value and the range, exit status 2, nothing written); `dermpipe run --backbones` checks every
name before the first stage runs; a `run.cache_dir` that is a file is refused before anything is written."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from dermpipe.classification.config import ClassificationConfig
from dermpipe.configs.loader import ConfigError, load_config
from dermpipe.configs.ranges import range_of
from dermpipe.data.generator import generate_dataset
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.pipeline import run as pipeline
from dermpipe.pipeline.demo import write_photo_folder
from dermpipe.predict import cli as predict_script
from dermpipe.predict.config import PredictConfig
from dermpipe.segmentation import train as segmentation_train
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.serve import main as serve_main

CONFIGS = (SegmentationConfig, ClassificationConfig, EnsembleConfig, PredictConfig)


def _ranged_keys(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """Every dotted numeric key of a config class that has a range, with one value just outside it."""
    out: list[tuple[str, object]] = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        tp = hints[item.name]
        if dataclasses.is_dataclass(tp):
            out += _ranged_keys(tp, f"{prefix}{item.name}.")
            continue
        bounds = range_of(item.name, cls.__name__)
        if bounds is None:
            continue
        bad = bounds.low - 1 if bounds.low is not None else bounds.high + 1
        if "int" in str(tp) or isinstance(item.default, int):
            bad = int(bad)
        if typing.get_origin(tp) is tuple:
            bad = [bad]
        out.append((f"{prefix}{item.name}", bad))
    return out


def _exit_status(main: typing.Callable[[list[str]], int], argv: list[str]) -> int:
    """A command's exit status, whether it returns it or exits with it (a flag refused while parsing)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return int(exit.code)


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """The ``error:`` lines a command printed (a log handler an earlier test left on a closed stream may add noise)."""
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_ranged_setting_of_every_stage_is_checked_when_the_config_loads(cls):
    keys = _ranged_keys(cls)
    assert len(keys) >= 3, keys  # the mechanism reaches the stage's sections
    for key, bad in keys:
        with pytest.raises(ConfigError, match=rf"^{key} = .* is out of range: allowed "):
            load_config(cls, overrides=[f"{key}={bad}"])
    load_config(cls)  # the defaults themselves are inside every range


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        (["--set", "run.num_workers=-1"], "run.num_workers = -1"),
        (["--set", "batch_size=0"], "batch_size = 0"),
        (["--set", "batch_size=-4"], "batch_size = -4"),
        (["--set", "run.threads=-2"], "run.threads = -2"),
        (["--set", "outputs.report_max_images=-1"], "outputs.report_max_images = -1"),
        (["--merge-timeout", "-5"], "--merge-timeout = -5"),
    ],
)
def test_prediction_refuses_a_setting_out_of_range_in_one_line_before_any_work(tmp_path, capsys, setting, named):
    photos = tmp_path / "photos"
    write_photo_folder(photos, 2, 32, seed=0)
    out = tmp_path / "out"
    code = _exit_status(
        predict_script.main, ["--input", str(photos), "--out", str(out), "--root", str(tmp_path / "root"), *setting]
    )
    lines = _error_lines(capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0] and "allowed >=" in lines[0], lines
    assert not out.exists() and not (tmp_path / "root").exists()


def test_training_refuses_a_batch_size_of_zero_before_any_work(tmp_path, capsys):
    manifest = generate_dataset(tmp_path / "syn", n_images=30, size=32, seed=0, classes=("nv", "mel"))
    root = tmp_path / "root"
    code = segmentation_train.main(["--manifest", str(manifest), "--root", str(root), "--set", "train.batch_size=0"])
    lines = _error_lines(capsys)
    assert code == 2 and len(lines) == 1 and "train.batch_size = 0 is out of range: allowed >= 1" in lines[0], lines
    assert not root.exists()


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_serve_refuses_a_port_out_of_range_in_one_line(tmp_path, capsys, port):
    code = _exit_status(serve_main.main, ["--model", str(tmp_path / "no-bundle"), "--port", port])
    lines = _error_lines(capsys)
    assert code == 2
    assert lines == [f"error: --port = {port} is out of range: allowed 0..65535 (0 = any free port)"], lines


def test_run_checks_every_backbone_name_before_the_first_stage(tmp_path, capsys):
    manifest = generate_dataset(tmp_path / "syn", n_images=30, size=32, seed=0, classes=("nv", "mel"))
    root = tmp_path / "root"
    code = pipeline.main(["--manifest", str(manifest), "--root", str(root), "--backbones", "test_resnet,resnt50,nope"])
    lines = _error_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "'resnt50'" in lines[0] and "'nope'" in lines[0] and "resnet50" in lines[0], lines
    assert not root.exists()  # the U-Net never started


def test_a_cache_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    manifest = generate_dataset(tmp_path / "syn", n_images=30, size=32, seed=0, classes=("nv", "mel"))
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    root = tmp_path / "root"
    code = segmentation_train.main(
        ["--manifest", str(manifest), "--root", str(root), "--set", f"run.cache_dir={cache}"]
    )
    lines = _error_lines(capsys)
    assert code == 2 and len(lines) == 1 and f"run.cache_dir {cache} is a file" in lines[0], lines
    assert not root.exists()
    code = pipeline.main(["--manifest", str(manifest), "--root", str(root), "--backbones", "test_resnet",
                          "--set", f"classification.run.cache_dir={cache / 'below'}"])  # fmt: skip
    lines = _error_lines(capsys)
    assert code == 2 and f"lies under {cache}, which is a file" in lines[-1], lines
    assert not root.exists() and cache.read_text() == "not a folder"
