"""The quick measurement set behind ``make bench``: the benchmarks here at a small size, offline, on the CPU.

    python benchmarks/quick_synthetic.py --out runs/bench/quick

Writes a small synthetic data set (``OUT/data``), then runs each script as ``python benchmarks/NAME.py ...`` in a
process of its own: the bare classification and segmentation reference loops on that set, the segmentation
prediction throughput, the classification training throughput, and the whole pipeline's batch prediction throughput
(the five default backbones at their native sizes, random weights). Each writes its JSON under ``OUT``;
``OUT/summary.json`` gathers them with the equivalent commands and their seconds. Small sizes, few epochs: this checks
that the benchmarks run end to end and shows their order of magnitude on this machine; the figures in BENCHMARKS.md
come from the full-size commands there.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from dermpipe.data.generator import generate_dataset
from dermpipe.engine.files import write_text_atomic

HERE = Path(__file__).resolve().parent


def steps(out: Path, manifest: Path, threads: int) -> list[tuple[str, list[str], Path]]:
    """(script name, arguments, JSON it writes) for each measurement, in the order they run."""
    t = ["--threads", str(threads)]
    return [
        (
            "classification_bare",
            ["--manifest", str(manifest), "--out", str(out / "classification_bare"), "--size", "32", "--epochs", "2",
             "--batch-size", "16", *t],
            out / "classification_bare" / "metrics_test.json",
        ),
        (
            "segmentation_bare",
            ["--manifest", str(manifest), "--out", str(out / "segmentation_bare"), "--size", "64", "--epochs", "2",
             "--batch-size", "8", *t],
            out / "segmentation_bare" / "scores_test.json",
        ),
        (
            "segmentation_prediction_throughput",
            ["--size", "128", "--images", "16", "--batch", "8", "--encoder", "resnet18", *t,
             "--json", str(out / "segmentation_prediction_throughput.json")],
            out / "segmentation_prediction_throughput.json",
        ),
        (
            "classification_training_throughput",
            ["--models", "test_resnet", "resnet18", "--size", "64", "--batch-size", "16", "--steps", "3",
             "--repeats", "3", *t, "--json", str(out / "classification_training_throughput.json")],
            out / "classification_training_throughput.json",
        ),
        (
            "pipeline_throughput",
            ["--images", "4", "--batch", "4", "--seg-size", "128", "--encoder", "resnet18", *t,
             "--json", str(out / "pipeline_throughput.json")],
            out / "pipeline_throughput.json",
        ),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/quick", help="folder for the data set and the JSON results")
    parser.add_argument("--images", type=int, default=80, help="synthetic images for the bare loops (default 80)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every step (default 1, steadier on a shared machine; 0 = torch's default)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    manifest = generate_dataset(out / "data", n_images=args.images, size=64, seed=0)
    summary = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": args.threads or torch.get_num_threads(),
        },
        "data": {"manifest": str(manifest), "images": args.images, "size": 64, "seconds": time.perf_counter() - start},
        "results": {},
    }
    for name, arguments, result in steps(out, manifest, args.threads):
        command = shlex.join(["python", f"benchmarks/{name}.py", *arguments])
        print(f"== {command}", flush=True)
        began = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / f"{name}.py"), *arguments], check=True)
        summary["results"][name] = {
            "command": command,
            "seconds": time.perf_counter() - began,
            "result": json.loads(result.read_text()),
        }
    summary["seconds"] = time.perf_counter() - start
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'summary.json'} ({summary['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
