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
import struct
from pathlib import Path
from typing import BinaryIO

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


# The write-ahead log's format (https://sqlite.org/fileformat.html#the_write_ahead_log): a 32-byte header, then
# frames of a 24-byte header and one page, each checksummed cumulatively from the header's checksum on.
WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksum words little- or big-endian
WAL_VERSION = 3007000
WAL_VERIFY_MAX_BYTES = 256 * 2**20  # past this (a WAL checkpoints at ~4 MB) the frames are not verified


def _checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    for x0, x1 in struct.iter_unpack(">II" if big_endian else "<II", data):
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return s0, s1


def wal_problem(wal: Path) -> str | None:
    """What SQLite will silently skip when it replays this WAL, if that may hold committed data; else None.

    SQLite replays frames up to the last commit whose checksums chain and whose salts match the header, and drops
    the rest without a word. That is right for a transaction a crash cut short; it is data loss when the header is
    damaged, when a frame in the middle is, or when the file was cut. Read before SQLite opens the database.
    """
    try:
        size = wal.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    if size > WAL_VERIFY_MAX_BYTES:
        return None
    with wal.open("rb") as file:  # frame by frame: memory stays one page, whatever the WAL's size
        return _walk(file, size)


def _walk(file: BinaryIO, size: int) -> str | None:
    header = file.read(32)
    if len(header) < 32:
        return f"WAL header torn ({len(header)} bytes): none of it replayed"
    magic, version, page_size, _, salt1, salt2, c0, c1 = struct.unpack(">8I", header)
    big_endian = magic == WAL_MAGIC[1]
    if (
        magic not in WAL_MAGIC
        or version != WAL_VERSION
        or page_size < 512
        or page_size > 65536
        or page_size & (page_size - 1)
        or _checksum(header[:24], big_endian) != (c0, c1)
    ):
        return f"WAL header damaged: {size} bytes not replayed"
    frame_size = 24 + page_size
    salts = (salt1, salt2)
    s0, s1 = c0, c1
    frames = (size - 32) // frame_size
    for index in range(frames):
        frame = file.read(frame_size)
        _, _, f_salt1, f_salt2, f0, f1 = struct.unpack(">6I", frame[:24])
        if (f_salt1, f_salt2) != salts:
            return None  # frames of an earlier generation: already checkpointed, rightly ignored
        s0, s1 = _checksum(frame[:8], big_endian, s0, s1)
        s0, s1 = _checksum(frame[24:], big_endian, s0, s1)
        if (s0, s1) != (f0, f1):
            lost = _commits(frame, salts) + sum(
                _commits(file.read(frame_size), salts) for _ in range(index + 1, frames)
            )
            if lost:
                return (
                    f"WAL damaged at frame {index + 1}: {lost} committed transactions after it not replayed"
                )
            return None  # a transaction a crash cut short: nothing committed is lost
    if (size - 32) % frame_size:
        return (
            f"WAL ends in a partial frame ({(size - 32) % frame_size} bytes after frame {frames}): "
            "a write torn by power loss, or a file cut short"
        )
    return None


def _commits(frame: bytes, salts: tuple[int, int]) -> bool:
    """Whether ``frame`` ends a transaction of the WAL generation with these salts."""
    _, commit_size, salt1, salt2 = struct.unpack_from(">4I", frame)
    return commit_size != 0 and (salt1, salt2) == salts


def empty_file_problem(db: Path) -> str | None:
    """A database file of 0 bytes: SQLite would take it for a new, empty database and say nothing."""
    try:
        size = db.stat().st_size
    except FileNotFoundError:
        return None
    return "database file is empty (0 bytes): cut short or replaced" if size == 0 else None
