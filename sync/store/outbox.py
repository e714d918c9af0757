"""The outbox: append-only records with durable group commit, drained by priority, deleted on acknowledge.

``append`` returns only after the records are committed (fsynced with ``synchronous=full``), so a caller
may report them as taken. Appends that arrive while a commit is in progress are gathered into the next
transaction (group commit): one fsync covers them all, and no append waits for a timer.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from fleetgate.sync.store.database import Database, transaction
from fleetgate.sync.store.records import Appended, NewRecord, Priority, StoredRecord
from fleetgate.sync.store.state import write_state


def read_boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class StreamDepth:
    stream: str
    depth: int
    last_seq: int
    oldest_wall_ns: int | None
    bytes: int = 0
    evicted: int = 0


INSERT = "INSERT INTO outbox(stream_id, seq, priority, wall_ns, mono_ns, boot, time_trusted, payload) VALUES "
ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"
CHUNK = 100
INSERT_CHUNK = INSERT + ", ".join([ROW] * CHUNK)


def insert_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert outbox rows, 100 per statement.

    executemany steps one row at a time and releases the GIL around every step; with the event loop busy in
    the other thread, each row then waits to get the GIL back (a convoy: measured 3.5k rows/s against 400k
    alone). One multi-row statement per 100 rows crosses that boundary 100 times less, and is faster alone too.
    """
    full = len(rows) - len(rows) % CHUNK
    for start in range(0, full, CHUNK):
        conn.execute(INSERT_CHUNK, list(chain.from_iterable(rows[start : start + CHUNK])))
    if full < len(rows):
        conn.executemany(INSERT + ROW, rows[full:])


@dataclass(frozen=True, slots=True)
class _Pending:
    records: Sequence[NewRecord]
    state: dict[str, str | None]  # JSON text, None to delete
    future: asyncio.Future[list[Appended]]


ROW_OVERHEAD = 64  # bytes a row costs beyond its payload (integers, index entries), for quota accounting
EVICT_CHUNK = 1000


@dataclass
class Eviction:
    """Telemetry records of one stream deleted unsent to keep it under its quota."""

    records: int = 0
    bytes: int = 0
    first_seq: int | None = None
    last_seq: int | None = None


