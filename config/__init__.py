"""Configuration: the typed schema (``schema``), the TOML loader (``loader``), the signal catalogue (``signals``)
and the shipped files. Imports nothing of fleetgate but itself; importing the package loads none of its modules.
"""
