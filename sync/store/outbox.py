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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from fleetgate.sync.store import segments
from fleetgate.sync.store.database import Database, transaction
from fleetgate.sync.store.hot import ID_SPACE, SEQ_BLOCK, HotRecord, HotTier, SkippedSeqs, split_hot_id
from fleetgate.sync.store.records import ROW_OVERHEAD, Appended, Eviction, NewRecord, Priority, StoredRecord
from fleetgate.sync.store.segments import Pack, Sealed, Segment
from fleetgate.sync.store.spool import NewMessage, Spool, SpoolMessage, is_spool_id
from fleetgate.sync.store.state import write_state
from fleetgate.sync.store.wire import SELECT_ENCODED, EncodedRow


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
    packed: int = 0  # of depth, records sealed in segments (sync/store/segments.py)


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


EVICT_CHUNK = 1000
NO_PRIORITY = 1 << 31  # above every priority
# (stream, [(seq, wall_ns, encoded record)]) -> the sealed messages holding them (sync/mqtt/packer.py).
SpillSealer = Callable[[str, list[tuple[int, int, bytes]]], list[segments.SpilledMessage]]


@dataclass
class Spill:
    """Hot records of one stream on their way to the store (``Outbox.spill``)."""

    stream: str
    records: list[HotRecord]
    last_seq: int  # the stream's committed seq is raised to at least this (a clean stop: the last handed out)
    device: str = ""
    sealer: Callable[[Sequence[HotRecord]], list[segments.SpilledMessage]] | None = None

    @property
    def top(self) -> int:
        return max(self.last_seq, max((r.seq for r in self.records), default=0))


HOT_RESERVED_PREFIX = "outbox.hot-reserved/"  # state key per hot stream: the last seq reserved on disk


