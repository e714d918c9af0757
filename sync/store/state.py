"""Small JSON state that must survive restarts (trip in progress, active DTCs, last VIN ...)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from fleetgate.sync.store.database import Database


class StateStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, key: str) -> Any | None:
        return await self._db.run(_get, key)

    async def put(self, key: str, value: Any) -> None:
        """Durably replace ``key``'s value (committed before this returns)."""
        await self._db.run(_put, key, json.dumps(value, separators=(",", ":"), allow_nan=False))

    async def delete(self, key: str) -> None:
        await self._db.run(_delete, key)


def _get(conn: sqlite3.Connection, key: str) -> Any | None:
    row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def write_state(conn: sqlite3.Connection, changes: dict[str, str | None]) -> None:
    """Upsert JSON text values, delete keys whose value is None; the caller owns the transaction."""
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


def _put(conn: sqlite3.Connection, key: str, value: str) -> None:
    write_state(conn, {key: value})


def _delete(conn: sqlite3.Connection, key: str) -> None:
    write_state(conn, {key: None})
