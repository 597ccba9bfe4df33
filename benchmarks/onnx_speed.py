"""ONNX Runtime against PyTorch eager for batch prediction (BENCHMARKS.md), on the same images, on the CPU.

    python benchmarks/onnx_speed.py --images 32 --batch 16 --threads 2 --out runs/bench/onnx

Builds a bundle with random weights (the U-Net at ``--seg-size`` with ``--encoder``, the backbones at their native
sizes or ``--size``, the vote), exports it (``dermpipe export --format onnx``), then measures both engines:

1. forward: every network's forward pass on the same batches (``--images`` in batches of ``--batch``), as prediction
   calls it: PyTorch eager under inference mode, and the ``OnnxModule`` prediction uses (ORT_ENABLE_ALL, tensors in
   and out). Images per second through all of them (U-Net, each backbone, vote), and the largest output difference.
2. predict: the whole prediction path (decode, preprocessing, the U-Net with its default flip TTA, crops, classifiers,
   vote, rows) over a folder of synthetic 256 px JPEGs, each engine from a cold cache of its own; the stages' loading
   (and ONNX Runtime's graph optimisation) is timed apart. Images per second, and the largest difference of the final
   probabilities (as predictions.csv writes them, 6 decimals).

The engines alternate and each figure is the best of ``--repeats`` (steadier on a shared machine). ``--levels`` also
times the forward passes under other graph optimisation levels. Writes ``OUT/onnx_speed.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch
from cold_start import cold_starts  # its neighbours, on sys.path when this script runs by path
from predict_profile import step_seconds

from dermpipe.bundle.onnx_export import example_input, export_onnx, load_network, weights_files
from dermpipe.bundle.store import bundle_checksums, open_bundle
from dermpipe.bundle.write import write_bundle
from dermpipe.classification.backbones import DEFAULT_BACKBONES, build_classifier, checkpoint_metadata
from dermpipe.configs.schema import RunConfig
from dermpipe.data.generator import generate_dataset, make_sample
from dermpipe.data.listing import manifest_from_folder
from dermpipe.engine.checkpoint import save_checkpoint
from dermpipe.engine.files import write_text_atomic
from dermpipe.engine.lineage import record_hand_made
from dermpipe.engine.onnx_runtime import INT8_ENGINE, OnnxModule, int8_file, onnx_file, session_options
from dermpipe.ensemble.meta import LocallyConnectedVote, save_meta
from dermpipe.predict.batch import predict_folder
from dermpipe.predict.config import PredictConfig, PredictOutputs
from dermpipe.predict.int8_export import export_int8
from dermpipe.predict.predictor import EnsemblePredictor
from dermpipe.segmentation.config import SegModelConfig
from dermpipe.segmentation.model import build_unet, save_unet

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_bundle(root: Path, encoder: str, seg_size: int, backbones: list[str], size: int) -> Path:
    """A bundle of random-weight stages (``root/bundle``), exported to ONNX."""
    stages = root / "stages"
    seg_model = SegModelConfig(encoder=encoder, encoder_weights=None)
    save_unet(stages / "segmentation" / "best.safetensors", build_unet(seg_model), seg_model, seg_size, "bench")
    for name in backbones:
        model = build_classifier(name, len(CLASSES), False)
        model.input_size = max(size, model.min_input_size) if size else model.input_size
        path = stages / "classification" / name / "best.safetensors"
        save_checkpoint(path, model, checkpoint_metadata(model, CLASSES))
    vote = LocallyConnectedVote(len(backbones), len(CLASSES), 20)
    save_meta(stages / "ensemble" / "meta.safetensors", vote, CLASSES, backbones, {"temperature": 1.0})
    record_hand_made(stages, backbones)
    bundle = write_bundle(stages, root / "bundle")
    export_onnx(bundle.path)
    # int8 calibrated on synthetic validation photos; random weights: its speed is what counts, not its gate (off)
    calibration = generate_dataset(root / "calibration", n_images=40, size=256, seed=1)
    export_int8(bundle.path, calibration, images=8, min_agreement=0.0, log=lambda line: None)
    return bundle.path


def _level_runner(path: Path, level: str, threads: int):
    """A forward through a session at another graph optimisation ``level`` than prediction's (tensors in and out)."""
    options = session_options(threads)
    options.graph_optimization_level = LEVELS[level]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def forward_times(bundle: Path, images: int, batch: int, threads: int, repeats: int, levels: list[str]) -> dict:
    """Seconds of every network's forward over ``images`` in batches of ``batch``, per engine (best of ``repeats``,
    engines alternating), and each network's largest output difference relative to its largest output (at least 1)."""
    opened = open_bundle(bundle)
    digests = bundle_checksums(opened)
    seconds: dict[str, float] = {}
    differences = {}
    for weights, stage in weights_files(opened).items():
        net = load_network(opened, stage, weights, digests[weights])
        x = example_input(net, batch)
        path = bundle / onnx_file(weights)
        runners = {"pytorch": net.module, "onnxruntime": OnnxModule(path, net.module, torch.device("cpu"), threads)}
        quantised = bundle / int8_file(weights)  # the vote has none: it runs float32 on the int8 engine too
        runners[INT8_ENGINE] = OnnxModule(quantised, net.module, torch.device("cpu"), threads) if quantised.is_file() \
            else runners["onnxruntime"]  # fmt: skip
        for level in levels:
            runners[f"onnxruntime_{level}"] = _level_runner(path, level, threads)
        with torch.inference_mode():
            outputs = {name: run(x).numpy() for name, run in runners.items()}  # also the warm-up
            scale = max(1.0, float(np.abs(outputs["pytorch"]).max()))  # untrained logits can reach 1e7
            differences[weights] = max(float(np.abs(o - outputs["pytorch"]).max())
                                       for name, o in outputs.items() if name != INT8_ENGINE) / scale  # fmt: skip
            times: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(repeats):
                for name, run in runners.items():
                    start = time.perf_counter()
                    for first in range(0, images, batch):
                        run(x[: min(batch, images - first)])
                    times[name].append(time.perf_counter() - start)
        for name in runners:
            seconds[name] = seconds.get(name, 0.0) + min(times[name])
    return {"seconds": seconds, "max_relative_output_difference": differences}


