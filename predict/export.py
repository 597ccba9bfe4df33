"""Export a bundle's networks for ONNX Runtime: ``dermpipe export --model ham-v1 --format onnx``.

Writes ``segmentation/best.onnx``, ``classification/<backbone>/best.onnx`` and ``ensemble/meta.onnx`` beside their
weights inside the bundle and lists them in its SHA256SUMS; the bundle's identity does not change. Then
``dermpipe predict --model ham-v1 --engine onnxruntime --input DIR`` runs them. A bundle that holds its ONNX files
already is left alone; a failed export leaves the bundle as it was.
"""

from __future__ import annotations

import argparse

from dermpipe.bundle.onnx_export import FORMATS, OPSET, export_onnx
from dermpipe.engine.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model bundle folder (dermpipe bundle)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="what to export to (default: onnx)")
    args = parser.parse_args(argv)

    def body() -> int:
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


if __name__ == "__main__":
    raise SystemExit(main())
