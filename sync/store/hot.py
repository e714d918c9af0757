"""The outbox's hot tier: live telemetry kept in memory until the broker acknowledges it.

Online, a reading is published within the live batching window and acknowledged within milliseconds, so
writing it to SQLite (a WAL frame of 4 KiB or more per commit, the delete after the acknowledgement, the
checkpoint: ~7 KB of flash per reading at a vehicle's rate, tools/bench/footprint.py) buys nothing. Readings of
the hot stream therefore get their sequence number here and stay in memory; the drain publishes them from
memory and forgets them on PUBACK. One that is not acknowledged within ``window_s`` of being taken (the link
is down, slow or gone quiet) is *spilled*: written to the outbox like any other record, in one transaction
with the others that are due, and drained from there as backlog (what AWS IoT FleetWise Edge does).

The cost is the durability bound: a kill -9 or power cut loses the readings of the last ``window_s`` (plus
the sink's flush interval) that the broker had not acknowledged; nothing acknowledged to anyone. Sequence
numbers are reserved on disk in blocks before they are handed out, so a crash never makes the gateway reuse
a number the broker may already have: the next start skips to the end of the reservation and reports the
skipped range (``Outbox.enable_hot``), so a consumer can tell that gap from a transport loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleetgate.sync.store.records import NewRecord, Priority
from fleetgate.sync.store.wire import EncodedRow

SEQ_BLOCK = 4096  # numbers reserved per commit: one small commit every ~10 min at a vehicle's rate
ID_SPACE = 16  # tiers at most; a hot record's id in the drain's space is -(seq * ID_SPACE + tier index)


def hot_id(index: int, seq: int) -> int:
    return -(seq * ID_SPACE + index)


def split_hot_id(record_id: int) -> tuple[int, int]:
    """(tier index, seq) of a negative id."""
    seq, index = divmod(-record_id, ID_SPACE)
    return index, seq


@dataclass(slots=True)
class HotRecord:
    seq: int
    wall_ns: int
    mono_ns: int
    trusted: bool
    corrected: bool
    payload: bytes
    taken: float  # time.monotonic() when it entered the tier
    in_flight: bool = False
    sent: float = 0.0  # time.monotonic() when it last went into flight
    spilling: bool = False  # being written to the outbox now: not to be sent meanwhile
    spilled: bool = False  # written to the outbox while in flight: its acknowledgement deletes that row


@dataclass(frozen=True)
class SkippedSeqs:
    """Numbers reserved by an earlier run that did not stop cleanly: some may have reached the broker, the
    rest were lost with the readings in memory; none will be used again."""

    stream: str
    first: int
    last: int


class HotTier:
    """Records of one stream in memory, in seq order (their ids in the drain's space: ``hot_id``)."""

    def __init__(
        self,
        stream: str,
        boot_id: str,
        window_s: float,
        max_records: int,
        index: int = 0,
        offline_window_s: float = 0.0,
    ) -> None:
        if not 0 <= index < ID_SPACE:
            raise ValueError(f"a hot tier's index is 0..{ID_SPACE - 1}")
        self.stream = stream
        self.index = index
        self.window_s = window_s
        # With no link there is nothing to wait for: records are held longer and stored in fewer, larger
        # commits (each costs whole pages of WAL whatever it holds). Never shorter than the online window.
        self.offline_window_s = max(window_s, offline_window_s)
        self.max_records = max_records
        self.boot_id = boot_id
        self._boot = json.dumps(boot_id)
        self.records: dict[int, HotRecord] = {}  # by seq, in order
        self.next_seq = 1
        self.reserved = 0
        self.counters = {"taken": 0, "acknowledged": 0, "spilled": 0}

    def held(self) -> int:
        """Records only here (not also in the store). (Not ``__len__``: an empty tier must not be falsy.)"""
        return sum(1 for r in self.records.values() if not r.spilled)

    def add(self, records: Sequence[NewRecord]) -> None:
        """Keep ``records`` (already numbered up to ``reserved`` by the caller's reservation)."""
        now = time.monotonic()
        seq = self.next_seq
        assert seq + len(records) - 1 <= self.reserved, "sequence numbers handed out beyond the reservation"
        for _stream, _priority, (wall_ns, mono_ns, trusted), payload in records:
            self.records[seq] = HotRecord(seq, wall_ns, mono_ns, trusted, False, payload, now)
            seq += 1
        self.next_seq = seq
        self.counters["taken"] += len(records)

    def waiting(self) -> list[HotRecord]:
        return [r for r in self.records.values() if not r.in_flight]  # a spilled one is always in flight

    def due_in(self, batch_s: float, batch_max: int) -> float | None:
        """Seconds until the records not in flight should be published (0: now), None if there are none.
        (Asked on every turn of the drain: it looks no further than the first record waiting, unless a full
        batch may be held.)"""
        first = next((r for r in self.records.values() if not (r.in_flight or r.spilling)), None)
        if first is None:
            return None
        if len(self.records) >= batch_max and len(self.waiting()) >= batch_max:
            return 0.0
        return max(0.0, first.taken + batch_s - time.monotonic())

    def take_records(self, limit: int) -> list[HotRecord]:
        """Up to ``limit`` records not in flight, oldest first, marked in flight."""
        out: list[HotRecord] = []
        now = time.monotonic()
        for record in self.records.values():
            if record.in_flight or record.spilling:
                continue
            record.in_flight = True
            record.sent = now
            out.append(record)
            if len(out) >= limit:
                break
        return out

    def take(self, limit: int) -> list[EncodedRow]:
        """As ``take_records``, each encoded as the store encodes a row (envelope version 1)."""
        prio = int(Priority.TELEMETRY)
        return [
            (hot_id(self.index, r.seq), self.stream, prio, self.encode(r)) for r in self.take_records(limit)
        ]

    def encode(self, r: HotRecord) -> bytes:
        """The record as ``wire.ENCODED_RECORD`` encodes a row: byte for byte (tests/test_hot_tier.py)."""
        seconds = r.wall_ns // 1_000_000_000
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return (
            (
                f'{{"seq":{r.seq},"ts":"{ts}.{r.wall_ns // 1_000_000 % 1000:03d}Z","wall_ns":{r.wall_ns},'
                f'"mono_ns":{r.mono_ns},"boot":{self._boot},"trusted":{"true" if r.trusted else "false"},'
                f'"corrected":{"true" if r.corrected else "false"},"data":'
            ).encode()
            + r.payload
            + b"}"
        )

    def acknowledged(self, seqs: Iterable[int]) -> list[int]:
        """Forget what the broker acknowledged; returns the seqs that were spilled meanwhile (their rows are
        the caller's to delete)."""
        in_store = []
        for seq in seqs:
            record = self.records.pop(seq, None)
            if record is not None:
                self.counters["acknowledged"] += 1
                if record.spilled:
                    in_store.append(seq)
        return in_store

    def release(self, seqs: Iterable[int]) -> None:
        """Back from flight unacknowledged (the drain stopped): to be sent again, or spilled. One spilled
        while in flight is the store's alone from now on."""
        for seq in seqs:
            record = self.records.get(seq)
            if record is None:
                continue
            if record.spilled:
                del self.records[seq]
            else:
                record.in_flight = False

    def spillable(
        self, everything: bool = False, offline: bool = False, along: bool = False
    ) -> list[HotRecord]:
        """Once a record waiting to be sent is older than the window, or one in flight has waited that long
        for its acknowledgement (a link gone quiet must not stretch the durability bound), or more than
        ``max_records`` are held: every record held that is not in flight, and the in-flight ones that hang.
        While the link is down that makes one commit per window, not one per reading batch (each commit
        costs whole 4 KiB pages of WAL, then again at the checkpoint). Those in flight normally are left to
        their acknowledgement: stored too, they would go out twice. ``offline`` (the uplink is not connected):
        the window is ``offline_window_s``. ``along``: another stream spills now, and the commit costs the same
        with these: every record waiting to be sent."""
        held = [r for r in self.records.values() if not r.spilled]
        if everything or not held:
            return held
        if along:
            return [r for r in held if not r.in_flight]
        limit = time.monotonic() - (self.offline_window_s if offline else self.window_s)
        waiting = [r for r in held if not r.in_flight]
        hung = [r for r in held if r.in_flight and r.sent <= limit]
        if hung or (waiting and waiting[0].taken <= limit) or len(self.records) > self.max_records:
            return [r for r in held if not r.in_flight or r.sent <= limit]
        return []

    def spilled_now(self, records: Iterable[HotRecord]) -> None:
        """``records`` are committed to the outbox: forget them, or (in flight) remember their row exists."""
        for record in records:
            if record.seq not in self.records:
                continue
            self.counters["spilled"] += 1
            if record.in_flight:
                record.spilled = True
            else:
                del self.records[record.seq]

    def correct(self, offset_ns: int, before_mono_ns: int) -> int:
        """As ``Outbox.correct_wall_times`` does for rows: untrusted records taken before the clock became
        trusted get ``wall_ns = mono_ns + offset_ns``."""
        n = 0
        for record in self.records.values():
            if not record.trusted and not record.corrected and record.mono_ns < before_mono_ns:
                record.wall_ns = record.mono_ns + offset_ns
                record.corrected = True
                n += 1
        return n

    def oldest_wall_ns(self) -> int | None:
        first = next(iter(self.records.values()), None)
        return None if first is None else first.wall_ns

    def snapshot(self) -> dict[str, int | float]:
        return {
            "held": sum(1 for r in self.records.values() if not r.spilled),
            "in_flight": sum(1 for r in self.records.values() if r.in_flight),
            "window_s": self.window_s,
            "offline_window_s": self.offline_window_s,
            **self.counters,
        }
