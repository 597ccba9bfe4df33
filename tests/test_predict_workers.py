"""Prediction with DataLoader workers (`run.num_workers`): the next images are read, decoded, checked and looked up
in other processes while the U-Net runs, and the outputs are those of one process, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_untrained_pipeline

from dermpipe.pipeline.demo import write_photo_folder
from dermpipe.predict import cli as predict

CLASSES = ("nv", "mel", "bkl", "bcc")


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_untrained_pipeline(tmp_path_factory.mktemp("stages"), ("test_resnet", "test_efficientnet"), CLASSES)


def run(stages: Path, photos: Path, out: Path, cache: Path, workers: int) -> int:
    return predict.main([
        "--input", str(photos), "--out", str(out), "--device", "cpu", "--segmentation-run", str(stages / "seg"),
        "--classification-root", str(stages / "cls"), "--ensemble-run", str(stages / "ens"),
        "--set", f"run.cache_dir={cache}", "--set", "batch_size=3", "--set", f"run.num_workers={workers}",
    ])  # fmt: skip


def test_workers_write_what_one_process_writes_and_count_the_cache_right(stages, tmp_path, capsys):
    photos = tmp_path / "photos"
    write_photo_folder(photos, 10, 64, seed=5)  # and notes.jpg, not a photo: skipped when read
    assert run(stages, photos, tmp_path / "one", tmp_path / "cache1", 0) == 0
    assert run(stages, photos, tmp_path / "two", tmp_path / "cache2", 2) == 0
    for name in ("predictions.csv", "skipped.csv", "report.html"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert "notes.jpg" in (tmp_path / "two" / "skipped.csv").read_text()
    capsys.readouterr()
    assert run(stages, photos, tmp_path / "again", tmp_path / "cache2", 2) == 0  # warm cache, with workers
    out = capsys.readouterr().out
    assert "30 reused, 0 computed" in out, out  # 10 crops + 10 x 2 backbones, counted though found in workers
    assert (tmp_path / "again" / "predictions.csv").read_bytes() == (tmp_path / "one" / "predictions.csv").read_bytes()
