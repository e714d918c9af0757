"""Configuration: the typed schema (``schema``), the TOML loader (``loader``), the signal catalogue (``signals``)
and the shipped files. Imports nothing of fleetgate but itself.
"""

from fleetgate.config.loader import ConfigError, load_config
from fleetgate.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config"]
