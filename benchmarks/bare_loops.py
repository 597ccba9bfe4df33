"""The loop both bare reference scripts share (``benchmarks/classification_bare.py``,
``benchmarks/segmentation_bare.py``): none of the stages' code, only torch, OpenCV and the manifest.

The bare scripts re-run the issues' bars on our own split, so the stages are compared with a plain loop on the same
images instead of with quoted figures: images squashed to a square and normalised, shuffled batches with random flips,
AdamW under torch's ``OneCycleLR``, the last epoch's model scored once.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from dermpipe.data.manifest import Manifest
from dermpipe.engine.files import write_text_atomic

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_split(manifest: Manifest, size: int) -> torch.Tensor:
    """Every image of ``manifest`` decoded and resized to ``size`` x ``size``, normalised, as one NCHW float tensor."""
    out = np.empty((len(manifest), 3, size, size), dtype=np.float32)
    for i, path in enumerate(r["image_path"] for r in manifest.rows):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"{path}: not a readable image; fix or drop its manifest row")
        image = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA)
        out[i] = ((image.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    return torch.from_numpy(out)


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image flipped left-right and up-down, each with probability 1/2."""
    h = torch.rand(len(images), generator=generator) < 0.5
    v = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(h[:, None, None, None], images.flip(3), images)
    return torch.where(v[:, None, None, None], images.flip(2), images)


def bare_arguments(argv: list[str] | None, doc: str, model: str, size: int, epochs: int, batch: int):
    """The options both bare scripts share, parsed; sets the thread count and the seed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=model, help="timm model (classification) or smp encoder (segmentation)")
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    args: argparse.Namespace,
    flip_targets: bool = False,
) -> float:
    """The bare loop: shuffled batches, random flips (of the target masks too with ``flip_targets``), AdamW under
    ``OneCycleLR`` at ``args.lr``; prints the loss per epoch and returns the training seconds. A last batch of one
    image is skipped (batch norm cannot train on it)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = (len(x) + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            if len(idx) < 2:
                continue
            if flip_targets:
                both = random_flips(torch.cat([x[idx], y[idx]], 1), generator)
                inputs, targets = both[:, : x.shape[1]], both[:, x.shape[1] :]
            else:
                inputs, targets = random_flips(x[idx], generator), y[idx]
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(x):.4f} ({time.perf_counter() - start:.0f} s)")
    return time.perf_counter() - start


def write_result(out: str, name: str, result: dict[str, float]) -> dict[str, float]:
    write_text_atomic(Path(out) / name, json.dumps(result, indent=2) + "\n")
    print(" ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result
