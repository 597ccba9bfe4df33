"""Every shipped stage YAML loads into its config and states exactly the defaults (no key missing or stale)."""

import pytest
import yaml

from dermpipe.classification.config import ClassificationConfig
from dermpipe.configs.loader import default_config_path, load_config, place_under_root, to_dict
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.predict.config import PredictConfig
from dermpipe.segmentation.config import SegmentationConfig


@pytest.mark.parametrize(
    "stage, cls",
    [("segmentation", SegmentationConfig), ("classification", ClassificationConfig), ("ensemble", EnsembleConfig),
     ("predict", PredictConfig)],
)  # fmt: skip
def test_shipped_yaml_matches_defaults(stage, cls):
    path = default_config_path(stage)
    assert load_config(cls, path) == place_under_root(cls())
    assert yaml.safe_load(path.read_text()) == to_dict(cls())


@pytest.mark.parametrize("cls", [SegmentationConfig, ClassificationConfig, EnsembleConfig, PredictConfig])
def test_every_path_left_empty_takes_its_place_under_the_run_root(cls):
    cfg = load_config(cls, None, ["run.root=exp/a"])
    for key in cls.ROOT_PATHS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value.startswith("exp/a/"), (key, value)
    assert cfg.run.cache_dir == "exp/a/cache"
    shared = load_config(cls, None, ["run.root=exp/a", "run.cache_dir=shared/cache", "run.out_dir=elsewhere"])
    assert (shared.run.cache_dir, shared.run.out_dir) == ("shared/cache", "elsewhere")  # given paths are kept
