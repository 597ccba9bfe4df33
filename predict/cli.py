"""Predict a folder of photos end to end: ``python ensemble/predict.py --input DIR --output predictions.csv``.

With ``--num-shards N --shard-index I`` (or under torchrun, or in a SLURM array) one process predicts part I of N of
the input list into ``OUT/shards/I-of-N/``; ``dermpipe merge --out OUT`` joins the parts (rank 0 does it under
torchrun once every part is finished) into exactly what one process writes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from dermpipe.bundle.store import BundleError, open_bundle
from dermpipe.configs.loader import default_config_path, load_yaml
from dermpipe.data.listing import NothingReadableError, read_inputs
from dermpipe.data.manifest import Manifest
from dermpipe.engine.cache import user_cache_dir
from dermpipe.engine.cli import add_follow_links, resolve_config, run_cli, stage_parser
from dermpipe.engine.onnx_runtime import ENGINES
from dermpipe.engine.run import setup_logging
from dermpipe.predict.api import Model, check_outputs, check_trained_stages
from dermpipe.predict.batch import merge_parts, predict_part
from dermpipe.predict.config import PredictConfig
from dermpipe.predict.launch import Shard, local_device, resolve_shard
from dermpipe.predict.predictor import EnsemblePredictor
from dermpipe.predict.shards import (
    DEFAULT_MERGE_TIMEOUT,
    check_parts,
    finished_part,
    merge_command,
    plan_part,
    settings_digest,
    wait_for_parts,
)


def bundle_cache_dir(args: argparse.Namespace) -> str | None:
    """Where prediction from a bundle caches when the user named neither a cache nor a run root (``--root``, or
    ``run.cache_dir`` / ``run.root`` by ``--set`` or ``--config``): the user's cache folder (``user_cache_dir``),
    never ``./runs/cache`` in whatever folder the command runs from. ``None`` where the user chose."""
    if args.root or any(o.strip().startswith(("run.cache_dir=", "run.root=")) for o in args.overrides):
        return None
    if str(args.config) != str(default_config_path("predict")):
        run = load_yaml(args.config).get("run")
        if isinstance(run, dict) and (run.get("cache_dir") or run.get("root")):
            return None
    return str(user_cache_dir())


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("predict", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="folder of images (recursive: jpg, jpeg, png, bmp, tif)")
    source.add_argument("--manifest", help="or a manifest CSV of images")
    add_follow_links(parser)
    parser.add_argument("--output", default=None, help="predictions CSV (default: OUT/predictions.csv)")
    parser.add_argument("--out", default=None, help="folder for skipped.csv, report.html and optional outputs")
    parser.add_argument(
        "--model", default=None, help="a model bundle folder (dermpipe bundle): every trained stage from it alone"
    )
    parser.add_argument("--segmentation-run", default=None, help="trained U-Net's run (default: ROOT/segmentation)")
    parser.add_argument(
        "--classification-root", default=None, help="folder of one run per backbone (default: ROOT/classification)"
    )
    parser.add_argument("--ensemble-run", default=None, help="trained vote's run folder (default: ROOT/ensemble)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="classifier TTA")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="what runs the networks (default pytorch; onnxruntime: the .onnx files `dermpipe export` writes into "
        "the bundle; onnxruntime-int8: its int8 files, from `dermpipe export --quantize int8`)",
    )
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=None, help="write report.html")
    parser.add_argument("--gradcam", action="store_true", default=None, help="Grad-CAM overlays in the report")
    parser.add_argument("--masks", action="store_true", default=None, help="write ISIC-style masks")
    parser.add_argument("--crops", action="store_true", default=None, help="write the lesion crops")
    parser.add_argument("--isic-csv", action="store_true", default=None, help="write an ISIC submission CSV")
    shards = parser.add_argument_group("sharded prediction (several GPUs or nodes, a cluster)")
    shards.add_argument(
        "--num-shards",
        type=int,
        default=None,
        metavar="N",
        help="split the input list into N contiguous parts (default: WORLD_SIZE under torchrun, "
        "SLURM_ARRAY_TASK_COUNT in a SLURM array, their product for torchrun in each array task; 1: one process "
        "over all, whatever the environment)",
    )
    shards.add_argument(
        "--shard-index",
        type=int,
        default=None,
        metavar="I",
        help="predict part I (0..N-1) only, into OUT/shards/I-of-N/ (default: RANK under torchrun, "
        "SLURM_ARRAY_TASK_ID in a SLURM array); join the parts with `dermpipe merge --out OUT`",
    )
    shards.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after this part, wait for the other parts and merge them (default: on rank 0 under torchrun)",
    )
    shards.add_argument(
        "--merge-timeout",
        type=float,
        default=DEFAULT_MERGE_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds --merge waits for the other parts (default {DEFAULT_MERGE_TIMEOUT:g})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    def body() -> int:
        shard = resolve_shard(args.num_shards, args.shard_index)  # None: one process over the whole list
        flags = {
            "run.out_dir": args.out,
            "segmentation_run": args.segmentation_run,
            "classification_root": args.classification_root,
            "ensemble_run": args.ensemble_run,
            "tta": args.tta,
            "engine": args.engine,
            "outputs.report": args.report,
            "outputs.gradcam": args.gradcam,
            "outputs.masks": args.masks,
            "outputs.crops": args.crops,
            "outputs.isic_csv": args.isic_csv,
        }
        bundle = None
        if args.model:
            given = [f for f in ("segmentation_run", "classification_root", "ensemble_run") if getattr(args, f)]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise BundleError(f"--model {args.model} holds every trained stage: drop {flag}")
            bundle = open_bundle(args.model)  # verified against its sha256 manifest before anything is read
            flags.update(bundle.stage_paths())
            flags["run.cache_dir"] = bundle_cache_dir(args)  # None: the user's --root or run.cache_dir
        cfg = resolve_config(PredictConfig, args, flags)
        out, output = check_outputs(cfg.run.out_dir, args.output, args.input)
        check_trained_stages(cfg)
        inputs = read_inputs(args.manifest, args.input, args.follow_links, outputs=[out, output])
        manifest, excluded = inputs.manifest, inputs.excluded
        device = local_device(cfg.run.device) if shard is not None else cfg.run.device  # torchrun: cuda:LOCAL_RANK
        model = Model.from_config(cfg, bundle, device)
        predictor, model_id = model.predictor, model.model_id
        if shard is not None:
            return predict_shard(shard, args, argv, cfg, manifest, excluded, predictor, model_id, out, output)
        setup_logging(out)  # everything validated: from here on the output folder is written
        s = model.predict_manifest(manifest, out, output=output, excluded=excluded)
        if not s.images:
            raise NothingReadableError(args.input or args.manifest, s.skipped, out)
        print(f"predict: {s.line()}; wrote {output}")
        return 0

    return run_cli(body)


def predict_shard(
    shard: Shard,
    args: argparse.Namespace,
    argv: Sequence[str],
    cfg: PredictConfig,
    manifest: Manifest,
    excluded: Sequence[Mapping[str, str]],
    predictor: EnsemblePredictor,
    model_id: str,
    out: Path,
    output: Path,
) -> int:
    """Predict this shard's part into ``OUT/shards/I-of-N/`` (nothing when it is finished already), then, with
    ``--merge`` (on rank 0 under torchrun by default), wait for the other parts and merge them."""
    plan = plan_part(shard, manifest.rows, excluded, model=model_id, weights=predictor.weights,
                     settings=settings_digest(cfg), argv=argv)  # fmt: skip
    folder = shard.folder(out)
    finished = None if cfg.run.force else finished_part(folder, plan)
    if finished is not None:
        counts = finished.get("counts", {})
        print(
            f"predict: {shard.name} is finished already ({counts.get('images')} images, {counts.get('skipped')} "
            f"skipped in {folder}): nothing recomputed ({predictor.cache_summary()}); --force predicts it again"
        )
    else:
        setup_logging(folder)  # everything validated: from here on the shard's folder is written
        (start, stop), (first, last) = plan.images, plan.excluded
        part = replace(manifest, rows=manifest.rows[start:stop])
        s = predict_part(part, predictor, folder, out, excluded[first:last], model_id=model_id, part=plan.describe())
        print(f"predict: {shard.name}: {s.line()}; wrote {folder}")
    merge = args.merge if args.merge is not None else (shard.source == "torchrun" and shard.index == 0)
    if not merge:
        print(f"predict: once all {shard.count} shards are finished, join them with `{merge_command(out)}`")
        return 0
    wait_for_parts(out, plan, args.merge_timeout)
    s = merge_parts(check_parts(out, shard.count), out, output)
    print(f"predict: merged {shard.count} shards: {s.line()}; wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
