"""The uplink feature: the MQTT link, drain and offline packer wired to the outbox, the network watch that
reconnects at once, and the health message. Imports the runtime, sync and config; no other feature.
"""
