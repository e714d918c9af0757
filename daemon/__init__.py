"""The running service. ``app.py`` composes it; ``runtime/`` is what every feature is handed; each other
folder is one feature (``telemetry/``, ``access/``, ``uplink/``, ``scooters/``) that builds itself from the core.
"""
