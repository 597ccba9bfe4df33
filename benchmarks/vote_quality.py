"""The learned vote against the simple ones on the real sample (BENCHMARKS.md; ``make bench QUALITY=1``).

python benchmarks/vote_quality.py --data ../shared/data/isic_real --root runs/bench/cpufast \
    --out runs/bench/vote_quality --tables BENCHMARKS.md

1. The manifest of the whole real sample (``--manifest``, made when missing; its grouped split).
2. The preset's K-fold pipeline (``dermpipe run --config configs/presets/cpu-fast.yaml``) under ``--root`` with
   ``classification.train.fold_models=refit``, run only when ``ROOT/summary.md`` is missing: every backbone's K fold
   models and one refitted on the whole training split (the per-step seconds of the table are that first run's; a
   rerun reuses every stage and would time the reuse).
3. The other choice of ``train.fold_models``, the mean of the K fold models, from the same fold models: copied to
   ``OUT/fold_mean/classification`` and finished there by ``classification/train.py --folds K`` (its default), which
   reuses them and writes the mean's checkpoint and val/test tables.
4. Eight votes over the same five backbones, each into ``OUT/<models>/<fit>_<init>``: on the refit models' and on the
   fold means' tables, fit on the validation split and on the out-of-fold tables of the training split, each with
   the meta-network started at the mean vote (the default) and with seed 004's random start (``meta.init=random``).
   Every choice is made inside the fit tables.
5. The tables: test balanced accuracy of every method with its 95% interval, the new meta-network's paired
   difference to each (the same class-stratified bootstrap resamples of the test split), recalls of the three rare
   classes; the cross-validation inside each fit set; the time of each step. ``--tables FILE`` writes them between
   the ``make bench QUALITY=1`` markers of FILE and touches nothing else there.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.classification import train as classification_train
from dermpipe.configs.loader import load_yaml
from dermpipe.ensemble import vote
from dermpipe.ensemble.baselines import majority_vote, mean_vote
from dermpipe.ensemble.evaluation import bootstrap_balanced_accuracy
from dermpipe.ensemble.stacked_tables import load_probability_tables
from dermpipe.pipeline import run as pipeline

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quick_synthetic import write_tables  # noqa: E402
from segmentation_quality import real_sample_manifest  # noqa: E402

BEGIN, END = "<!-- make bench QUALITY=1: begin -->", "<!-- make bench QUALITY=1: end -->"
FITS = ("val", "oof")
INITS = ("mean_vote", "random")
RARE = ("df", "vasc", "akiec")
NAMES = {
    "best_single": "best single backbone (chosen on the fit set)",
    "mean_vote": "mean vote",
    "majority_vote": "majority vote",
    "logistic_stacking": "logistic stacking",
    "seed_meta": "seed 004's meta-network (random start)",
    "new_meta": "meta-network started at the mean vote",
}


def run_pipeline(manifest: Path, root: Path, preset: Path, device: str) -> None:
    if (root / "summary.md").is_file():
        print(f"pipeline: {root}/summary.md exists, the run is reused as it is (delete it to run again)")
        return
    code = pipeline.main(["--manifest", str(manifest), "--root", str(root), "--config", str(preset),
                          "--set", "classification.train.fold_models=refit", "--device", device])  # fmt: skip
    if code != 0:
        raise SystemExit(f"error: dermpipe run stopped (exit status {code}); rerun this command to resume it")


def build_fold_means(root: Path, out: Path, preset: Path, device: str) -> list[tuple[str, str]]:
    """``OUT/fold_mean/classification``: each backbone's fold models copied from ROOT, finished by
    ``classification/train.py --folds K`` (``train.fold_models: mean``); returns each command's seconds."""
    data, sets = pipeline.experiment_settings(str(preset), [])
    target, seconds = out / "fold_mean" / "classification", []
    for backbone in data["backbones"]:
        for i in range(int(data["folds"])):
            source, copy = root / "classification" / backbone / f"fold{i}", target / backbone / f"fold{i}"
            if not copy.is_dir():
                shutil.copytree(source, copy)
        argv = ["--backbone", backbone, "--root", str(root), "--out", str(target), "--folds", str(data["folds"]),
                "--fold-models", "mean", "--device", device]  # fmt: skip
        argv += [x for item in sets["classification"] for x in ("--set", item)]
        print(f"== classification/train.py {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        if classification_train.main(argv) != 0:
            raise SystemExit(f"error: the mean of {backbone}'s fold models failed (above)")
        step = f"`classification/train.py --backbone {backbone} --folds {data['folds']} --fold-models mean`"
        seconds.append((f"{step} (the fold models reused)", f"{time.perf_counter() - start:.0f}"))
    return seconds


def run_votes(
    root: Path, out: Path, backbones: Sequence[str], device: str, bootstrap: int, sets: Sequence[str] = ()
) -> dict[str, float]:
    """The four votes of one set of backbone tables (``ROOT/classification``), each into ``OUT/<fit>_<init>``."""
    seconds = {}
    for fit in FITS:
        for init in INITS:
            argv = ["--root", str(root), "--backbones", ",".join(backbones), "--fit-split", fit,
                    "--out", str(out / f"{fit}_{init}"), "--device", device]  # fmt: skip
            for item in (f"meta.init={init}", f"evaluation.bootstrap={bootstrap}", *sets):
                argv += ["--set", item]
            print(f"== ensemble/vote.py {' '.join(argv)}", flush=True)
            start = time.perf_counter()
            if vote.main(argv) != 0:
                raise SystemExit(f"error: the vote fit on {fit} with meta.init={init} failed (above)")
            seconds[f"{fit}_{init}"] = time.perf_counter() - start
    return seconds


def _meta_predictions(path: Path, ids: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    with path.open(newline="") as f:
        predicted = {r["image_id"]: classes.index(r["predicted"]) for r in csv.DictReader(f)}
    return np.array([predicted[i] for i in ids])


def _cv_best(rows: Sequence[dict[str, Any]], **match: Any) -> float:
    return max(r["cv_balanced_accuracy"] for r in rows if all(r.get(k) == v for k, v in match.items()))


def compare(root: Path, out: Path, backbones: Sequence[str], samples: int, seed: int = 0) -> dict[str, Any]:
    """Every method's test scores per fit set, the new meta-network's paired differences, and the CV table."""
    test = load_probability_tables(root / "classification", backbones, "test").labelled()
    classes = list(test.classes)
    summaries = {f"{fit}_{init}": json.loads((out / f"{fit}_{init}" / "summary.json").read_text())
                 for fit in FITS for init in INITS}  # fmt: skip
    chosen_on_val = summaries["val_mean_vote"]["best_single"]
    predictions = {
        f"best_single_{fit}": test.probs[
            :, list(backbones).index(summaries[f"{fit}_mean_vote"]["best_single"]), :
        ].argmax(1)
        for fit in FITS
    }
    predictions |= {
        "mean_vote": mean_vote(test.probs).argmax(1),
        "majority_vote": majority_vote(test.probs).argmax(1),
    }
    for fit in FITS:
        for init, name in (("mean_vote", "new_meta"), ("random", "seed_meta")):
            path = out / f"{fit}_{init}" / "test_predictions.csv"
            predictions[f"{name}_{fit}"] = _meta_predictions(path, test.ids, classes)
    result: dict[str, Any] = {"classes": classes, "n_test": len(test), "best_single_on_val": chosen_on_val,
                              "samples": samples, "fits": {}}  # fmt: skip
    for fit in FITS:
        new, seed_run = summaries[f"{fit}_mean_vote"], summaries[f"{fit}_random"]
        rows = {r["method"]: r for r in new["methods"]}
        rows["new_meta"] = rows["meta_network"]
        rows["seed_meta"] = {r["method"]: r for r in seed_run["methods"]}["meta_network"]
        rows["best_single_val"] = {**rows[chosen_on_val], "detail": f"{chosen_on_val} (chosen on val)"}
        # paired against the new meta-network fitted on this fit set, on the same resamples (one seed)
        paired = {}
        for name in ("best_single", "best_single_val", "mean_vote", "majority_vote", "seed_meta"):
            reference = predictions.get(name, predictions.get(f"{name}_{fit}"))
            pair = {"new": predictions[f"new_meta_{fit}"], "reference": reference}
            d = bootstrap_balanced_accuracy(test.labels, pair, "reference", samples, 0.95, seed)["new"]
            paired[name] = {"difference": d["delta_vs_best_single"], "low": d["delta_low"], "high": d["delta_high"]}
        paired["logistic_stacking"] = new["meta_network_vs"]["logistic_stacking"]
        cv_new = new["meta_cv"]
        result["fits"][fit] = {
            "n_fit": new["n_fit"],
            "best_single_on_fit": new["best_single"],
            "methods": {name: rows[name] for name in (*NAMES, "best_single_val")},
            "paired": paired,
            "new_settings": new["meta_settings"],
            "seed_settings": seed_run["meta_settings"],
            "cv": {
                "mean_vote": _cv_best(cv_new, anchor="inf", inputs="probs"),
                "log_probability_average": _cv_best(cv_new, anchor="inf", inputs="log_probs"),
                "logistic_stacking": max(r["cv_balanced_accuracy"] for r in new["logistic_cv"]),
                "seed_meta": _cv_best(seed_run["meta_cv"]),
                "new_meta": next(r["cv_balanced_accuracy"] for r in cv_new if r["chosen"]),
            },
        }
    return result


def _interval(low: float, high: float) -> str:
    return f"{low:.3f}-{high:.3f}"


def _signed(d: dict[str, float]) -> str:
    return f"{d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})"


def _settings(s: dict[str, Any]) -> str:
    if s.get("init") == "random":
        return f"hidden {s['hidden']}, weight decay {s['weight_decay']:g}, {s['inputs']}"
    if s.get("anchor") == "inf":
        return f"the mean vote itself, {s['inputs']}"
    return f"hidden {s['hidden']}, anchor {s['anchor']:g}, {s['inputs']}"


MODELS = {"refit": "refit models", "fold_mean": "fold means"}


def tables(results: dict[str, dict[str, Any]], times: Sequence[tuple[str, str]], command: str) -> str:
    """``results``: ``compare``'s result per choice of backbone models (``MODELS``), all on one test split."""
    first = next(iter(results.values()))
    classes = first["classes"]
    rare = [c for c in RARE if c in classes]
    columns = ["backbone models", "fit on", "method", "balanced accuracy (95% interval)",
               "new meta-network minus it (95% interval)", *(f"{c} recall" for c in rare), "mel recall",
               "macro AUC"]  # fmt: skip
    lines = [
        BEGIN,
        f"`{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}); test split {first['n_test']} images, scored "
        f"once; intervals 95%, class-stratified bootstrap of the test images ({first['samples']:,} resamples); "
        "differences paired on the same resamples. Refit models: each backbone refitted on the whole training split "
        "(`train.fold_models: refit`); fold means: the mean probability of its fold models (`train.fold_models: "
        "mean`, the default), the models the out-of-fold tables come from.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for models, result in results.items():
        for fit, part in result["fits"].items():
            label = f"{'validation' if fit == 'val' else 'out-of-fold'} ({part['n_fit']:,} images)"
            names = dict(NAMES)
            if part["best_single_on_fit"] != result["best_single_on_val"]:  # the target's reference: chosen on val
                names = {"best_single_val": "", **names}
            for name, title in names.items():
                row = part["methods"][name]
                if name.startswith("best_single"):
                    title = f"best single backbone: {row['detail']}"
                elif name == "seed_meta":
                    title += f", {_settings(part['seed_settings'])}"
                elif name == "new_meta":
                    title += f", {_settings(part['new_settings'])}"
                versus = "" if name == "new_meta" else _signed(part["paired"][name])
                interval = _interval(row["balanced_accuracy_low"], row["balanced_accuracy_high"])
                recalls = [f"{row[f'recall_{c}']:.3f}" for c in (*rare, "mel")]
                cells = [MODELS[models], label, title, f"{row['balanced_accuracy']:.3f} ({interval})", versus,
                         *recalls, f"{row['macro_auc']:.3f}"]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    folds = " / ".join(sorted({str(part["new_settings"]["cv_folds"]) for r in results.values()
                               for part in r["fits"].values()}))  # fmt: skip
    lines += [
        "",
        f"Cross-validation inside each fit set ({folds} stratified folds; balanced accuracy of the pooled out-of-fold "
        "predictions; the mean votes fit nothing, so theirs is their score on the fit set):",
        "",
        "| backbone models | fit on | mean vote | log-probability average | logistic stacking (best C) "
        "| seed meta-network (best) | new meta-network (chosen) | new meta-network's rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for models, result in results.items():
        for fit, part in result["fits"].items():
            cv = part["cv"]
            ordered = sorted(cv.values(), reverse=True)
            rank = 1 + sum(v > cv["new_meta"] for v in cv.values())
            gap = ordered[0] - cv["new_meta"]
            lines.append(
                f"| {MODELS[models]} | {fit} | {cv['mean_vote']:.3f} | {cv['log_probability_average']:.3f} | "
                f"{cv['logistic_stacking']:.3f} | {cv['seed_meta']:.3f} | {cv['new_meta']:.3f} | "
                f"{rank} of {len(cv)}{f' ({gap:.3f} below the first)' if gap > 0 else ''} |"
            )
    lines += ["", "| step | seconds |", "|---|---|", *(f"| {step} | {sec} |" for step, sec in times), END]
    return "\n".join(lines)


def pipeline_times(root: Path) -> list[tuple[str, str]]:
    """The step table of ``ROOT/summary.md`` (the run that trained everything)."""
    rows, inside = [], False
    for line in (root / "summary.md").read_text().splitlines():
        if line.startswith("| step | seconds |"):
            inside = True
        elif inside and line.startswith("| ") and not line.startswith("|---"):
            step, sec = (cell.strip() for cell in line.strip("|").split("|"))
            rows.append((f"`{step}`", sec))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/isic_real", help="the real sample (images/, masks/, ...)")
    parser.add_argument("--manifest", default="runs/bench/isic_all.csv", help="its manifest (made when missing)")
    parser.add_argument("--root", default="runs/bench/cpufast", help="run root of the preset's pipeline")
    parser.add_argument("--preset", default="configs/presets/cpu-fast.yaml", help="the experiment file it runs")
    parser.add_argument("--out", default="runs/bench/vote_quality", help="folder of the four votes and the tables")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test split")
    parser.add_argument("--tables", help="also write the tables into this Markdown file (BENCHMARKS.md)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of every vote (ensemble/vote.py --set), e.g. meta.epochs=100")  # fmt: skip
    args = parser.parse_args(argv)
    manifest, root, out = Path(args.manifest), Path(args.root), Path(args.out)
    if not manifest.is_file():
        real_sample_manifest(Path(args.data), manifest)
        print(f"wrote {manifest}")
    run_pipeline(manifest, root, Path(args.preset), args.device)
    backbones = load_yaml(args.preset)["backbones"]
    times = pipeline_times(root) + build_fold_means(root, out, Path(args.preset), args.device)
    roots = {"refit": (root, out / "refit"), "fold_mean": (out / "fold_mean", out / "fold_mean")}
    results = {}
    for models, (tables_root, votes) in roots.items():
        vote_seconds = run_votes(tables_root, votes, backbones, args.device, args.bootstrap, args.sets)
        results[models] = compare(tables_root, votes, backbones, args.bootstrap)
        times += [(f"`ensemble/vote.py --fit-split {k.replace('_', ' --set meta.init=', 1)}` ({MODELS[models]})",
                   f"{s:.0f}") for k, s in vote_seconds.items()]  # fmt: skip
    command = "python benchmarks/vote_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = tables(results, times, command.strip())
    (out / "result.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "tables.md").write_text(table + "\n")
    print(table)
    if args.tables:
        heading = "## The learned vote on the real sample (`make bench QUALITY=1`)"
        write_tables(Path(args.tables), table, BEGIN, END, heading)
        print(f"wrote the tables into {args.tables}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
