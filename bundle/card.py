"""The model card of a bundle (MODEL_CARD.md): what it was trained on, how well it did, what it is for and not for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dermpipe.engine.lineage import short

LIMITS = """\
## Intended use and limits

- Research software for dermoscopic images of skin lesions: to study, compare and audit lesion classifiers, and to
  triage images for a dermatologist's review in research settings. **It is not a medical device**: it has not been
  cleared or approved by any regulator, and it must not be used to diagnose, to rule out melanoma or to decide
  treatment.
- It judges dermoscopic photographs like those it was trained on. Clinical (non-dermoscopic) photos, other body
  sites, skin types or devices under-represented in the training data, and classes it was not trained on (every image
  gets one of its classes) are outside what the metrics below describe.
- The metrics were measured once on the held-out test split of the training data set; they say how the models did
  there, not on another clinic's patients. Rare classes are scored on few images: read the intervals.
- Images the models cannot judge (too small, dark, blurred, no lesion found), images unlike the training images (the
  out-of-distribution check below) and images below the refer threshold are flagged `refer` = 1: send them to a
  dermatologist.
"""


def _vote_form(vote: Mapping[str, Any]) -> str:
    """How the vote was fitted, in words: from the mean vote (and whether it moved) or seed 004's random start."""
    inputs = vote.get("inputs")
    if vote.get("init") == "mean_vote":
        if vote.get("anchor") == "inf":
            return f"the mean vote on {inputs}: cross-validation found no gain in moving from it"
        anchor, hidden = vote.get("anchor"), vote.get("hidden")
        return f"started at the mean vote on {inputs}, held to it with strength {anchor}, hidden {hidden}"
    return f"random start, hidden {vote.get('hidden')}, weight decay {vote.get('weight_decay')}, inputs {inputs}"


def _number(value: Any, digits: int = 3) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "n/a"


