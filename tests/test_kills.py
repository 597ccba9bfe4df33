"""A run killed outright (SIGKILL: no handler, no cleanup, no flush) and then run again writes exactly what an
uninterrupted run writes, and leaves no temporary behind.

Each kill is deterministic: the killed command runs in a subprocess whose script wraps one function so that its N-th
call sends SIGKILL to its own process; no timing is involved. The uninterrupted runs and the reruns are in-process.
A killed run is mostly interpreter start-up and imports, so all of them are started at once, at the start of the
module, and run beside the in-process work; each test waits for its own.
"""

import csv
import hashlib
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import write_untrained_pipeline
from safetensors.torch import load_file

from dermpipe.classification import train as train_script
from dermpipe.data.generator import generate_dataset, make_sample
from dermpipe.data.manifest import Manifest
from dermpipe.engine import loop
from dermpipe.engine.files import file_digest
from dermpipe.predict import cli as predict_script

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["nv", "mel", "bcc"]
BACKBONES = ["test_resnet", "test_efficientnet"]  # two: a kill can come after one model has loaded
PHOTOS = [f"p{i}.jpg" for i in range(5)]  # with batch_size=2: three batches (2, 2, 1)

# argv: "module:qualname" of the function to wrap, N, the entry module, then its arguments. The N-th call of the
# function kills the process before the real function runs.
KILL_SCRIPT = """
import importlib, os, signal, sys
import torch
torch.set_num_threads(1)
target, n, entry, *args = sys.argv[1:]
module_name, qualname = target.split(":")
*owners, name = qualname.split(".")
owner = importlib.import_module(module_name)
for part in owners:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), []
def killing(*a, **k):
    calls.append(1)
    if len(calls) == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
setattr(owner, name, killing)
raise SystemExit(importlib.import_module(entry).main(args))
"""

PREDICT_KILLS = {
    "loading the second backbone": ("dermpipe.predict.predictor:load_classifier", 2),
    "voting on the second batch": ("dermpipe.predict.predictor:EnsemblePredictor.judge", 2),
    "between the tables and the report": ("dermpipe.predict.batch:write_report", 1),
}
TRAIN_KILLS = {  # n None: the optimiser step inside epoch 2 that leaves steps still to come
    "training in epoch 2": ("dermpipe.engine.loop:optimiser_step", None),
    # epoch 2's weights written, its resume state not: the state must not be paired with weights of another epoch
    "between epoch 2's weights and its resume state": ("dermpipe.engine.loop:save_resume_state", 2),
}


@dataclass
class Killed:
    """A command started in a subprocess that kills itself; ``args`` are the command's, for the rerun."""

    args: list[str]
    proc: subprocess.Popen
    log: Path

    def wait(self) -> None:
        self.proc.wait(timeout=600)
        assert self.proc.returncode == -signal.SIGKILL, (self.proc.returncode, self.log.read_text()[-3000:])


@dataclass
class World:
    predicted: Path  # the uninterrupted prediction's --out folder
    trained: Path  # the uninterrupted training's run folder
    steps: list[int]  # its optimiser steps per epoch
    killed: dict[str, Killed] = field(default_factory=dict)


def _start_killed(target: str, n: int, entry: str, args: list[str], log: Path) -> Killed:
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, target, str(n), entry, *args], stdout=f, stderr=subprocess.STDOUT
        )
    return Killed(args, proc, log)


def _predict_args(stages: Path, photos: Path, out: Path, cache: Path) -> list[str]:
    return ["--input", str(photos), "--out", str(out), "--device", "cpu", "--segmentation-run", str(stages / "seg"),
            "--classification-root", str(stages / "cls"), "--ensemble-run", str(stages / "ens"),
            "--set", f"run.cache_dir={cache}", "--set", "batch_size=2"]  # fmt: skip


def _train_args(manifest: Path, out: Path) -> list[str]:
    return [
        "--manifest", str(manifest), "--backbone", "test_resnet", "--out", str(out), "--device", "cpu",
        "--set", "model.pretrained=false", "--set", "data.image_size=32", "--set", "train.epochs=2",
        "--set", "train.batch_size=8", "--set", "train.freeze_epochs=1", "--set", "train.lr=0.003",
        "--set", f"run.cache_dir={out / 'cache'}", "--set", "run.threads=1",
    ]  # fmt: skip


