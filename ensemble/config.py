"""The ensemble stage's config: probability tables in, meta-network, baselines, calibration and abstention, run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dermpipe.configs.schema import RunConfig

DEFAULT_BACKBONES: tuple[str, ...] = ("resnet50", "densenet169", "inception_v3", "inception_resnet_v2", "xception")


@dataclass(frozen=True)
class EnsembleDataConfig:
    classification_root: str = ""  # holds <backbone>/probs_<split>.csv; '' = <root>/classification
    backbones: tuple[
        str, ...
    ] = ()  # the stacking order (the meta-network's axis); () = every one trained under the root
    fit_split: Literal["val", "oof"] = "val"  # held-out probabilities the vote learns from; never the training split
    test_split: str = "test"  # evaluated once, never used to choose anything


@dataclass(frozen=True)
class MetaConfig:
    # mean_vote: the network starts computing the mean vote (log_probs inputs: the log-probability average; probs: the
    # mean probability) and is pulled back towards that start with a strength from anchor_grid, the mean vote itself
    # (not moved) being one candidate; random: seed 004's form, Glorot start and weight decay towards zero
    init: Literal["mean_vote", "random"] = "mean_vote"
    anchor_grid: tuple[float, ...] = (1.0, 0.1, 0.01, 0.001)  # penalty strengths towards the start (init: mean_vote)
    # cross-validation keeps the simplest candidate (the mean vote, then the strongest anchor, the fewest hidden units)
    # whose CV balanced accuracy is within this much of the best one: differences smaller than that are fold noise
    prefer_simpler_within: float = 0.005
    # ...or within this many bootstrap standard errors of it (the one-standard-error rule, Breiman et al. 1984;
    # Hastie et al. 2009, 7.10): the candidate's CV predictions against the best one's, paired on class-stratified
    # resamples of the fit set; a gain the fit set cannot tell from noise moves nothing. 0 = the fixed margin alone
    selection_se: float = 1.0
    hidden: int = 20  # hidden units per class (seed 004: 20); used when hidden_grid is empty
    weight_decay: float = 1.0e-3  # init: random only; used when weight_decay_grid is empty
    hidden_grid: tuple[int, ...] = (4, 20)  # settings tried by cross-validation inside the fit set
    weight_decay_grid: tuple[float, ...] = (1.0e-3, 1.0e-1)  # init: random only
    inputs: Literal["probs", "log_probs"] = "probs"  # what each class's MLP sees; used when inputs_grid is empty
    inputs_grid: tuple[Literal["probs", "log_probs"], ...] = ("probs", "log_probs")
    epochs: int = 300  # full-batch AdamW steps
    lr: float = 0.02
    cv_folds: int = 5  # stratified, inside the fit set
    sigmoid_output: bool = False  # seed 004 put a sigmoid before the softmax; off: it caps every probability
    seed: int = 0  # the meta-network's initial weights and the cross-validation folds

    def __post_init__(self) -> None:
        if self.init == "mean_vote" and self.sigmoid_output:
            raise ValueError("meta.sigmoid_output is seed 004's form: it goes with meta.init=random (a sigmoid cannot "
                             "start at the mean vote)")  # fmt: skip
        if self.selection_se < 0 or self.prefer_simpler_within < 0:
            raise ValueError("meta.selection_se and meta.prefer_simpler_within must be >= 0")
        if any(a <= 0 for a in self.anchor_grid):
            raise ValueError(f"meta.anchor_grid holds penalty strengths > 0, got {list(self.anchor_grid)}")


@dataclass(frozen=True)
class BaselineConfig:
    logistic_c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strength, chosen by CV on the fit set
    logistic_inputs: Literal["log_probs", "probs"] = "log_probs"  # features: the flattened backbones x classes


@dataclass(frozen=True)
class CalibrationConfig:
    temperature: bool = True  # fit one temperature on held-out meta-network logits (Guo et al. 2017)
    refer: bool = True  # refer an image to a dermatologist when its top probability is below a threshold
    refer_class: str = "mel"  # the class whose sensitivity the threshold protects
    target_sensitivity: float = 0.95  # on the held-out set, counting referred images of refer_class as caught
    ece_bins: int = 15  # bins of the reliability diagram and the expected calibration error


@dataclass(frozen=True)
class EvaluationConfig:
    bootstrap: int = 1000  # stratified bootstrap resamples of the test images for confidence intervals; 0 = none
    confidence: float = 0.95  # width of the intervals (percentile)

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ValueError(f"evaluation.bootstrap must be >= 0 (0 = no intervals), got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"evaluation.confidence must be between 0 and 1, e.g. 0.95, got {self.confidence}")


@dataclass(frozen=True)
class EnsembleConfig:
    data: EnsembleDataConfig = field(default_factory=EnsembleDataConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    ROOT_PATHS: ClassVar[dict[str, str]] = {
        "data.classification_root": "classification",
        "run.out_dir": "ensemble",
        "run.cache_dir": "cache",
    }