def _data_table(images: Mapping[str, Mapping[str, int]] | None, classes: Sequence[str]) -> str:
    if not images:
        return "The training manifest was not found when the bundle was made: counts not recorded.\n"
    splits = [s for s in ("train", "val", "test") if s in images] + sorted(s for s in images if s not in
                                                                          ("train", "val", "test"))  # fmt: skip
    labels = [c for c in classes if any(c in images[s] for s in splits)]
    labels += sorted({c for s in splits for c in images[s]} - set(labels))
    lines = ["| class | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for c in labels:
        lines.append(f"| {c} | " + " | ".join(str(images[s].get(c, 0)) for s in splits) + " |")
    lines.append("| **all** | " + " | ".join(str(sum(images[s].values())) for s in splits) + " |")
    return "\n".join(lines) + "\n"


def _models(digests: Mapping[str, str] | None) -> str:
    """The models a figure was measured on, as ``name 3fa2c0de..`` (``meta``: the vote's own weights)."""
    if not digests:
        return "n/a"
    return ", ".join(f"{'vote' if name == 'meta' else name} {short(d)}" for name, d in digests.items())


def _methods_table(summary: Mapping[str, Any], vote: Mapping[str, Any]) -> str:
    rows = summary.get("methods") or []
    if not rows:
        return "No test-split scores were recorded (the vote's summary.json is missing).\n"
    scored = {row.get("method"): row.get("model_digests") for row in vote.get("methods") or []}
    lines = [
        "| method | balanced accuracy | 95% interval | macro AUC | models scored (sha256) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row.get("balanced_accuracy_low"), row.get("balanced_accuracy_high")
        interval = f"{_number(low)} to {_number(high)}" if low is not None else "n/a"
        lines.append(f"| {row['method']} | {_number(row.get('balanced_accuracy'))} | {interval} | "
                     f"{_number(row.get('macro_auc'))} | {_models(scored.get(row['method']))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _referral(summary: Mapping[str, Any], calibration: Mapping[str, Any]) -> str:
    referral = summary.get("referral_test") or {}
    if not referral:
        return "No refer threshold (calibration.refer was off).\n"
    missed = (
        f" **This is below the {_number(summary.get('target_sensitivity'), 2)} target.**"
        if summary.get("target_missed")
        else ""
    )
    return (
        f"Images whose top probability is below {_number(calibration.get('refer_threshold'))} (vote "
        f"{short(calibration.get('model_digest'))}) are referred. On the "
        f"test split {_number(referral.get('referred_fraction'), 3)} of images were referred, and the "
        f"{calibration.get('refer_class')} sensitivity counting referred images as caught was "
        f"{_number(referral.get('sensitivity_with_referral'))} (target "
        f"{_number(calibration.get('target_sensitivity'), 2)}, set on the held-out fit split).{missed}\n"
    )


def model_card(info: Mapping[str, Any], summary: Mapping[str, Any], seg_metrics: Sequence[Mapping[str, str]]) -> str:
    """MODEL_CARD.md from the bundle's bundle.json, the vote's summary.json and the U-Net's metrics.csv."""
    classes = list(info["classes"])
    seg = info.get("segmentation") or {}
    scores = info.get("metrics") or {}
    best = max(seg_metrics, key=lambda r: float(r.get("val_jaccard") or 0), default=None)
    seg_line = (
        f"best validation Jaccard (per image, as ISIC scores) {_number(best.get('val_jaccard'))} at epoch "
        f"{best.get('epoch')}, Dice {_number(best.get('val_dice'))} (U-Net "
        f"{short((scores.get('segmentation') or {}).get('model_digest'))})"
        if best
        else "not recorded"
    )
    tested = scores.get("classifiers") or {}
    crops = info.get("crops") or {}
    data = info.get("training_data") or {}
    backbones = "\n".join(
        f"  - `{name}`: input {c.get('input_size')} px, SE reduction {c.get('se_reduction')}, mean {c.get('mean')}, "
        f"std {c.get('std')}; started from {c.get('weights_source') or 'not recorded'}"
        + (f"; the mean probability of {c['fold_models']} fold models" if c.get("fold_models") else "")
        + (
            f"; test balanced accuracy {_number(tested[name].get('balanced_accuracy'))} (weights "
            f"{short(tested[name].get('model_digest'))})"
            if name in tested
            else ""
        )
        for name, c in (info.get("classifiers") or {}).items()
    )
    vote = info.get("vote") or {}
    calibration = info.get("calibration") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
    return f"""# Model card: {info["name"]}

Made by dermpipe on {info.get("created")} from the run root `{info.get("source_root")}`. Its files and their
sha256 are listed in `SHA256SUMS`; `dermpipe predict --model` refuses the bundle if any of them changed.

{LIMITS}
## Classes (in the order of the probability columns)

{", ".join(f"`{c}`" for c in classes)}

## Training data

Manifest `{data.get("manifest")}`; images per split and class (splits grouped by lesion: no lesion on two sides):

{_data_table(data.get("images"), classes)}
## Pipeline

- Segmentation: {seg.get("architecture")} with encoder `{seg.get("encoder")}` at {seg.get("input_size")} px;
  started from {seg.get("weights_source") or "not recorded"}; {seg_line}.
- Crops: the lesion's box with a margin of {crops.get("margin")} of its side, square, resized to
  {crops.get("crop_size")} px (mask threshold {crops.get("threshold")}, flip TTA {crops.get("tta")}).
- Classifiers (each with a Squeeze-and-Excitation block before pooling):
{backbones}
- Vote: locally connected meta-network over the stacked probabilities ({_vote_form(vote)}), fit on the
  `{vote.get("fit_split")}` split only; temperature {_number(calibration.get("temperature"))} (vote
  {short(calibration.get("model_digest"))}).

## Measured on the test split ({summary.get("n_test", "n/a")} images, scored once)

Balanced accuracy (mean per-class recall) with a 95% interval from a paired, class-stratified bootstrap of the test
images; `best_single` is the backbone chosen on the fit split. Each row names the weights it scored (the first 8 hex
digits of their sha256; bundle.json holds them whole, and the bundle is refused unless they are its own weights).

{_methods_table(summary, scores.get("vote") or {})}
{_referral(summary, calibration)}
{_trust_checks(info, summary)}
## Versions

{versions}
"""


def card_warnings(info: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    """What a bundle's user must know about when it refers: a refer rule that can never refer on confidence (the
    vote's ``never_refers``, or a threshold of at most 1/classes in a vote from before it was recorded), and
    backbones whose out-of-distribution check is off."""
    from dermpipe.ensemble.calibration import never_refers

    warnings = []
    calibration = info.get("calibration") or {}
    if calibration.get("refer"):
        never = summary.get("never_refers")
        if never is None:
            threshold = float(calibration.get("refer_threshold") or 0.0)
            never = never_refers(threshold, len(info.get("classes") or []), float(calibration.get("temperature") or 1))
        if never:
            warnings.append(f"calibration: {never}")
    classifiers = info.get("classifiers") or {}
    off = [name for name, c in classifiers.items() if not (c.get("ood") or {}).get("usable")]
    if off:
        whole = " (the whole check is off: images unlike the training images are not referred)"
        warnings.append(f"out-of-distribution check off for {', '.join(off)}: no statistics fitted on its weights "
                        f"(retrain it){whole if len(off) == len(classifiers) else ''}")  # fmt: skip
    return warnings


def _trust_checks(info: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The card's section on what refers an image besides the input quality: the out-of-distribution check, its
    thresholds and how they were set, and any warning about the refer rule."""
    lines = [
        "## Referral checks",
        "",
        "An image whose pooled classifier features lie far from the training images' (the Mahalanobis distance to",
        "the nearest class mean, over a threshold set on held-out crops; the mean over the backbones of distance /",
        'threshold above 1) is referred as "unlike the training images"; an image where the U-Net finds no lesion',
        'is referred as "no lesion found".',
        "",
    ]
    for name, c in (info.get("classifiers") or {}).items():
        ood = c.get("ood") or {}
        if ood.get("usable"):
            lines.append(
                f"- `{name}`: distance threshold {_number(ood.get('threshold'))}, the {ood.get('percentile')}th "
                f"percentile of the {ood.get('threshold_images')} {ood.get('threshold_split')} crops (fitted on "
                f"{ood.get('fit_images')} training crops, {ood.get('feature_dim')} features)"
            )
        else:
            lines.append(f"- `{name}`: check off ({ood.get('why') or 'no statistics: trained before the check'})")
    warnings = card_warnings(info, summary)
    if warnings:
        lines += ["", *(f"**Warning**: {w}." for w in warnings)]
    return "\n".join(lines) + "\n"