def _counting_steps(monkeypatch) -> list[int]:
    """Optimiser steps per epoch of the in-process training runs that follow."""
    per_epoch: list[int] = []
    real_step, real_epoch = loop.optimiser_step, loop.train_one_epoch

    def step(*args, **kwargs):
        per_epoch[-1] += 1
        return real_step(*args, **kwargs)

    def epoch(*args, **kwargs):
        per_epoch.append(0)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "optimiser_step", step)
    monkeypatch.setattr(loop, "train_one_epoch", epoch)
    return per_epoch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The inputs, every killed run (started at once, in the background), and the uninterrupted runs."""
    root = tmp_path_factory.mktemp("kills")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    killed: dict[str, Killed] = {}
    try:
        stages = write_untrained_pipeline(root / "stages", BACKBONES, CLASSES)
        photos = root / "photos"
        photos.mkdir()
        rng = np.random.default_rng(5)
        for i, name in enumerate(PHOTOS):
            image, _ = make_sample(rng, CLASSES[i % len(CLASSES)], 64)
            cv2.imwrite(str(photos / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        (photos / "broken.jpg").write_bytes(b"not an image")  # so skipped.csv has a row
        for i, (point, (target, n)) in enumerate(PREDICT_KILLS.items()):
            # a fresh --out and its own cache: nothing shared with the uninterrupted run but the stages
            out = root / f"B{i}"
            if point == "between the tables and the report":  # an earlier run's report, which must not survive
                out.mkdir()
                (out / "report.html").write_text("<html>a report of an earlier run</html>")
            args = _predict_args(stages, photos, out, root / f"cache_B{i}")
            killed[point] = _start_killed(target, n, "dermpipe.predict.cli", args, root / f"B{i}.log")

        data = generate_dataset(root / "syn", n_images=36, size=48, seed=0, classes=("nv", "mel"), imbalance=1.5)
        manifest = Manifest.read(data)
        manifest = manifest.with_column("crop_path", [r["image_path"] for r in manifest.rows])
        manifest = manifest.with_column("crop_key", [file_digest(r["image_path"]) for r in manifest.rows])
        crops = manifest.write(root / "crops" / "crops.csv")  # a folder of its own: the outputs beside it are not in it
        with pytest.MonkeyPatch.context() as mp:
            steps = _counting_steps(mp)
            assert train_script.main(_train_args(crops, root / "train_A")) == 0
        assert len(steps) == 2 and steps[1] >= 3, steps  # room to kill inside epoch 2 with steps still to come
        for i, (point, (target, n)) in enumerate(TRAIN_KILLS.items()):
            args = _train_args(crops, root / f"train_B{i}")
            n = steps[0] + 2 if n is None else n  # None: inside epoch 2, with steps still to come
            killed[point] = _start_killed(
                target, n, "dermpipe.classification.train", args, root / f"train_B{i}.log"
            )  # fmt: skip

        assert predict_script.main(_predict_args(stages, photos, root / "A", root / "cache_A")) == 0
        yield World(root / "A", root / "train_A" / "test_resnet", steps, killed)
    finally:
        torch.set_num_threads(before)
        for k in killed.values():  # a test that failed or was deselected: its subprocess is not left running
            if k.proc.poll() is None:
                k.proc.kill()
                k.proc.wait()


def _temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob(".*tmp*")]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _folder(args: list[str], flag: str) -> Path:
    return Path(args[args.index(flag) + 1])


# --- batch prediction -----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("point", list(PREDICT_KILLS))
def test_prediction_killed_and_rerun_writes_what_an_uninterrupted_run_writes(world, point):
    killed, out_a = world.killed[point], world.predicted
    out = _folder(killed.args, "--out")
    cache = Path(next(a for a in killed.args if a.startswith("run.cache_dir=")).split("=", 1)[1])
    killed.wait()

    predictions = out / "predictions.csv"
    if point == "loading the second backbone":
        assert not predictions.exists()
    elif point == "voting on the second batch":
        # rows were being written: into a temporary beside the table, never into predictions.csv itself
        assert not predictions.exists()
        assert len(list(out.glob(".predictions.*.tmp.csv"))) == 1
    else:
        assert predictions.read_bytes() == (out_a / "predictions.csv").read_bytes()  # complete before the kill
        assert (out / "skipped.csv").read_bytes() == (out_a / "skipped.csv").read_bytes()
        assert not (out / "report.html").exists()  # no stale report that looks like this run's

    assert predict_script.main(killed.args) == 0
    assert predictions.read_bytes() == (out_a / "predictions.csv").read_bytes()
    assert (out / "skipped.csv").read_bytes() == (out_a / "skipped.csv").read_bytes()
    assert "broken.jpg" in (out / "skipped.csv").read_text()
    # the very same report, whatever the rerun found cached: the cache tally is in the log, not the report (its
    # images are named by image id, relative to the report)
    assert (out / "report.html").read_bytes() == (out_a / "report.html").read_bytes()
    a, b = _snapshot(out_a), _snapshot(out)
    assert sorted(b) == sorted(a)  # the same files, no leftovers of the killed run
    assert {k: v for k, v in b.items() if k.startswith("report_files/")} == {
        k: v for k, v in a.items() if k.startswith("report_files/")
    }
    assert _temporaries(out, cache) == []


# --- training -------------------------------------------------------------------------------------------------------


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("sec", "images_per_sec")} for r in csv.DictReader(f)]


@pytest.mark.e2e
@pytest.mark.parametrize("point", list(TRAIN_KILLS))
def test_training_killed_resumes_to_the_uninterrupted_weights(world, monkeypatch, point):
    killed, run_a = world.killed[point], world.trained
    out = _folder(killed.args, "--out")
    run_b = out / "test_resnet"
    killed.wait()
    # epoch 1 finished, epoch 2 cut off (its row may be written before the state: resume drops it)
    assert [r["epoch"] for r in _metrics(run_b)][:1] == ["1"]

    steps = _counting_steps(monkeypatch)
    assert train_script.main([*killed.args, "--resume"]) == 0
    assert steps == world.steps[1:]  # it resumed at epoch 2: epoch 1 was not trained again

    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(run_a / name), load_file(run_b / name)
        assert sorted(a) == sorted(b)
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, f"{name}: {len(unequal)} tensors differ, e.g. {unequal[:3]}"
    assert _metrics(run_b) == _metrics(run_a)
    assert [r["epoch"] for r in _metrics(run_b)] == ["1", "2"]
    assert _temporaries(out) == []