class _Writer:
    """Store-thread state: stream ids and sequences cached after the first commit that touches them."""

    def __init__(self, boot_id: str, quotas: dict[str, int] | None = None) -> None:
        self.boot_id = boot_id
        self.quotas = quotas or {}  # stream -> bytes
        self.evictions: dict[str, Eviction] = {}  # since last taken by the daemon
        self.boot_row: int | None = None
        self.streams: dict[str, tuple[int, int]] = {}  # name -> (id, last committed seq)

    def _stream(self, conn: sqlite3.Connection, name: str) -> tuple[int, int]:
        cached = self.streams.get(name)
        if cached is not None:
            return cached
        conn.execute("INSERT OR IGNORE INTO streams(name) VALUES (?)", (name,))
        row = conn.execute("SELECT id, last_seq FROM streams WHERE name = ?", (name,)).fetchone()
        return int(row[0]), int(row[1])

    def _boot(self, conn: sqlite3.Connection) -> int:
        if self.boot_row is None:
            conn.execute("INSERT OR IGNORE INTO boots(boot_id) VALUES (?)", (self.boot_id,))
            row = conn.execute("SELECT id FROM boots WHERE boot_id = ?", (self.boot_id,)).fetchone()
            return int(row[0])
        return self.boot_row

    def write(
        self, conn: sqlite3.Connection, records: Sequence[NewRecord], state: dict[str, str | None]
    ) -> list[Appended]:
        # Sequences are taken in a local copy and published to the cache only after COMMIT succeeds,
        # so a failed transaction never burns or reuses a sequence number.
        def body(
            conn: sqlite3.Connection,
        ) -> tuple[int, dict[str, tuple[int, int]], list[Appended], dict[str, Eviction]]:
            boot = self._boot(conn)
            seqs: dict[str, tuple[int, int]] = {}
            rows = []
            appended = []
            add_row, add_appended = rows.append, appended.append
            sizes: dict[int, int] = {}
            for stream, priority, stamp, payload in records:
                stream_id, seq = seqs.get(stream) or self._stream(conn, stream)
                seq += 1
                seqs[stream] = (stream_id, seq)
                sizes[stream_id] = sizes.get(stream_id, 0) + len(payload) + ROW_OVERHEAD
                wall_ns, mono_ns, trusted = stamp
                add_row((stream_id, seq, priority, wall_ns, mono_ns, boot, trusted, payload))
                add_appended(Appended(stream, seq))
            insert_rows(conn, rows)
            conn.executemany(
                "UPDATE streams SET last_seq = ?, bytes = bytes + ? WHERE id = ?",
                [(seq, sizes[sid], sid) for sid, seq in seqs.values()],
            )
            evicted = {
                name: self._enforce_quota(conn, name, sid)
                for name, (sid, _) in seqs.items()
                if name in self.quotas
            }
            if state:
                write_state(conn, state)
            return boot, seqs, appended, evicted

        boot, seqs, appended, evicted = transaction(conn, body)
        self.boot_row = boot
        self.streams.update(seqs)
        for name, ev in evicted.items():
            if ev.records:
                total = self.evictions.setdefault(name, Eviction())
                total.records += ev.records
                total.bytes += ev.bytes
                total.first_seq = ev.first_seq if total.first_seq is None else total.first_seq
                total.last_seq = ev.last_seq
        return appended

    def _enforce_quota(self, conn: sqlite3.Connection, name: str, stream_id: int) -> Eviction:
        """Delete the stream's oldest telemetry-priority rows until it fits its quota; never anything else."""
        ev = Eviction()
        held = int(conn.execute("SELECT bytes FROM streams WHERE id = ?", (stream_id,)).fetchone()[0])
        while held > self.quotas[name]:
            oldest = conn.execute(
                "SELECT id, seq, length(payload) FROM outbox WHERE stream_id = ? AND priority = ? ORDER BY id LIMIT ?",
                (stream_id, int(Priority.TELEMETRY), EVICT_CHUNK),
            ).fetchall()
            if not oldest:
                break  # only records that are never evicted remain: the status says so
            doomed = []
            for row_id, seq, size in oldest:
                if held <= self.quotas[name]:
                    break
                doomed.append(row_id)
                held -= size + ROW_OVERHEAD
                ev.bytes += size + ROW_OVERHEAD
                ev.first_seq = seq if ev.first_seq is None else ev.first_seq
                ev.last_seq = seq
            conn.execute(
                "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(doomed),)
            )
            ev.records += len(doomed)
        if ev.records:
            conn.execute(
                "UPDATE streams SET bytes = bytes - ?, evicted = evicted + ? WHERE id = ?",
                (ev.bytes, ev.records, stream_id),
            )
        return ev


