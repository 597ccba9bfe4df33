"""The ``dermpipe`` command: one subcommand per stage script, each calling that script's ``main(argv)``."""

from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, one line of help); every script also runs as `python <folder>/<file>.py`
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("dermpipe.data.convert", "a public dataset layout (ISIC, HAM10000, PH2, Derm7pt, folders) -> manifest"),
    "synthetic": ("dermpipe.data.synthetic", "write a synthetic dermoscopy set with masks and labels"),
    "train-segmentation": ("dermpipe.segmentation.train", "train the lesion U-Net on masks"),
    "segment": ("dermpipe.segmentation.predict", "lesion masks, boxes and square crops for a manifest or folder"),
    "evaluate": ("dermpipe.segmentation.score", "score predicted masks against truth as the ISIC challenge does"),
    "train-classifier": ("dermpipe.classification.train", "train one backbone (with its SE block) on the crops"),
    "vote": ("dermpipe.ensemble.vote", "fit the meta-network vote on held-out probabilities, test it once"),
    "run": ("dermpipe.pipeline.run", "the whole pipeline from one manifest: train, crop, vote, test, summary"),
    "bundle": ("dermpipe.bundle.make_bundle", "a trained run root -> one portable, verified model bundle"),
    "predict": ("dermpipe.predict.cli", "a folder of photos end to end: crops, classifiers, vote, report"),
    "serve": ("dermpipe.serve.main", "a bundle as a local web page and JSON API (upload photos, see the report)"),
    "export": ("dermpipe.predict.export", "a bundle's networks as ONNX files (for ONNX Runtime), added to it"),
    "merge": ("dermpipe.predict.merge", "join a sharded predict's parts (OUT/shards/) into what one process writes"),
    "cache": ("dermpipe.engine.cache_command", "see the stage cache per stage; prune it by stage, age or size"),
    "demo": ("dermpipe.pipeline.demo", "the whole pipeline on synthetic data, on the CPU, in a few minutes"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return (
        "usage: dermpipe COMMAND [options]   (dermpipe COMMAND --help explains each)\n\n"
        "A two-stage dermoscopy pipeline. Commands:\n" + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    if args[0] == "--version":
        from dermpipe import __version__

        print(f"dermpipe {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        from dermpipe.errors import did_you_mean

        print(
            f"error: unknown command {name!r}{did_you_mean(name, SUBCOMMANDS)}; see `dermpipe --help`", file=sys.stderr
        )
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    saved = sys.argv[0]
    sys.argv[0] = f"dermpipe {name}"  # argparse names the program from argv[0] in usage lines
    try:
        return int(module.main(rest) or 0)
    finally:
        sys.argv[0] = saved


if __name__ == "__main__":
    raise SystemExit(main())
