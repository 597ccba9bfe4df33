"""Benchmark scripts (benchmarks/, not installed): they import, run by path, and measure what they say.

benchmarks/ is no package on sys.path: its scripts are loaded here by path, as ``python benchmarks/NAME.py`` runs them.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dermpipe.classification.backbones import TEST_BACKBONE
from dermpipe.data.generator import generate_dataset
from dermpipe.data.manifest import Manifest
from dermpipe.segmentation import predict as predict_script
from dermpipe.segmentation import train as train_script

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))

TINY_UNET = [
    "--set", "model.encoder=tu-test_resnet", "--set", "model.encoder_weights=null",
    "--set", "model.decoder_channels=[32,16,16,8,8]", "--set", "data.image_size=48", "--set", "train.batch_size=8",
    "--set", "train.lr=0.01", "--set", "train.panel_images=2", "--set", "run.threads=2",
]  # fmt: skip


def load(name: str):
    """The script ``benchmarks/NAME.py`` as a module, its folder on sys.path while it loads (as when run by path)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-Net trained for a few epochs on a synthetic set: (folder, manifest, run folder)."""
    root = tmp_path_factory.mktemp("syn")
    manifest = generate_dataset(root / "data", n_images=40, size=64, seed=3, hair=0.0, ruler=0.0)
    run = root / "seg"
    args = ["--manifest", str(manifest), "--out", str(run), "--epochs", "6", "--device", "cpu",
            "--set", f"run.cache_dir={root / 'cache'}", *TINY_UNET]  # fmt: skip
    assert train_script.main(args) == 0
    return root, manifest, run


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_loads_by_path(name):
    module = load(name)
    helpers = ("bare_loops", "cold_start", "predict_profile")  # the scripts' shared parts, no scripts themselves
    assert name in helpers or callable(module.main)


def test_bare_reference_flips_each_image_one_of_four_ways():
    random_flips = load("bare_loops").random_flips

    images = torch.arange(64 * 3 * 4 * 4, dtype=torch.float32).reshape(64, 3, 4, 4)
    flipped = random_flips(images, torch.Generator().manual_seed(0))
    seen = set()
    for before, after in zip(images, flipped):
        variants = [before, before.flip(2), before.flip(1), before.flip(1).flip(2)]
        matches = [i for i, v in enumerate(variants) if torch.equal(v, after)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


@pytest.mark.e2e
def test_bare_classification_reference_run_by_path_trains_and_scores_the_test_rows(tmp_path):
    manifest = generate_dataset(tmp_path / "syn", n_images=40, size=32, seed=0, classes=("nv", "mel"), imbalance=1.0)
    options = f"--model {TEST_BACKBONE} --size 32 --epochs 4 --batch-size 8 --threads 1".split()
    script = BENCHMARKS / "classification_bare.py"
    done = subprocess.run(
        [sys.executable, str(script), "--manifest", str(manifest), "--out", str(tmp_path / "bare"), *options],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    losses = [float(line.split("loss ")[1].split()[0]) for line in done.stdout.splitlines() if " loss " in line]
    assert len(losses) == 4 and losses[-1] < losses[0]
    result = json.loads((tmp_path / "bare" / "metrics_test.json").read_text())
    assert set(result) == {"balanced_accuracy", "accuracy", "macro_auc", "train_seconds"}
    assert 0.0 <= result["balanced_accuracy"] <= 1.0 and 0.0 <= result["macro_auc"] <= 1.0


@pytest.mark.e2e
def test_bare_segmentation_reference_trains_and_scores_every_test_image_at_its_size(tmp_path, capsys):
    bare = load("segmentation_bare")

    manifest = generate_dataset(tmp_path / "syn", n_images=40, size=48, seed=0)
    options = ["--size", "32", "--epochs", "3", "--batch-size", "4"]
    result = bare.main(["--manifest", str(manifest), "--out", str(tmp_path / "bare"), *options])
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines if " loss " in line]
    test = Manifest.read(manifest).select("test")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result["images"] == len(test) and json.loads((tmp_path / "bare" / "scores_test.json").read_text()) == result
    masks = bare.load_masks(test, 32)
    assert masks.shape == (len(test), 1, 32, 32) and set(masks.unique().tolist()) == {0.0, 1.0}


@pytest.mark.e2e
def test_mask_variants_score_the_pipelines_own_masks_at_the_trained_size(trained, tmp_path):
    from dermpipe.segmentation.metrics import image_scores, mean_scores, read_mask

    mask_variants = load("segmentation_quality").mask_variants
    root, manifest, run = trained
    out = tmp_path / "val"
    args = ["--manifest", str(manifest), "--split", "val", "--run", str(run), "--out", str(out), "--device", "cpu",
            "--set", f"run.cache_dir={tmp_path / 'cache'}", "--masks"]  # fmt: skip
    assert predict_script.main(args) == 0
    rows = Manifest.read(manifest).select("val").rows
    assert rows
    pipeline = mean_scores(
        [
            image_scores(read_mask(out / "masks" / f"{r['image_id']}_segmentation.png"), read_mask(r["mask_path"]))
            for r in rows
        ]  # fmt: skip
    )
    variants = mask_variants(run, manifest, "val", [48, 64])
    assert variants["size 48"] == pytest.approx(pipeline, abs=1e-9)
    assert {"size 64", "mean of sizes 48 and 64", "threshold 0.4", "convex hull"} <= set(variants)
    # a grown mask finds at least as much lesion, a shrunk one at most as much
    assert variants["dilation 1%"]["sensitivity"] >= variants["size 48"]["sensitivity"]
    assert variants["erosion 1%"]["sensitivity"] <= variants["size 48"]["sensitivity"]
    assert variants["convex hull"]["sensitivity"] >= variants["size 48"]["sensitivity"]


def test_segmentation_prediction_throughput_times_the_pipeline_and_the_bare_forward(tmp_path):
    script = load("segmentation_prediction_throughput")
    out = tmp_path / "seg.json"
    args = ["--size", "32", "--images", "3", "--batch", "2", "--encoder", "tu-test_resnet", "--json", str(out)]
    assert script.main(args) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["size"] == 32 and result["encoder"] == "tu-test_resnet"
    assert min(result["bare_forward_img_s"], result["pipeline_img_s"], result["warm_cache_img_s"]) > 0


def test_pipeline_throughput_times_the_whole_prediction_path(tmp_path):
    script = load("pipeline_throughput")
    out = tmp_path / "pipeline.json"
    args = ["--images", "2", "--batch", "2", "--seg-size", "32", "--encoder", "tu-test_resnet",
            "--backbones", TEST_BACKBONE, "--json", str(out)]  # fmt: skip
    assert script.main(args) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["backbones"] == [TEST_BACKBONE]
    assert min(result["bare_img_s"], result["pipeline_img_s"], result["warm_img_s"]) > 0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # random labels, a few steps
def test_classification_training_throughput_compares_our_loop_with_bare_timm(tmp_path):
    script = load("classification_training_throughput")
    out = tmp_path / "cls.json"
    args = ["--models", TEST_BACKBONE, "--size", "32", "--batch-size", "4", "--steps", "2", "--repeats", "1",
            "--json", str(out)]  # fmt: skip
    assert script.main(args) == 0
    result = json.loads(out.read_text())["models"][TEST_BACKBONE]
    assert result["bare_timm_img_s"] > 0 and result["ours_img_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_img_s"] / result["bare_timm_img_s"])


def test_make_bench_writes_its_machine_table_between_the_markers_and_nowhere_else(tmp_path):
    quick = load("quick_synthetic")
    summary = {
        "machine": {"platform": "Linux-x", "python": "3.11", "torch": "2.x", "torch_threads": 1, "cpus": 2},
        "date": "2026-11-30",
        "seconds": 99.0,
        "results": {
            "pipeline_throughput": {"result": {"pipeline_img_s": 0.5, "bare_img_s": 0.6, "warm_img_s": 100.0,
                                               "warm_speedup": 200.0}},
            "memory_flat": {"result": {"runs": [{"images": 200, "peak_rss_mb": 1000.0},
                                                {"images": 2000, "peak_rss_mb": 1010.0}], "ratio": 1.01}},
            "onnx_speed": {"result": {
                "forward": {"ratio": 2.0, "int8_ratio": 4.5},
                "predict": {"onnxruntime_img_s": 1.0, "pytorch_img_s": 0.45, "onnxruntime-int8_img_s": 1.6,
                            "ratio": 2.0, "int8_ratio": 3.2, "max_abs_probability_difference": 1e-6,
                            "int8_class_agreement": 0.97},
                "cold_start": {"onnxruntime-int8": {"predict_first_s": 9.0, "predict_later_s": 5.5,
                                                    "serve_first_answer_s": 6.0, "predict_peak_mb": 900.0}}}},
        },
    }  # fmt: skip
    table = quick.machine_table(summary)
    assert "| batch prediction, `--engine onnxruntime-int8`, cold cache | 1.60 img/s | 3.20x PyTorch eager's" in table
    assert "| cold start, `onnxruntime-int8` | predict 9.0 s to the first row | 5.5 s once its graphs are cached; " \
           "serve 6.0 s to the first answer | peak 900 MB |" in table  # fmt: skip
    assert "| batch prediction, whole pipeline, cold cache | 0.50 img/s | 1.20x the six bare forwards' time |" in table
    assert "200 images 1000 MB, 2000 images 1010 MB | ratio 1.010" in table and "2 CPUs" in table
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nhand-written figures\n")
    quick.write_tables(doc, table)
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nhand-written figures\n") and first.count(quick.BEGIN) == 1
    summary["results"]["pipeline_throughput"]["result"]["pipeline_img_s"] = 0.3
    quick.write_tables(doc, quick.machine_table(summary))
    second = doc.read_text()
    assert second.count(quick.BEGIN) == 1 and "0.30 img/s" in second and "0.50 img/s" not in second
    assert second.split(quick.BEGIN)[0] == first.split(quick.BEGIN)[0]  # what lies outside the markers is kept


@pytest.mark.e2e
def test_vote_quality_compares_both_fit_sets_and_both_starts_on_one_test_split(tmp_path, capsys, monkeypatch):
    """The table of ``make bench QUALITY=1`` on synthetic tables: eight votes (refit models / fold means x val /
    out-of-fold fit x mean-vote / random start), every figure the one its vote wrote, paired differences that match
    the point scores."""
    from test_ensemble import BACKBONES, synthetic_probs, write_tables

    script = load("vote_quality")
    rng = np.random.default_rng(4)
    root = tmp_path / "root"
    out = tmp_path / "votes"
    for split, n in (("val", 160), ("oof", 400), ("test", 200)):
        labels, probs = synthetic_probs(n, rng)
        write_tables(root / "classification", split, labels, probs)
        # the fold means' tables: the same images, other probabilities (the fold models themselves are not trained
        # here: classification/train.py's fold mean has its own tests)
        write_tables(out / "fold_mean" / "classification", split, labels, synthetic_probs(n, rng)[1])

    def fold_means(root_, out_, preset_, device_):
        assert (root_, out_) == (root, out)
        return [("`classification/train.py --backbone a --folds 3 --fold-models mean`", "7")]

    monkeypatch.setattr(script, "build_fold_means", fold_means)
    steps = "| step | seconds |\n|---|---|\n| segmentation/train.py | 42 |\n"
    (root / "summary.md").write_text(f"# dermpipe run\n\n{steps}")
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"backbones: {list(BACKBONES)}\nfolds: 3\n")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\nkept\n\n{script.BEGIN}\nSTALE TABLE\n{script.END}\n\nalso kept\n")
    fast = ["meta.epochs=60", "meta.lr=0.05", "meta.hidden_grid=[4]", "meta.anchor_grid=[0.1,0.001]",
            "meta.weight_decay_grid=[0.001]", "meta.cv_folds=3", "baselines.logistic_c_grid=[0.1,1.0]"]  # fmt: skip
    manifest = tmp_path / "manifest.csv"  # present, so not rebuilt; the pipeline is not run (summary.md exists)
    manifest.write_text("image_id\n")
    args = ["--manifest", str(manifest), "--root", str(root), "--preset", str(preset), "--out", str(out),
            "--bootstrap", "200", "--tables", str(doc), *(x for s in fast for x in ("--set", s))]  # fmt: skip
    assert script.main(args) == 0
    results = json.loads((out / "result.json").read_text())
    assert set(results) == {"refit", "fold_mean"}
    for models, votes in (("refit", out / "refit"), ("fold_mean", out / "fold_mean")):
        result = results[models]
        assert set(result["fits"]) == {"val", "oof"} and result["n_test"] == 200
        for fit, n_fit in (("val", 160), ("oof", 400)):
            part = result["fits"][fit]
            assert part["n_fit"] == n_fit
            new = json.loads((votes / f"{fit}_mean_vote" / "summary.json").read_text())
            seed = json.loads((votes / f"{fit}_random" / "summary.json").read_text())
            assert seed["meta_settings"]["init"] == "random" and new["meta_settings"]["init"] == "mean_vote"
            scores = {r["method"]: r["balanced_accuracy"] for r in new["methods"]}
            new_meta = part["methods"]["new_meta"]["balanced_accuracy"]
            assert new_meta == scores["meta_network"]
            assert part["methods"]["seed_meta"]["balanced_accuracy"] == next(
                r["balanced_accuracy"] for r in seed["methods"] if r["method"] == "meta_network"
            )
            for name in ("mean_vote", "majority_vote", "logistic_stacking", "best_single"):
                d = part["paired"][name]
                assert d["difference"] == pytest.approx(new_meta - scores[name], abs=1e-9), (fit, name)
                assert d["low"] <= d["difference"] <= d["high"]
            seed_meta = part["methods"]["seed_meta"]["balanced_accuracy"]
            assert part["paired"]["seed_meta"]["difference"] == pytest.approx(new_meta - seed_meta, abs=1e-9)
            assert part["cv"]["new_meta"] == next(r["cv_balanced_accuracy"] for r in new["meta_cv"] if r["chosen"])
    # the two kinds of backbone models give different test tables, so different mean votes
    assert (
        results["refit"]["fits"]["val"]["methods"]["mean_vote"]
        != results["fold_mean"]["fits"]["val"]["methods"]["mean_vote"]
    )
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n\n") and text.endswith("\n\nalso kept\n") and "STALE" not in text
    for models in ("refit models", "fold means"):
        assert text.count(f"| {models} | out-of-fold (400 images) |") >= 6
        assert text.count(f"| {models} | validation (160 images) |") >= 6
    assert "| `segmentation/train.py` | 42 |" in text
    assert "| `classification/train.py --backbone a --folds 3 --fold-models mean` | 7 |" in text
    assert "`ensemble/vote.py --fit-split oof --set meta.init=random` (fold means)" in text


def _recipe_run(folder, labels, predicted, val, classes=("nv", "mel", "bcc")):
    """A finished classification run folder as the recipe report reads it: metrics.csv, probs_test.csv and .json."""
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(f"epoch,val_balanced_accuracy\n1,{val / 2}\n2,{val}\n")
    (folder / "probs_test.json").write_text(json.dumps({"classes": list(classes)}))
    lines = ["image_id,crop_key,label," + ",".join(classes)]
    for i, (label, guess) in enumerate(zip(labels, predicted)):
        probs = [0.8 if c == guess else 0.1 for c in range(len(classes))]
        lines.append(f"img{i},k{i},{classes[label]}," + ",".join(map(str, probs)))
    (folder / "probs_test.csv").write_text("\n".join(lines) + "\n")


def test_pretrained_recipe_report_chooses_on_val_and_pairs_the_test_differences(tmp_path):
    recipe = load("pretrained_recipe")
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    out = tmp_path / "recipe"
    folder = out / "tf_efficientnet_lite0_64"

    def guesses(share):  # right on about this share of the images, else the next class
        right = rng.random(labels.size) < share
        return np.where(right, labels, (labels + 1) % 3)

    made = {("head", 0.60, 0.5), ("frozen", 0.70, 0.9), ("batch", 0.75, 0.6), ("scratch", 0.50, 0.4)}
    for name, val, share in made:
        for seed in (0, 1):
            _recipe_run(folder / f"{name}_s{seed}" / "tf_efficientnet_lite0", labels, guesses(share), val + seed / 100)
    assert recipe.main(["report", "--out", str(out), "--seeds", "0", "1", "--samples", "300"]) == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["chosen"] == "batch"  # the highest validation mean wins, whatever the test split says
    tests = {name: report["recipes"][name]["test"] for name in ("frozen", "head", "batch")}
    frozen_vs_head = report["differences"]["frozen - head"]
    assert frozen_vs_head["point"] == pytest.approx(np.mean(tests["frozen"]) - np.mean(tests["head"]))
    assert 0 < frozen_vs_head["low"] < frozen_vs_head["point"] < frozen_vs_head["high"]
    batch_vs_frozen = report["differences"]["batch - frozen"]  # the chosen recipe against the other candidates
    assert batch_vs_frozen["high"] < 0 and batch_vs_frozen["seeds"] == [0, 1]


def test_segmentation_paired_differences_pair_each_image_with_itself():
    quality = load("segmentation_quality")
    a = [{"jaccard": j} for j in (0.9, 0.5, 0.7, 0.8)]
    shifted = quality.paired_differences(a, [{"jaccard": x["jaccard"] - 0.05} for x in a], samples=200)
    assert shifted["jaccard_difference"] == pytest.approx([0.05, 0.05, 0.05])  # the images' own spread cancels
    mixed = quality.paired_differences(a, [{"jaccard": j} for j in (0.8, 0.6, 0.7, 0.8)], samples=500)
    point, low, high = mixed["jaccard_difference"]
    assert point == pytest.approx(0.0) and -0.1 <= low < 0 < high <= 0.1


def test_the_cross_source_manifest_moves_every_other_source_row_to_test(tmp_path):
    quality = load("pretrained_quality")
    whole = tmp_path / "whole.csv"
    rows = [("a", "train", "HAM10000"), ("b", "val", "HAM10000"), ("c", "test", "HAM10000"),
            ("d", "train", quality.CROSS_TEST_SOURCE), ("e", "val", quality.CROSS_TEST_SOURCE)]  # fmt: skip
    whole.write_text("image_id,split,dataset,label\n" + "".join(f"{i},{s},{d},nv\n" for i, s, d in rows))
    out = quality.cross_manifest(whole, tmp_path / "cross.csv")
    import csv

    with open(out, newline="") as f:
        split = {r["image_id"]: r["split"] for r in csv.DictReader(f)}
    assert split == {"a": "train", "b": "val", "c": "test", "d": "test", "e": "test"}  # nothing of it trains or selects


def _finished_variant(root, labels, probs, vote, threshold=0.5):
    """A variant's run root as ``tables`` reads it: probability tables, the vote's summary and test predictions."""
    from test_ensemble import BACKBONES, CLASSES, write_tables

    for split in ("val", "test"):
        write_tables(root / "classification", split, labels, probs)
    (root / "ensemble").mkdir(parents=True)
    (root / "ensemble" / "summary.json").write_text(
        json.dumps({"backbones": list(BACKBONES), "refer_threshold": threshold})
    )
    lines = ["image_id," + ",".join(CLASSES)]
    lines += [f"test_{i:04d}," + ",".join(f"{p:.6f}" for p in row) for i, row in enumerate(vote)]
    (root / "ensemble" / "test_predictions.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.e2e
def test_pretrained_tables_score_each_variant_pair_them_and_keep_a_variant_whose_root_is_gone(tmp_path):
    """The tables of ``make bench QUALITY=pretrained``: every figure is the one the scores give, the pretrained
    variant is paired with the scratch one image by image, and a variant run in an earlier session keeps its block."""
    from test_ensemble import BACKBONES, CLASSES, synthetic_probs

    from dermpipe.ensemble.evaluation import method_metrics

    quality = load("pretrained_quality")
    rng = np.random.default_rng(7)
    labels, good = synthetic_probs(300, rng, quality=(2.5, 2.0))
    # the scratch variant: the same images and labels, weaker probabilities of its own
    z = rng.normal(size=good.shape)
    z[np.arange(300), :, labels] += 0.4
    weak = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    out = tmp_path / "pretrained"
    _finished_variant(out / "pretrained", labels, good, good.mean(axis=1))
    _finished_variant(out / "scratch", labels, weak, weak.mean(axis=1))
    (out / "pretrained" / "times.json").write_text(json.dumps({"segmentation/train.py": 600.0, "ensemble/vote.py": 60}))
    (out / "pretrained" / "seg_test.json").write_text(
        json.dumps({"jaccard": 0.8123, "thresholded_jaccard": 0.7456, "images": 300})
    )
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    assert quality.main(["tables", "--out", str(out), "--samples", "60", "--tables", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n\n## The pretrained preset on the real sample\n")
    for variant, probs in (("pretrained", good), ("scratch", weak)):
        block = quality.previous_blocks(text)[variant]
        for b, name in enumerate(BACKBONES):
            point = method_metrics(labels, probs[:, b], CLASSES)
            row = next(line for line in block.splitlines() if line.startswith(f"| {name} |"))
            assert row.startswith(f"| {name} | {point['balanced_accuracy']:.3f} (")
            assert f"| {point['macro_auc']:.3f} (" in row
    assert "U-Net test Jaccard 0.8123, thresholded Jaccard 0.7456 (300 images)." in text
    assert "`segmentation/train.py` 10.0; `ensemble/vote.py` 1.0; all 11." in text
    assert "U-Net and crops: the pretrained variant's" in quality.previous_blocks(text)["scratch"]
    comparison = quality.previous_blocks(text)["comparison"]
    for b, name in enumerate(BACKBONES):
        first = method_metrics(labels, good[:, b], CLASSES)["balanced_accuracy"]
        second = method_metrics(labels, weak[:, b], CLASSES)["balanced_accuracy"]
        row = next(line for line in comparison.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == [f"{first:.3f}", f"{second:.3f}"]
        assert cells[3].startswith(f"{first - second:+.3f} (")
    low = float(next(line for line in comparison.splitlines() if "good_a |" in line).split("(")[1].split(" to ")[0])
    assert low > 0  # the informative backbone is far better than its weak twin: the whole interval is above zero
    assert "| best single: good_a against good_b |" in comparison  # each variant's own best
    # --only: the named blocks are scored again, the others keep what the file holds
    marked = text.replace("<!-- pretrained: begin -->", "<!-- pretrained: begin -->\nMARK")
    doc.write_text(marked.replace("U-Net and crops: the pretrained", "STALE and crops: the pretrained"))
    args = ["tables", "--out", str(out), "--samples", "60", "--tables", str(doc)]
    assert quality.main([*args, "--only", "scratch"]) == 0
    assert "MARK" in doc.read_text() and "STALE" not in doc.read_text()
    doc.write_text(text)
    # a later run with only the scratch root left rewrites that one and keeps the pretrained figures as they were
    kept = quality.previous_blocks(text)["pretrained"]
    import shutil

    shutil.rmtree(out / "pretrained")
    assert quality.main(["tables", "--out", str(out), "--samples", "60", "--tables", str(doc)]) == 0
    again = quality.previous_blocks(doc.read_text())
    assert again["pretrained"] == kept and again["comparison"] == comparison
    assert doc.read_text().count("## The pretrained preset on the real sample") == 1


def test_the_pretrained_runs_time_each_stage_dermpipe_run_calls(tmp_path):
    """``TimedSteps`` is what ``dermpipe run`` calls each stage through: each finished stage's seconds are added to
    ``times.json`` under its name; a stage that fails adds nothing and its error goes through."""
    quality = load("pretrained_quality")
    quality.TimedSteps.path = tmp_path / "times.json"
    steps = quality.TimedSteps()
    assert steps("segmentation/train.py", lambda: None) is None
    steps("segmentation/train.py", lambda: None, True)  # resumed: its seconds add to the earlier ones
    with pytest.raises(ZeroDivisionError):
        steps("ensemble/vote.py", lambda: 1 / 0)
    times = json.loads((tmp_path / "times.json").read_text())
    assert list(times) == ["segmentation/train.py"] and times["segmentation/train.py"] >= 0