class Outbox:
    def __init__(
        self,
        db: Database,
        boot_id: str | None = None,
        max_batch: int = 5000,
        quotas: dict[str, int] | None = None,
    ) -> None:
        self._db = db
        self._writer = _Writer(boot_id or read_boot_id(), quotas)
        self.quotas = dict(quotas or {})
        self._max_batch = max_batch
        self._pending: deque[_Pending] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0
        self.records_committed = 0
        self.appended = asyncio.Event()  # set after every commit that added records (the drain waits on it)

    async def append(
        self, records: Sequence[NewRecord], state: dict[str, Any] | None = None
    ) -> list[Appended]:
        """Make ``records`` durable; returns their (stream, seq) in order.

        ``state`` sets (or, with value None, deletes) keys of the state table in the same transaction, so
        an event and the state it reports cannot part ways in a crash (a trip's completion and its state).
        """
        if not records and not state:
            return []
        encoded = {
            k: None if v is None else json.dumps(v, separators=(",", ":")) for k, v in (state or {}).items()
        }
        future: asyncio.Future[list[Appended]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(records, encoded, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="outbox-group-commit")
        # Shielded: a caller that gives up waiting does not cancel a commit others share.
        return await asyncio.shield(future)

    async def append_one(self, record: NewRecord, state: dict[str, Any] | None = None) -> Appended:
        return (await self.append([record], state))[0]

    def _take_group(self) -> list[_Pending]:
        group, count = [], 0
        while self._pending and (not group or count + len(self._pending[0].records) <= self._max_batch):
            item = self._pending.popleft()
            group.append(item)
            count += len(item.records)
        return group

    async def _flush(self) -> None:
        while self._pending:
            group = self._take_group()
            flat = [r for item in group for r in item.records]
            state: dict[str, str | None] = {}
            for item in group:
                state.update(item.state)
            try:
                appended = await self._db.run(self._writer.write, flat, state)
            except Exception as exc:
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.commits += 1
            self.records_committed += len(flat)
            if flat:
                self.appended.set()
            start = 0
            for item in group:
                if not item.future.done():
                    item.future.set_result(appended[start : start + len(item.records)])
                start += len(item.records)

    async def drain_pending(self) -> None:
        """Wait until every append made so far is committed (or failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def next_batch(self, limit: int) -> list[StoredRecord]:
        """The next ``limit`` records by priority (most urgent first), then by age."""
        return await self._db.run(_next_batch, limit)

    async def encoded_after(self, priority: int, after_id: int, limit: int) -> list[EncodedRow]:
        """The next ``limit`` records in drain order (priority, then age) after position (priority, after_id),
        each already encoded for the uplink (see SELECT_ENCODED)."""
        return await self._db.run(_select_encoded, "WHERE (o.priority, o.id) > (?, ?) ORDER BY o.priority, o.id"
                                  " LIMIT ?", (priority, after_id, limit))  # fmt: skip

    async def encoded_newest_after(self, after_id: int, limit: int) -> list[EncodedRow]:
        """Records appended after row ``after_id``, oldest first and encoded: the live edge while a backlog
        drains."""
        return await self._db.run(_select_encoded, "WHERE o.id > ? ORDER BY o.id LIMIT ?", (after_id, limit))

    async def last_id(self) -> int:
        return await self._db.run(
            lambda conn: int(conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0])
        )

    async def acknowledge(self, ids: Sequence[int]) -> int:
        """Delete acknowledged records; returns how many were still present."""
        if not ids:
            return 0
        return await self._db.run(_acknowledge, list(ids))

    async def depth(self) -> list[StreamDepth]:
        return await self._db.run(_depth)

    async def take_evictions(self) -> dict[str, Eviction]:
        """Evictions since the last call (read on the store thread, where they are made)."""

        def take(_conn: sqlite3.Connection) -> dict[str, Eviction]:
            taken, self._writer.evictions = self._writer.evictions, {}
            return taken

        return await self._db.run(take)

    async def correct_wall_times(self, offset_ns: int, before_mono_ns: int) -> int:
        """Records of this boot taken before ``before_mono_ns`` with untrusted wall time get
        ``wall_ns = mono_ns + offset_ns`` and are marked corrected; returns how many."""
        await self.drain_pending()
        return await self._db.run(_correct_wall_times, self._writer.boot_id, offset_ns, before_mono_ns)


def _next_batch(conn: sqlite3.Connection, limit: int) -> list[StoredRecord]:
    return _select(conn, "ORDER BY o.priority, o.id LIMIT ?", (limit,))


SELECT_RECORDS = (
    "SELECT o.id, s.name, o.seq, o.priority, o.wall_ns, o.mono_ns, b.boot_id, o.time_trusted, o.time_corrected,"
    " o.payload FROM outbox o JOIN streams s ON s.id = o.stream_id JOIN boots b ON b.id = o.boot "
)


def _select(conn: sqlite3.Connection, tail: str, params: tuple[Any, ...]) -> list[StoredRecord]:
    """``tail`` is one of this module's constant clauses; values only ever travel as parameters."""
    rows = conn.execute(SELECT_RECORDS + tail, params).fetchall()
    return [
        StoredRecord(
            id_, stream, seq, Priority(prio), wall, mono, boot, bool(trusted), bool(fixed), bytes(payload)
        )
        for id_, stream, seq, prio, wall, mono, boot, trusted, fixed, payload in rows
    ]


# One record of the uplink envelope (docs/mqtt.md), made by SQLite on the store thread, which releases the
# GIL while it steps: the event loop does not pay for it (in Python, ~3 us per record on the loop).
# json_quote writes what json.dumps does for the ASCII boot ids (/proc's UUID, or "unknown").
SELECT_ENCODED = (
    "SELECT o.id, s.name, o.priority, CAST('{\"seq\":' || o.seq"
    " || ',\"ts\":\"' || strftime('%Y-%m-%dT%H:%M:%S', o.wall_ns / 1000000000, 'unixepoch')"
    ' || printf(\'.%03dZ","wall_ns":\', o.wall_ns / 1000000 % 1000) || o.wall_ns'
    " || ',\"mono_ns\":' || o.mono_ns || ',\"boot\":' || json_quote(b.boot_id)"
    " || CASE WHEN o.time_trusted THEN ',\"trusted\":true' ELSE ',\"trusted\":false' END"
    " || CASE WHEN o.time_corrected THEN ',\"corrected\":true' ELSE ',\"corrected\":false' END"
    " || ',\"data\":' || o.payload || '}' AS BLOB)"
    " FROM outbox o JOIN streams s ON s.id = o.stream_id JOIN boots b ON b.id = o.boot "
)
EncodedRow = tuple[int, str, int, bytes]  # id, stream, priority, encoded record


def _select_encoded(conn: sqlite3.Connection, tail: str, params: tuple[Any, ...]) -> list[EncodedRow]:
    return conn.execute(SELECT_ENCODED + tail, params).fetchall()


def _runs(ids: list[int]) -> list[list[int]]:
    """Ids as [first, last] runs of consecutive ids: what a drain acknowledges is mostly one run."""
    ids = sorted(ids)
    runs = [[ids[0], ids[0]]]
    for i in ids[1:]:
        if i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


ACKED = (
    "FROM json_each(?) r JOIN outbox o"
    " ON o.id BETWEEN json_extract(r.value, '$[0]') AND json_extract(r.value, '$[1]')"
)
ACKED_FREED = f"SELECT o.stream_id, count(*), sum(length(o.payload)) {ACKED} GROUP BY o.stream_id"
ACKED_DELETE = f"DELETE FROM outbox WHERE id IN (SELECT o.id {ACKED})"  # noqa: S608 (constant SQL, values bound)


def _acknowledge(conn: sqlite3.Connection, ids: list[int]) -> int:
    # Set-wise statements only: a statement stepped once per row from Python (executemany, RETURNING) hands
    # the GIL to the busy event loop and waits to get it back, once per row.
    runs = json.dumps(_runs(ids))

    def body(conn: sqlite3.Connection) -> int:
        freed = conn.execute(ACKED_FREED, (runs,)).fetchall()
        conn.execute(ACKED_DELETE, (runs,))
        conn.executemany(
            "UPDATE streams SET bytes = bytes - ? WHERE id = ?",
            [(size + n * ROW_OVERHEAD, sid) for sid, n, size in freed],
        )
        return sum(n for _, n, _ in freed)

    return transaction(conn, body)


def _correct_wall_times(conn: sqlite3.Connection, boot_id: str, offset_ns: int, before_mono_ns: int) -> int:
    def body(conn: sqlite3.Connection) -> int:
        cur = conn.execute(
            "UPDATE outbox SET wall_ns = mono_ns + ?, time_corrected = 1"
            " WHERE boot = (SELECT id FROM boots WHERE boot_id = ?) AND time_trusted = 0 AND mono_ns < ?",
            (offset_ns, boot_id, before_mono_ns),
        )
        return cur.rowcount

    return transaction(conn, body)


def _depth(conn: sqlite3.Connection) -> list[StreamDepth]:
    rows = conn.execute(
        "SELECT s.name, s.last_seq,"
        " (SELECT count(*) FROM outbox o WHERE o.stream_id = s.id),"
        " (SELECT o.wall_ns FROM outbox o WHERE o.stream_id = s.id ORDER BY o.id LIMIT 1), s.bytes, s.evicted"
        " FROM streams s ORDER BY s.name"
    ).fetchall()
    return [
        StreamDepth(name, int(depth), int(last), oldest, int(size), int(evicted))
        for name, last, depth, oldest, size, evicted in rows
    ]
