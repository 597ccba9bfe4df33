"""Ensemble vote: locally connected meta-network, baselines, calibration, abstention, table checks, leak guard, CLI."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dermpipe.ensemble.baselines import best_single, logistic_stacking, majority_vote, mean_vote
from dermpipe.ensemble.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    refer_threshold,
    referral_outcome,
    reliability_diagram,
)
from dermpipe.ensemble.config import MetaConfig
from dermpipe.ensemble.evaluation import bootstrap_balanced_accuracy
from dermpipe.ensemble.meta import (
    LocallyConnectedVote,
    fit_meta,
    load_meta,
    meta_logits,
    save_meta,
    selection_score,
    softmax,
)
from dermpipe.ensemble.stacked_tables import LeakError, TableError, load_probability_tables
from dermpipe.ensemble.vote import main

CLASSES = ("nv", "mel", "bkl", "bcc")
BACKBONES = ("good_a", "good_b", "noise")
FAST = MetaConfig(epochs=150, lr=0.03, hidden_grid=(4, 8), weight_decay_grid=(1.0e-3,), cv_folds=3)


def synthetic_probs(n, rng, quality=(1.6, 1.2), noise=True, n_classes=4):
    """Labels and (images, backbones, classes) probabilities: informative backbones plus a confident noise one."""
    labels = rng.integers(0, n_classes, n)
    stacks = []
    for q in quality:
        z = rng.normal(size=(n, n_classes))
        z[np.arange(n), labels] += q
        stacks.append(softmax(2.0 * z))
    if noise:
        stacks.append(softmax(4.0 * rng.normal(size=(n, n_classes))))
    return labels, np.stack(stacks, axis=1)


def write_tables(root, split, labels, probs, backbones=BACKBONES, classes=CLASSES, ids=None, sidecar=None, prefix=""):
    ids = ids or [f"{prefix}{split}_{i:04d}" for i in range(len(labels))]
    for b, name in enumerate(backbones):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"probs_{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "crop_key", "label", *classes])
            for i, image_id in enumerate(ids):
                label = classes[labels[i]] if labels[i] >= 0 else ""
                w.writerow([image_id, f"key-{image_id}", label, *(f"{p:.6f}" for p in probs[i, b])])
        meta = {
            "backbone": name,
            "classes": list(classes),
            "split": split,
            "source": split,
            "trained_on": "train",
            "weights_digest": f"w-{name}",
            "table_key": f"t-{name}-{split}",
        }
        meta.update((sidecar or {}).get(name, {}))
        (folder / f"probs_{split}.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def tables(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "classification"
    fit_labels, fit_probs = synthetic_probs(240, rng)
    test_labels, test_probs = synthetic_probs(200, rng)
    write_tables(root, "val", fit_labels, fit_probs)
    write_tables(root, "test", test_labels, test_probs)
    return root


def _args(root, out, *extra):
    return [
        "--classification-root",
        str(root),
        "--backbones",
        ",".join(BACKBONES),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--set",
        "meta.epochs=100",
        "--set",
        "meta.lr=0.05",
        "--set",
        "meta.hidden_grid=[4,8]",
        "--set",
        "meta.weight_decay_grid=[0.001]",
        "--set",
        "meta.cv_folds=3",
        "--set",
        "baselines.logistic_c_grid=[0.1,1.0]",
        "--set",
        "meta.anchor_grid=[1.0,0.01]",
        "--set",
        "evaluation.bootstrap=200",
        *extra,
    ]


# --- the meta-network ---


def test_locally_connected_layer_keeps_classes_apart():
    torch.manual_seed(0)
    model = LocallyConnectedVote(n_backbones=3, n_classes=4, hidden=5)
    x = torch.rand(6, 3, 4)
    before = model(x)
    with torch.no_grad():
        model.w1[0] += 1.0
        model.w2[0] += 0.5
    after = model(x)
    assert not torch.allclose(after[:, 0], before[:, 0])
    torch.testing.assert_close(after[:, 1:], before[:, 1:])
    # class 1's logit depends on the backbones' class-1 probabilities only
    x2 = x.clone()
    x2[:, :, 0] = torch.rand(6, 3)
    torch.testing.assert_close(model(x2)[:, 1:], after[:, 1:])
    assert model.predict_proba(x).sum(1).allclose(torch.ones(6))


def test_meta_network_down_weights_a_noise_backbone_and_beats_the_mean_vote():
    rng = np.random.default_rng(1)
    fit_labels, fit_probs = synthetic_probs(300, rng)
    test_labels, test_probs = synthetic_probs(400, rng)
    model = fit_meta(fit_probs, fit_labels, FAST, seed=0)
    meta_bacc, _ = selection_score(softmax(meta_logits(model, test_probs)), test_labels)
    mean_bacc, _ = selection_score(mean_vote(test_probs), test_labels)
    assert meta_bacc > mean_bacc + 0.05
    # scrambling the noise backbone barely moves the meta-network, while scrambling a good one hurts it
    scrambled = test_probs.copy()
    scrambled[:, 2] = rng.permutation(scrambled[:, 2])
    noise_bacc, _ = selection_score(softmax(meta_logits(model, scrambled)), test_labels)
    scrambled = test_probs.copy()
    scrambled[:, 0] = rng.permutation(scrambled[:, 0])
    good_bacc, _ = selection_score(softmax(meta_logits(model, scrambled)), test_labels)
    assert abs(noise_bacc - meta_bacc) < 0.05 and good_bacc < meta_bacc - 0.1


def test_fit_is_deterministic_and_checkpoint_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    labels, probs = synthetic_probs(80, rng)
    cfg = MetaConfig(epochs=30)
    a, b = fit_meta(probs, labels, cfg, seed=3), fit_meta(probs, labels, cfg, seed=3)
    np.testing.assert_array_equal(meta_logits(a, probs), meta_logits(b, probs))
    path = save_meta(tmp_path / "meta.safetensors", a, CLASSES, BACKBONES, {"temperature": 1.5})
    loaded, meta = load_meta(path, backbones=BACKBONES, classes=CLASSES)
    np.testing.assert_allclose(meta_logits(loaded, probs), meta_logits(a, probs))
    assert meta["temperature"] == 1.5 and meta["hidden"] == cfg.hidden
    from dermpipe.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="backbones"):
        load_meta(path, backbones=BACKBONES[::-1])


def test_log_prob_inputs_are_applied_and_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 3, 4) * 3, dim=-1)
    on_logs = LocallyConnectedVote(3, 4, hidden=5, inputs="log_probs")
    on_probs = LocallyConnectedVote(3, 4, hidden=5)
    on_probs.load_state_dict(on_logs.state_dict())
    # same weights: the log-prob model sees log(p), so it equals the prob model fed log(p), not the prob model fed p
    torch.testing.assert_close(on_logs(probs), on_probs(torch.log(probs)))
    assert not torch.allclose(on_logs(probs), on_probs(probs))
    path = save_meta(tmp_path / "meta.safetensors", on_logs, CLASSES[:4], BACKBONES)
    loaded, meta = load_meta(path)
    assert meta["inputs"] == "log_probs" and loaded.inputs == "log_probs"
    torch.testing.assert_close(loaded(probs), on_logs(probs))
    with pytest.raises(ValueError, match="log_probs"):
        LocallyConnectedVote(3, 4, inputs="logits")


def test_cross_validation_tries_both_input_scales():
    from dermpipe.ensemble.meta import select_meta_settings

    rng = np.random.default_rng(4)
    labels, probs = synthetic_probs(120, rng)
    cfg = MetaConfig(epochs=20, hidden_grid=(4,), anchor_grid=(0.1,))
    selection = select_meta_settings(probs, labels, cfg)
    # the mean vote on each scale, then the anchored fit on each
    assert [row["inputs"] for row in selection.scores] == ["probs", "log_probs"] * 2
    assert selection.settings.inputs in ("probs", "log_probs")
    only = select_meta_settings(
        probs, labels, MetaConfig(epochs=20, hidden_grid=(4,), anchor_grid=(0.1,), inputs_grid=(), inputs="log_probs")
    )
    assert [row["inputs"] for row in only.scores] == ["log_probs"] * 2
    seed_form = MetaConfig(init="random", epochs=20, hidden_grid=(4,), weight_decay_grid=(1e-3,))
    assert [row["inputs"] for row in select_meta_settings(probs, labels, seed_form).scores] == ["probs", "log_probs"]


# --- baselines ---


def test_majority_vote_breaks_ties_by_mean_probability():
    probs = np.array([[[0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [0.45, 0.55, 0.0], [0.98, 0.01, 0.01]]])  # 2 vs 2 votes
    scores = majority_vote(probs)
    assert scores.argmax() == 0 and np.isclose(scores.sum(), 1.0)  # class 0 has the higher mean probability
    assert majority_vote(probs[:, :3]).argmax() == 1  # 2 votes beat 1 whatever the probabilities


def test_best_single_and_logistic_stacking_on_the_fit_set():
    rng = np.random.default_rng(4)
    labels, probs = synthetic_probs(240, rng)
    best, scores = best_single(probs, labels, BACKBONES)
    assert BACKBONES[best] == "good_a" and len(scores) == 3
    test_labels, test_probs = synthetic_probs(300, rng)
    stacking = logistic_stacking(probs, labels, (0.01, 1.0), cv_folds=3)
    assert stacking.c in (0.01, 1.0) and len(stacking.cv_scores) == 2
    out = stacking.predict_proba(test_probs)
    assert out.shape == (300, 4) and np.allclose(out.sum(1), 1.0)
    assert selection_score(out, test_labels)[0] > selection_score(mean_vote(test_probs), test_labels)[0]


# --- calibration and abstention ---


def test_temperature_softens_over_confident_probabilities():
    rng = np.random.default_rng(5)
    labels, probs = synthetic_probs(500, rng, quality=(1.0,), noise=False)
    logits = 4.0 * np.log(probs[:, 0])  # sharpened: over-confident
    temperature = fit_temperature(logits, labels)
    assert temperature > 1.5

    def nll(p):
        return -np.log(p[np.arange(len(labels)), labels]).mean()

    assert nll(apply_temperature(logits, temperature)) < nll(apply_temperature(logits, 1.0)) - 0.1
    assert expected_calibration_error(apply_temperature(logits, temperature), labels) < expected_calibration_error(
        apply_temperature(logits, 1.0), labels
    )
    np.testing.assert_array_equal(apply_temperature(logits, temperature).argmax(1), logits.argmax(1))


def test_refer_threshold_reaches_the_target_sensitivity_and_no_more(tmp_path):
    rng = np.random.default_rng(6)
    labels, probs = synthetic_probs(400, rng, quality=(0.8,), noise=False)
    probs = probs[:, 0]
    mel = CLASSES.index("mel")
    plain = referral_outcome(probs, labels, mel, 0.0)
    assert plain["referred_fraction"] == 0.0 and plain["sensitivity_without_referral"] < 0.9
    threshold = refer_threshold(probs, labels, mel, 0.9)
    outcome = referral_outcome(probs, labels, mel, threshold)
    assert outcome["sensitivity_with_referral"] >= 0.9
    assert 0 < outcome["referred_fraction"] < 1
    # a hair lower no longer reaches it: the rule refers as few images as it can
    lower = referral_outcome(probs, labels, mel, np.nextafter(threshold, 0.0))
    assert lower["sensitivity_with_referral"] < 0.9
    assert refer_threshold(probs, labels, mel, plain["sensitivity_without_referral"]) == 0.0
    path = reliability_diagram({"raw": probs}, labels, tmp_path / "rel.png")
    assert path.stat().st_size > 1000


# --- tables ---


def test_tables_stack_in_backbone_order_whatever_the_row_order(tmp_path):
    rng = np.random.default_rng(7)
    labels, probs = synthetic_probs(20, rng)
    write_tables(tmp_path, "val", labels, probs)
    rows = (tmp_path / "noise" / "probs_val.csv").read_text().splitlines()
    (tmp_path / "noise" / "probs_val.csv").write_text("\n".join([rows[0], *rows[1:][::-1]]) + "\n")
    table = load_probability_tables(tmp_path, BACKBONES, "val")
    assert table.probs.shape == (20, 3, 4) and table.classes == CLASSES
    np.testing.assert_allclose(table.probs, probs, atol=1e-6)
    np.testing.assert_array_equal(table.labels, labels)


def test_missing_backbone_is_named_with_the_command(tables):
    with pytest.raises(TableError, match=r"backbone xception.*python classification/train\.py --backbone xception"):
        load_probability_tables(tables, (*BACKBONES, "xception"), "val")
    (tables / "noise" / "probs_val.csv").unlink()
    with pytest.raises(TableError, match=r"noise has no val probability table"):
        load_probability_tables(tables, BACKBONES, "val")


def test_disagreeing_classes_images_or_crop_keys_are_refused(tmp_path):
    rng = np.random.default_rng(8)
    labels, probs = synthetic_probs(10, rng)
    write_tables(tmp_path, "val", labels, probs, backbones=BACKBONES[:2])
    write_tables(tmp_path, "val", labels, probs, backbones=("noise",), classes=("nv", "mel", "bkl", "scc"))
    with pytest.raises(TableError, match=r"classes.*'bcc'.*noise has.*'scc'"):
        load_probability_tables(tmp_path, BACKBONES, "val")
    ids = [f"val_{i:04d}" for i in range(10)]
    write_tables(tmp_path, "val", labels, probs, backbones=("noise",), ids=[*ids[:9], "other_9"])
    with pytest.raises(TableError, match=r"image val_0009 is in good_a's table but not in noise's"):
        load_probability_tables(tmp_path, BACKBONES, "val")
    write_tables(tmp_path, "val", labels, probs, backbones=("noise",))
    path = tmp_path / "noise" / "probs_val.csv"
    path.write_text(path.read_text().replace("key-val_0003", "key-recropped"))
    with pytest.raises(TableError, match=r"crop of image val_0003: good_a.*noise"):
        load_probability_tables(tmp_path, BACKBONES, "val")


@pytest.mark.parametrize(
    "sidecar, split",
    [({"source": "train"}, "val"), ({"trained_on": "train+val"}, "val"), ({"trained_on": ["train", "oof"]}, "oof")],
)
def test_leak_guard_refuses_tables_of_training_images(tmp_path, sidecar, split):
    rng = np.random.default_rng(9)
    labels, probs = synthetic_probs(10, rng)
    write_tables(tmp_path, split, labels, probs, sidecar={"good_b": sidecar})
    with pytest.raises(LeakError, match="good_b"):
        load_probability_tables(tmp_path, BACKBONES, split)
    # what the classification stage writes for plain and K-fold runs is accepted
    for trained_on in (
        "train",
        "train (5 folds; each row predicted by the model that did not see its fold)",
        "train (mean of the 5 fold models)",
        "train folds 1,2,3,4 (fold 0 held out, not val or oof)",
    ):
        write_tables(tmp_path, split, labels, probs, sidecar={"good_b": {"trained_on": trained_on}})
        assert load_probability_tables(tmp_path, BACKBONES, split).probs.shape == (10, 3, 4)


# --- bootstrap intervals ---


def test_bootstrap_intervals_pair_methods_and_keep_every_class():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [200, 100, 50, 2])  # a class of 2 images is in every resample
    perfect = labels.copy()
    half = np.where(rng.random(labels.size) < 0.5, labels, (labels + 1) % 4)
    out = bootstrap_balanced_accuracy(
        labels, {"ref": half, "same": half.copy(), "perfect": perfect}, "ref", samples=300, seed=1
    )
    # identical predictions: the paired difference is exactly zero in every resample
    assert out["same"]["delta_low"] == out["same"]["delta_high"] == out["same"]["delta_vs_best_single"] == 0.0
    assert out["same"]["p_better_than_best_single"] == 0.0
    # a method right on every image: its interval is a point at 1, and it beats the reference in every resample
    assert out["perfect"]["balanced_accuracy_low"] == out["perfect"]["balanced_accuracy_high"] == 1.0
    assert out["perfect"]["delta_low"] > 0.0 and out["perfect"]["p_better_than_best_single"] == 1.0
    point = np.mean([(half[labels == c] == c).mean() for c in range(4)])
    assert out["perfect"]["delta_vs_best_single"] == pytest.approx(1.0 - point)
    assert out["ref"]["balanced_accuracy_low"] < point < out["ref"]["balanced_accuracy_high"]
    # the 2-image class makes the reference's interval wide: a resample can hold that class's image twice
    assert out["ref"]["balanced_accuracy_high"] - out["ref"]["balanced_accuracy_low"] > 0.05


# --- end to end ---


def test_vote_end_to_end_writes_every_method(tables, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tables, out)) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("meta-network balanced accuracy") and "best single backbone good_a" in line
    with (out / "methods.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    expected = {
        *BACKBONES,
        "best_single",
        "mean_vote",
        "majority_vote",
        "logistic_stacking",
        "meta_network",
        "meta_network_calibrated",
    }
    assert set(rows) == expected
    for r in rows.values():
        assert 0.0 <= float(r["balanced_accuracy"]) <= 1.0 and 0.0 <= float(r["macro_auc"]) <= 1.0
        assert {f"recall_{c}" for c in CLASSES} <= set(r)
    assert float(rows["meta_network"]["balanced_accuracy"]) > float(rows["mean_vote"]["balanced_accuracy"])
    assert float(rows["noise"]["balanced_accuracy"]) < 0.4
    assert float(rows["best_single"]["delta_vs_best_single"]) == 0.0
    meta = rows["meta_network"]
    assert (
        float(meta["balanced_accuracy_low"])
        <= float(meta["balanced_accuracy"])
        <= float(meta["balanced_accuracy_high"])
    )
    assert float(meta["delta_low"]) <= float(meta["delta_vs_best_single"]) <= float(meta["delta_high"])
    assert "bootstrap interval" in line
    # the meta-network against the mean vote and logistic stacking, paired on the same resamples
    versus = json.loads((out / "summary.json").read_text())["meta_network_vs"]
    assert set(versus) == {"best_single", "mean_vote", "majority_vote", "logistic_stacking"}
    for reference, d in versus.items():
        gap = float(meta["balanced_accuracy"]) - float(rows[reference]["balanced_accuracy"])
        assert d["difference"] == pytest.approx(gap, abs=1e-5)  # methods.csv rounds
        assert d["low"] <= d["difference"] <= d["high"] and 0.0 <= d["p_better"] <= 1.0
    assert versus["best_single"]["low"] == pytest.approx(float(meta["delta_low"]), abs=1e-5)
    assert f"meta-network {versus['mean_vote']['difference']:+.4f}" in line
    for name in (
        "confusion_meta.csv",
        "confusion_meta.png",
        "reliability_meta.png",
        "test_predictions.csv",
        "meta.safetensors",
        "summary.json",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    _, meta = load_meta(out / "meta.safetensors", backbones=BACKBONES, classes=CLASSES)
    assert meta["temperature"] == pytest.approx(summary["temperature"])
    assert meta["refer_threshold"] == pytest.approx(summary["refer_threshold"])
    assert summary["referral_fit"]["sensitivity_with_referral"] >= 0.95
    test_sensitivity = summary["referral_test"]["sensitivity_with_referral"]
    assert summary["target_sensitivity"] == 0.95 and summary["target_missed"] == (test_sensitivity < 0.95)
    with (out / "test_predictions.csv").open() as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 200
    assert {int(p["refer"]) for p in preds} <= {0, 1}
    assert all((float(p["top_probability"]) < summary["refer_threshold"]) == (p["refer"] == "1") for p in preds)


@pytest.mark.e2e
def test_a_finished_vote_is_reused_refitted_when_asked_and_kept_when_changed_unasked(tables, tmp_path, monkeypatch):
    import dermpipe.ensemble.voting

    out = tmp_path / "run"
    assert main(_args(tables, out)) == 0
    first = (out / "summary.json").read_text()
    calls = []
    real = dermpipe.ensemble.voting.select_meta_settings
    monkeypatch.setattr(
        dermpipe.ensemble.voting, "select_meta_settings", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert main(_args(tables, out)) == 0
    assert calls == [] and (out / "summary.json").read_text() == first
    assert main([*_args(tables, out), "--force"]) == 0
    assert calls == [1]
    assert main([*_args(tables, out), "--set", "meta.epochs=50"]) == 2  # other settings: refused, the vote kept
    assert main([*_args(tables, out), "--set", "meta.epochs=50", "--force"]) == 0
    assert calls == [1, 1]
    # new tables (two probabilities of one image swapped) are a new vote too
    path = tables / BACKBONES[0] / "probs_test.csv"
    text = path.read_text().splitlines()
    cells = text[1].split(",")
    cells[3], cells[4] = cells[4], cells[3]
    path.write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    assert main([*_args(tables, out), "--set", "meta.epochs=50"]) == 2
    assert main([*_args(tables, out), "--set", "meta.epochs=50", "--force"]) == 0
    assert calls == [1, 1, 1]
    # a summary whose files are gone is not a finished vote
    (out / "methods.csv").unlink()
    assert main([*_args(tables, out), "--set", "meta.epochs=50"]) == 0
    assert calls == [1, 1, 1, 1] and (out / "methods.csv").is_file()


def test_a_finished_vote_is_found_from_another_working_directory(tables, tmp_path, monkeypatch):
    import dermpipe.ensemble.voting

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(_args(tables, "run")) == 0  # a relative run folder
    calls = []
    real = dermpipe.ensemble.voting.select_meta_settings
    monkeypatch.setattr(
        dermpipe.ensemble.voting, "select_meta_settings", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(_args(tables, tmp_path / "run")) == 0
    assert calls == []


@pytest.mark.e2e
def test_test_labels_never_influence_any_choice(tables, tmp_path):
    assert main(_args(tables, tmp_path / "a")) == 0
    path = tables / "good_a" / "probs_test.csv"
    with path.open() as f:
        rows = list(csv.reader(f))
    labels = [r[2] for r in rows[1:]]
    np.random.default_rng(0).shuffle(labels)
    for b in BACKBONES:  # the same shuffled labels in every backbone's table
        p = tables / b / "probs_test.csv"
        with p.open() as f:
            body = list(csv.reader(f))
        for r, label in zip(body[1:], labels):
            r[2] = label
        with p.open("w", newline="") as f:
            csv.writer(f).writerows(body)
    assert main(_args(tables, tmp_path / "b")) == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    for key in ("meta_settings", "meta_cv", "logistic_c", "best_single", "temperature", "refer_threshold"):
        assert a[key] == b[key], key
    wa, wb = (load_file(str(tmp_path / d / "meta.safetensors")) for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    scores = ({r["method"]: r["balanced_accuracy"] for r in s["methods"]} for s in (a, b))
    assert next(scores)["meta_network"] != next(scores)["meta_network"]  # the test labels did change


def test_vote_refuses_leaks_and_missing_backbones_in_one_line(tables, tmp_path, capsys):
    sidecar = tables / "good_b" / "probs_val.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "source": "train"}))
    assert main(_args(tables, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "source=train" in last and "good_b" in last and "Traceback" not in err
    sidecar.write_text(json.dumps(meta))
    assert main([*_args(tables, tmp_path / "run"), "--backbones", "good_a,xception"]) == 2
    assert "backbone xception is missing" in capsys.readouterr().err
    assert main([*_args(tables, tmp_path / "run"), "--set", "calibration.refer_class=melanoma"]) == 2
    assert "refer_class 'melanoma'" in capsys.readouterr().err


def test_vote_refuses_test_images_that_were_fitted_on(tmp_path, capsys):
    rng = np.random.default_rng(10)
    labels, probs = synthetic_probs(60, rng)
    write_tables(tmp_path, "val", labels, probs, prefix="a_")
    write_tables(tmp_path, "test", labels, probs, ids=[f"a_val_{i:04d}" for i in range(60)])
    assert main(_args(tmp_path, tmp_path / "run")) == 2
    assert "a_val_0000" in capsys.readouterr().err


def test_vote_stacks_the_backbones_it_finds_trained_and_says_which(tables, tmp_path, capsys):
    args = _args(tables, tmp_path / "run")
    i = args.index("--backbones")
    del args[i : i + 2]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "stacking the 3 backbones trained under" in said and "good_a, good_b, noise" in said
    assert "defaults not trained: resnet50, densenet169" in said
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["backbones"] == ["good_a", "good_b", "noise"]
    assert main([*args[:1], str(tmp_path / "empty"), *args[2:]]) == 2
    assert "no trained backbone under" in capsys.readouterr().err


@pytest.mark.parametrize("bootstrap", [200, 0])
def test_methods_forest_plot_shows_the_values_of_methods_csv(tables, tmp_path, bootstrap):
    from dermpipe.ensemble.outputs import methods_plot_data

    out = tmp_path / "run"
    assert main([*_args(tables, out), "--set", f"evaluation.bootstrap={bootstrap}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    png = out / "methods.png"
    assert summary["paths"]["methods_plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with (out / "methods.csv").open() as f:
        table = list(csv.DictReader(f))
    plotted = methods_plot_data(summary["methods"], summary["best_single"])  # what run_vote drew...
    assert plotted == methods_plot_data(table, summary["best_single"])  # ...is what methods.csv says, read back
    assert list(plotted.methods) == [r["method"] for r in table]
    assert list(plotted.balanced_accuracy) == [float(r["balanced_accuracy"]) for r in table]
    best = next(r for r in table if r["method"] == "best_single")
    assert plotted.reference == float(best["balanced_accuracy"])
    assert plotted.best_single == "good_a" and best["detail"].startswith("good_a ")
    if bootstrap:
        assert list(plotted.low) == [float(r["balanced_accuracy_low"]) for r in table]
        assert list(plotted.high) == [float(r["balanced_accuracy_high"]) for r in table]
    else:
        assert plotted.low is None and plotted.high is None and "balanced_accuracy_low" not in table[0]
