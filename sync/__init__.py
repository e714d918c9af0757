"""Store-and-forward and the cloud links: ``store/`` (SQLite outbox and state), ``mqtt/``, ``reef/``, ``crypto/``.
Imports config and the root package, never the daemon or drivers; a room imports no other room but ``store``.
"""
