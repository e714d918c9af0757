"""Checks that find a database the daemon must not run on, beyond what ``PRAGMA quick_check`` sees.

``quick_check`` proves the file is a sound b-tree, not that it is *our* database: a dropped table, a missing
column, an empty ``meta`` table or a sequence pushed to the edge of int64 all pass it and then fail the daemon at
every start or every append. These find such tampering (or a bug) at open, so the store can treat it like
corruption: move the file aside for forensics and start a fresh one.
"""

from __future__ import annotations

import functools
import re
import sqlite3

from fleetgate.sync.store.migrations import MIGRATIONS, migrate

# The highest sequence number a stream may reach: consumers parse seq from JSON, where integers above 2^53 lose
# precision. A million records a second for a century stays below 2^52, so a larger value was never written by us.
MAX_SEQ = 2**53 - 1
_STORE_ID = re.compile(r"[0-9a-f]{32}")


@functools.cache
def expected_schema() -> dict[str, tuple[tuple[object, ...], ...]]:
    """Every table's columns and every index, as a fresh database at the current version has them."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(conn, MIGRATIONS)
        return _schema(conn)
    finally:
        conn.close()


def _schema(conn: sqlite3.Connection) -> dict[str, tuple[tuple[object, ...], ...]]:
    rows = conn.execute(
        "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
    ).fetchall()
    schema: dict[str, tuple[tuple[object, ...], ...]] = {}
    for kind, name in rows:
        if kind == "table":
            info = conn.execute('SELECT name, type, "notnull", pk FROM pragma_table_info(?)', (name,))
            schema[f"table {name}"] = tuple(tuple(r) for r in info)
        elif kind == "index":
            info = conn.execute("SELECT name FROM pragma_index_info(?)", (name,))
            schema[f"index {name}"] = tuple(tuple(r) for r in info)
    return schema


def schema_problem(conn: sqlite3.Connection) -> str | None:
    """None when the tables, columns and indexes are exactly those the migrations make, else what differs."""
    actual, expected = _schema(conn), expected_schema()
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(k for k in set(actual) & set(expected) if actual[k] != expected[k])
    if not (missing or extra or changed):
        return None
    parts = [
        f"{label}: {', '.join(names)}"
        for label, names in (("missing", missing), ("unexpected", extra), ("changed", changed))
        if names
    ]
    return "schema differs from version " + str(len(MIGRATIONS)) + " (" + "; ".join(parts) + ")"


def content_problem(conn: sqlite3.Connection) -> str | None:
    """None when the values the store relies on are ones it could have written, else the first that is not."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
    if row is None or not isinstance(row[0], str) or not _STORE_ID.fullmatch(row[0]):
        return "meta.store_id is missing or not 32 hex digits"
    streams = conn.execute("SELECT id, name, last_seq FROM streams").fetchall()
    for stream_id, name, last_seq in streams:
        if not isinstance(last_seq, int) or not 0 <= last_seq <= MAX_SEQ:
            return f"streams.last_seq of {name!r} is {last_seq!r}, outside 0..2^53-1"
        newest = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM outbox WHERE stream_id = ?1 ORDER BY id DESC LIMIT 1), 0),"
            " coalesce((SELECT last_seq FROM segments WHERE stream_id = ?1 ORDER BY id DESC LIMIT 1), 0))",
            (stream_id,),
        ).fetchone()[0]
        if newest > last_seq:
            return f"streams.last_seq of {name!r} ({last_seq}) is behind a stored record ({newest}): seqs would repeat"
    return None
