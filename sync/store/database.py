"""Open the SQLite database: integrity check, corrupt-file recovery, migrations, one writer thread.

Every statement runs on one dedicated thread that owns the connection, so the event loop never blocks on
disk and writes are naturally serialised. A database that fails ``PRAGMA quick_check`` (or is not a
database at all) is moved aside with its WAL into ``corrupt/`` for forensics and a fresh one is created:
the daemon goes on, and the caller records what happened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fleetgate.sync.store.migrations import MIGRATIONS, SchemaTooNewError, migrate

log = logging.getLogger(__name__)

T = TypeVar("T")
SIDECARS = ("-wal", "-shm", "-journal")


class StoreError(Exception):
    """The store cannot be opened or used; the message says why."""


@dataclass(frozen=True)
class RecoveryReport:
    """A corrupt database was moved aside and replaced by a fresh one."""

    reason: str
    moved_to: Path


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
    except BaseException:
        conn.close()
        raise
    return conn


def _quick_check(conn: sqlite3.Connection) -> str | None:
    """None when the database is sound, else the first problem SQLite reports."""
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows[:5])


def _move_aside(path: Path) -> Path:
    folder = path.parent / "corrupt"
    folder.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder / f"{path.name}.{stamp}.{os.getpid()}"
    for suffix in ("", *SIDECARS):
        src = path.with_name(path.name + suffix)
        if src.exists():
            shutil.move(src, target.with_name(target.name + suffix))
    return target


def open_connection(
    path: Path, synchronous: str = "full"
) -> tuple[sqlite3.Connection, RecoveryReport | None]:
    """Open (creating if needed) and migrate the database, replacing it if it is corrupt."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    recovery: RecoveryReport | None = None
    conn: sqlite3.Connection | None = None
    try:
        conn = _connect(path, synchronous)
        problem = _quick_check(conn)
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed" ...
        problem = str(exc)
    if problem is not None:
        if conn is not None:
            conn.close()
        moved = _move_aside(path)
        log.error("store corrupt, moved aside", extra={"reason": problem, "moved_to": str(moved)})
        recovery = RecoveryReport(problem, moved)
        conn = _connect(path, synchronous)
    assert conn is not None
    try:
        migrate(conn)
    except SchemaTooNewError as exc:
        conn.close()
        raise StoreError(str(exc)) from None
    return conn, recovery


class Database:
    """The open database and the one thread that may touch it."""

    def __init__(self, conn: sqlite3.Connection, path: Path, recovery: RecoveryReport | None) -> None:
        self._conn = conn
        self.path = path
        self.recovery = recovery
        self.schema_version = len(MIGRATIONS)
        self.store_id: str = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._closed = False

    @classmethod
    async def open(cls, path: Path, synchronous: str = "full") -> Database:
        loop = asyncio.get_running_loop()
        try:
            conn, recovery = await loop.run_in_executor(None, open_connection, path, synchronous)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        return cls(conn, path, recovery)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(conn, *args)`` on the store thread."""
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._conn, *args)

    async def close(self) -> None:
        """Finish every queued statement, checkpoint the WAL and close."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_on_thread)
        self._executor.shutdown(wait=True)

    def _close_on_thread(self) -> None:
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a busy checkpoint is harmless: the WAL is replayed at next open
            log.warning("wal checkpoint at close failed", extra={"error": str(exc)})
        self._conn.close()


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn`` inside BEGIN IMMEDIATE ... COMMIT, rolling back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result
