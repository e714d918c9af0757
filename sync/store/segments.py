"""Sealed segments: a message's worth of a stream's oldest telemetry, packed while the uplink is down.

A backlog built offline is a long run of small rows. Drained row by row, every record is read, packed,
compressed and deleted at the moment coverage returns, which is when time on the link is scarcest. So while
there is no link, the packer (``fleetgate.sync.mqtt.packer``) replaces each full message's worth of a stream's
oldest telemetry rows with one segment: the uplink message (docs/mqtt.md) exactly as it will be published,
with its seq range and record count. When the link is back the drain publishes segments as they are and
deletes one row per message. Compressed at leisure, a segment also holds ~5x less disk than its rows
(tools/bench/drain.py: 126 MB of rows became 26 MB), so the same quota keeps a longer outage.

What keeps the outbox's promises:

- One transaction inserts the segment and deletes its rows: a crash leaves one or the other, never both or
  neither.
- Only a prefix of a stream's telemetry-priority rows, in id order, and only a full message of them: a
  stream's segments are always older than its rows, so eviction stays oldest-first and the tail (less than
  a message) waits as rows for the live lane.
- Never a row whose wall time may still be corrected (untrusted, uncorrected, this boot: see
  ``Outbox.correct_wall_times``); such a row ends the prefix until trust arrives.
- Never while the drain runs, which holds rows in flight: the packer takes the drain's lock.

Every function here runs on the store thread; ``seal_next`` makes its own transaction, the others run in
the caller's.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

from fleetgate.sync.store.database import transaction
from fleetgate.sync.store.records import ROW_OVERHEAD, Eviction, Priority
from fleetgate.sync.store.wire import ENCODED_RECORD, FROM_RECORDS

SCAN_PAGE = 256

# A segment's payload from its rows (stream, [(row id, encoded record)]): (message bytes, compressed).
Pack = Callable[[str, list[tuple[int, bytes]]], tuple[bytes, bool]]


class Segment(NamedTuple):
    id: int
    stream: str
    device: str  # the device id its envelope carries
    records: int
    compressed: bool
    payload: bytes


@dataclass(frozen=True)
class Sealed:
    records: int
    rows_bytes: int  # what the rows held (quota accounting)
    segment_bytes: int  # what the segment holds instead


# Constant SQL; values are bound.
SCAN = (
    "SELECT o.id, o.seq, o.wall_ns, length(o.payload),"  # noqa: S608
    " (o.time_trusted OR o.time_corrected OR o.boot IS NOT (SELECT id FROM boots WHERE boot_id = ?)), "
    + ENCODED_RECORD
    + FROM_RECORDS
    + "WHERE o.stream_id = ? AND o.priority = ? ORDER BY o.id"
)


def seal_next(
    conn: sqlite3.Connection,
    boot_id: str,
    device: str,
    pack: Pack,
    max_bytes: int,
    skip: Collection[str] = (),
) -> Sealed | None:
    """Seal one full message of the first stream that has one (``pack`` builds it for ``device``); None
    when no stream has. Streams in ``skip`` hold sealed messages in the spool (spool.py), which a segment
    made now would be older than in the drain's order, though its rows are newer: they wait for the drain.

    Scanning and packing only read: the store thread is the database's one writer, so nothing changes the
    rows between the scan and the transaction that replaces them."""
    found = _first_full_prefix(conn, boot_id, max_bytes, skip)
    if found is None:
        return None
    stream_id, name, prefix = found
    payload, compressed = pack(name, prefix.rows)
    segment_bytes = len(payload) + ROW_OVERHEAD

    def replace(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO segments(stream_id, device, first_seq, last_seq, records, first_wall_ns, compressed,"
            " payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (stream_id, device, prefix.first_seq, prefix.last_seq, len(prefix.rows), prefix.first_wall_ns,
             int(compressed), payload),
        )  # fmt: skip
        # Exactly the rows scanned: this stream's telemetry rows are consecutive in that id range.
        conn.execute(
            "DELETE FROM outbox WHERE stream_id = ? AND priority = ? AND id BETWEEN ? AND ?",
            (stream_id, int(Priority.TELEMETRY), prefix.rows[0][0], prefix.rows[-1][0]),
        )
        conn.execute(
            "UPDATE streams SET bytes = bytes - ? + ? WHERE id = ?",
            (prefix.rows_bytes, segment_bytes, stream_id),
        )

    transaction(conn, replace)
    return Sealed(len(prefix.rows), prefix.rows_bytes, segment_bytes)


@dataclass
class _Prefix:
    rows: list[tuple[int, bytes]]  # (row id, encoded record)
    first_seq: int
    last_seq: int
    first_wall_ns: int
    rows_bytes: int


def _first_full_prefix(
    conn: sqlite3.Connection, boot_id: str, max_bytes: int, skip: Collection[str]
) -> tuple[int, str, _Prefix] | None:
    for stream_id, name in conn.execute("SELECT id, name FROM streams ORDER BY id").fetchall():
        if name in skip:
            continue
        prefix = _full_prefix(conn, stream_id, boot_id, max_bytes)
        if prefix is not None:
            return stream_id, name, prefix
    return None


def _full_prefix(conn: sqlite3.Connection, stream_id: int, boot_id: str, max_bytes: int) -> _Prefix | None:
    """The stream's oldest sealable telemetry rows that fill one message, or None if they do not (yet).

    The same fill rule as envelope.pack_encoded: records while they fit, one alone if it is bigger."""
    prefix: _Prefix | None = None
    size = 0
    cursor = conn.execute(SCAN, (boot_id, stream_id, int(Priority.TELEMETRY)))
    try:
        while page := cursor.fetchmany(SCAN_PAGE):
            for row_id, seq, wall_ns, payload_len, sealable, encoded in page:
                if not sealable:
                    return None
                if prefix is None:
                    prefix = _Prefix([], seq, seq, wall_ns, 0)
                elif size + len(encoded) + 1 > max_bytes:
                    return prefix
                prefix.rows.append((row_id, encoded))
                prefix.last_seq = seq
                prefix.rows_bytes += payload_len + ROW_OVERHEAD
                size += len(encoded) + 1
    finally:
        cursor.close()
    return None


# One row for a whole page: the sqlite3 module takes the GIL back after every row it steps, and with the
# event loop busy publishing, each row then waits for it (a page of 32 took ~5 ms instead of ~0.3 ms).
# Both aggregates see the page's rows in the same pass, so the lengths cut the joined payloads exactly.
SELECT_PAGE = (
    "SELECT json_group_array(json_array(id, name, device, records, compressed, length(payload))),"
    " CAST(group_concat(payload, '') AS BLOB) FROM (SELECT g.id, s.name, g.device, g.records, g.compressed,"
    " g.payload"
    " FROM segments g JOIN streams s ON s.id = g.stream_id WHERE g.id > ? ORDER BY g.id LIMIT ?)"
)


def select_after(conn: sqlite3.Connection, after_id: int, limit: int) -> list[Segment]:
    """Segments in drain order (oldest first) after segment ``after_id``."""
    meta, joined = conn.execute(SELECT_PAGE, (after_id, limit)).fetchone()
    out = []
    at = 0
    for seg_id, name, device, records, compressed, size in json.loads(meta):
        out.append(Segment(seg_id, name, device, records, bool(compressed), joined[at : at + size]))
        at += size
    if at != len(joined or b""):
        raise sqlite3.DatabaseError(f"segment page: {len(joined or b'')} bytes read for {at} expected")
    out.sort(key=lambda g: g.id)
    return out


def delete(conn: sqlite3.Connection, ids: list[int]) -> dict[int, tuple[int, int]]:
    """Delete acknowledged segments; returns, per stream id, (records, bytes) freed."""
    doomed = json.dumps(ids)
    freed = conn.execute(
        "SELECT stream_id, sum(records), sum(length(payload)) + count(*) * ? FROM segments"
        " WHERE id IN (SELECT value FROM json_each(?)) GROUP BY stream_id",
        (ROW_OVERHEAD, doomed),
    ).fetchall()
    _delete(conn, doomed)
    return {sid: (int(n), int(size)) for sid, n, size in freed}


def evict_oldest(conn: sqlite3.Connection, stream_id: int, held: int, quota: int, ev: Eviction) -> int:
    """Delete the stream's oldest segments while it is over ``quota``; returns the bytes it holds then.

    Segments are older than every row of their stream, so they go first."""
    while held > quota:
        oldest = conn.execute(
            "SELECT id, first_seq, last_seq, records, length(payload) FROM segments"
            " WHERE stream_id = ? ORDER BY id LIMIT 100",
            (stream_id,),
        ).fetchall()
        if not oldest:
            break
        doomed = []
        for seg_id, first_seq, last_seq, records, size in oldest:
            if held <= quota:
                break
            doomed.append(seg_id)
            held -= size + ROW_OVERHEAD
            ev.add(records, size + ROW_OVERHEAD, first_seq, last_seq)
        _delete(conn, json.dumps(doomed))
    return held


class SpilledMessage(NamedTuple):
    """Live records of one stream sealed at the moment they are spilled (``Outbox.seal_spills``)."""

    first_seq: int
    last_seq: int
    records: int
    first_wall_ns: int
    compressed: bool
    payload: bytes


def has_rows(conn: sqlite3.Connection, stream_id: int) -> bool:
    """Whether the stream has telemetry-priority rows: then a new segment would be newer than a row, and the
    rule that a stream's segments are older than its rows (eviction and drain order) says rows."""
    return (
        conn.execute(
            "SELECT 1 FROM outbox WHERE stream_id = ? AND priority = ? LIMIT 1",
            (stream_id, int(Priority.TELEMETRY)),
        ).fetchone()
        is not None
    )


def _delete(conn: sqlite3.Connection, ids_json: str) -> None:
    conn.execute("DELETE FROM segments WHERE id IN (SELECT value FROM json_each(?))", (ids_json,))
