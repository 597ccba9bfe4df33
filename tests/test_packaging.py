"""The package's shape: the wheel holds only ``dermpipe``, and a user's own ``data`` or ``configs`` shadows nothing."""

from __future__ import annotations

import configparser
import csv
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_untrained_pipeline

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's scripts: the installed `dermpipe` console script
USER_MARK = "THE USER'S OWN MODULE WAS IMPORTED"


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def package_folders() -> dict[str, Path]:
    """setup.cfg's package_dir: package name -> source folder, e.g. dermpipe.data -> <root>/data."""
    pairs = (line.partition("=") for line in setup_cfg()["options"]["package_dir"].strip().splitlines())
    return {name.strip(): ROOT / folder.strip() for name, _, folder in pairs}


def in_users_path(folder: Path) -> dict[str, str]:
    """The environment of a user whose project folder is on the import path (as with `python -c` or `-m` there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)
    return env


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command in the user's folder, with that folder on the import path; it succeeds and uses none of theirs."""
    command = [str(a) for a in args]
    result = subprocess.run(command, cwd=cwd, env=in_users_path(cwd), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert USER_MARK not in result.stdout + result.stderr, result.stderr
    return result


# ---- the wheel


def source_copy(dest: Path) -> Path:
    """What a clean clone (plus any uncommitted work) holds: no venv, no build/, no egg-info, no caches."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in listed.split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: leave out what .gitignore names
        ignored = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", ".*cache")
        ignore = shutil.ignore_patterns(*ignored)
        shutil.copytree(ROOT, dest, ignore=ignore)
        return dest
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    source = source_copy(tmp / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
        + ["--disable-pip-version-check", "-w", str(tmp / "dist")],
        check=True,
        timeout=600,
    )
    (built,) = (tmp / "dist").glob("dermpipe-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_wheel_holds_only_the_dermpipe_namespace(wheel):
    version = setup_cfg()["metadata"]["version"]
    names = wheel.namelist()
    stray = [n for n in names if not n.startswith(("dermpipe/", f"dermpipe-{version}.dist-info/"))]
    assert stray == [], f"files outside dermpipe/ in the wheel: {stray}"
    assert not any(n.startswith(("dermpipe/tests/", "dermpipe/benchmarks/")) for n in names)
    assert wheel.read(f"dermpipe-{version}.dist-info/top_level.txt").decode().split() == ["dermpipe"]


def test_wheel_holds_the_configs(wheel):
    shipped = {f"dermpipe/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped, "no configs/*.yaml in the source tree"
    assert shipped <= set(wheel.namelist())
    assert "dermpipe/configs/segmentation.yaml" in shipped


def test_wheel_holds_every_module_of_the_source_tree(wheel):
    """Each .py file of each mapped folder, subpackages included (a package missing from setup.cfg is left out)."""
    names = set(wheel.namelist())
    missing = []
    for package, folder in package_folders().items():
        for path in folder.rglob("*.py"):
            inside = "/".join([*package.split("."), *path.relative_to(folder).parts])
            if "__pycache__" not in path.parts and inside not in names:
                missing.append(inside)
    assert missing == [], f"source modules the wheel leaves out: {sorted(missing)}"


def test_wheel_declares_the_console_script(wheel):
    version = setup_cfg()["metadata"]["version"]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"dermpipe-{version}.dist-info/entry_points.txt").decode())
    assert entry_points["console_scripts"]["dermpipe"].strip() == "dermpipe.cli:main"


# ---- a user's folder with its own `data` package and `configs` module


def make_user_folder(folder: Path) -> Path:
    """The user's project: their own data/ package, configs.py module and configs/*.yaml files."""
    (folder / "data").mkdir(parents=True)
    mark = f"import sys\nsys.stderr.write({USER_MARK!r} + ': ' + __name__ + '\\n')\n"
    (folder / "data" / "__init__.py").write_text(mark)
    (folder / "data" / "manifest.py").write_text(mark + 'Manifest = "the user\'s own"\n')
    (folder / "configs.py").write_text(mark + 'SETTINGS = "the user\'s own"\n')
    for name in ("engine", "segmentation", "classification", "ensemble"):
        (folder / f"{name}.py").write_text(mark)
    (folder / "configs").mkdir()  # a module beats a folder without __init__.py: `import configs` is configs.py
    for stage in ("segmentation", "classification", "ensemble", "predict"):
        (folder / "configs" / f"{stage}.yaml").write_text("not: [the package's config\n")
    return folder


@pytest.fixture
def user_folder(tmp_path) -> Path:
    return make_user_folder(tmp_path / "project")


IMPORTS = """
import dermpipe.configs
import dermpipe.data.manifest
from dermpipe.configs import default_config_path
from dermpipe.data.manifest import Manifest
assert Manifest != "the user's own"
assert isinstance(Manifest, type), Manifest
print(dermpipe.data.manifest.__file__)
print(dermpipe.configs.__file__)
print(default_config_path("segmentation"))
"""


def test_package_modules_win_over_the_users_own(user_folder):
    import dermpipe.configs
    import dermpipe.data.manifest

    out = run(sys.executable, "-c", IMPORTS, cwd=user_folder).stdout.splitlines()
    manifest_file, configs_file, config_yaml = map(Path, out)
    assert manifest_file == Path(dermpipe.data.manifest.__file__)  # the one this test imports: the repo's data/
    assert configs_file == Path(dermpipe.configs.__file__)
    if Path(dermpipe.data.manifest.__file__).resolve().is_relative_to(ROOT):  # an editable install (make install)
        assert manifest_file.resolve() == package_folders()["dermpipe.data"].resolve() / "manifest.py"
    assert config_yaml.parent == configs_file.parent and config_yaml.is_file()
    assert not manifest_file.resolve().is_relative_to(user_folder.resolve())


@pytest.mark.parametrize(
    "command",
    [
        [BIN / "dermpipe", "synthetic"],
        [sys.executable, ROOT / "data" / "synthetic.py"],
    ],
    ids=["console-script", "script-path"],
)
def test_synthetic_set_in_the_users_folder(command, user_folder):
    flags = ["--out", "syn", "--n", "24", "--size", "48", "--classes", "nv,mel,bcc", "--seed", "0"]
    run(*command, *flags, cwd=user_folder)
    with open(user_folder / "syn" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {r["label"] for r in rows} == {"nv", "mel", "bcc"}
    assert all((user_folder / "syn" / r["image_path"]).is_file() for r in rows)


def test_synthetic_script_help_in_the_users_folder(user_folder):
    result = run(sys.executable, ROOT / "data" / "synthetic.py", "--help", cwd=user_folder)
    assert result.stdout.startswith("usage: ") and "--out" in result.stdout


# ---- prediction in the user's folder, with a tiny pipeline

CLASSES = ["nv", "mel", "bcc"]
BACKBONE = "test_resnet"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """Untrained but complete stage folders (as tests/test_predict.py makes them) and three photos."""
    root = write_untrained_pipeline(tmp_path_factory.mktemp("pipeline"), [BACKBONE], CLASSES)
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for i in range(3):
        image = rng.integers(120, 220, (64, 64, 3), dtype=np.uint8)
        cv2.circle(image, (32, 32), 14 + 2 * i, (60, 40, 30), -1)
        cv2.imwrite(str(root / "photos" / f"photo_{i}.jpg"), image)
    return root


PREDICT = {
    "console-script": [BIN / "dermpipe", "predict"],
    "script-path": [sys.executable, ROOT / "ensemble" / "predict.py"],
}


@pytest.fixture(scope="module")
def predictions(pipeline, tmp_path_factory) -> dict[str, tuple[Path, subprocess.Popen]]:
    """Both ways of predicting, started at once in one user's folder (each mostly waits on importing torch)."""
    folder = make_user_folder(tmp_path_factory.mktemp("user") / "project")
    started = {}
    for how, command in PREDICT.items():
        out = folder / how
        args = [*command, "--input", pipeline / "photos", "--output", out / "predictions.csv", "--out", out,
                "--device", "cpu", "--no-report", "--segmentation-run", pipeline / "seg",
                "--classification-root", pipeline / "cls", "--ensemble-run", pipeline / "ens",
                "--set", f"run.cache_dir={out / 'cache'}"]  # fmt: skip
        process = subprocess.Popen(
            [str(a) for a in args],
            cwd=folder,
            env=in_users_path(folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[how] = (out, process)
    yield started
    for _, process in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.e2e
@pytest.mark.parametrize("how", list(PREDICT))
def test_predict_in_the_users_folder(how, predictions):
    out, process = predictions[how]
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, f"{process.args}\n{stdout}\n{stderr}"
    assert USER_MARK not in stdout + stderr, stderr
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image_id"] for r in rows) == ["photo_0", "photo_1", "photo_2"]
    assert all(r["predicted"] in CLASSES for r in rows)
