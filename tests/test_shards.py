"""Sharded batch prediction: N parts, then a merge, write byte for byte what one process writes; the shard comes from
flags, torchrun or a SLURM array; a merge of parts that are missing, unfinished or of another run is refused and
changes nothing; a finished shard is not predicted again, an interrupted one is completed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from conftest import write_untrained_pipeline

from dermpipe.data.generator import generate_dataset
from dermpipe.data.listing import list_folder
from dermpipe.pipeline.demo import write_photo_folder
from dermpipe.predict import cli as predict_script
from dermpipe.predict import merge as merge_script
from dermpipe.predict import shards
from dermpipe.predict.launch import Shard, local_device, resolve_shard
from dermpipe.predict.shards import ShardError, part_range, shard_command

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["nv", "mel", "bcc"]
BACKBONES = ["test_resnet", "test_efficientnet"]
N = 3
# written by one process and by a merge alike; compared byte for byte
FOLDER_OUTPUTS = ("predictions.csv", "skipped.csv", "report.html", "isic_submission.csv")
TRUTH_OUTPUTS = ("predictions.csv", "skipped.csv", "report.html", "metrics.json", "confusion.csv",
                 "confusion.png", "segmentation_scores.csv")  # fmt: skip
SHARD_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
)


@pytest.fixture(autouse=True)
def no_shard_environment(monkeypatch):
    """The tests run outside torchrun and SLURM whatever launched them."""
    for name in SHARD_ENV:
        monkeypatch.delenv(name, raising=False)


def _args(stages, source, out, cache, *extra):
    flag = "--manifest" if Path(source).is_file() else "--input"
    return [flag, str(source), "--out", str(out), "--device", "cpu", "--segmentation-run", str(stages / "seg"),
            "--classification-root", str(stages / "cls"), "--ensemble-run", str(stages / "ens"),
            "--set", f"run.cache_dir={cache}", "--set", "batch_size=2", *extra]  # fmt: skip


def _shard(args, index, count=N):
    return [*args, "--num-shards", str(count), "--shard-index", str(index)]


def _snapshot(folder):
    """Every file under ``folder``: bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}  # fmt: skip