class _Writer:
    """Store-thread state: stream ids and sequences cached after the first commit that touches them."""

    def __init__(self, boot_id: str, spool: Spool, quotas: dict[str, int] | None = None) -> None:
        self.boot_id = boot_id
        self.spool = spool
        self.quotas = quotas or {}  # stream -> bytes
        self.evictions: dict[str, Eviction] = {}  # since last taken by the daemon
        self.boot_row: int | None = None
        self.streams: dict[str, tuple[int, int]] = {}  # name -> (id, last committed seq)
        self.sealed_spills = 0  # spills stored sealed, in the spool
        self._evicted_spooled: list[SpoolMessage] = []  # by the transaction under way (_enforce_quota)

    def _commit(self, conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """``transaction``, and what it did to the spool (quota evictions) applied once it committed."""
        self._evicted_spooled = []
        result = transaction(conn, body)
        if self._evicted_spooled:
            self.spool.forget(self._evicted_spooled)
            self._evicted_spooled = []
        return result

    def _write_state(self, conn: sqlite3.Connection, state: dict[str, str | None]) -> dict[str, str | None]:
        """Write ``state`` with every value still only in the spool (in the caller's transaction); returns
        what to hand to ``Spool.folded`` after the commit."""
        folded = self.spool.fold(state)
        if folded:
            write_state(conn, folded)
        return folded

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
            folded = self._write_state(conn, state) if state else {}
            return boot, seqs, appended, evicted, folded

        boot, seqs, appended, evicted, folded = self._commit(conn, body)
        self.spool.folded(folded)
        self.boot_row = boot
        self.streams.update(seqs)
        for name, ev in evicted.items():
            if ev.records:
                self.evictions.setdefault(name, Eviction()).add(
                    ev.records, ev.bytes, ev.first_seq, ev.last_seq
                )
        return appended

    def hot_start(self, conn: sqlite3.Connection, stream: str) -> tuple[int, int]:
        """(last committed seq, last reserved seq) of a hot stream; the committed one is raised to the
        reservation, so numbers an unclean stop left reserved are never handed out again."""

        def body(conn: sqlite3.Connection) -> tuple[int, int, int]:
            stream_id, last = self._stream(conn, stream)
            last = max(last, self.spool.top(stream))  # numbers held sealed in the spool are no gap
            row = conn.execute(
                "SELECT value FROM state WHERE key = ?", (HOT_RESERVED_PREFIX + stream,)
            ).fetchone()
            try:
                reserved = int(json.loads(row[0])) if row is not None else 0
            except (TypeError, ValueError):
                reserved = 0  # unreadable: nothing beyond the committed seq can be proven handed out
            if reserved > last:
                conn.execute("UPDATE streams SET last_seq = ? WHERE id = ?", (reserved, stream_id))
            return stream_id, last, reserved

        stream_id, last, reserved = transaction(conn, body)
        self.streams[stream] = (stream_id, max(last, reserved))
        return last, reserved

    def write_spill(
        self,
        conn: sqlite3.Connection,
        spills: Sequence[Spill],
        state: dict[str, str | None],
        state_in_spool: bool = False,
    ) -> None:
        """Hot records of one or more streams, numbered already, made durable; each stream's committed seq
        raised to its ``last_seq``.

        A spill with a sealer goes to the spool as the sealed messages the sealer makes of its records (one
        record for all of them: spool.py), unless the stream has rows, which sealed messages must not be
        newer than (segments.py); the others go to the outbox as rows, in one transaction. ``state`` goes
        with the rows, or into the spool record if ``state_in_spool`` and there are no rows to write.

        Raises ``SpillFailed`` naming the streams that were written when only the spool's part was."""
        sealed = [s for s in spills if s.sealer is not None and s.records and not self._has_rows(conn, s)]
        rows = [s for s in spills if all(s is not t for t in sealed)]
        spool_state = state if state_in_spool and not any(s.records for s in rows) else {}
        messages = [
            NewMessage(spill.stream, spill.device, message)
            for spill in sealed
            for message in spill.sealer(spill.records)  # type: ignore[misc]
        ]
        if messages or spool_state:
            self.spool.append(messages, spool_state)
            self.sealed_spills += len(sealed)
        db_state = {} if spool_state else state
        if not rows and not db_state and not any(s.stream in self.quotas for s in sealed):
            return
        try:
            self._write_spilled_rows(conn, rows, sealed, db_state)
        except BaseException as exc:
            if sealed:
                raise SpillFailed([s.stream for s in sealed]) from exc
            raise

    def _has_rows(self, conn: sqlite3.Connection, spill: Spill) -> bool:
        stream_id, _ = self._stream(conn, spill.stream)
        return segments.has_rows(conn, stream_id)

    def _write_spilled_rows(
        self,
        conn: sqlite3.Connection,
        spills: Sequence[Spill],
        spooled: Sequence[Spill],
        state: dict[str, str | None],
    ) -> None:
        def body(conn: sqlite3.Connection) -> tuple[int, dict[str, Eviction], dict[str, str | None]]:
            boot = self._boot(conn)
            evicted: dict[str, Eviction] = {}
            for spill in spills:
                stream_id, _ = self._stream(conn, spill.stream)
                size = self._spill_rows(conn, stream_id, boot, spill.records)
                # Never behind a stored record: the store's integrity check at start says so (and moves aside
                # a database whose seqs would repeat).
                conn.execute(
                    "UPDATE streams SET last_seq = max(last_seq, ?), bytes = bytes + ? WHERE id = ?",
                    (spill.top, size, stream_id),
                )
            for spill in [*spills, *spooled]:
                if spill.stream in self.quotas:
                    stream_id, _ = self._stream(conn, spill.stream)
                    evicted[spill.stream] = self._enforce_quota(conn, spill.stream, stream_id)
            folded = self._write_state(conn, state) if state else {}
            return boot, evicted, folded

        boot, evicted, folded = self._commit(conn, body)
        self.spool.folded(folded)
        self.boot_row = boot
        for spill in spills:
            stream_id, last = self.streams.get(spill.stream, (None, 0))
            if stream_id is not None:
                self.streams[spill.stream] = (stream_id, max(last, spill.top))
        for stream, ev in evicted.items():
            if ev.records:
                self.evictions.setdefault(stream, Eviction()).add(
                    ev.records, ev.bytes, ev.first_seq, ev.last_seq
                )

    @staticmethod
    def _spill_rows(conn: sqlite3.Connection, stream_id: int, boot: int, records: Sequence[HotRecord]) -> int:
        prio = int(Priority.TELEMETRY)
        insert_rows(
            conn,
            [(stream_id, r.seq, prio, r.wall_ns, r.mono_ns, boot, r.trusted, r.payload) for r in records],
        )
        corrected = [r.seq for r in records if r.corrected]
        if corrected:
            conn.execute(
                "UPDATE outbox SET time_corrected = 1 WHERE stream_id = ? AND seq IN"
                " (SELECT value FROM json_each(?))",
                (stream_id, json.dumps(corrected)),
            )
        return sum(len(r.payload) + ROW_OVERHEAD for r in records)

    def _enforce_quota(self, conn: sqlite3.Connection, name: str, stream_id: int) -> Eviction:
        """Delete the stream's oldest telemetry until it fits its quota, oldest first: its segments, its
        messages in the spool (newer than its segments, older than its rows), then its telemetry-priority
        rows; never anything else."""
        ev = Eviction()
        quota = self.quotas[name]
        start = int(conn.execute("SELECT bytes FROM streams WHERE id = ?", (stream_id,)).fetchone()[0])
        spooled = self.spool.held().get(name, [])
        in_spool = sum(m.held_bytes for m in spooled)
        if start + in_spool <= quota:
            return ev
        held = segments.evict_oldest(conn, stream_id, start, quota - in_spool, ev)
        doomed = []
        for message in spooled:
            if held + in_spool <= quota:
                break
            doomed.append(message.id)
            in_spool -= message.held_bytes
            ev.add(message.records, message.held_bytes, message.first_seq, message.last_seq)
        if doomed:
            changes, gone = self.spool.done_changes(doomed)
            write_state(conn, changes)
            self._evicted_spooled.extend(gone)
        while held + in_spool > quota:
            oldest = conn.execute(
                "SELECT id, seq, length(payload) FROM outbox WHERE stream_id = ? AND priority = ? ORDER BY id LIMIT ?",
                (stream_id, int(Priority.TELEMETRY), EVICT_CHUNK),
            ).fetchall()
            if not oldest:
                break  # only records that are never evicted remain: the status says so
            doomed = []
            for row_id, seq, size in oldest:
                if held + in_spool <= quota:
                    break
                doomed.append(row_id)
                held -= size + ROW_OVERHEAD
                ev.add(1, size + ROW_OVERHEAD, seq, seq)
            conn.execute(
                "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(doomed),)
            )
        if ev.records:
            conn.execute(
                "UPDATE streams SET bytes = bytes - ?, evicted = evicted + ? WHERE id = ?",
                (start - held, ev.records, stream_id),
            )
        return ev


class SpillFailed(Exception):
    """A spill's sealed part reached the spool, its rows did not reach the database (the cause is chained):
    the records of ``streams`` are durable and must not be written again."""

    def __init__(self, streams: list[str]) -> None:
        super().__init__(f"spill half written: sealed {', '.join(streams)}, rows not stored")
        self.streams = streams


class Outbox:
    def __init__(
        self,
        db: Database,
        boot_id: str | None = None,
        max_batch: int = 5000,
        quotas: dict[str, int] | None = None,
    ) -> None:
        self._db = db
        self._writer = _Writer(boot_id or read_boot_id(), db.spool, quotas)
        self.quotas = dict(quotas or {})
        self._max_batch = max_batch
        self._pending: deque[_Pending] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0
        self.records_committed = 0
        self.appended = asyncio.Event()  # set after every commit that added records (the drain waits on it)
        self.hot: dict[str, HotTier] = {}  # by stream: live records in memory until acknowledged (hot.py)
        self._hot_lock = asyncio.Lock()
        self._spill_sealer: tuple[str, SpillSealer] | None = None
        self.offline = False  # as the last spill was told: the uplink is not connected
        self._deferred: dict[
            str, Any
        ] = {}  # checkpoints waiting for the next offline spill (checkpoint_state)

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

    # -- the hot tiers (sync/store/hot.py) ------------------------------------------------------------------

    async def enable_hot(
        self, stream: str, window_s: float, max_records: int, offline_window_s: float = 0.0
    ) -> SkippedSeqs | None:
        """Keep ``stream``'s records in memory until acknowledged or ``window_s`` old (``offline_window_s``
        while the uplink is not connected: ``spill(offline=True)``); returns the numbers an unclean stop left
        reserved and unaccounted for (reported by the caller), if any."""
        if stream in self.hot or len(self.hot) >= ID_SPACE:
            raise ValueError(f"stream {stream!r} already has a hot tier, or there are {ID_SPACE} of them")
        await self.drain_pending()
        last, reserved = await self._db.run(self._writer.hot_start, stream)
        tier = HotTier(stream, self._writer.boot_id, window_s, max_records, len(self.hot), offline_window_s)
        tier.next_seq = max(last, reserved) + 1
        tier.reserved = max(last, reserved)
        self.hot[stream] = tier
        return SkippedSeqs(stream, last + 1, reserved) if reserved > last else None

    def seal_spills(self, device: str, sealer: SpillSealer) -> None:
        """From now on, live records spilled with their wall time settled and none in flight are stored as
        ``sealer`` packs them, sealed messages for ``device`` (segments), instead of as rows the packer would
        read, pack and delete again: written once, ~4x smaller (tools/bench/footprint.py)."""
        self._spill_sealer = (device, sealer)

    @property
    def sealed_spills(self) -> int:
        return self._writer.sealed_spills

    def hot_tier(self, index: int) -> HotTier | None:
        return next((t for t in self.hot.values() if t.index == index), None)

    async def append_hot(self, records: Sequence[NewRecord]) -> None:
        """Records of one stream: with a hot tier, numbered and kept in memory, the drain woken; without, a
        durable ``append``."""
        if not records:
            return
        tier = self.hot.get(records[0].stream)
        if tier is None or any(r.stream != tier.stream for r in records):
            await self.append(records)
            return
        async with self._hot_lock:
            needed = tier.next_seq + len(records) - 1
            if needed > tier.reserved:
                upto = needed + SEQ_BLOCK
                await self.append([], {HOT_RESERVED_PREFIX + tier.stream: upto})
                tier.reserved = upto
            tier.add(records)
        self.appended.set()

    async def spill(
        self, everything: bool = False, offline: bool = False, state: dict[str, str | None] | None = None
    ) -> int:
        """Write the hot records that are due (``everything``: all, and each reservation given back, as at a
        clean stop; ``offline``: the uplink is not connected) to the store, in one commit; returns how many.

        When one stream's records are due, the others' waiting records go along: a write costs whole pages
        whatever it holds, so the heartbeat's one record a minute must not cost one of its own. ``state``
        (values as JSON text) is written with them, in the spool's record if they all go there, and makes
        every waiting record go along."""
        self.offline = offline
        if not offline and not everything and self._deferred:
            await self._flush_deferred()  # back online: the checkpoint kept for the next spill goes now
        async with self._hot_lock:
            await self.drain_pending()  # after every append made so far: rows keep the seq order
            due = {tier.stream: tier.spillable(everything, offline) for tier in self.hot.values()}
            if not everything and not state and not any(due.values()):
                return 0
            spills: list[Spill] = []
            carried = dict(self._deferred)  # checkpoints waiting for this write (checkpoint_state)
            state = {k: _json_text(v) for k, v in carried.items()} | dict(state or {})
            in_spool = bool(state) and not everything
            for tier in self.hot.values():
                records = due[tier.stream] or tier.spillable(along=True)
                last_seq = 0
                if everything:
                    last_seq = tier.next_seq - 1
                    state[HOT_RESERVED_PREFIX + tier.stream] = json.dumps(last_seq)
                elif not records:
                    continue
                spills.append(self._spill_of(tier, records, last_seq))
            for spill in spills:
                for record in spill.records:
                    record.spilling = True  # the drain must not take them while they are being written
            try:
                await self._db.run(self._writer.write_spill, spills, state, in_spool)
            except SpillFailed as exc:  # the sealed part is durable: never written twice
                for spill in spills:
                    if spill.stream in exc.streams:
                        self.hot[spill.stream].spilled_now(spill.records)
                raise
            finally:
                for spill in spills:
                    for record in spill.records:
                        record.spilling = False
            self._deferred = {k: v for k, v in self._deferred.items() if carried.get(k) is not v}
            for spill in spills:
                tier = self.hot[spill.stream]
                tier.spilled_now(spill.records)
                if everything:
                    tier.reserved = spill.last_seq
            count = sum(len(spill.records) for spill in spills)
            self.commits += 1
            self.records_committed += count
            if count:
                self.appended.set()
            return count

    async def checkpoint_state(self, key: str, value: Any) -> None:
        """Save a value rewritten periodically (a trip's statistics). Online, a commit. Offline it waits for
        the next spill of the live records (within ``offline_window_s``) and goes in the same spool record
        (spool.py): a checkpoint a minute would otherwise cost a write of its own, as much flash as the
        minute's readings. So offline a power cut loses at most the offline window of it, as of the readings."""
        if self.offline and self._spill_sealer is not None and self.hot:
            self._deferred[key] = value
            await self.spill(offline=True)  # written now only if readings are due anyway
        else:
            self._deferred.pop(key, None)
            await self.append([], {key: value})

    async def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, {}
        try:
            await self.append([], deferred)
        except BaseException:
            self._deferred = deferred | self._deferred  # kept for the next try
            raise

    def _spill_of(self, tier: HotTier, records: list[HotRecord], last_seq: int) -> Spill:
        """Sealed when a sealer is set, none of the records is in flight (its acknowledgement deletes a row by
        seq) and every wall time is settled (a segment's bytes cannot be corrected)."""
        if self._spill_sealer is None or not all(
            not r.in_flight and (r.trusted or r.corrected) for r in records
        ):
            return Spill(tier.stream, records, last_seq)
        device, sealer = self._spill_sealer

        def seal(rs: Sequence[HotRecord]) -> list[segments.SpilledMessage]:
            return sealer(tier.stream, [(r.seq, r.wall_ns, tier.encode(r)) for r in rs])

        return Spill(tier.stream, records, last_seq, device, seal)

    def release_hot(self, ids: Sequence[int]) -> None:
        """The drain stopped with these (negative) ids in flight, unacknowledged."""
        for index, seqs in _by_tier(ids).items():
            if (tier := self.hot_tier(index)) is not None:
                tier.release(seqs)

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

    async def encoded_after(
        self, priority: int, after_id: int, limit: int, below: int | None = None
    ) -> list[EncodedRow]:
        """The next ``limit`` records in drain order (priority, then age) after position (priority, after_id),
        of priorities below ``below`` if given, each already encoded for the uplink (``wire.SELECT_ENCODED``)."""
        return await self._db.run(_encoded_after, priority, after_id, limit, below)

    async def encoded_newest_after(self, after_id: int, limit: int) -> list[EncodedRow]:
        """Records appended after row ``after_id``, oldest first and encoded: the live edge while a backlog
        drains."""
        return await self._db.run(_select_encoded, "WHERE o.id > ? ORDER BY o.id LIMIT ?", (after_id, limit))

    async def last_id(self) -> int:
        return await self._db.run(
            lambda conn: int(conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0])
        )

    async def acknowledge(self, ids: Sequence[int], segment_ids: Sequence[int] = ()) -> int:
        """Delete acknowledged records (row ids; negative: ``-seq`` of a hot record) and segments; returns how
        many records were still present."""
        rows = [i for i in ids if i > 0]
        forgotten = 0
        for index, seqs in _by_tier(ids).items():
            tier = self.hot_tier(index)
            if tier is None:
                continue
            before = len(tier.records)
            spilled = tier.acknowledged(seqs)
            forgotten += before - len(tier.records) - len(spilled)
            if spilled:  # spilled while in flight: the row goes too
                forgotten += await self._db.run(_acknowledge_seqs, tier.stream, spilled)
        if not rows and not segment_ids:
            return forgotten
        return forgotten + await self._db.run(_acknowledge, self._writer.spool, rows, list(segment_ids))

    async def seal_next(self, pack: Pack, max_bytes: int, device: str) -> Sealed | None:
        """Replace a full message's worth of a stream's oldest telemetry rows by one segment, packed by
        ``pack`` for ``device`` (see sync/store/segments.py); None when no stream has that many sealable
        rows."""
        spool = self._writer.spool
        return await self._db.run(
            lambda conn: segments.seal_next(
                conn, self._writer.boot_id, device, pack, max_bytes, spool.streams()
            )
        )

    async def segments_after(self, after_id: int, limit: int) -> list[Segment]:
        """Sealed messages in drain order after ``after_id``: the database's segments, then the spool's
        (spool ids sort after every segment id, and a stream's spooled messages are newer than its segments)."""
        return await self._db.run(_segments_after, self._writer.spool, after_id, limit)

    def spool_snapshot(self) -> dict[str, Any]:
        return self._writer.spool.snapshot()

    async def depth(self) -> list[StreamDepth]:
        depths = {d.stream: d for d in await self._db.run(_depth, self._writer.spool)}
        for tier in self.hot.values():
            if tier.next_seq == 1 and not tier.records:
                continue  # (one that handed out numbers counts even when empty: last_seq never drops)
            d = depths.get(tier.stream) or StreamDepth(tier.stream, 0, 0, None)
            oldest = tier.oldest_wall_ns()
            if oldest is None or (d.oldest_wall_ns is not None and d.oldest_wall_ns < oldest):
                oldest = d.oldest_wall_ns
            depths[tier.stream] = StreamDepth(
                d.stream, d.depth + tier.held(), max(d.last_seq, tier.next_seq - 1), oldest,
                d.bytes, d.evicted, d.packed,
            )  # fmt: skip
        return [depths[name] for name in sorted(depths)]

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
        in_memory = sum(tier.correct(offset_ns, before_mono_ns) for tier in self.hot.values())
        return in_memory + await self._db.run(
            _correct_wall_times, self._writer.boot_id, offset_ns, before_mono_ns
        )


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


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


