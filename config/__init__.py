"""Configuration: the typed schema (``schema``), the TOML loader (``loader``) and the shipped files."""

from fleetgate.config.loader import ConfigError, load_config
from fleetgate.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config"]
