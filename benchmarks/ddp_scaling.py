"""Distributed training on the CPU: one process against N gloo processes under torchrun, same global batch.

python benchmarks/ddp_scaling.py --processes 2 --images 160 --epochs 2 --json runs/bench/ddp.json

Trains the classification stage (``test_resnet`` by default, from scratch, whole images) on a synthetic set once in
one process and once under ``torchrun --nproc_per_node N`` (gloo), and reads each run's training images per second
(summed over ranks by the loop) and last validation balanced accuracy from its metrics.csv. Each process gets
``cores / N`` torch threads, so both runs use the same cores: on a CPU the figure says what the gloo gradient
all-reduce and the split batches cost, not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dermpipe.data.generator import generate_dataset
from dermpipe.engine.files import write_text_atomic

REPO = Path(__file__).resolve().parent.parent


def train(manifest: Path, root: Path, processes: int, args: argparse.Namespace) -> dict[str, float]:
    threads = max(1, (os.cpu_count() or 1) // processes)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), str(REPO / "classification" / "train.py"),
               "--manifest", str(manifest), "--root", str(root), "--backbone", args.backbone, "--no-crop",
               "--epochs", str(args.epochs), "--device", "cpu", "--set", "model.pretrained=false",
               "--set", f"data.image_size={args.size}", "--set", f"train.batch_size={args.batch}",
               "--set", "train.gradcam_images=0", "--set", f"run.threads={threads}"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - start
    with open(root / "classification" / args.backbone / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "processes": processes,
        "threads_per_process": threads,
        # the epochs after the first: the first also fills the resized-image cache
        "train_img_s": sum(float(r["images_per_sec"]) for r in rows[1:] or rows) / len(rows[1:] or rows),
        "val_balanced_accuracy": float(rows[-1]["val_balanced_accuracy"]),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="the global batch, the same in both runs")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_dataset(Path(tmp) / "data", n_images=args.images, size=96, seed=0)
        one = train(manifest, Path(tmp) / "one", 1, args)
        many = train(manifest, Path(tmp) / "many", args.processes, args)
    ratio = many["train_img_s"] / one["train_img_s"]
    print(f"1 process {one['train_img_s']:.1f} img/s, {args.processes} gloo processes {many['train_img_s']:.1f} img/s "
          f"(ratio {ratio:.2f}); val balanced accuracy {one['val_balanced_accuracy']:.3f} vs "
          f"{many['val_balanced_accuracy']:.3f}")  # fmt: skip
    if args.json:
        result = {"one": one, "many": many, "ratio": ratio, "global_batch": args.batch, "backbone": args.backbone}
        write_text_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