def _encoded_after(
    conn: sqlite3.Connection, priority: int, after_id: int, limit: int, below: int | None
) -> list[EncodedRow]:
    # Two range scans of the (priority, id) index: the rest of this priority, then the priorities after it.
    rows = conn.execute(
        SELECT_ENCODED + "WHERE o.priority = ? AND o.id > ? ORDER BY o.id LIMIT ?",
        (priority, after_id, limit),
    ).fetchall()
    if len(rows) < limit:
        rows += conn.execute(
            SELECT_ENCODED + "WHERE o.priority > ? AND o.priority < ? ORDER BY o.priority, o.id LIMIT ?",
            (priority, NO_PRIORITY if below is None else below, limit - len(rows)),
        ).fetchall()
    return rows


def _segments_after(conn: sqlite3.Connection, spool: Spool, after_id: int, limit: int) -> list[Segment]:
    out = [] if is_spool_id(after_id) else segments.select_after(conn, after_id, limit)
    if len(out) < limit:
        out += [
            Segment(m.id, m.stream, m.device, m.records, m.compressed, payload)
            for m, payload in spool.after(max(after_id, 0), limit - len(out))
        ]
    return out


def _acknowledge(conn: sqlite3.Connection, spool: Spool, ids: list[int], segment_ids: list[int]) -> int:
    # Set-wise statements only: a statement stepped once per row from Python (executemany, RETURNING) hands
    # the GIL to the busy event loop and waits to get it back, once per row.
    runs = json.dumps(_runs(ids)) if ids else None
    spool_done, spooled = spool.done_changes(i for i in segment_ids if is_spool_id(i))
    segment_ids = [i for i in segment_ids if not is_spool_id(i)]
    # Every value still only in the spool goes to the table now, so a file emptied here can be deleted.
    spool_done = spool.fold(spool_done) if spool_done else {}

    def body(conn: sqlite3.Connection) -> int:
        freed: dict[int, tuple[int, int]] = {}
        if runs is not None:
            for sid, n, size in conn.execute(ACKED_FREED, (runs,)).fetchall():
                freed[sid] = (n, size + n * ROW_OVERHEAD)
            conn.execute(ACKED_DELETE, (runs,))
        if segment_ids:
            for sid, (n, size) in segments.delete(conn, segment_ids).items():
                had = freed.get(sid, (0, 0))
                freed[sid] = (had[0] + n, had[1] + size)
        conn.executemany(
            "UPDATE streams SET bytes = bytes - ? WHERE id = ?",
            [(size, sid) for sid, (_, size) in freed.items()],
        )
        write_state(conn, spool_done)
        return sum(n for n, _ in freed.values()) + sum(m.records for m in spooled)

    # What is deleted here the cloud already has: overwriting it on the freelist (Debian builds SQLite with
    # secure_delete on) would double the flash writes of draining a backlog, and halve the drain's speed
    # (tools/bench/drain.py). FAST still scrubs b-tree pages; freed overflow pages keep traces until reused.
    # Every other delete (eviction, sealing, state) keeps the connection's setting. See docs/security.md.
    before = conn.execute("PRAGMA secure_delete").fetchone()[0]
    conn.execute("PRAGMA secure_delete = FAST")
    try:
        acknowledged = transaction(conn, body)
    finally:
        conn.execute(f"PRAGMA secure_delete = {int(before)}")
    spool.folded(spool_done)
    spool.forget(spooled)
    return acknowledged


