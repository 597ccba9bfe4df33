"""Cold start of each engine (benchmarks/onnx_speed.py calls it; BENCHMARKS.md): the seconds from launching
``dermpipe predict`` on one photo to its finished predictions.csv (a fresh user cache: ONNX Runtime optimises its
graphs; then a second start, which finds them cached), with the command's peak memory; and from launching
``dermpipe serve`` to the first answered ``POST /v1/predict``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ENGINES = ("pytorch", "onnxruntime", "onnxruntime-int8")


# runs `dermpipe ARGS` and writes its own peak resident memory (VmHWM, since its exec) to stderr's last line: the
# rusage of a child is no use, it carries the parent's peak across fork and exec
PEAK = ("import atexit, re, sys\n"
        "def peak():\n"
        "    status = open('/proc/self/status').read()\n"
        "    sys.stderr.write('\\npeak_kb ' + re.search(r'VmHWM:\\s+(\\d+)', status).group(1) + '\\n')\n"
        "atexit.register(peak)\n"
        "from dermpipe.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")  # fmt: skip


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak resident MB) of one ``dermpipe`` command (``argv`` after ``dermpipe``) run to its end."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *argv], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"dermpipe {' '.join(argv)} failed: {done.stderr[-2000:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1].split()[1]) / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_first_answer(bundle: Path, engine: str, photo: Path, env: dict[str, str], threads: int) -> float:
    """Seconds from launching the server to its first answered prediction of ``photo``."""
    port = _free_port()
    argv = [sys.executable, "-m", "dermpipe", "serve", "--model", str(bundle), "--engine", engine, "--port", str(port),
            "--no-gradcam", "--set", f"run.threads={threads}"]  # fmt: skip
    start = time.perf_counter()
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"dermpipe serve --engine {engine} ended with {server.returncode}")
            try:
                with open(photo, "rb") as f:
                    answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", files={"files": (photo.name, f)},
                                        timeout=300)  # fmt: skip
                if answer.status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                time.sleep(0.05)  # not listening yet
    finally:
        server.terminate()
        server.wait(30)


def cold_starts(bundle: Path, root: Path, threads: int) -> dict[str, dict[str, float]]:
    """Per engine: ``predict_first_s`` (fresh user cache), ``predict_later_s`` (its optimised graphs cached),
    ``predict_peak_mb``, ``serve_first_answer_s`` (the graphs cached)."""
    one = root / "one_photo"
    one.mkdir(exist_ok=True)
    photo = next(p for p in sorted((root / "photos").iterdir()) if p.suffix == ".jpg")
    shutil.copyfile(photo, one / photo.name)
    out: dict[str, dict[str, float]] = {}
    for engine in ENGINES:
        home = root / f"cold_{engine}"
        env = {**os.environ, "XDG_CACHE_HOME": str(home / "cache"), "OMP_NUM_THREADS": str(threads or os.cpu_count())}
        argv = ["predict", "--model", str(bundle), "--engine", engine, "--input", str(one), "--no-report", "--set",
                f"run.threads={threads}"]  # fmt: skip
        first, peak = _timed([*argv, "--out", str(home / "first")], env)
        shutil.rmtree(home / "cache" / "dermpipe" / "crops", ignore_errors=True)  # the photo's answers, not graphs
        shutil.rmtree(home / "cache" / "dermpipe" / "crop_probabilities", ignore_errors=True)
        later, _ = _timed([*argv, "--out", str(home / "later")], env)
        serve = _serve_first_answer(bundle, engine, photo, env, threads)
        out[engine] = {"predict_first_s": first, "predict_later_s": later, "predict_peak_mb": peak,
                       "serve_first_answer_s": serve}  # fmt: skip
    return out
