"""Open the SQLite database: integrity checks, corrupt-file recovery, migrations, one writer thread.

Every statement runs on one dedicated thread that owns the connection, so the event loop never blocks on
disk and writes are naturally serialised. A database that fails ``PRAGMA quick_check``, is not a database at
all, cannot be migrated, or is not the schema and content the store writes (integrity.py) is moved aside with
its WAL into ``corrupt/`` for forensics and a fresh one is created: the daemon goes on, and the caller records
what happened. Trouble with the machine rather than the file (disk full, I/O error, no permission) never
moves anything: it is an error, and the data stays where it is for the next start.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleetgate.sync.store.integrity import content_problem, empty_file_problem, schema_problem, wal_problem
from fleetgate.sync.store.migrations import MIGRATIONS, SchemaTooNewError, migrate
from fleetgate.sync.store.spool import DONE_PREFIX, FOLDED_KEY, Spool, spool_folder

log = logging.getLogger(__name__)

T = TypeVar("T")
SIDECARS = ("-wal", "-shm", "-journal")


# SQLite primary result codes that speak of the machine, not of the file: moving the file aside cures none.
_ENVIRONMENTAL = {
    sqlite3.SQLITE_PERM,
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_AUTH,
}


class StoreError(Exception):
    """The store cannot be opened or used; the message says why."""


# What a store call the store cannot take raises: SQLite's own error ("database or disk is full"), the
# store's (closed, cannot open), or the spool's file system's (spool.py: no space, I/O error).
STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, sqlite3.Error, OSError)


class StoreTooNewError(StoreError):
    """The database was written by a newer fleetgate: a configuration problem, not one a restart cures."""


def is_environmental(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _ENVIRONMENTAL


def is_disk_full(exc: BaseException) -> bool:
    """SQLite's "database or disk is full", or the spool's file system's ENOSPC / EDQUOT."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL


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


def _forensics(path: Path) -> Path:
    """Where a damaged file is kept: ``corrupt/<name>.<UTC time>.<pid>`` beside it."""
    folder = path.parent / "corrupt"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{os.getpid()}"


def _move_aside(path: Path) -> Path:
    target = _forensics(path)
    for suffix in ("", *SIDECARS):
        src = path.with_name(path.name + suffix)
        if src.exists():
            shutil.move(src, target.with_name(target.name + suffix))
    return target


def _copy_aside(wal: Path) -> Path:
    target = _forensics(wal)
    shutil.copy2(wal, target)
    return target


