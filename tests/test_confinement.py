"""Outputs are confined: predict, segment, merge and serve never write inside a bundle or a finished run (symlinks
followed); the report's folder holds only its own pictures; prediction from a bundle makes no ./runs."""

import os

import pytest
from conftest import write_photos, write_untrained_bundle, write_untrained_pipeline

from dermpipe.engine.confine import finished_folder
from dermpipe.predict import cli as predict_script
from dermpipe.predict import merge as merge_script
from dermpipe.segmentation import predict as segment_script
from dermpipe.serve import main as serve_script

CLASSES = ["nv", "mel", "bcc"]
BACKBONES = ["test_resnet"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_untrained_bundle(tmp_path_factory.mktemp("bundle"), BACKBONES, CLASSES)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A run root with a finished U-Net run (its metrics.csv too), a crops folder and a vote."""
    root = write_untrained_pipeline(
        tmp_path_factory.mktemp("root"), BACKBONES, CLASSES, ("segmentation", "classification", "ensemble")
    )
    (root / "segmentation" / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    (root / "crops").mkdir()
    (root / "crops" / "crops.csv").write_text("image_id,image_path\n")
    return root


def _photos(folder, n=3, seed=0):
    return write_photos(folder, n, seed, CLASSES)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, code, flag, finished):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {flag} ") and str(finished.resolve()) in lines[0]
    assert f"choose an {flag} outside it" in lines[0]


def _predict_args(bundle, photos, *extra):
    return ["--model", str(bundle), "--input", str(photos), "--device", "cpu", *extra]


@pytest.mark.parametrize("where", ["bundle.json", "ensemble/preds.csv", "link/bundle.json", "link/new/preds.csv"])
def test_predict_output_inside_a_bundle_is_refused(bundle, tmp_path, capsys, where):
    (tmp_path / "link").symlink_to(bundle, target_is_directory=True)  # the same bundle through a symlink
    before = _files(bundle)
    target = (tmp_path if where.startswith("link") else bundle) / where
    args = _predict_args(bundle, _photos(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--output", str(target))
    _refused(capsys, predict_script.main(args), "--output", bundle)
    assert _files(bundle) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["bundle", "bundle/classification", "link", "link/fresh"])
def test_predict_out_inside_a_bundle_is_refused(bundle, tmp_path, capsys, where):
    (tmp_path / "link").symlink_to(bundle, target_is_directory=True)
    before = _files(bundle)
    out = bundle.parent / where if where.startswith("bundle") else tmp_path / where
    _refused(capsys, predict_script.main(_predict_args(bundle, _photos(tmp_path / "photos"), "--out", str(out))),
             "--out", bundle)  # fmt: skip
    assert _files(bundle) == before


def test_predict_output_over_a_finished_runs_metrics_is_refused(root, tmp_path, capsys):
    before = _files(root)
    args = ["--input", str(_photos(tmp_path / "photos")), "--root", str(root), "--device", "cpu",
            "--output", str(root / "segmentation" / "metrics.csv"), "--out", str(tmp_path / "out")]  # fmt: skip
    _refused(capsys, predict_script.main(args), "--output", root / "segmentation")
    assert _files(root) == before


def test_segment_out_inside_a_bundle_or_a_finished_run_is_refused(bundle, root, tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    before = _files(bundle), _files(root)
    for out, finished in ((bundle / "segmentation" / "crops", bundle), (root / "ensemble", root / "ensemble")):
        args = ["--input", str(photos), "--run", str(root / "segmentation"), "--out", str(out), "--device", "cpu"]
        _refused(capsys, segment_script.main(args), "--out", finished)
    assert (_files(bundle), _files(root)) == before


def test_merge_out_inside_a_bundle_is_refused(bundle, tmp_path, capsys):
    (tmp_path / "link").symlink_to(bundle / "classification", target_is_directory=True)
    before = _files(bundle)
    _refused(capsys, merge_script.main(["--out", str(tmp_path / "link")]), "--out", bundle)
    _refused(capsys, merge_script.main(["--out", str(tmp_path / "mine"), "--output", str(tmp_path / "link" / "x.csv")]),
             "--output", bundle)  # fmt: skip
    assert _files(bundle) == before


def test_serve_upload_dir_inside_a_bundle_is_refused(bundle, capsys):
    before = _files(bundle)
    code = serve_script.main(["--model", str(bundle), "--upload-dir", str(bundle / "ensemble"), "--port", "0"])
    _refused(capsys, code, "--upload-dir", bundle)
    assert _files(bundle) == before


def test_what_counts_as_finished(bundle, root, tmp_path):
    assert finished_folder(root / "predict") is None  # a run root's own output folder
    assert finished_folder(root) is None  # the demo writes its predictions and report beside the stage folders
    assert "run root" in finished_folder(root / "summary.md", is_file=True)  # but never over its summary table
    assert finished_folder(root / "crops", own="crops") is None  # segment's rerun into its own crops folder
    assert "crops folder" in finished_folder(root / "crops")
    assert "training run" in finished_folder(root / "classification" / BACKBONES[0] / "sub")
    assert "bundle" in finished_folder(bundle / "segmentation" / "x.csv", is_file=True)
    assert finished_folder(tmp_path / "new" / "deeper") is None


def test_report_files_hold_only_the_current_reports_pictures(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "out"
    assert predict_script.main(_predict_args(bundle, _photos(tmp_path / "first", 3, seed=1), "--out", str(out))) == 0
    first = set(os.listdir(out / "report_files"))
    assert predict_script.main(_predict_args(bundle, _photos(tmp_path / "second", 2, seed=2), "--out", str(out))) == 0
    second = set(os.listdir(out / "report_files"))
    report = (out / "report.html").read_text()
    assert second and not second & first  # nothing of the first input is left
    assert all(f"report_files/{name}" in report for name in second)
    assert predict_script.main(_predict_args(bundle, tmp_path / "second", "--out", str(out), "--no-report")) == 0
    assert not os.listdir(out / "report_files")  # no report: no pictures of one


def test_predict_from_a_bundle_makes_no_runs_folder(bundle, tmp_path, monkeypatch, capsys):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    photos = _photos(tmp_path / "photos", 2)
    assert predict_script.main(_predict_args(bundle, photos, "--out", str(tmp_path / "out"))) == 0
    assert os.listdir(work) == []
    cache = tmp_path / "xdg" / "dermpipe"
    assert sorted(os.listdir(cache)) == ["crop_probabilities", "crops"]  # the user's cache folder (platformdirs)
    capsys.readouterr()
    assert predict_script.main(_predict_args(bundle, photos, "--out", str(tmp_path / "again"))) == 0
    assert "cache: 4 reused, 0 computed" in capsys.readouterr().out and os.listdir(work) == []
    mine = tmp_path / "mine"
    args = _predict_args(bundle, photos, "--out", str(tmp_path / "third"), "--set", f"run.cache_dir={mine}")
    assert predict_script.main(args) == 0  # run.cache_dir still chooses
    assert sorted(os.listdir(mine)) == ["crop_probabilities", "crops"] and os.listdir(work) == []
