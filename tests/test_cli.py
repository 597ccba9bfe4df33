"""The ``dermpipe`` command and the stage scripts: help, unknown commands, running from anywhere, one-line errors."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dermpipe import cli
from dermpipe.engine.cli import run_cli
from dermpipe.errors import DermpipeError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's scripts: the installed `dermpipe` console script
EXPECTED = [
    "convert",
    "synthetic",
    "train-segmentation",
    "segment",
    "evaluate",
    "train-classifier",
    "vote",
    "run",
    "bundle",
    "predict",
    "serve",
    "export",
    "merge",
    "cache",
    "demo",
]


def package_folders() -> dict[str, Path]:
    """setup.cfg's package_dir: where each subpackage's source lives, e.g. dermpipe.segmentation -> segmentation/."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    pairs = (line.partition("=") for line in parser["options"]["package_dir"].strip().splitlines())
    return {name.strip(): ROOT / folder.strip() for name, _, folder in pairs}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def command_lines(text: str) -> dict[str, list[str]]:
    """The help's command table: each command name -> the lines that list it."""
    table = text.split("Commands:\n", 1)[1]
    found: dict[str, list[str]] = {}
    for line in table.splitlines():
        match = re.match(r"^  (\S+)\s{2,}(\S.*)$", line)
        assert match, f"not a `  name  help` line: {line!r}"
        found.setdefault(match[1], []).append(match[2])
    return found


def check_top_help(text: str) -> None:
    assert text.startswith("usage: dermpipe ")
    listed = command_lines(text)
    assert list(listed) == EXPECTED
    for name, lines in listed.items():
        assert lines == [cli.SUBCOMMANDS[name][1]], name  # one line each, its own help


def test_subcommands_are_the_documented_ones():
    assert list(cli.SUBCOMMANDS) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_subcommand_module_is_a_script_in_the_tree(name):
    """Every subcommand's module is a stage script that also runs as ``python <folder>/<file>.py``."""
    package, _, module = cli.SUBCOMMANDS[name][0].rpartition(".")
    script = package_folders()[package] / f"{module}.py"
    assert script.is_file(), f"`dermpipe {name}` runs {cli.SUBCOMMANDS[name][0]}, but there is no {script}"
    source = script.read_text()
    assert re.search(r"^def main\(argv", source, re.M) and 'if __name__ == "__main__":' in source


def test_help_in_process_lists_every_subcommand_once(capsys):
    for argv in (["--help"], ["-h"], ["help"], []):
        assert cli.main(argv) == 0
        captured = capsys.readouterr()
        check_top_help(captured.out)
        assert captured.err == ""


def test_help_of_installed_console_script():
    result = run(BIN / "dermpipe", "--help")
    assert result.returncode == 0, result.stderr
    check_top_help(result.stdout)


def test_python_dash_m_dermpipe(tmp_path):
    result = run(sys.executable, "-m", "dermpipe", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    check_top_help(result.stdout)


@pytest.mark.parametrize("name", EXPECTED)
def test_subcommand_help(name, capsys):
    argv0 = sys.argv[0]
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert re.match(rf"usage: dermpipe {re.escape(name)}(\s|$)", out), out[:200]
    assert sys.argv[0] == argv0  # the program name is restored


def test_subcommand_help_of_installed_console_script():
    result = run(BIN / "dermpipe", "synthetic", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: dermpipe synthetic ")


@pytest.mark.parametrize(
    ("typed", "offered"), [("segmnt", "'segment'"), ("trian-classifier", "'train-classifier'"), ("frobnicate", None)]
)
def test_unknown_subcommand_is_one_error_line(typed, offered, capsys):
    assert cli.main([typed, "--out", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: unknown command {typed!r}"), captured.err
    if offered:
        assert f"did you mean {offered}" in lines[0]
    else:
        assert "did you mean" not in lines[0]


def test_unknown_subcommand_of_installed_console_script():
    result = run(BIN / "dermpipe", "segmnt")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: unknown command 'segmnt' (did you mean 'segment'?); see `dermpipe --help`"
    ]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "how", [("segmentation/train.py",), ("-m", "dermpipe.segmentation.train")], ids=["script-path", "dash-m"]
)
def test_stage_script_runs_from_another_folder(how, tmp_path):
    args = [ROOT / how[0]] if how[0].endswith(".py") else list(how)
    result = run(sys.executable, *args, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and "--manifest" in result.stdout
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


# ---- a user mistake is one `error:` line and exit status 2; a bug keeps its traceback


class WrongStageError(DermpipeError):
    """A subclass, as the stages define them."""


def test_user_mistake_is_one_error_line(capsys):
    def body():
        raise WrongStageError("runs/seg is a classification run: pass --segmentation-run a segmentation run")

    assert run_cli(body) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: runs/seg is a classification run: pass --segmentation-run a segmentation run\n"
    assert captured.out == ""


def test_missing_file_is_one_error_line(tmp_path, capsys):
    def body():
        (tmp_path / "missing.csv").read_text()

    assert run_cli(body) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.csv" in lines[0]


def test_bug_keeps_its_traceback(capsys):
    def body():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_cli(body)
    assert "error:" not in capsys.readouterr().err


def test_success_returns_the_body_status():
    assert run_cli(lambda: 0) == 0
    assert run_cli(lambda: 3) == 3


SCRIPT = """
import sys
from dermpipe.engine.cli import run_cli
from dermpipe.errors import DermpipeError

class Mistake(DermpipeError):
    pass

def body():
    if sys.argv[1] == "mistake":
        raise Mistake("unknown backbone 'resnet5' (did you mean 'resnet50'?)")
    raise RuntimeError("shape mismatch")

raise SystemExit(run_cli(body))
"""


def test_in_a_process_mistake_is_one_line_and_bug_a_traceback(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(SCRIPT)
    mistake = run(sys.executable, script, "mistake", cwd=tmp_path)
    assert mistake.returncode == 2
    assert mistake.stderr.splitlines() == ["error: unknown backbone 'resnet5' (did you mean 'resnet50'?)"]
    bug = run(sys.executable, script, "bug", cwd=tmp_path)
    assert bug.returncode == 1
    assert bug.stderr.startswith("Traceback (most recent call last):")
    assert bug.stderr.rstrip().endswith("RuntimeError: shape mismatch")
    assert not any(line.startswith("error:") for line in bug.stderr.splitlines())


def test_stage_script_user_mistake_through_dermpipe(tmp_path, monkeypatch, capsys):
    """A real stage: a manifest that is not there is one line naming it, exit 2, and nothing written."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "manifest.csv"
    assert cli.main(["train-segmentation", "--manifest", str(missing), "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], lines
    assert list(tmp_path.iterdir()) == []
