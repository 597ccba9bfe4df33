"""Join the parts of a sharded prediction: ``dermpipe merge --out OUT``.

Each ``dermpipe predict ... --num-shards N --shard-index I`` (or torchrun rank, or SLURM array task) leaves its part in
``OUT/shards/I-of-N/``; this writes ``predictions.csv``, ``skipped.csv``, ``report.html`` and, when the inputs gave
the truth, ``metrics.json`` and the rest, exactly as one process over the whole input list writes them. A missing or
unfinished part, or a part of another run, is refused naming the shard and the command that makes it, and nothing
is written.
"""

from __future__ import annotations

import argparse

from dermpipe.engine.cli import run_cli
from dermpipe.engine.confine import confine_output
from dermpipe.engine.files import check_output_file, check_output_folder
from dermpipe.engine.run import setup_logging
from dermpipe.predict.batch import merge_parts
from dermpipe.predict.shards import check_parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the --out folder of the sharded predictions (holds shards/)")
    parser.add_argument("--output", default=None, help="predictions CSV (default: OUT/predictions.csv)")
    parser.add_argument(
        "--num-shards", type=int, default=None, help="which run to merge when OUT/shards holds runs of several counts"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        out = check_output_folder(args.out, "--out")
        output = check_output_file(args.output if args.output else out / "predictions.csv", "--output")
        confine_output(out, "--out")  # never inside a bundle or a finished run (symlinks followed)
        confine_output(output, "--output", is_file=True)
        parts = check_parts(out, args.num_shards)  # reads only: a refused merge leaves everything as it was
        setup_logging(None)
        s = merge_parts(parts, out, output)
        print(f"merge: {len(parts)} shards, {s.line()}; wrote {output}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
