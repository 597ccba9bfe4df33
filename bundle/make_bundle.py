"""Bundle a trained run root for a colleague: ``dermpipe bundle --root runs/ham --out ham-v1 [--archive]``.

The bundle holds the U-Net, the classifiers, the vote with its calibration and refer threshold, every preprocessing
setting, library versions, a model card and a sha256 manifest; ``dermpipe predict --model ham-v1 --input DIR`` runs
from it alone. Every metric in bundle.json and the card names the sha256 of the model(s) it scored.

A root is refused, naming the stage and the command that fixes it, when a stage it would pack is stale by its lineage
(a U-Net retrained after the crops, a classifier after the vote), when the vote was fitted on other classifier weights
than those packed, when the classifiers were trained on crops of another U-Net, or when a stage kept no lineage.
"""

from __future__ import annotations

import argparse

from dermpipe.bundle.store import CARD_FILE, bundle_files
from dermpipe.bundle.write import write_bundle
from dermpipe.configs.schema import DEFAULT_ROOT
from dermpipe.engine.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"the trained run root (default: {DEFAULT_ROOT})")
    parser.add_argument("--out", required=True, help="the bundle folder to create (refused when it exists)")
    parser.add_argument("--archive", action="store_true", help="also write OUT.tar.gz beside the folder")
    args = parser.parse_args(argv)

    def body() -> int:
        bundle = write_bundle(args.root, args.out, archive=args.archive)
        archive = f" and {bundle.path}.tar.gz" if args.archive else ""
        print(
            f"bundle: {bundle.identity}: {len(bundle_files(bundle))} files ({', '.join(bundle.info['backbones'])}; "
            f"classes {', '.join(bundle.info['classes'])}); wrote {bundle.path}{archive}; read "
            f"{bundle.path / CARD_FILE}"
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
