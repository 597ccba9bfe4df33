"""The layer contract in ``.importlinter`` holds: each stage package imports only from the stages below it.

import-linter finds a package as one folder, but the source tree keeps the stage folders beside ``dermpipe/`` and
setup.cfg's ``package_dir`` maps them inside it (``data/`` is ``dermpipe.data``). So the check runs on a staged copy
of the installed layout (``tools/staged_layout.py``), made of links to the source.

Run as a script, ``python tests/test_layers.py`` is the same check for ``make lint`` and CI (extra arguments go to
``lint-imports``).
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
sys.path.insert(0, str(ROOT / "tools"))
import staged_layout  # noqa: E402


def stage_layout(dest: Path, root: Path = ROOT) -> Path:
    """The installed layout (``tools/staged_layout.py``) with the import contract beside it."""
    staged_layout.stage_layout(dest, root)
    shutil.copy2(root / ".importlinter", dest / ".importlinter")
    return dest


def lint_imports(dest: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    """The venv's ``lint-imports`` on the layout staged in ``dest``, run there: it finds config and package there."""
    if not LINT_IMPORTS.exists():
        raise FileNotFoundError(f"{LINT_IMPORTS} not found: install the dev extras (pip install -e '.[dev]')")
    stage_layout(dest)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *args], cwd=dest, capture_output=capture, text=True, check=False
    )


def test_layer_contract_holds(tmp_path):
    result = lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout, result.stdout


def test_the_check_sees_imports_between_stages(tmp_path):
    """Not vacuous: with the layers upside down the staged graph has imports that break them."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    section = next(s for s in config.sections() if config[s].get("type") == "layers")
    layers = [line.strip() for line in config[section]["layers"].splitlines() if line.strip()]
    upside_down = list(reversed(layers))  # a line may hold independent siblings: "a | b"
    config[section]["layers"] = "\n" + "\n".join(upside_down)
    stage_layout(tmp_path)
    with open(tmp_path / ".importlinter", "w") as f:
        config.write(f)
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout + result.stderr
    assert "dermpipe.ensemble" in result.stdout and "dermpipe.engine" in result.stdout


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        raise SystemExit(lint_imports(Path(folder), *sys.argv[1:], capture=False).returncode)