def _by_tier(ids: Sequence[int]) -> dict[int, list[int]]:
    """Hot ids (negative) as seqs by tier index."""
    out: dict[int, list[int]] = {}
    for record_id in ids:
        if record_id < 0:
            index, seq = split_hot_id(record_id)
            out.setdefault(index, []).append(seq)
    return out


def _acknowledge_seqs(conn: sqlite3.Connection, stream: str, seqs: list[int]) -> int:
    """Delete a stream's rows by seq (hot records spilled while in flight, then acknowledged)."""

    def body(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT id FROM streams WHERE name = ?", (stream,)).fetchone()
        if row is None:
            return 0
        match = "FROM outbox WHERE stream_id = ? AND seq IN (SELECT value FROM json_each(?))"
        params = (row[0], json.dumps(seqs))
        n, size = conn.execute(
            f"SELECT count(*), coalesce(sum(length(payload)), 0) {match}", params
        ).fetchone()
        conn.execute(f"DELETE {match}", params)
        conn.execute("UPDATE streams SET bytes = bytes - ? WHERE id = ?", (size + n * ROW_OVERHEAD, row[0]))
        return int(n)

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


def _depth(conn: sqlite3.Connection, spool: Spool) -> list[StreamDepth]:
    """Per stream: the database's rows and segments, and the spool's messages (older than the rows)."""
    depths = {d.stream: d for d in _depth_in_database(conn)}
    for stream, held in spool.held().items():
        d = depths.get(stream) or StreamDepth(stream, 0, 0, None)
        records = sum(m.records for m in held)
        oldest = d.oldest_wall_ns if d.packed else held[0].first_wall_ns  # segments are older still
        depths[stream] = StreamDepth(
            stream, d.depth + records, max(d.last_seq, max(m.last_seq for m in held)),
            oldest if oldest is not None else held[0].first_wall_ns,
            d.bytes + sum(m.held_bytes for m in held), d.evicted, d.packed + records,
        )  # fmt: skip
    return [depths[name] for name in sorted(depths)]


def _depth_in_database(conn: sqlite3.Connection) -> list[StreamDepth]:
    # A stream's segments are older than its rows (segments.py), so the oldest record is in its first one.
    rows = conn.execute(
        "SELECT s.name, s.last_seq,"
        " (SELECT count(*) FROM outbox o WHERE o.stream_id = s.id),"
        " (SELECT coalesce(sum(g.records), 0) FROM segments g WHERE g.stream_id = s.id),"
        " coalesce((SELECT g.first_wall_ns FROM segments g WHERE g.stream_id = s.id ORDER BY g.id LIMIT 1),"
        " (SELECT o.wall_ns FROM outbox o WHERE o.stream_id = s.id ORDER BY o.id LIMIT 1)), s.bytes, s.evicted"
        " FROM streams s ORDER BY s.name"
    ).fetchall()
    return [
        StreamDepth(name, int(depth) + int(packed), int(last), oldest, int(size), int(evicted), int(packed))
        for name, last, depth, packed, oldest, size, evicted in rows
    ]
