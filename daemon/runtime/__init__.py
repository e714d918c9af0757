"""The runtime every feature is handed: the core (store, clock, events, reading sink), supervisor, control
socket, status, heartbeat, sd_notify, logs. Imports sync, config and the root package; never a feature.
"""
