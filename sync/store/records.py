"""The shapes that go into and come out of the outbox."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

ROW_OVERHEAD = 64  # bytes a row costs beyond its payload (integers, index entries), for quota accounting


class Priority(IntEnum):
    """Lower drains first. Audit and session records are never evicted; telemetry may be."""

    AUDIT = 0
    EVENT = 1
    TELEMETRY = 2


class Stamp(NamedTuple):
    """When a record was taken: wall clock, boot-relative monotonic clock, and whether wall time was trusted."""

    wall_ns: int
    mono_ns: int
    trusted: bool


class NewRecord(NamedTuple):
    """A record to append. (NamedTuples, not dataclasses: these are made per reading on the hot path.)"""

    stream: str
    priority: Priority
    stamp: Stamp
    payload: bytes  # JSON, UTF-8

    @classmethod
    def json(cls, stream: str, priority: Priority, stamp: Stamp, body: Any) -> NewRecord:
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return cls(stream, priority, stamp, payload.encode())


class Appended(NamedTuple):
    """A record made durable: its idempotent id is (device, stream, seq)."""

    stream: str
    seq: int


@dataclass(frozen=True, slots=True)
class StoredRecord:
    id: int  # row id, for acknowledge; not stable across databases
    stream: str
    seq: int
    priority: Priority
    wall_ns: int
    mono_ns: int
    boot_id: str
    time_trusted: bool
    time_corrected: bool  # wall_ns was recomputed from mono_ns once the clock became trusted
    payload: bytes


@dataclass
class Eviction:
    """Telemetry records of one stream deleted unsent to keep it under its quota."""

    records: int = 0
    bytes: int = 0
    first_seq: int | None = None
    last_seq: int | None = None

    def add(self, records: int, size: int, first_seq: int | None, last_seq: int | None) -> None:
        self.records += records
        self.bytes += size
        self.first_seq = first_seq if self.first_seq is None else self.first_seq
        self.last_seq = last_seq if last_seq is not None else self.last_seq