def write_photos(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        image, _ = make_sample(rng, CLASSES[i % len(CLASSES)], size)
        cv2.imwrite(str(folder / f"photo_{i:04d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _probabilities(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        return np.array([[float(row[c]) for c in CLASSES] for row in csv.DictReader(f)])


ENGINES = ("pytorch", "onnxruntime", INT8_ENGINE)


def _config(bundle: Path, batch: int, threads: int) -> PredictConfig:
    return PredictConfig(
        segmentation_run=str(bundle / "segmentation"),
        classification_root=str(bundle / "classification"),
        ensemble_run=str(bundle / "ensemble"),
        batch_size=batch,
        outputs=PredictOutputs(report=False),
        run=RunConfig(threads=threads),
    )


def profiles(bundle: Path, root: Path, batch: int, threads: int) -> dict:
    """Seconds per step of one cold-cache pass per engine, reading serially (``run.prefetch=0``) and ahead (1)."""
    manifest = manifest_from_folder(root / "photos")
    out: dict[str, dict] = {}
    for engine in ENGINES:
        for prefetch in (0, 1):
            folder = root / f"profile_{engine}_{prefetch}"
            base = _config(bundle, batch, threads)
            run = replace(base.run, out_dir=str(folder), cache_dir=str(folder / "cache"), prefetch=prefetch)
            predictor = EnsemblePredictor(replace(base, engine=engine, run=run), torch.device("cpu"))
            seconds = step_seconds(lambda p=predictor, f=folder: predict_folder(manifest, p, f / "predictions.csv", f))
            out.setdefault(engine, {})["serial" if prefetch == 0 else "prefetch"] = seconds
    return out


def predict_times(bundle: Path, root: Path, images: int, batch: int, threads: int, repeats: int) -> dict:
    """The whole prediction over ``images`` synthetic photos from a cold cache, per engine (best of ``repeats``,
    engines alternating): seconds, loading seconds, the largest difference of ONNX Runtime's final probabilities
    from PyTorch's, and int8's agreement with float32 ONNX Runtime."""
    photos = root / "photos"
    write_photos(photos, images, 256)
    manifest = manifest_from_folder(photos)
    base = _config(bundle, batch, threads)
    seconds: dict[str, list[float]] = {e: [] for e in ENGINES}
    loading: dict[str, list[float]] = {e: [] for e in ENGINES}
    for repeat in range(repeats):
        for engine in ENGINES:
            out = root / f"{engine}_{repeat}"
            cfg = replace(base, engine=engine, run=replace(base.run, out_dir=str(out), cache_dir=str(out / "cache")))
            start = time.perf_counter()
            predictor = EnsemblePredictor(cfg, torch.device("cpu"))
            loading[engine].append(time.perf_counter() - start)
            start = time.perf_counter()
            predict_folder(manifest, predictor, out / "predictions.csv", out)
            seconds[engine].append(time.perf_counter() - start)
    probs = {e: _probabilities(root / f"{e}_0" / "predictions.csv") for e in ENGINES}
    return {
        "seconds": {k: min(v) for k, v in seconds.items()},
        "load_seconds": {k: min(v) for k, v in loading.items()},
        "max_abs_probability_difference": float(np.abs(probs["pytorch"] - probs["onnxruntime"]).max()),
        "int8_max_abs_probability_difference": float(np.abs(probs[INT8_ENGINE] - probs["onnxruntime"]).max()),
        "int8_class_agreement": float((probs[INT8_ENGINE].argmax(1) == probs["onnxruntime"].argmax(1)).mean()),
    }


def run(args: argparse.Namespace) -> dict:
    backbones = args.backbones.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        bundle = make_bundle(root, args.encoder, args.seg_size, backbones, args.size)
        export_s = time.perf_counter() - start
        forward = forward_times(bundle, args.images, args.batch, args.threads, args.repeats, args.levels)
        predict = predict_times(bundle, root, args.images, args.batch, args.threads, args.repeats)
        cold = cold_starts(bundle, root, args.threads) if args.cold_start else {}
        profile = profiles(bundle, root, args.batch, args.threads) if args.profile else {}
    f, p = forward["seconds"], predict["seconds"]
    settings = {k: getattr(args, k) for k in ("images", "batch", "threads", "repeats", "seg_size", "encoder", "size")}
    versions = {"torch": torch.__version__, "onnxruntime": ort.__version__, "cpus": os.cpu_count()}
    return {
        "settings": {**settings, "backbones": backbones, **versions},
        "bundle_and_export_s": export_s,
        "forward": {
            **{f"{e}_img_s": args.images / f[e] for e in ENGINES},
            "ratio": f["pytorch"] / f["onnxruntime"],
            "int8_ratio": f["pytorch"] / f[INT8_ENGINE],
            "onnxruntime_levels_img_s": {level: args.images / f[f"onnxruntime_{level}"] for level in args.levels},
            "max_relative_output_difference": forward["max_relative_output_difference"],
        },
        "predict": {
            **{f"{e}_img_s": args.images / p[e] for e in ENGINES},
            "ratio": p["pytorch"] / p["onnxruntime"],
            "int8_ratio": p["pytorch"] / p[INT8_ENGINE],
            "load_s": predict["load_seconds"],
            **{k: v for k, v in predict.items() if k not in ("seconds", "load_seconds")},
        },
        "cold_start": cold,
        "profile": profile,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seg-size", type=int, default=256)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES))
    parser.add_argument("--size", type=int, default=0, help="classifier input size (default 0: each one's native)")
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads; 0 = their default")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per engine; the best counts")
    parser.add_argument(
        "--levels", nargs="*", default=[], choices=list(LEVELS), help="also time the forward passes at these levels"
    )
    parser.add_argument("--cold-start", action=argparse.BooleanOptionalAction, default=True,
                        help="also time predict and serve from start to the first answer")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="also profile one pass per engine, step by step")
    parser.add_argument("--out", default="runs/bench/onnx", help="folder for onnx_speed.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args)
    f, p = r["forward"], r["predict"]
    print(
        f"forward passes: PyTorch eager {f['pytorch_img_s']:.2f} img/s, ONNX Runtime {f['onnxruntime_img_s']:.2f} "
        f"img/s ({f['ratio']:.2f}x), int8 {f[INT8_ENGINE + '_img_s']:.2f} img/s ({f['int8_ratio']:.2f}x); predict, "
        f"cold cache: {p['pytorch_img_s']:.2f}, {p['onnxruntime_img_s']:.2f} ({p['ratio']:.2f}x), "
        f"{p[INT8_ENGINE + '_img_s']:.2f} img/s ({p['int8_ratio']:.2f}x); ONNX Runtime's final probabilities within "
        f"{p['max_abs_probability_difference']:.1e} of PyTorch's"
    )
    for engine, c in r["cold_start"].items():
        print(f"cold start {engine}: predict {c['predict_first_s']:.1f} s ({c['predict_later_s']:.1f} s later), "
              f"serve {c['serve_first_answer_s']:.1f} s; peak {c['predict_peak_mb']:.0f} MB")  # fmt: skip
    out = Path(args.out) / "onnx_speed.json"
    write_text_atomic(out, json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