def _photos(folder, n, seed):
    write_photo_folder(folder, n, 64, seed=seed)  # and notes.jpg, not a photo: skipped when read
    for name in ("a_readme.txt", "m_notes.txt", ".hidden.jpg", "z_scan.doc"):  # excluded by the listing
        (folder / name).write_text("not a photo")
    return folder


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A folder predicted by one process (A) and by 3 shards then a merge (B), each with a fresh cache."""
    root = tmp_path_factory.mktemp("shards")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than several contending ones
    try:
        stages = write_untrained_pipeline(root / "stages", BACKBONES, CLASSES)
        photos = _photos(root / "photos", 8, seed=3)
        extra = ("--isic-csv", "--masks", "--set", "outputs.report_max_images=4")  # a capped report: picked over parts
        assert predict_script.main(_args(stages, photos, root / "A", root / "cache_A", *extra)) == 0
        sharded = _args(stages, photos, root / "B", root / "cache_B", *extra)
        for i in range(N):
            assert predict_script.main(_shard(sharded, i)) == 0
        assert merge_script.main(["--out", str(root / "B")]) == 0
    finally:
        torch.set_num_threads(before)
    return root, stages, photos, sharded


def test_three_shards_merged_are_byte_identical_to_one_process(folder_run, capsys):
    root, _, photos, _ = folder_run
    a, b = root / "A", root / "B"
    for name in FOLDER_OUTPUTS:
        assert (b / name).read_bytes() == (a / name).read_bytes(), name
    listing = list_folder(photos)
    assert len(listing.manifest) == 9 and len(listing.excluded) == 4  # 8 photos + notes.jpg; 4 excluded entries
    skipped = (b / "skipped.csv").read_text()
    assert all(n in skipped for n in ("notes.jpg", "a_readme.txt", ".hidden.jpg", "m_notes.txt", "z_scan.doc"))
    assert _snapshot(b / "report_files").keys() == _snapshot(a / "report_files").keys()  # the capped report's 4
    for picture in (a / "report_files").iterdir():
        assert (b / "report_files" / picture.name).read_bytes() == picture.read_bytes()
    assert _snapshot(a / "masks").keys() == _snapshot(b / "masks").keys()
    assert "cache:" not in (b / "report.html").read_text()  # the tally is in the log: the report is the inputs'
    assert merge_script.main(["--out", str(b)]) == 0  # merged again: the same files; the parts' tallies summed
    assert "cache: 0 reused, 24 computed" in capsys.readouterr().out  # 8 crops + 8 x 2 backbones, all parts
    # each excluded entry and each photo in exactly one part, the parts contiguous and in order
    parts = [json.loads((b / "shards" / f"{i}-of-{N}" / "part.json").read_text()) for i in range(N)]
    assert [(p["images"]["start"], p["images"]["stop"]) for p in parts] == [part_range(9, i, N) for i in range(N)]
    assert [(p["excluded"]["start"], p["excluded"]["stop"]) for p in parts] == [part_range(4, i, N) for i in range(N)]
    assert len({(p["inputs"], p["model"], p["weights"], p["settings"]) for p in parts}) == 1


def test_merged_truth_scores_are_those_of_the_whole_set(folder_run, tmp_path):
    root, stages, _, _ = folder_run
    data = generate_dataset(tmp_path / "syn", n_images=24, size=64, seed=0, classes=CLASSES, imbalance=1.5)
    extra = ("--set", "refer=false", "--set", "outputs.report_max_images=5")  # right and wrong rows, a capped report
    assert predict_script.main(_args(stages, data, tmp_path / "A", tmp_path / "cache_A", *extra)) == 0
    sharded = _args(stages, data, tmp_path / "B", tmp_path / "cache_B", *extra)
    for i in range(N):
        assert predict_script.main(_shard(sharded, i)) == 0
    assert merge_script.main(["--out", str(tmp_path / "B")]) == 0
    for name in TRUTH_OUTPUTS:
        assert (tmp_path / "B" / name).read_bytes() == (tmp_path / "A" / name).read_bytes(), name
    metrics = json.loads((tmp_path / "B" / "metrics.json").read_text())
    assert metrics["scored"] == 24 and metrics["segmentation"]["scored"] == 24
    correct = {r.split(",")[-2] for r in (tmp_path / "A" / "predictions.csv").read_text().splitlines()[1:]}
    assert correct == {"0", "1"}  # right and wrong rows: the capped report picks the wrong ones first, over all parts
    report = (tmp_path / "A" / "report.html").read_text()
    assert "&#10007; wrong" in report and "<td>shown in this report</td><td>5 " in report


def test_torchrun_and_slurm_environments_choose_the_shard(folder_run, monkeypatch, capsys):
    root, stages, photos, _ = folder_run
    env = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"}
    assert resolve_shard(None, None, env) == Shard(1, 3, "torchrun")
    assert resolve_shard(2, 0, env) == Shard(0, 2, "flags")  # flags win
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "3"}
    assert resolve_shard(None, None, slurm) == Shard(2, 3, "slurm")
    assert resolve_shard(None, None, {**slurm, **env}) == Shard(7, 9, "slurm+torchrun")  # 3 ranks per task
    assert resolve_shard(1, None, slurm) is None  # --num-shards 1: one process over all, whatever the environment
    assert resolve_shard(None, None, {"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process
    assert resolve_shard(None, None, {}) is None
    for bad in ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3"}, {"RANK": "3", "WORLD_SIZE": "3"}):
        with pytest.raises(ShardError):
            resolve_shard(None, None, bad)
    with pytest.raises(ShardError, match="needs --num-shards"):
        resolve_shard(None, 1, {})
    assert local_device("cuda", env) == "cuda:1" and local_device("cpu", env) == "cpu"
    assert local_device("cuda:0", env) == "cuda:0" and local_device("cuda", {}) == "cuda"

    out = root / "C"
    args = _args(stages, photos, out, root / "cache_B")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert predict_script.main(args) == 0  # rank 1 of 3: its part only, no merge
    assert [p.name for p in (out / "shards").iterdir()] == ["1-of-3"]
    part = json.loads((out / "shards" / "1-of-3" / "part.json").read_text())
    assert (part["shard"], part["shards"], part["images"]["start"], part["images"]["stop"]) == (1, 3, 3, 6)
    assert not (out / "predictions.csv").exists()
    assert "shard 1 of 3" in capsys.readouterr().out
    for name in env:
        monkeypatch.delenv(name)
    for name, value in {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}.items():
        monkeypatch.setenv(name, value)
    assert predict_script.main(args) == 0
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["1-of-3", "2-of-3"]
    assert predict_script.main([*args, "--num-shards", "2", "--shard-index", "0"]) == 0  # flags win
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["0-of-2", "1-of-3", "2-of-3"]


def test_merge_of_a_missing_or_foreign_part_is_refused_and_changes_nothing(folder_run, tmp_path, capsys):
    root, stages, photos, _ = folder_run
    out = tmp_path / "B"
    shutil.copytree(root / "B", out)
    capsys.readouterr()

    shutil.rmtree(out / "shards" / "1-of-3")
    before = _snapshot(out)
    assert merge_script.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard 1 of 3 is missing") and err.count("\n") == 1
    assert "`dermpipe predict --input " in err and "--num-shards 3 --shard-index 1`" in err
    assert _snapshot(out) == before

    shutil.copytree(root / "B" / "shards" / "1-of-3", out / "shards" / "1-of-3")
    (out / "shards" / "1-of-3" / "part.json").unlink()  # as an interrupted shard leaves it
    before = _snapshot(out)
    assert merge_script.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard 1 of 3 is unfinished") and err.count("\n") == 1
    assert _snapshot(out) == before
    shutil.copy(root / "B" / "shards" / "1-of-3" / "part.json", out / "shards" / "1-of-3" / "part.json")

    other = tmp_path / "photos"  # another input list: one more photo
    shutil.copytree(photos, other)
    shutil.copy(photos / "photo_000.jpg", other / "photo_100.jpg")
    assert predict_script.main(_shard(_args(stages, other, out, root / "cache_B"), 2)) == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert merge_script.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard 2 of 3") and "its input list differs" in err and err.count("\n") == 1
    assert f"--input {photos} " in err and "--shard-index 2`" in err  # the command of the run the others are of
    assert _snapshot(out) == before
    assert merge_script.main(["--out", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: no shard parts under")


def test_a_finished_shard_is_not_predicted_again_and_an_interrupted_one_is_completed(
    folder_run, tmp_path, monkeypatch, capsys
):
    root, _, _, sharded = folder_run
    out = tmp_path / "E"
    shutil.copytree(root / "B" / "shards", out / "shards")
    args = [*sharded]
    args[args.index("--out") + 1] = str(out)
    capsys.readouterr()
    before = _snapshot(out)
    assert predict_script.main(_shard(args, 0)) == 0
    printed = capsys.readouterr().out
    assert "shard 0 of 3 is finished already" in printed and "cache: 0 reused, 0 computed" in printed
    assert _snapshot(out) == before

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # killed between the part's table and its part.json

    shutil.rmtree(out / "shards" / "1-of-3")  # shard 1 starts afresh (its images are in the cache)
    with monkeypatch.context() as patch:
        patch.setattr(shards, "write_part", killed)
        assert predict_script.main(_shard(args, 1)) == 130
    assert not (out / "shards" / "1-of-3" / "part.json").exists()
    assert merge_script.main(["--out", str(out)]) == 2
    assert "shard 1 of 3 is unfinished" in capsys.readouterr().err
    assert predict_script.main(_shard(args, 1)) == 0
    printed = capsys.readouterr().out
    assert "shard 1 of 3: 3 images" in printed and "cache: 9 reused, 0 computed" in printed  # completed from cache
    assert merge_script.main(["--out", str(out)]) == 0
    for name in ("predictions.csv", "skipped.csv", "isic_submission.csv"):
        assert (out / name).read_bytes() == (root / "A" / name).read_bytes()


def test_shard_command_keeps_the_run_and_names_the_shard():
    argv = ["--input", "p", "--num-shards", "4", "--shard-index=1", "--merge", "--merge-timeout", "5", "--tta"]
    assert shard_command(argv, 3, 4) == "dermpipe predict --input p --tta --num-shards 4 --shard-index 3"


@pytest.mark.e2e
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_two_processes_under_torchrun_merge_to_one_process(folder_run, tmp_path):
    root, stages, photos, _ = folder_run
    out = tmp_path / "T"
    args = _args(stages, photos, out, tmp_path / "cache", "--isic-csv", "--set", "outputs.report_max_images=4")
    env = {k: v for k, v in os.environ.items() if k not in SHARD_ENV}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--module", "dermpipe", "predict", *args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "merged 2 shards" in done.stdout
    for name in ("predictions.csv", "skipped.csv", "isic_submission.csv"):
        assert (out / name).read_bytes() == (root / "A" / name).read_bytes(), name
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["0-of-2", "1-of-2"]
