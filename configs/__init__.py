"""Stage configs: one YAML per stage and a loader into frozen dataclasses."""

from dermpipe.configs.loader import ConfigError, config_hash, default_config_path, load_config, to_dict

__all__ = ["ConfigError", "config_hash", "default_config_path", "load_config", "to_dict"]
