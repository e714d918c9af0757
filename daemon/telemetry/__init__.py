"""Telemetry: the OBD-II and GPS samplers, the DTC tracker, ignition and trips, fed into the core's sink.
Imports the runtime, drivers, sync and config; no other feature.
"""
