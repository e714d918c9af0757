"""The MQTT uplink: topics, the message envelope, the drain (outbox to broker), the offline packer, the link.
Imports sync.store and config; nothing of the daemon.
"""
