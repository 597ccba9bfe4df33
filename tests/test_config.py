"""Config loading: precedence, unknown keys, wrong types, saved resolved config."""

from dataclasses import dataclass, field

import pytest
import yaml

from dermpipe.configs.loader import ConfigError, config_hash, load_config, to_dict
from dermpipe.engine.run import save_config


@dataclass(frozen=True)
class Train:
    epochs: int = 3
    lr: float = 1.0e-3
    amp: bool = True
    sizes: tuple[int, ...] = (64, 128)
    weights: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str = "seg"
    train: Train = field(default_factory=Train)


def test_defaults_and_frozen():
    cfg = load_config(Stage)
    assert cfg.train.epochs == 3 and cfg.train.sizes == (64, 128)
    with pytest.raises(AttributeError):
        cfg.train.epochs = 5  # type: ignore[misc]


def test_precedence_yaml_then_set_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 1e-2\n")
    cfg = load_config(Stage, path)
    assert cfg.train.epochs == 7 and cfg.train.lr == pytest.approx(0.01)  # "1e-2" read as str by PyYAML, coerced
    cfg = load_config(Stage, path, overrides=["train.epochs=9"])
    assert cfg.train.epochs == 9
    cfg = load_config(Stage, path, overrides=["train.epochs=9"], flags={"train.epochs": 11, "train.lr": None})
    assert cfg.train.epochs == 11 and cfg.train.lr == pytest.approx(0.01)  # None flag does not override


def test_unknown_key_names_it_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epoch.*did you mean 'epochs'"):
        load_config(Stage, overrides=["train.epoch=2"])
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*'train'"):
        load_config(Stage, path)


@pytest.mark.parametrize(
    "item, key",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.amp=maybe", "train.amp"),
        ("train.lr=fast", "train.lr"),
        ("train.epochs=true", "train.epochs"),
        ("train.sizes=[1, x]", r"train.sizes\[1\]"),
    ],
)
def test_wrong_type_names_the_key(item, key):
    with pytest.raises(ConfigError, match=key):
        load_config(Stage, overrides=[item])


def test_optional_and_tuple_values():
    cfg = load_config(Stage, overrides=["train.weights=/tmp/w.pth", "train.sizes=32,48"])
    assert cfg.train.weights == "/tmp/w.pth" and cfg.train.sizes == (32, 48)
    assert load_config(Stage, overrides=["train.weights=null"]).train.weights is None


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Stage, overrides=["train.epochs=5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["train"]["epochs"] == 5
    assert load_config(Stage, path) == cfg
    assert config_hash(cfg) == config_hash(load_config(Stage, path)) != config_hash(Stage())
    assert to_dict(cfg)["train"]["sizes"] == [64, 128]


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Stage, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Stage, bad)
