"""Prediction with DataLoader workers (`run.num_workers`) or a reading thread (`run.prefetch`): the next images are
read, decoded, checked and looked up in other processes or a thread while the U-Net runs, and the outputs are those of
one process reading one batch after the other, byte for byte."""

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


def run(stages: Path, photos: Path, out: Path, cache: Path, workers: int, prefetch: int = 0) -> int:
    return predict.main([
        "--input", str(photos), "--out", str(out), "--device", "cpu", "--segmentation-run", str(stages / "seg"),
        "--classification-root", str(stages / "cls"), "--ensemble-run", str(stages / "ens"),
        "--set", f"run.cache_dir={cache}", "--set", "batch_size=3", "--set", f"run.num_workers={workers}",
        "--set", f"run.prefetch={prefetch}",
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


def test_the_reading_thread_writes_what_serial_reading_writes(stages, tmp_path, monkeypatch):
    from dermpipe.segmentation import prediction

    photos = tmp_path / "photos"
    write_photo_folder(photos, 11, 64, seed=6)
    threads = []
    real = prediction.SegmentationPredictor.prepare

    def prepare(self, image_id, path):
        import threading

        threads.append(threading.current_thread().name)
        return real(self, image_id, path)

    monkeypatch.setattr(prediction.SegmentationPredictor, "prepare", prepare)
    assert run(stages, photos, tmp_path / "serial", tmp_path / "cache1", 0, prefetch=0) == 0
    assert set(threads) == {"MainThread"}
    threads.clear()
    assert run(stages, photos, tmp_path / "ahead", tmp_path / "cache2", 0, prefetch=2) == 0
    assert threads and all(name.startswith("dermpipe-read") for name in threads)  # read on the thread, not inline
    for name in ("predictions.csv", "skipped.csv", "report.html"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "ahead" / name).read_bytes(), name
