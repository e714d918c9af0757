"""Small JSON state that must survive restarts (trip in progress, active DTCs, last VIN ...).

A value that is not JSON (a disk error, a hand edit) is a ``StateDecodeError`` naming the key, never a bare
``json.JSONDecodeError``; its owner decides what a missing value means and may move the text aside
(``quarantine_key``) rather than fail to start.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Protocol

from fleetgate.sync.store.database import Database, transaction
from fleetgate.sync.store.spool import Spool

QUARANTINE_PREFIX = "quarantine/"


class StateDecodeError(ValueError):
    """A saved value cannot be decoded: not JSON here, or (raised by its owner) not the shape it expects.
    ``text`` is the value as stored, for moving it aside; it is not part of the message."""

    def __init__(self, key: str, reason: str, text: str | None = None) -> None:
        super().__init__(f"state {key!r} cannot be decoded: {reason}")
        self.key = key
        self.reason = reason
        self.text = text


def quarantine_key(key: str, wall_ns: int) -> str:
    """Where a bad value of ``key`` is kept, found at ``wall_ns`` (each finding keeps its own copy)."""
    return f"{QUARANTINE_PREFIX}{key}/{wall_ns}"


class Checkpointer(Protocol):
    async def checkpoint_state(self, key: str, value: Any) -> None: ...


class StateStore:
    def __init__(self, db: Database, checkpointer: Checkpointer | None = None) -> None:
        self._db = db
        self._checkpointer = checkpointer  # the outbox: offline, checkpoints go with its spill

    async def get(self, key: str) -> Any | None:
        """The value of ``key`` (None if unset); StateDecodeError if the stored text is not JSON."""
        return await self._db.run(_get, self._db.spool, key)

    async def put(self, key: str, value: Any) -> None:
        """Durably replace ``key``'s value (committed before this returns)."""
        await self._db.run(commit_state, self._db.spool, {key: encode(value)})

    async def checkpoint(self, key: str, value: Any) -> None:
        """Durably replace a value rewritten periodically (a trip's statistics): offline, in the spool's
        record with the live readings waiting in memory (``Outbox.checkpoint_state``), not a commit of its own."""
        if self._checkpointer is None:
            await self.put(key, value)
        else:
            await self._checkpointer.checkpoint_state(key, value)

    async def delete(self, key: str) -> None:
        await self._db.run(commit_state, self._db.spool, {key: None})

    async def items(self, prefix: str) -> dict[str, str]:
        """Every key that starts with ``prefix``, with its value as stored (JSON text, not decoded: each
        owner decodes its own and decides what a bad one means)."""
        return await self._db.run(_items, self._db.spool, prefix)


def encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _get(conn: sqlite3.Connection, spool: Spool, key: str) -> Any | None:
    spooled, text = spool.overlay(key)
    if not spooled:
        row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        text = None if row is None else row[0]
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:  # not JSON, or not text (SQLite keeps whatever type was written)
        shown = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        raise StateDecodeError(key, f"not JSON ({exc})", shown) from None


def commit_state(conn: sqlite3.Connection, spool: Spool, changes: dict[str, str | None]) -> None:
    """Write ``changes`` in a transaction of their own, with every value still only in the spool."""
    changes = spool.fold(changes)
    transaction(conn, lambda c: write_state(c, changes))
    spool.folded(changes)


def write_state(conn: sqlite3.Connection, changes: dict[str, str | None]) -> None:
    """Upsert JSON text values, delete keys whose value is None; the caller owns the transaction and has
    folded in the spool's values (``Spool.fold``)."""
    now = time.time_ns()
    for key, value in changes.items():
        if value is None:
            conn.execute("DELETE FROM state WHERE key = ?", (key,))
        else:
            conn.execute(
                "INSERT INTO state(key, value, updated_wall_ns) VALUES (?, ?, ?) ON CONFLICT(key)"
                " DO UPDATE SET value = excluded.value, updated_wall_ns = excluded.updated_wall_ns",
                (key, value, now),
            )


def _items(conn: sqlite3.Connection, spool: Spool, prefix: str) -> dict[str, str]:
    # A range, not LIKE: '%' and '_' in a prefix are not wildcards here.
    rows = conn.execute(
        "SELECT key, value FROM state WHERE key >= ? AND key < ? ORDER BY key",
        (prefix, prefix + "\U0010ffff"),
    )
    out = {key: value if isinstance(value, str) else str(value) for key, value in rows}
    for key, value in spool.pending.items():
        if key.startswith(prefix):
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
    return dict(sorted(out.items()))
