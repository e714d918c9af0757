"""Versioned schema migrations, tracked in ``PRAGMA user_version``.

Append new migrations to the end; never edit one that has shipped. Each runs in one transaction together
with the version bump, so a crash mid-migration leaves the previous version intact.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[list[str]] = [
    # 1: outbox, its streams, boots, and key/value state.
    [
        """CREATE TABLE boots (
               id INTEGER PRIMARY KEY,
               boot_id TEXT NOT NULL UNIQUE
           )""",
        """CREATE TABLE streams (
               id INTEGER PRIMARY KEY,
               name TEXT NOT NULL UNIQUE,
               last_seq INTEGER NOT NULL DEFAULT 0   -- never decreases, so (device, stream, seq) is never reused
           )""",
        """CREATE TABLE outbox (
               id INTEGER PRIMARY KEY,
               stream_id INTEGER NOT NULL REFERENCES streams(id),
               seq INTEGER NOT NULL,
               priority INTEGER NOT NULL,
               wall_ns INTEGER NOT NULL,
               mono_ns INTEGER NOT NULL,
               boot INTEGER NOT NULL REFERENCES boots(id),
               time_trusted INTEGER NOT NULL,
               payload BLOB NOT NULL
           )""",
        "CREATE INDEX outbox_drain ON outbox(priority, id)",
        "CREATE INDEX outbox_stream ON outbox(stream_id, id)",
        """CREATE TABLE state (
               key TEXT PRIMARY KEY,
               value TEXT NOT NULL,          -- JSON
               updated_wall_ns INTEGER NOT NULL
           )""",
    ],
    # 2: wall times fixed up after the fact, once trust in the clock arrived later in the same boot.
    ["ALTER TABLE outbox ADD COLUMN time_corrected INTEGER NOT NULL DEFAULT 0"],
    # 3: bytes held and records evicted per stream, for disk quotas.
    [
        "ALTER TABLE streams ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE streams ADD COLUMN evicted INTEGER NOT NULL DEFAULT 0",
        "UPDATE streams SET bytes = (SELECT coalesce(sum(length(payload) + 64), 0) FROM outbox"
        " WHERE outbox.stream_id = streams.id)",
    ],
    # 4: an id for this database, so (device, store, stream, seq) stays unique when a database is replaced
    # (corrupt at start, or wiped) and every seq starts again at 1.
    [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta(key, value) VALUES ('store_id', lower(hex(randomblob(16))))",
    ],
    # 5: sealed segments: a message's worth of a stream's oldest telemetry, packed while the uplink was down
    # (sync/store/segments.py).
    [
        """CREATE TABLE segments (
               id INTEGER PRIMARY KEY,
               stream_id INTEGER NOT NULL REFERENCES streams(id),
               device TEXT NOT NULL,          -- the device id its envelope carries
               first_seq INTEGER NOT NULL,
               last_seq INTEGER NOT NULL,
               records INTEGER NOT NULL,
               first_wall_ns INTEGER NOT NULL,
               compressed INTEGER NOT NULL,
               payload BLOB NOT NULL          -- the uplink message, exactly as it is published
           )""",
        "CREATE INDEX segments_stream ON segments(stream_id, id)",
    ],
]


class SchemaTooNewError(Exception):
    """The database was written by a newer fleetgate; refusing to touch it keeps its data."""


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, migrations: list[list[str]] = MIGRATIONS) -> list[int]:
    """Bring the database to the latest version; returns the versions applied."""
    current = schema_version(conn)
    if current > len(migrations):
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this fleetgate knows ({len(migrations)}); "
            "upgrade fleetgate or restore a matching database"
        )
    applied = []
    for version, statements in enumerate(migrations[current:], start=current + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back by itself (disk full)
                conn.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied
