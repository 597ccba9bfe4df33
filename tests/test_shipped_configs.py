"""Every shipped stage YAML loads into its config and states exactly the defaults (no key missing or stale)."""

import pytest
import yaml

from dermpipe.classification.config import ClassificationConfig
from dermpipe.configs.loader import default_config_path, load_config, to_dict
from dermpipe.ensemble.config import EnsembleConfig, PredictConfig
from dermpipe.segmentation.config import SegmentationConfig


@pytest.mark.parametrize(
    "stage, cls",
    [("segmentation", SegmentationConfig), ("classification", ClassificationConfig), ("ensemble", EnsembleConfig),
     ("predict", PredictConfig)],
)  # fmt: skip
def test_shipped_yaml_matches_defaults(stage, cls):
    path = default_config_path(stage)
    assert load_config(cls, path) == cls()
    assert yaml.safe_load(path.read_text()) == to_dict(cls())
