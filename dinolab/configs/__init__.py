"""Training configuration: typed defaults (``schema``) and YAML preset deltas (``presets/``)."""

from dinolab.configs.schema import Config, load_config, preset_names, to_yaml

__all__ = ["Config", "load_config", "preset_names", "to_yaml"]