def open_connection(
    path: Path, synchronous: str = "full"
) -> tuple[sqlite3.Connection, RecoveryReport | None]:
    """Open (creating if needed) and migrate the database, replacing it if it is corrupt or not ours."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    wal = path.with_name(path.name + "-wal")
    wal_damage = wal_problem(wal)
    wal_copy = None
    if wal_damage is not None:  # keep the evidence before SQLite replays what it can and reuses the file
        wal_copy = _copy_aside(wal)
        log.error("store WAL damaged, copy kept", extra={"reason": wal_damage, "copied_to": str(wal_copy)})
    conn, problem = _open_checked(path, synchronous)
    if conn is not None:
        if wal_copy is None:
            return conn, None
        assert wal_damage is not None  # a copy is kept only of a damaged WAL
        kept = "; kept: the database with every transaction before the damage"
        return conn, RecoveryReport(wal_damage + kept, wal_copy)
    moved = _move_aside(path)
    log.error("store corrupt, moved aside", extra={"reason": problem, "moved_to": str(moved)})
    conn = _connect(path, synchronous)
    migrate(conn)
    return conn, RecoveryReport(str(problem), moved)


def _open_checked(path: Path, synchronous: str) -> tuple[sqlite3.Connection | None, str | None]:
    """The migrated connection, or None and what is wrong with the file. Raises for what is not the file's fault."""
    empty = empty_file_problem(path)
    if empty is not None:
        return None, empty
    try:
        conn = _connect(path, synchronous)
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed" ...
        if is_environmental(exc):
            raise
        return None, str(exc)
    try:
        problem = _quick_check(conn)
        if problem is None:
            migrate(conn)
            problem = schema_problem(conn) or content_problem(conn)
    except SchemaTooNewError as exc:
        conn.close()
        raise StoreTooNewError(str(exc)) from None
    except sqlite3.DatabaseError as exc:
        if is_environmental(exc):
            conn.close()
            raise
        problem = str(exc)
    if problem is not None:
        conn.close()
        return None, problem
    return conn, None


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
        # Disk full: since when (wall time) writes have been refused, and how many; cleared by the next write.
        self.disk_full_since: float | None = None
        self.disk_full_errors = 0
        self.spool = Spool(spool_folder(path))  # the sealed backlog's files (spool.py); loaded by ``open``

    @classmethod
    async def open(cls, path: Path, synchronous: str = "full") -> Database:
        loop = asyncio.get_running_loop()
        try:
            conn, recovery = await loop.run_in_executor(None, open_connection, path, synchronous)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        db = cls(conn, path, recovery)
        try:
            await db.run(db._load_spool)
        except (OSError, sqlite3.Error) as exc:
            await db.close()
            raise StoreError(f"cannot read the spool {db.spool.folder}: {exc}") from exc
        return db

    def _load_spool(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute(
            "SELECT key, value FROM state WHERE key = ? OR (key >= ? AND key < ?)",
            (FOLDED_KEY, DONE_PREFIX, DONE_PREFIX + "\U0010ffff"),
        ).fetchall()
        stale = self.spool.load({str(k): str(v) for k, v in rows})
        if stale:
            transaction(
                conn, lambda c: c.executemany("DELETE FROM state WHERE key = ?", [(k,) for k in stale])
            )

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(conn, *args)`` on the store thread."""
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, args)

    def _call(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        """On the store thread: run ``fn`` and keep track of whether the disk takes writes."""
        changes = self._conn.total_changes, self.spool.appends
        try:
            result = fn(self._conn, *args)
        except (sqlite3.Error, OSError) as exc:
            if is_disk_full(exc):
                self.disk_full_errors += 1
                if self.disk_full_since is None:
                    self.disk_full_since = time.time()
                    log.error("disk full: the store refuses writes", extra={"store": str(self.path)})
            raise
        if self.disk_full_since is not None and (self._conn.total_changes, self.spool.appends) != changes:
            log.warning(
                "disk takes writes again",
                extra={
                    "full_for_s": round(time.time() - self.disk_full_since, 1),
                    "refused": self.disk_full_errors,
                },
            )
            self.disk_full_since = None
        return result

    async def report(self) -> dict[str, Any]:
        """Integrity and sizes for a diagnostics bundle: ``PRAGMA quick_check`` (read-only, on the store thread,
        between two writes), pages, the files on disk and the spool."""

        def check(conn: sqlite3.Connection) -> dict[str, Any]:
            problem = _quick_check(conn)
            pragma = {
                k: conn.execute(f"PRAGMA {k}").fetchone()[0]
                for k in ("page_size", "page_count", "freelist_count")
            }
            return {"quick_check": problem or "ok", **pragma, "spool": self.spool.snapshot()}

        out = await self.run(check)
        files = {}
        for path in (self.path, *(self.path.with_name(self.path.name + s) for s in SIDECARS)):
            if path.exists():
                files[path.name] = path.stat().st_size
        for path in sorted(self.spool.folder.glob("*")) if self.spool.folder.is_dir() else []:
            files[f"{self.spool.folder.name}/{path.name}"] = path.stat().st_size
        return {"path": str(self.path), "schema_version": self.schema_version, **out, "files": files}

    async def close(self) -> None:
        """Finish every queued statement, checkpoint the WAL and close."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_on_thread)
        self._executor.shutdown(wait=True)

    def _close_on_thread(self) -> None:
        self.spool.close()
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
        conn.execute(
            "COMMIT"
        )  # a failed COMMIT (disk full) may leave the transaction open: rolled back below
    except BaseException:
        # SQLite may have rolled back already (a full disk does): a second ROLLBACK would hide the real error.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result
