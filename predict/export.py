"""Export a bundle's networks for ONNX Runtime: ``dermpipe export --model ham-v1 --format onnx``.

Writes ``segmentation/best.onnx``, ``classification/<backbone>/best.onnx`` and ``ensemble/meta.onnx`` beside their
weights inside the bundle and lists them in its SHA256SUMS; the bundle's identity does not change. Then
``dermpipe predict --model ham-v1 --engine onnxruntime --input DIR`` runs them. A bundle that holds its ONNX files
already is left alone; a failed export leaves the bundle as it was.

``--quantize int8 --calibration runs/ham.csv`` adds int8 networks (``best.int8.onnx``) calibrated and gated on the
manifest's validation images (predict/int8_export.py): ``dermpipe predict --engine onnxruntime-int8`` runs them.
"""

from __future__ import annotations

import argparse

from dermpipe.bundle.onnx_export import FORMATS, OPSET, export_onnx
from dermpipe.engine.cli import run_cli
from dermpipe.predict.int8_export import CALIBRATION_IMAGES, GATE_AGREEMENT, export_int8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model bundle folder (dermpipe bundle)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="what to export to (default: onnx)")
    parser.add_argument("--quantize", choices=("int8",), default=None, help="also write int8 networks, gated")
    parser.add_argument("--calibration", default=None,
                        help="with --quantize: the manifest the models were trained on (its val rows)")  # fmt: skip
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES,
                        help=f"with --quantize: validation images to use (default {CALIBRATION_IMAGES})")  # fmt: skip
    parser.add_argument("--min-agreement", type=float, default=GATE_AGREEMENT,
                        help=f"with --quantize: the gate's agreement (default {GATE_AGREEMENT})")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quantize and not args.calibration:
        parser.error("--quantize int8 needs --calibration MANIFEST (the manifest the bundle was trained on)")

    def body() -> int:
        if args.quantize:
            return _int8(args)
        bundle, written = export_onnx(args.model)
        if not written:
            print(f"export: {bundle.identity} in {bundle.path} holds its ONNX files already: nothing to do")
            return 0
        print(
            f"export: {bundle.identity}: wrote {len(written)} ONNX files (opset {OPSET}, dynamic batch) into "
            f"{bundle.path}: {', '.join(written)}; SHA256SUMS lists them, identity unchanged; predict with "
            f"`dermpipe predict --model {bundle.path} --engine onnxruntime --input DIR`"
        )
        return 0

    return run_cli(body)


def _int8(args: argparse.Namespace) -> int:
    result = export_int8(args.model, args.calibration, images=args.calibration_images, min_agreement=args.min_agreement)
    g = result.gate
    if not result.written:
        print(f"export: {result.bundle.identity} holds its int8 networks already: nothing to do")
        return 0
    print(
        f"export: {result.bundle.identity}: wrote {len(result.written)} files ({', '.join(result.written)}); gate on "
        f"{g['images']} validation images: predicted class agrees {g['class_agreement']:.1%}, refer "
        f"{g['refer_agreement']:.1%}, largest probability difference {g['max_probability_difference']:.3g}; predict "
        f"with `dermpipe predict --model {result.bundle.path} --engine onnxruntime-int8 --input DIR`"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
