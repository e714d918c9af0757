"""fleetgate: an edge gateway daemon for vehicles and depots.

The import root. Its subpackages live in the repository's top-level folders
(``fleetgate.daemon`` is ``daemon/``, ``fleetgate.sync`` is ``sync/`` ...), mapped in pyproject.toml.
This package itself holds only the command-line entry point.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fleetgate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
