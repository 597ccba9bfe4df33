"""The whole pipeline from one manifest: ``dermpipe run --manifest FILE --root DIR [--config EXPERIMENT.yaml]``.

Trains the U-Net, crops every image, trains each classifier, fits the vote and scores it once on the test split,
all under one run root, then prints one summary table (also ``ROOT/summary.md``). Each step is the stage's own library
call (``dermpipe.segmentation.stage.train``, ``.crop``, ``dermpipe.classification.stage.train``,
``dermpipe.ensemble.stage.vote``) on the config of its section, in this one process, so it skips what is finished
(same settings and data) and a rerun after an interrupt resumes the training that was cut.

An experiment file holds the whole experiment: optional ``manifest``, ``root`` and ``backbones``, and one section
per stage in that stage's own config form::

    root: runs/ham
    backbones: [resnet50, densenet169]
    folds: 5
    segmentation: {train: {epochs: 20}}
    classification: {train: {epochs: 15}, model: {pretrained: false}}
    ensemble: {calibration: {target_sensitivity: 0.9}}
    backbone_settings: {densenet169: {train: {batch_size: 16}}}

``backbone_settings`` gives one backbone's classification settings over the ``classification`` section (e.g. a
backbone with no ImageNet weights offline trained from scratch). ``--set STAGE.section.key=value`` overrides one value
of one stage, for every backbone (after the file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dermpipe.classification import stage as classification
from dermpipe.classification.backbones import DEFAULT_BACKBONES, BackboneError, resolve_backbone
from dermpipe.classification.config import ClassificationConfig
from dermpipe.configs.loader import ConfigError, default_config_path, load_config, load_yaml
from dermpipe.configs.schema import DEFAULT_ROOT, ROOT_LAYOUT
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.claim import unfinished
from dermpipe.engine.cli import run_cli
from dermpipe.engine.files import write_text_atomic
from dermpipe.engine.loop import read_metrics
from dermpipe.engine.rerun import refuse_all
from dermpipe.engine.run import check_run_folder
from dermpipe.ensemble import stage as ensemble
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.errors import did_you_mean
from dermpipe.pipeline.stage_check import CLASSIFICATION_OF, planned_conflicts, stage_configs
from dermpipe.segmentation import stage as segmentation
from dermpipe.segmentation.config import SegmentationConfig

STAGES: dict[str, type] = {
    "segmentation": SegmentationConfig,
    "classification": ClassificationConfig,
    "ensemble": EnsembleConfig,
}
TOP_KEYS = ("manifest", "root", "backbones", "folds", *STAGES, "backbone_settings")


def _flatten(section: Mapping[str, Any], prefix: str = "") -> list[str]:
    """A nested config section as ``--set key=value`` items (lists and mappings as JSON, which YAML reads back)."""
    items = []
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items += _flatten(value, f"{name}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            items.append(f"{name}={text}")
    return items


def experiment_settings(path: str | None, overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The experiment file's top-level values and, per stage, its ``--set`` items (file first, then ``--set``).

    Every stage's settings are resolved here, so a mistyped key fails before anything runs.
    """
    data = load_yaml(path) if path else {}
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"experiment file {path}: unknown key '{key}'{did_you_mean(key, TOP_KEYS)}; it takes "
                              f"{', '.join(TOP_KEYS)}")  # fmt: skip
    sets: dict[str, list[str]] = {}
    for stage in STAGES:
        section = data.get(stage) or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"experiment file {path}: '{stage}' must be a mapping of that stage's config sections")
        sets[stage] = _flatten(section)
    for item in overrides:
        stage, _, rest = item.partition(".")
        if stage not in STAGES or not rest:
            raise ConfigError(f"--set {item!r}: name the stage first, e.g. --set classification.train.epochs=5 "
                              f"(stages: {', '.join(STAGES)}){did_you_mean(stage, STAGES)}")  # fmt: skip
        sets[stage].append(rest)
    per_backbone = data.get("backbone_settings") or {}
    if not isinstance(per_backbone, Mapping):
        raise ConfigError(f"experiment file {path}: 'backbone_settings' must map backbone names to classification "
                          "sections, e.g. {resnet18: {model: {pretrained: false}}}")  # fmt: skip
    common = _flatten(data.get("classification") or {})
    for backbone, section in per_backbone.items():
        if not isinstance(section, Mapping):
            raise ConfigError(f"experiment file {path}: backbone_settings.{backbone} must be a classification section")
        sets[f"{CLASSIFICATION_OF}{backbone}"] = [*common, *_flatten(section), *sets["classification"][len(common) :]]
    for stage, items in sets.items():
        name, _, backbone = stage.partition(CLASSIFICATION_OF)
        try:
            load_config(STAGES[name or "classification"], default_config_path(name or "classification"), items)
        except ConfigError as e:
            raise ConfigError(f"{f'backbone_settings.{backbone}' if backbone else stage}: {e}") from None
    return data, sets


