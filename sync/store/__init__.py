"""The SQLite store: one WAL database with an outbox (append-only records), packed segments and state tables.
Imports nothing of fleetgate but itself: every other room builds on it.
"""

from fleetgate.sync.store.database import Database, RecoveryReport, StoreError
from fleetgate.sync.store.outbox import Outbox
from fleetgate.sync.store.records import Appended, NewRecord, Priority, Stamp, StoredRecord
from fleetgate.sync.store.state import StateStore

__all__ = [
    "Appended",
    "Database",
    "NewRecord",
    "Outbox",
    "Priority",
    "RecoveryReport",
    "Stamp",
    "StateStore",
    "StoreError",
    "StoredRecord",
]
