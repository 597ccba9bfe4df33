"""Batch prediction's memory is flat in the archive's size (BENCHMARKS.md, "Memory"):

python benchmarks/memory_flat.py --sizes 2000 20000 --out runs/bench/memory

Writes ``max(--sizes)`` small synthetic photos and a tiny untrained pipeline (a U-Net and one classifier on
``tu-test_resnet`` / ``test_resnet``, a vote), then runs ``dermpipe predict`` over the first N photos for each N in a
fresh process and reads that process's peak resident memory (``ru_maxrss``). Prediction streams, so the peak should
not grow with N; the JSON gives each peak and the ratio of the largest to the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dermpipe.classification.backbones import build_classifier, checkpoint_metadata
from dermpipe.data.generator import make_sample
from dermpipe.data.reading import write_image
from dermpipe.engine.checkpoint import save_checkpoint
from dermpipe.engine.files import write_text_atomic
from dermpipe.engine.run import save_config
from dermpipe.ensemble.meta import LocallyConnectedVote, save_meta
from dermpipe.segmentation.config import SegDataConfig, SegmentationConfig, SegModelConfig, SegPredictConfig
from dermpipe.segmentation.model import build_unet, save_unet

CLASSES = ("nv", "mel", "bkl", "bcc")


def tiny_pipeline(root: Path) -> None:
    torch.manual_seed(0)
    seg_model = SegModelConfig(encoder="tu-test_resnet", encoder_weights=None, decoder_channels=(16, 8, 8, 8, 8))
    seg_cfg = SegmentationConfig(
        data=SegDataConfig(image_size=32), model=seg_model, predict=SegPredictConfig(crop_size=32, tta=False)
    )
    save_unet(root / "segmentation" / "best.safetensors", build_unet(seg_model), seg_model, 32, "bench")
    save_config(seg_cfg, root / "segmentation" / "config.yaml")
    model = build_classifier("test_resnet", len(CLASSES), False)
    model.input_size = 32
    save_checkpoint(
        root / "classification" / "test_resnet" / "best.safetensors", model, checkpoint_metadata(model, CLASSES)
    )
    save_meta(root / "ensemble" / "meta.safetensors", LocallyConnectedVote(1, len(CLASSES), 4), CLASSES,
              ["test_resnet"], {"temperature": 1.0, "refer_threshold": 0.5, "refer_class": "mel"})  # fmt: skip


def photos(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    base = [make_sample(rng, c, 64)[0] for c in CLASSES for _ in range(8)]  # 32 distinct photos, each its own bytes
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / f"photo_{i:06d}.png"
        if not path.is_file():
            image = base[i % len(base)].copy()
            image[0, 0] = (i % 251, (i // 251) % 251, 7)  # every file different: no cache hit between photos
            write_image(path, image)


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """Peak resident memory (MB) and seconds of one command (its output passes through), run as the only child of a
    fresh process, so the peak is that command's alone; a failing command raises ``CalledProcessError``."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); "
             "code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t); "
             "sys.exit(code)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe, *argv], stdout=subprocess.PIPE, text=True)
    *output, last = done.stdout.rstrip("\n").split("\n")
    if output:
        print("\n".join(output), flush=True)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, argv)
    kb, seconds = last.split()
    return int(kb) / 1024, float(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--out", default="runs/bench/memory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    tiny_pipeline(out / "model")
    start = time.time()
    photos(out / "photos", max(args.sizes))
    print(f"{max(args.sizes)} photos in {time.time() - start:.0f}s")
    dermpipe = Path(sys.executable).parent / "dermpipe"
    results = []
    for n in sorted(args.sizes):
        folder = out / f"input_{n}"
        if not folder.is_dir():  # the first n photos, as links
            for i in range(n):
                src = out / "photos" / f"{i // 1000:03d}" / f"photo_{i:06d}.png"
                (folder / src.parent.name).mkdir(parents=True, exist_ok=True)
                os.symlink(src.resolve(), folder / src.parent.name / src.name)
        command = [str(dermpipe), "predict", "--input", str(folder), "--root", str(out / "model"),
                   "--out", str(out / f"predicted_{n}"), "--set", f"run.cache_dir={out / f'cache_{n}'}",
                   "--device", "cpu"]  # fmt: skip
        mb, seconds = peak_rss_mb(command)
        results.append({"images": n, "peak_rss_mb": round(mb, 1), "seconds": round(seconds, 1)})
        print(f"{n} images: peak RSS {mb:.0f} MB, {seconds:.0f}s ({n / seconds:.0f} img/s)")
    ratio = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"peak RSS ratio {results[-1]['images']} / {results[0]['images']} images: {ratio:.3f}")
    summary = {"runs": results, "ratio": round(ratio, 3), "command": " ".join(["python", *sys.argv])}
    write_text_atomic(out / "memory.json", json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