def _interrupted(run_dir: Path) -> bool:
    """Whether the folder (or one of its fold folders) holds an interrupted training, which the stage then resumes;
    a finished one is reused by the stage itself."""
    return any(unfinished(folder) for folder in [run_dir, *sorted(run_dir.glob("fold*"))])


def crop_trained(root: Path, manifest: str, seg_sets: Sequence[str], flags: Mapping[str, Any]) -> segmentation.Crops:
    """What ``segmentation/predict.py --manifest M --root ROOT`` does once the U-Net is trained: every image of the
    manifest cropped into ``ROOT/crops`` with the trained run's own settings (and the experiment's)."""
    run_dir, out = root / ROOT_LAYOUT["segmentation"], root / ROOT_LAYOUT["crops"]
    check_run_folder(run_dir, "segmentation")
    cfg = load_config(SegmentationConfig, run_dir / "config.yaml", seg_sets, {"run.root": str(root), **flags})
    return segmentation.crop(cfg, Manifest.read(manifest), out, run_dir / "best.safetensors", source=manifest,
                             manifest_file=manifest)  # fmt: skip


class Steps:
    """Calls each stage in turn, timing it and printing its result's line; at the first that fails, says which
    (finished stages are kept) and lets the error through."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def __call__(self, name: str, stage: Callable[[], Any], resumed: bool = False) -> Any:
        print(f"run: {name}", flush=True)
        start = time.time()
        try:
            result = stage()
        except Exception:
            hint = " (it resumed an interrupted training: pass --force to train that stage afresh)" if resumed else ""
            print(f"run: stopped at {name}{hint}; finished stages are kept", file=sys.stderr, flush=True)
            raise
        self.times.append((name, time.time() - start))
        if result is not None:
            print(result.line(), flush=True)
        return result


def _segmentation_row(root: Path) -> list[str]:
    rows = read_metrics(root / ROOT_LAYOUT["segmentation"] / "metrics.csv", (), 10**9)
    best = max(rows, key=lambda r: float(r.get("val_jaccard") or 0), default=None)
    if best is None:
        return ["segmentation", "U-Net, val Jaccard (not recorded)", "n/a", ""]
    return ["segmentation", f"U-Net, val Jaccard at epoch {best['epoch']}", f"{float(best['val_jaccard']):.4f}", ""]


def summary_table(root: Path, times: Sequence[tuple[str, float]]) -> str:
    """One Markdown table: the U-Net's Jaccard, then every backbone's and every vote's test balanced accuracy."""
    summary_path = root / ROOT_LAYOUT["ensemble"] / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rows = [_segmentation_row(root)]
    for row in summary.get("methods", []):
        low, high = row.get("balanced_accuracy_low"), row.get("balanced_accuracy_high")
        interval = f"{low:.4f} to {high:.4f}" if low is not None else ""
        detail = f"test balanced accuracy; {row['detail']}" if row.get("detail") else "test balanced accuracy"
        rows.append([row["method"], detail, f"{row['balanced_accuracy']:.4f}", interval])
    lines = [
        f"# dermpipe run: {root}",
        "",
        f"Test split: {summary.get('n_test', 'n/a')} images, scored once; intervals: 95% paired class-stratified "
        "bootstrap of the test images.",
        "",
        "| what | measure | score | 95% interval |",
        "|---|---|---|---|",
        *(f"| {' | '.join(cells)} |" for cells in rows),
    ]
    if summary.get("target_missed"):
        lines += ["", f"The refer threshold missed its {summary['target_sensitivity']:.2f} sensitivity target on test "
                  f"({summary['referral_test']['sensitivity_with_referral']:.3f})."]  # fmt: skip
    lines += ["", "| step | seconds |", "|---|---|", *(f"| {name} | {sec:.0f} |" for name, sec in times)]
    return "\n".join(lines) + "\n"


