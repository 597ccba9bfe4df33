"""Training throughput of our loop (SE model, ``train_one_epoch``) against a bare timm loop on the same batch.

``python benchmarks/classification_training_throughput.py --models test_resnet resnet18 --size 64`` prints images per
second of both and their ratio (``--json FILE`` also writes them). Runs alternate and the median of the repeats is
reported, so a busy machine hurts both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from dermpipe.classification.backbones import build_classifier
from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.epochs import build_optimizer
from dermpipe.classification.evaluation import TrainScorer
from dermpipe.configs.loader import load_config
from dermpipe.engine.files import write_text_atomic
from dermpipe.engine.loop import train_one_epoch
from dermpipe.engine.run import Run, choose_device
from dermpipe.engine.schedules import Schedule


def bare_timm_images_per_sec(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """The reference: timm model with its own head, AdamW, cross-entropy, nothing else."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    _sync(images.device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(images.device)
    return steps * images.shape[0] / (time.perf_counter() - start)


def our_images_per_sec(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, run: Run, cfg: ClassificationConfig
) -> float:
    """Our training step: SE model, weight-decay groups, LambdaLR schedule, GradScaler, metrics, progress bar."""
    optimizer = build_optimizer(model, cfg)
    t = cfg.train
    scheduler = Schedule(t.schedule, t.epochs * steps, int(t.warmup_epochs * steps)).scheduler(optimizer)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp)
    loss_fn = torch.nn.CrossEntropyLoss()
    _sync(images.device)
    start = time.perf_counter()
    train_one_epoch(model, [(images, labels)] * steps, loss_fn, optimizer, scheduler, run, scaler, scorer=TrainScorer())
    _sync(images.device)
    return steps * images.shape[0] / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    models: list[str], size: int, batch_size: int, steps: int, repeats: int, classes: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Per model: the median images per second of the bare timm loop and of ours over ``repeats`` alternating runs of
    ``steps`` steps each on one random batch, and their ratio (ours over bare)."""
    # Same precision and memory layout on both sides: this measures the loop's overhead, not AMP.
    run = Run(Path(tempfile.gettempdir()), device, amp=False, channels_last=False, config_hash="benchmark")
    cfg = load_config(ClassificationConfig, overrides=["train.freeze_epochs=0", "train.warmup_epochs=0"])
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch_size,), device=device)
    results = {}
    for name in models:
        bare_model = timm.create_model(name, num_classes=classes).to(device)
        ours_model = build_classifier(name, classes).to(device)
        # Warm-up: allocator, kernels and lazy initialisation out of the timed runs.
        bare_timm_images_per_sec(bare_model, images, labels, 2)
        our_images_per_sec(ours_model, images, labels, 2, run, cfg)
        bare, ours = [], []
        for _ in range(repeats):
            bare.append(bare_timm_images_per_sec(bare_model, images, labels, steps))
            ours.append(our_images_per_sec(ours_model, images, labels, steps, run, cfg))
        b, o = statistics.median(bare), statistics.median(ours)
        results[name] = {"bare_timm_img_s": b, "ours_img_s": o, "ratio": o / b}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["test_resnet", "resnet18"], help="timm model names")
    parser.add_argument("--size", type=int, default=64, help="square input side in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.size} px")
    results = measure(args.models, args.size, args.batch_size, args.steps, args.repeats, args.classes, device)
    for name, r in results.items():
        print(
            f"{name:<14} bare timm {r['bare_timm_img_s']:8.1f} img/s   ours {r['ours_img_s']:8.1f} img/s   "
            f"ratio {r['ratio']:.2f}"
        )
    if args.json:
        settings = {"device": str(device), "threads": torch.get_num_threads(), "batch_size": args.batch_size}
        settings |= {"size": args.size, "steps": args.steps, "repeats": args.repeats}
        write_text_atomic(Path(args.json), json.dumps({**settings, "models": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
