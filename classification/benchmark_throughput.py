"""Training throughput of our loop (SE model, ``train_one_epoch``) against a bare timm loop on the same batch.

``python classification/benchmark_throughput.py --models test_resnet resnet18 --size 64`` prints images per second of
both and their ratio. Runs alternate and the median of the repeats is reported, so a busy machine hurts both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from dermpipe.classification.backbones import build_classifier
from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.training import build_optimizer, lr_factor, train_one_epoch
from dermpipe.configs.loader import load_config
from dermpipe.engine.run import Run, choose_device


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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp)
    loss_fn = torch.nn.CrossEntropyLoss()
    _sync(images.device)
    start = time.perf_counter()
    train_one_epoch(model, [(images, labels)] * steps, loss_fn, optimizer, scheduler, run, scaler)
    _sync(images.device)
    return steps * images.shape[0] / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    # Same precision and memory layout on both sides: this measures the loop's overhead, not AMP.
    run = Run(Path(tempfile.gettempdir()), device, amp=False, channels_last=False, config_hash="benchmark")
    cfg = load_config(ClassificationConfig, overrides=["train.freeze_epochs=0", "train.warmup_epochs=0"])
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.size} px")
    for name in args.models:
        bare_model = timm.create_model(name, num_classes=args.classes).to(device)
        ours_model = build_classifier(name, args.classes).to(device)
        # Warm-up: allocator, kernels and lazy initialisation out of the timed runs.
        bare_timm_images_per_sec(bare_model, images, labels, 2)
        our_images_per_sec(ours_model, images, labels, 2, run, cfg)
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(bare_timm_images_per_sec(bare_model, images, labels, args.steps))
            ours.append(our_images_per_sec(ours_model, images, labels, args.steps, run, cfg))
        b, o = statistics.median(bare), statistics.median(ours)
        print(f"{name:<14} bare timm {b:8.1f} img/s   ours {o:8.1f} img/s   ratio {o / b:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