def check_backbones(names: Sequence[str]) -> None:
    """Refuse, naming every one, the backbone names neither the registry nor timm knows (and an empty list)."""
    if not names:
        raise BackboneError("--backbones names no backbone: pass e.g. --backbones resnet50,densenet169")
    unknown = []
    for name in names:
        try:
            resolve_backbone(str(name))
        except BackboneError as error:
            unknown.append(str(error))
    if unknown:
        raise BackboneError(f"--backbones: {'; '.join(unknown)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="manifest CSV with images, masks, labels and splits (data/convert.py)")
    parser.add_argument("--root", help=f"run root for every stage (default: the file's root, else {DEFAULT_ROOT})")
    parser.add_argument("--config", help="experiment YAML: manifest, root, backbones and one section per stage")
    parser.add_argument(
        "--backbones", help=f"comma-separated classifiers (default: the file's, else {','.join(DEFAULT_BACKBONES)})"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override one value of one stage, e.g. --set classification.train.epochs=5 (repeatable)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        help="train each classifier K times on lesion-grouped folds of the training split and fit the vote on their "
        "out-of-fold probabilities of every training image; the mean of each backbone's K fold models makes the "
        "test table and predicts (or, with --set classification.train.fold_models=refit, one more model trained on "
        "the whole training split); default: the file's, else 0 (the vote learns from the val split)",
    )
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--force", action="store_true", help="retrain and recompute every stage")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        data, sets = experiment_settings(args.config, args.overrides)
        manifest = args.manifest or data.get("manifest")
        if not manifest:
            raise ManifestError("no manifest: pass --manifest FILE.csv (make one with `python data/convert.py`)")
        Manifest.read(manifest)  # a manifest that cannot be used fails before anything runs
        root = Path(args.root or data.get("root") or DEFAULT_ROOT)
        backbones = args.backbones.split(",") if args.backbones else list(data.get("backbones") or DEFAULT_BACKBONES)
        check_backbones(backbones)  # every name, before the first stage runs
        folds = int(args.folds if args.folds is not None else data.get("folds") or 0)
        if folds == 1 or folds < 0:
            raise ConfigError(f"--folds {folds}: K-fold training needs K >= 2 (0: no folds, the vote fits on val)")
        flags = {"run.device": args.device, "run.force": True if args.force else None}
        seg, classifiers, ens = stage_configs(root, str(manifest), backbones, sets, folds, flags)
        # every stage folder this run would replace, named at once before anything trains (--force: replaced)
        refuse_all(planned_conflicts(root, manifest, backbones, sets, folds), args.force, "choose another --root")
        step = Steps()
        seg_dir = root / ROOT_LAYOUT["segmentation"]
        again = _interrupted(seg_dir)
        step("segmentation/train.py", lambda: segmentation.train(seg, resume=again), again)
        step("segmentation/predict.py", lambda: crop_trained(root, str(manifest), sets["segmentation"], flags))
        for cfg in classifiers:
            again = _interrupted(root / ROOT_LAYOUT["classification"] / cfg.model.backbone)
            step(f"classification/train.py --backbone {cfg.model.backbone}",
                 lambda cfg=cfg, again=again: classification.train(cfg, resume=again), again)  # fmt: skip
        step("ensemble/vote.py", lambda: ensemble.vote(ens))
        table = summary_table(root, step.times)
        write_text_atomic(root / "summary.md", table)
        print(f"\n{table}\nwrote {root / 'summary.md'}; bundle it with `dermpipe bundle --root {root} --out NAME`")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
